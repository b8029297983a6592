"""Attention with rotary embeddings applied inside the kernels, as q and k tiles are loaded.

The kernels of ``attention.py`` (same layouts, key mask, window, dropout stream, LSE, block sizes and
autotune spaces), with every q and k tile held as its two halves (x1 = x[:, :d/2], x2 = x[:, d/2:], loaded
straight from memory) and rotated in registers (transformers' ModernBERT layout):

    r1 = x1·cos - x2·sin,   r2 = x2·cos + x1·sin      (cos, sin at the token's position, per pair)
    Q·Kᵀ = R1q·R1kᵀ + R2q·R2kᵀ                          (two d/2-deep products instead of one d-deep)

No rotated copy of q or k is written to memory. The backward accumulates dQ and dK in the rotated frame
(two half accumulators each) and rotates them back once per program before the store:

    dx1 = g1·cos + g2·sin,   dx2 = g2·cos - g1·sin      (the transpose of the rotation)

Positions are the in-sequence row indices the kernels already use (padded: the row; packed: the offset
in the document, so they restart at every cu_seqlens boundary). cos and sin come from a (max_seqlen, d/2)
fp32 table (``rotary._cos_sin_table``: transformers' fp32 values), read per tile from L2.
The dK/dV kernel never fuses dQ here (the short-sequence fused backward of attention.py is not built
for rotary): dK/dV and dQ are always two kernels.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from ._dispatch import HAS_TRITON
from ._triton_utils import device_guard, dropout_scale, dropout_threshold

# By module path: the package re-exports a function named ``attention``.
_attn = importlib.import_module(f"{__package__}.attention")

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._autotune import autotune
    from ._triton_utils import cast_rne, dot, mma
    from .attention import (_NO_SPECIALIZE, _TUNE_KEY, _keep_mask, _load_lse2, _load_tile, _prune,
                            _sequence_bounds, _window_span)


if HAS_TRITON:

    @triton.jit
    def _rot_load(ptrs, rows, n_rows, pos_ok, COS, SIN, pos, j, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BOUNDARY: tl.constexpr, D_FIRST: tl.constexpr):
        """The two rotated halves of a q/k tile, (rows, BLOCK_H) each, or with D_FIRST (BLOCK_H, rows)."""
        j_ok = j < HALF
        x1 = _load_tile(ptrs, rows, n_rows, j_ok, HALF, BLOCK_H, BOUNDARY, D_FIRST).to(tl.float32)
        x2 = _load_tile(ptrs + HALF, rows, n_rows, j_ok, HALF, BLOCK_H, BOUNDARY, D_FIRST).to(tl.float32)
        if D_FIRST:
            table = pos[None, :] * HALF + j[:, None]
            ok = pos_ok[None, :] & j_ok[:, None]
        else:
            table = pos[:, None] * HALF + j[None, :]
            ok = pos_ok[:, None] & j_ok[None, :]
        c = tl.load(COS + table, mask=ok, other=0.0)
        s = tl.load(SIN + table, mask=ok, other=0.0)
        dtype = ptrs.dtype.element_ty
        return cast_rne(x1 * c - x2 * s, dtype), cast_rne(x2 * c + x1 * s, dtype)

    @triton.jit
    def _unrotate(g1, g2, COS, SIN, pos, pos_ok, j, HALF: tl.constexpr):
        """(g1·cos + g2·sin, g2·cos - g1·sin) for (rows, BLOCK_H) fp32 gradients at positions ``pos``."""
        table = pos[:, None] * HALF + j[None, :]
        ok = pos_ok[:, None] & (j < HALF)[None, :]
        c = tl.load(COS + table, mask=ok, other=0.0)
        s = tl.load(SIN + table, mask=ok, other=0.0)
        return g1 * c + g2 * s, g2 * c - g1 * s

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q1, q2, k_ptrs, v_ptrs, kpm_ptr, COS, SIN, lo, hi, live_k,
                   offs_m, offs_n, offs_d, offs_h, stride_kn, stride_vn,
                   qk_scale, drop_threshold, seed, rng_base, rng_stride_m, window,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr):
        d_ok = offs_d < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            k1, k2 = _rot_load(k_ptrs + start_n * stride_kn, cols, live_k, cols < live_k, COS, SIN, cols, offs_h,
                               HALF, BLOCK_H, BOUNDARY, False)
            v = _load_tile(v_ptrs + start_n * stride_vn, cols, live_k, d_ok, HEAD_DIM, BLOCK_D, BOUNDARY, False)
            qk = mma(q2, tl.trans(k2), dot(q1, tl.trans(k1), DOT_PRECISION), DOT_PRECISION)
            if HAS_KPM:
                key_ok = tl.load(kpm_ptr + cols, mask=cols < live_k, other=0) != 0
                qk = tl.where(key_ok[None, :], qk, float("-inf"))
            elif BOUNDARY:
                qk = tl.where((cols < live_k)[None, :], qk, float("-inf"))
            if WINDOW:
                qk = tl.where(tl.abs(offs_m[:, None] - cols[None, :]) <= window, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            if HAS_KPM or WINDOW:
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: exp2(-inf) = 0, not NaN
            else:
                m_sub = m_new
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if DROPOUT:
                keep = _keep_mask(seed, rng_base, offs_m, start_n, rng_stride_m, drop_threshold, BLOCK_N)
                p = tl.where(keep, p, 0.0)
            acc = mma(cast_rne(p, v.dtype), v, acc, DOT_PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _fwd_jit(
        Q, K, V, Out, LSE, CU_SEQLENS, KV_LEN, KPM, COS, SIN,
        stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
        stride_ob, stride_om, stride_oh, stride_lb, stride_lh, stride_kpmb,
        n_heads, seqlen_q, seqlen_k, qk_scale, drop_threshold, keep_scale, seed, rng_offset, rng_stride_m,
        rng_stride_bh, window,
        SEQ_BUCKET,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
        IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
    ):
        tl.static_assert(BLOCK_M >= 16)
        tl.static_assert(BLOCK_N >= 16)
        tl.static_assert(BLOCK_H >= 16)
        start_m = tl.program_id(0) * BLOCK_M
        off_h = tl.program_id(1)
        off_b = tl.program_id(2)
        seq_start, rows_q, rows_k, live_k = _sequence_bounds(
            CU_SEQLENS, KV_LEN, off_b, seqlen_q, seqlen_k, IS_VARLEN, HAS_KPM)
        if start_m >= rows_q:
            return
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_h = tl.arange(0, BLOCK_H)
        d_ok = offs_d < HEAD_DIM
        row_ok = offs_m < rows_q
        b64 = off_b.to(tl.int64)
        h64 = off_h.to(tl.int64)
        q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + (seq_start + offs_m[:, None]) * stride_qm + offs_h[None, :]
        k_ptrs = K + b64 * stride_kb + h64 * stride_kh + (seq_start + offs_n[:, None]) * stride_kn + offs_h[None, :]
        v_ptrs = (V + b64 * stride_vb + h64 * stride_vh + (seq_start + offs_n[:, None]) * stride_vn
                  + offs_d[None, :])
        kpm_ptr = KPM + b64 * stride_kpmb
        rng_base = (b64 * n_heads + h64) * rng_stride_bh + rng_offset

        q1, q2 = _rot_load(q_ptrs, offs_m, rows_q, row_ok, COS, SIN, offs_m, offs_h, HALF, BLOCK_H, True, False)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if WINDOW:
            lo, full_end, hi = _window_span(start_m, window, live_k, live_k, BLOCK_N, BLOCK_M)
        else:
            lo = 0
            full_end = (live_k // BLOCK_N) * BLOCK_N
            hi = live_k
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q1, q2, k_ptrs, v_ptrs, kpm_ptr, COS, SIN, lo, full_end, live_k, offs_m, offs_n, offs_d,
            offs_h, stride_kn, stride_vn, qk_scale, drop_threshold, seed, rng_base, rng_stride_m, window,
            HALF, BLOCK_H, HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_KPM, DROPOUT, DOT_PRECISION, WINDOW)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q1, q2, k_ptrs, v_ptrs, kpm_ptr, COS, SIN, full_end, hi, live_k, offs_m, offs_n, offs_d,
            offs_h, stride_kn, stride_vn, qk_scale, drop_threshold, seed, rng_base, rng_stride_m, window,
            HALF, BLOCK_H, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_KPM, DROPOUT, DOT_PRECISION, WINDOW)

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        inv_l = 1.0 / l_safe
        if DROPOUT:
            inv_l = inv_l * keep_scale
        out = acc * inv_l[:, None]
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        o_ptrs = (Out + b64 * stride_ob + h64 * stride_oh + (seq_start + offs_m[:, None]) * stride_om
                  + offs_d[None, :])
        tl.store(o_ptrs, cast_rne(out, Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + b64 * stride_lb + h64 * stride_lh + seq_start + offs_m, lse, mask=row_ok)

    @triton.jit
    def _dkdv_inner(dk1, dk2, dv, k1, k2, v, key_ok, q_ptrs, do_ptrs, lse_ptr, delta_ptr, COS, SIN, lo, hi, rows_q,
                    start_n, offs_m, offs_n, offs_d, offs_h, stride_qm, stride_dom,
                    qk_scale, drop_threshold, keep_scale, seed, rng_base, rng_stride_m, window,
                    HALF: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, HAS_KPM: tl.constexpr,
                    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr):
        d_ok = offs_d < HEAD_DIM
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            # Qᵀ halves, rotated, (BLOCK_H, BLOCK_M).
            q1T, q2T = _rot_load(q_ptrs + start_m * stride_qm, rows, rows_q, rows < rows_q, COS, SIN, rows, offs_h,
                                 HALF, BLOCK_H, BOUNDARY, True)
            do = _load_tile(do_ptrs + start_m * stride_dom, rows, rows_q, d_ok, HEAD_DIM, BLOCK_D, BOUNDARY, False)
            lse2 = _load_lse2(lse_ptr, rows, rows_q)
            delta = tl.load(delta_ptr + rows, mask=rows < rows_q, other=0.0)
            qkT = mma(k2, q2T, dot(k1, q1T, DOT_PRECISION), DOT_PRECISION)
            pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
            if HAS_KPM:
                pT = tl.where(key_ok[:, None], pT, 0.0)
            if WINDOW:
                pT = tl.where(tl.abs(offs_n[:, None] - rows[None, :]) <= window, pT, 0.0)
            dpT = dot(v, tl.trans(do), DOT_PRECISION)
            if DROPOUT:
                keep = tl.trans(_keep_mask(seed, rng_base, rows, start_n, rng_stride_m, drop_threshold, BLOCK_N))
                pT_drop = tl.where(keep, pT * keep_scale, 0.0)
                dpT = tl.where(keep, dpT * keep_scale, 0.0)
            else:
                pT_drop = pT
            dv = mma(cast_rne(pT_drop, do.dtype), do, dv, DOT_PRECISION)
            dsT = cast_rne(pT * (dpT - delta[None, :]), q1T.dtype)
            dk1 = mma(dsT, tl.trans(q1T), dk1, DOT_PRECISION)
            dk2 = mma(dsT, tl.trans(q2T), dk2, DOT_PRECISION)
        return dk1, dk2, dv

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _dkdv_jit(
        Q, K, V, DO, LSE, Delta, DK, DV, CU_SEQLENS, KV_LEN, KPM, COS, SIN,
        stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
        stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
        stride_lb, stride_lh, stride_kpmb,
        n_heads, seqlen_q, seqlen_k, sm_scale, qk_scale, drop_threshold, keep_scale, seed, rng_offset, rng_stride_m,
        rng_stride_bh, window,
        SEQ_BUCKET,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
        IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
    ):
        """dK (unrotated), dV of one key block."""
        tl.static_assert(BLOCK_M >= 16)
        tl.static_assert(BLOCK_N >= 16)
        tl.static_assert(BLOCK_H >= 16)
        start_n = tl.program_id(0) * BLOCK_N
        off_h = tl.program_id(1)
        off_b = tl.program_id(2)
        seq_start, rows_q, rows_k, live_k = _sequence_bounds(
            CU_SEQLENS, KV_LEN, off_b, seqlen_q, seqlen_k, IS_VARLEN, HAS_KPM)
        if start_n >= rows_k:
            return
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_h = tl.arange(0, BLOCK_H)
        d_ok = offs_d < HEAD_DIM
        n_ok = offs_n < rows_k
        b64 = off_b.to(tl.int64)
        h64 = off_h.to(tl.int64)
        kv_rows = seq_start + offs_n[:, None]
        k1, k2 = _rot_load(K + b64 * stride_kb + h64 * stride_kh + kv_rows * stride_kn + offs_h[None, :], offs_n,
                           rows_k, n_ok, COS, SIN, offs_n, offs_h, HALF, BLOCK_H, True, False)
        v = tl.load(V + b64 * stride_vb + h64 * stride_vh + kv_rows * stride_vn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if HAS_KPM:
            key_ok = tl.load(KPM + b64 * stride_kpmb + offs_n, mask=n_ok, other=0) != 0
        else:
            key_ok = n_ok
        q_rows = seq_start + offs_m
        q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + q_rows[None, :] * stride_qm + offs_h[:, None]  # Qᵀ halves
        do_ptrs = DO + b64 * stride_dob + h64 * stride_doh + q_rows[:, None] * stride_dom + offs_d[None, :]
        lse_ptr = LSE + b64 * stride_lb + h64 * stride_lh + seq_start
        delta_ptr = Delta + b64 * stride_lb + h64 * stride_lh + seq_start
        rng_base = (b64 * n_heads + h64) * rng_stride_bh + rng_offset

        dk1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        dk2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        q_hi = tl.where(start_n < live_k, rows_q, 0)
        if WINDOW:
            q_lo, full_end, q_hi = _window_span(start_n, window, q_hi, rows_q, BLOCK_M, BLOCK_N)
        else:
            q_lo = 0
            full_end = (q_hi // BLOCK_M) * BLOCK_M
        dk1, dk2, dv = _dkdv_inner(
            dk1, dk2, dv, k1, k2, v, key_ok, q_ptrs, do_ptrs, lse_ptr, delta_ptr, COS, SIN, q_lo, full_end, rows_q,
            start_n, offs_m, offs_n, offs_d, offs_h, stride_qm, stride_dom, qk_scale, drop_threshold, keep_scale,
            seed, rng_base, rng_stride_m, window, HALF, BLOCK_H, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False,
            HAS_KPM, DROPOUT, DOT_PRECISION, WINDOW)
        dk1, dk2, dv = _dkdv_inner(
            dk1, dk2, dv, k1, k2, v, key_ok, q_ptrs, do_ptrs, lse_ptr, delta_ptr, COS, SIN, full_end, q_hi, rows_q,
            start_n, offs_m, offs_n, offs_d, offs_h, stride_qm, stride_dom, qk_scale, drop_threshold, keep_scale,
            seed, rng_base, rng_stride_m, window, HALF, BLOCK_H, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True,
            HAS_KPM, DROPOUT, DOT_PRECISION, WINDOW)
        dk1, dk2 = _unrotate(dk1 * sm_scale, dk2 * sm_scale, COS, SIN, offs_n, n_ok, offs_h, HALF)
        h_mask = n_ok[:, None] & (offs_h < HALF)[None, :]
        dk_ptrs = DK + b64 * stride_dkb + h64 * stride_dkh + kv_rows * stride_dkn + offs_h[None, :]
        tl.store(dk_ptrs, cast_rne(dk1, DK.dtype.element_ty), mask=h_mask)
        tl.store(dk_ptrs + HALF, cast_rne(dk2, DK.dtype.element_ty), mask=h_mask)
        tl.store(DV + b64 * stride_dvb + h64 * stride_dvh + kv_rows * stride_dvn + offs_d[None, :],
                 cast_rne(dv, DV.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _dq_inner(dq1, dq2, q1, q2, do, lse2, delta, k_ptrs, v_ptrs, kpm_ptr, COS, SIN, lo, hi, live_k,
                  offs_m, offs_n, offs_d, offs_h, stride_kn, stride_vn,
                  qk_scale, drop_threshold, keep_scale, seed, rng_base, rng_stride_m, window,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr):
        d_ok = offs_d < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            k1T, k2T = _rot_load(k_ptrs + start_n * stride_kn, cols, live_k, cols < live_k, COS, SIN, cols, offs_h,
                                 HALF, BLOCK_H, BOUNDARY, True)
            vT = _load_tile(v_ptrs + start_n * stride_vn, cols, live_k, d_ok, HEAD_DIM, BLOCK_D, BOUNDARY, True)
            qk = mma(q2, k2T, dot(q1, k1T, DOT_PRECISION), DOT_PRECISION)
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
            if HAS_KPM:
                key_ok = tl.load(kpm_ptr + cols, mask=cols < live_k, other=0) != 0
                p = tl.where(key_ok[None, :], p, 0.0)
            elif BOUNDARY:
                p = tl.where((cols < live_k)[None, :], p, 0.0)
            if WINDOW:
                p = tl.where(tl.abs(offs_m[:, None] - cols[None, :]) <= window, p, 0.0)
            dp = dot(do, vT, DOT_PRECISION)
            if DROPOUT:
                keep = _keep_mask(seed, rng_base, offs_m, start_n, rng_stride_m, drop_threshold, BLOCK_N)
                dp = tl.where(keep, dp * keep_scale, 0.0)
            ds = cast_rne(p * (dp - delta[:, None]), k1T.dtype)
            dq1 = mma(ds, tl.trans(k1T), dq1, DOT_PRECISION)
            dq2 = mma(ds, tl.trans(k2T), dq2, DOT_PRECISION)
        return dq1, dq2

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _dq_jit(
        Q, K, V, DO, LSE, Delta, DQ, CU_SEQLENS, KV_LEN, KPM, COS, SIN,
        stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
        stride_dob, stride_dom, stride_doh, stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh, stride_kpmb,
        n_heads, seqlen_q, seqlen_k, sm_scale, qk_scale, drop_threshold, keep_scale, seed, rng_offset, rng_stride_m,
        rng_stride_bh, window,
        SEQ_BUCKET,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
        IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
    ):
        tl.static_assert(BLOCK_M >= 16)
        tl.static_assert(BLOCK_N >= 16)
        tl.static_assert(BLOCK_H >= 16)
        start_m = tl.program_id(0) * BLOCK_M
        off_h = tl.program_id(1)
        off_b = tl.program_id(2)
        seq_start, rows_q, rows_k, live_k = _sequence_bounds(
            CU_SEQLENS, KV_LEN, off_b, seqlen_q, seqlen_k, IS_VARLEN, HAS_KPM)
        if start_m >= rows_q:
            return
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_h = tl.arange(0, BLOCK_H)
        d_ok = offs_d < HEAD_DIM
        row_ok = offs_m < rows_q
        b64 = off_b.to(tl.int64)
        h64 = off_h.to(tl.int64)
        rows = seq_start + offs_m[:, None]
        q1, q2 = _rot_load(Q + b64 * stride_qb + h64 * stride_qh + rows * stride_qm + offs_h[None, :], offs_m, rows_q,
                           row_ok, COS, SIN, offs_m, offs_h, HALF, BLOCK_H, True, False)
        do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + rows * stride_dom + offs_d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse2 = _load_lse2(LSE + b64 * stride_lb + h64 * stride_lh + seq_start, offs_m, rows_q)
        delta = tl.load(Delta + b64 * stride_lb + h64 * stride_lh + seq_start + offs_m, mask=row_ok, other=0.0)
        k_ptrs = K + b64 * stride_kb + h64 * stride_kh + (seq_start + offs_n[None, :]) * stride_kn + offs_h[:, None]
        v_ptrs = V + b64 * stride_vb + h64 * stride_vh + (seq_start + offs_n[None, :]) * stride_vn + offs_d[:, None]
        kpm_ptr = KPM + b64 * stride_kpmb
        rng_base = (b64 * n_heads + h64) * rng_stride_bh + rng_offset

        dq1 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        dq2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        if WINDOW:
            lo, full_end, hi = _window_span(start_m, window, live_k, live_k, BLOCK_N, BLOCK_M)
        else:
            lo = 0
            full_end = (live_k // BLOCK_N) * BLOCK_N
            hi = live_k
        dq1, dq2 = _dq_inner(
            dq1, dq2, q1, q2, do, lse2, delta, k_ptrs, v_ptrs, kpm_ptr, COS, SIN, lo, full_end, live_k,
            offs_m, offs_n, offs_d, offs_h, stride_kn, stride_vn, qk_scale, drop_threshold, keep_scale, seed,
            rng_base, rng_stride_m, window, HALF, BLOCK_H, HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_KPM, DROPOUT,
            DOT_PRECISION, WINDOW)
        dq1, dq2 = _dq_inner(
            dq1, dq2, q1, q2, do, lse2, delta, k_ptrs, v_ptrs, kpm_ptr, COS, SIN, full_end, hi, live_k,
            offs_m, offs_n, offs_d, offs_h, stride_kn, stride_vn, qk_scale, drop_threshold, keep_scale, seed,
            rng_base, rng_stride_m, window, HALF, BLOCK_H, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_KPM, DROPOUT,
            DOT_PRECISION, WINDOW)
        dq1, dq2 = _unrotate(dq1 * sm_scale, dq2 * sm_scale, COS, SIN, offs_m, row_ok, offs_h, HALF)
        h_mask = row_ok[:, None] & (offs_h < HALF)[None, :]
        dq_ptrs = DQ + b64 * stride_dqb + h64 * stride_dqh + rows * stride_dqm + offs_h[None, :]
        tl.store(dq_ptrs, cast_rne(dq1, DQ.dtype.element_ty), mask=h_mask)
        tl.store(dq_ptrs + HALF, cast_rne(dq2, DQ.dtype.element_ty), mask=h_mask)

    _fwd_kernel = autotune(configs=_attn._FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_prune("M"))(_fwd_jit)
    _dkdv_kernel = autotune(configs=_attn._DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by=_prune("N"))(_dkdv_jit)
    _dq_kernel = autotune(configs=_attn._DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by=_prune("M"))(_dq_jit)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _half_blocks(head_dim: int) -> tuple[int, int]:
    half = head_dim // 2
    return half, max(16, triton.next_power_of_2(half))


def forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed, rng_offset, window,
            cos, sin):
    """As ``attention.attention_forward`` with q, k rotated in the kernel (cos/sin: (positions, d/2) fp32)."""
    q, k, v = (_attn._last_dim_contiguous(t) for t in (q, k, v))
    layout = _attn._Layout(q, k, cu_seqlens, max_seqlen)
    out = _attn._alloc(q.shape, q)
    lse = _attn._alloc(layout.lse_shape, q, torch.float32)
    if q.numel() == 0 or k.numel() == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    kpm, kv_len, stride_kpmb = _attn._key_padding_args(key_padding_mask, layout, q.device)
    cu = cu_seqlens if cu_seqlens is not None else kv_len
    scale = _attn._scale(softmax_scale, layout.head_dim)
    rng_stride_m = _attn._rng_stride_m(layout.seqlen_k)
    half, block_h = _half_blocks(layout.head_dim)

    def grid(meta):
        return (triton.cdiv(layout.seqlen_q, meta["BLOCK_M"]), layout.heads, layout.batch)

    _fwd_kernel[grid](
        q, k, v, out, lse, cu, kv_len, kpm, cos, sin,
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(out),
        *layout.lse_strides(lse), stride_kpmb,
        layout.heads, layout.seqlen_q, layout.seqlen_k, scale * _attn.LOG2E, dropout_threshold(dropout_p),
        dropout_scale(dropout_p), int(seed), int(rng_offset), rng_stride_m, layout.seqlen_q * rng_stride_m,
        _attn._window_arg(window), layout.seq_bucket,
        HEAD_DIM=layout.head_dim, BLOCK_D=layout.block_d, HALF=half, BLOCK_H=block_h,
        IS_VARLEN=layout.is_varlen, HAS_KPM=key_padding_mask is not None, DROPOUT=dropout_p > 0.0,
        DOT_PRECISION=_attn._dot_precision(q.dtype), WINDOW=_attn._has_window(window),
    )
    return out, lse


def backward(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, seed,
             rng_offset, window, cos, sin):
    """(dq, dk, dv) for the unrotated q, k."""
    q, k, v, out, dout = (_attn._last_dim_contiguous(t) for t in (q, k, v, out, dout))
    layout = _attn._Layout(q, k, cu_seqlens, max_seqlen)
    dq, dk, dv = _attn._alloc(q.shape, q), _attn._alloc(k.shape, k), _attn._alloc(v.shape, v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = _attn._alloc(layout.lse_shape, q, torch.float32)
    kpm, kv_len, stride_kpmb = _attn._key_padding_args(key_padding_mask, layout, q.device)
    cu = cu_seqlens if cu_seqlens is not None else kv_len
    scale = _attn._scale(softmax_scale, layout.head_dim)
    common = dict(HEAD_DIM=layout.head_dim, BLOCK_D=layout.block_d, IS_VARLEN=layout.is_varlen)
    pre_block = 64
    _attn._attn_bwd_preprocess_kernel[(triton.cdiv(layout.seqlen_q, pre_block), layout.heads, layout.batch)](
        out, dout, delta, cu, *layout.strides(out), *layout.strides(dout), *layout.lse_strides(delta),
        layout.seqlen_q, BLOCK_M=pre_block, num_warps=4, **common,
    )
    rng_stride_m = _attn._rng_stride_m(layout.seqlen_k)
    scalars = (layout.heads, layout.seqlen_q, layout.seqlen_k, scale, scale * _attn.LOG2E,
               dropout_threshold(dropout_p), dropout_scale(dropout_p), int(seed), int(rng_offset), rng_stride_m,
               layout.seqlen_q * rng_stride_m, _attn._window_arg(window), layout.seq_bucket)
    half, block_h = _half_blocks(layout.head_dim)
    flags = dict(common, HALF=half, BLOCK_H=block_h, HAS_KPM=key_padding_mask is not None, DROPOUT=dropout_p > 0.0,
                 DOT_PRECISION=_attn._dot_precision(q.dtype), WINDOW=_attn._has_window(window))

    def grid_k(meta):
        return (triton.cdiv(layout.seqlen_k, meta["BLOCK_N"]), layout.heads, layout.batch)

    _dkdv_kernel[grid_k](
        q, k, v, dout, lse, delta, dk, dv, cu, kv_len, kpm, cos, sin,
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(dout),
        *layout.strides(dk), *layout.strides(dv), *layout.lse_strides(lse), stride_kpmb, *scalars, **flags,
    )

    def grid_q(meta):
        return (triton.cdiv(layout.seqlen_q, meta["BLOCK_M"]), layout.heads, layout.batch)

    _dq_kernel[grid_q](
        q, k, v, dout, lse, delta, dq, cu, kv_len, kpm, cos, sin,
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(dout),
        *layout.strides(dq), *layout.lse_strides(lse), stride_kpmb, *scalars, **flags,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# torch.library custom ops
# ----------------------------------------------------------------------------------------------------
_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? cu_seqlens, int max_seqlen, "
               "float dropout_p, float softmax_scale, Tensor? rng_seed, int rng_offset, int window, Tensor cos, "
               "Tensor sin) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_padding_mask, "
               "Tensor? cu_seqlens, int max_seqlen, float dropout_p, float softmax_scale, Tensor? rng_seed, "
               "int rng_offset, int window, Tensor cos, Tensor sin) -> (Tensor, Tensor, Tensor)")


@torch.library.custom_op("electra_kernels::attention_rotary_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _fwd_op(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, rng_seed, rng_offset,
            window, cos, sin):
    with device_guard(q):
        return forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                       _attn._seed_value(rng_seed), rng_offset, window, cos, sin)


@_fwd_op.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, rng_seed, rng_offset, window,
      cos, sin):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens is not None else (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("electra_kernels::attention_rotary_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _bwd_op(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, rng_seed,
            rng_offset, window, cos, sin):
    with device_guard(q):
        return backward(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                        _attn._seed_value(rng_seed), rng_offset, window, cos, sin)


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, rng_seed,
      rng_offset, window, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, rng_seed, rng_offset, window, cos,
     sin) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens, rng_seed, cos, sin)
    ctx.args = (max_seqlen, dropout_p, softmax_scale)
    ctx.rng_offset, ctx.window = rng_offset, window


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, key_padding_mask, cu_seqlens, rng_seed, cos, sin = ctx.saved_tensors
    max_seqlen, dropout_p, softmax_scale = ctx.args
    dq, dk, dv = torch.ops.electra_kernels.attention_rotary_bwd(
        dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, rng_seed,
        ctx.rng_offset, ctx.window, cos, sin)
    return (dq, dk, dv) + (None,) * 10


torch.library.register_autograd("electra_kernels::attention_rotary_fwd", _backward, setup_context=_setup_context)


def attention_rotary(q, k, v, key_padding_mask, cu_seqlens, max_seqlen: int, dropout_p: float, softmax_scale: float,
                     rng_seed, window: Optional[int], rotary_base: Optional[float], table=None):
    """Called by ``attention`` / ``attention_varlen`` (inputs checked there): the fused rotary kernels.
    ``table``: (cos, sin), each (>= max_seqlen, head_dim/2) fp32 contiguous, instead of the θ-derived one
    (patch_hf passes transformers' own, for any rope type)."""
    from .rotary import _cos_sin_table

    if table is not None:
        cos, sin = table
    else:
        cos, sin = _cos_sin_table(max_seqlen, q.shape[-1], rotary_base, q.device)
    return torch.ops.electra_kernels.attention_rotary_fwd(
        q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, rng_seed, 0,
        -1 if window is None else int(window), cos, sin)


# The launchers run these kernels on Hopper and newer only (attention._rotary_mode): on sm_80 the dK/dV
# kernel spills at every config that keeps tensor-core-sized tiles (bf16, head dim 64, ptxas -v: default
# 32x128 8 warps 255 registers + 236-532 B spilled, 16x128 0-88 B, 16x64 0-20 B (packed), 16x32 clean
# but mma.sync only), and dQ at its default 128x32 spills 64-160 B. Joining the rotated halves back into
# one (rows, d) tile (tl.join + permute + reshape) for a single d-deep product was tried for dK/dV: worse
# on sm_80 (576-680 B spilled at 32x128 with dropout), so the two-half products stay. On sm_90 every default below compiles
# to 132-214 (forward), 208-247 (dK/dV), 142-211 (dQ) registers, no spill, wgmma.
SM90_AND_NEWER = frozenset({90, 100, 120})


def compile_variants():
    """The fused rotary kernels at ModernBERT's head dim 64 with attention.py's default configs (bf16, fp16;
    padded, padded + key mask, packed; dropout on and off; global and windowed), on sm_90+ (where the
    launchers run them; fp32 takes the separate rotary kernel): for ``benchmarks/compile_report.py`` and
    ``tests/kernels/test_gpu_compile.py``."""
    from ._gpu_compile import Variant, runtime_args

    def arg_type(name, dtype):
        if name in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"):
            return "*" + dtype
        if name in ("LSE", "Delta", "COS", "SIN"):
            return "*fp32"
        if name in ("CU_SEQLENS", "KV_LEN"):
            return "*i32"
        if name == "KPM":
            return "*u8"
        if name in ("qk_scale", "sm_scale", "keep_scale"):
            return "fp32"
        return "i32"

    aligned = frozenset(n for n in runtime_args(_dkdv_jit) + runtime_args(_fwd_jit) + runtime_args(_dq_jit)
                        if n.startswith("stride_") and n not in ("stride_lb", "stride_lh", "stride_kpmb"))
    layouts = {"packed": dict(IS_VARLEN=True, HAS_KPM=False), "padded": dict(IS_VARLEN=False, HAS_KPM=False),
               "padded+mask": dict(IS_VARLEN=False, HAS_KPM=True)}
    kernels = [("attention+rotary fwd", _fwd_kernel, _attn._FWD_SPACE), ("attention+rotary dk/dv", _dkdv_kernel,
               _attn._DKDV_SPACE), ("attention+rotary dq", _dq_kernel, _attn._DQ_SPACE)]
    variants = []
    head_dim = 64
    half, block_h = _half_blocks(head_dim)
    for dtype in ("bf16", "fp16"):
        precision = "tf32"
        for layout, flags in layouts.items():
            for dropout in (False, True):
                for window in (False, True):
                    tags = dict(dtype=dtype, layout=layout, dropout=dropout, head_dim=head_dim, window=window,
                                rotary=True)
                    for name, kernel, space in kernels:
                        block_m, block_n, warps, stages = space[0]
                        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, HALF=half, BLOCK_H=block_h,
                                          DROPOUT=dropout, DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                                          WINDOW=window, **flags)
                        variants.append(Variant(name, kernel, {a: arg_type(a, dtype) for a in runtime_args(kernel)},
                                                constexprs, warps, stages, default=True, matmul=True, tags=tags,
                                                aligned=aligned, archs=SM90_AND_NEWER))
    return variants
