"""Bidirectional (non-causal) attention for encoders, padded and variable-length layouts.

    out = dropout(softmax(Q·Kᵀ·scale + key_padding)) · V        per (batch, head)

One set of Triton kernels serves both layouts (flash-attention style, Dao et al. 2022/2023):

* padded   q, k, v: (batch, seq, heads, head_dim), optional key_padding_mask (batch, seq) bool;
* packed   q, k, v: (total_tokens, heads, head_dim) with cu_seqlens (batch + 1,) int32, so that padding
  costs no work at all (the encoder unpads once with :func:`electra_kernels.unpad_input`).

The forward pass keeps only the output and the per-row log-sum-exp (LSE); the backward pass recomputes
the probabilities block by block from Q, K and the LSE. No (seq × seq) matrix ever exists in memory:

* ``_attn_fwd_kernel``           one program per (query block, head, sequence); online softmax over
                                 key blocks in the log2 domain (exp2 is one MUFU instruction);
* ``_attn_bwd_preprocess_kernel`` delta_i = rowsum(dO_i * O_i)  (= Σ_j P_ij dP_ij, see below);
* ``_attn_bwd_dkdv_kernel``      one program per key block, loops over query blocks, owns dK and dV;
* ``_attn_bwd_dq_kernel``        one program per query block, loops over key blocks, owns dQ.
  Splitting dK/dV from dQ costs one extra Q·Kᵀ and dO·Vᵀ recomputation but needs no atomics, so the
  result is deterministic. When one key block holds the whole sequence (S <= 128, ELECTRA-Small),
  ``_attn_bwd_fused_kernel`` (the dK/dV kernel with FUSE_DQ) also writes dQ and the dQ kernel is skipped.

Dropout on the attention probabilities is drawn inside the kernels with Philox from a (seed, offset)
pair, 16 keep decisions per Philox evaluation (``dropout_keep16`` in ``_triton_utils``: four 32-bit
words = 16 bytes, each compared with an 8-bit threshold). That is a sixteenth of the integer work of
one ``tl.rand`` per probability, which at B32 H12 S512 (100 M probabilities, three passes) would cost
more than the attention's matmuls. The drop probability is therefore quantised to 1/256, and the
survivors are scaled by 1/q with q the exact quantised keep probability (``dropout_keep_probability``),
so E[dropout(P)] = P. Element (b, h, i, j) of the keep-mask is byte j % 16 of the Philox counter
``offset + ((b·H + h)·Sq + i)·⌈Sk/16⌉ + j // 16`` with i, j the positions inside the sequence (Sq = Sk =
max_seqlen for the packed layout): the forward and both backward kernels (whatever their block sizes)
regenerate exactly the same mask, and the padded and packed layouts of the same batch drop the same
probabilities. ``attention_dropout_mask`` materialises that mask for tests.

Backward math (P = softmax(S), Z = keep / q the dropout scaling, O = (P∘Z)·V):
    dV = (P∘Z)ᵀ·dO,   dP = (dO·Vᵀ)∘Z,   dS = P∘(dP - delta),   delta_i = Σ_j P_ij dP_ij = dO_i·O_i,
    dQ = scale · dS·K,   dK = scale · dSᵀ·Q.

Dtypes: fp16/bf16 inputs go through the tensor cores with fp32 accumulation; fp32 inputs use exact
fp32 products (``input_precision="ieee"``, no TF32) — correct but several times slower, meant for
checks, not for training. Head dims up to 128 (any size; non-powers of two are padded in registers).

Reading order: Triton kernels -> launchers -> torch.library custom ops (autograd, fake) -> public
functions and ``FusedAttention`` -> references.
"""

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from . import rotary
from ._dispatch import HAS_TRITON, interpreter_enabled, use_triton
from ._outputs import new_empty
from ._triton_utils import device_guard, dropout_scale, dropout_threshold

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._autotune import autotune, device_smem_limit, triton_configs
    from ._triton_utils import cast_rne, dot, dropout_keep16, mma

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
MAX_HEAD_DIM = 128
# On the GPU the kernels run bf16 and fp16; fp32 q/k/v take attention_ref there (torch's cuBLAS matmuls
# and softmax, exact fp32). The fp32 tiles (4-byte elements: twice the registers and shared memory of
# the 16-bit ones for every staged K/V tile, and ieee tl.dot products on the FMA units, no tensor
# cores) spilled up to 42 KB per thread in the forward and 23 KB in dQ and exceeded sm_80's shared
# memory at d = 128 with the default configs (Triton 3.9); configs small enough to fit would run the
# products at a fraction of cuBLAS's fp32 rate. The price of torch's path: it materialises the
# (batch, heads, seq_q, seq_k) fp32 scores. Under the interpreter (CPU tests) fp32 still runs the kernels.
GPU_DTYPES = (torch.bfloat16, torch.float16)



def _alloc(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return new_empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
if HAS_TRITON:
    _INTERPRET = interpreter_enabled()

    # Candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages), the first one the default (see
    # kernels/electra_kernels/_autotune.py). What each costs in registers, spills and shared memory on sm_80 / sm_90 is
    # in `python benchmarks/compile_report.py --kernel attention`; the notes below quote it for bf16,
    # d=64 (Triton 3.9). Candidates that spilled more than ~100 B were dropped; the ones kept with a
    # small spill are timed by the tuner like any other, so they win only where the spill is free.
    # Forward: BLOCK_M=128/BLOCK_N=64 is the Hopper sweet spot for d=64 (Triton tutorial 06). The
    # default runs it with 8 warps: with 4 (the second candidate) the online softmax, the dropout mask
    # and the fp32 accumulator exceed 255 registers (32-64 B spilled on sm_80, 56-104 B with dropout on
    # sm_90). (128, 128, 8) spills 56-144 B with dropout on sm_80 only. BLOCK_M=64 doubles the
    # programs for short sequences (S=128: B·H programs only with BLOCK_M=128).
    _FWD_SPACE = [
        (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4),
        (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3),
    ]
    # dK/dV: BLOCK_N1 keys stay in registers (two fp32 accumulators) while BLOCK_M1 queries stream by.
    # 128 keys per program need 8 warps (4 warps: 168-944 B spilled on sm_80, 4-272 B on sm_90;
    # (64, 128, 8) and (64, 64, 4) spill 100-1000 B on sm_80: dropped).
    _DKDV_SPACE = [(32, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 4)]
    # Fused dK/dV/dQ for short sequences: BLOCK_N = FUSED_BLOCK_N covers the whole sequence. The program
    # also holds dK, dV (fp32) and K, V for all 128 keys, so the default steps 16 query rows at a time;
    # 32 rows spill 8-100 B on sm_80 (kept for Hopper), 64 rows 180-1036 B (dropped).
    FUSED_BLOCK_N = 128
    # Only at BLOCK_D 64: at d = 128 it spills (below); at d <= 32 the dQᵀ = Kᵀ·dSᵀ product has
    # BLOCK_D = 32 rows, fewer than the 64 a Hopper warpgroup's wgmma takes, so on sm_90 it fell back
    # to mma.sync inside the wgmma kernel (bf16 and fp16, every layout); dK/dV + dQ run all-wgmma there.
    FUSED_BLOCK_D = 64
    _FUSED_SPACE = [(16, FUSED_BLOCK_N, 8, 3), (32, FUSED_BLOCK_N, 8, 3)]
    # dQ: BLOCK_M2 queries stay, BLOCK_N2 keys stream (the mirror image of dK/dV); 8 warps by default
    # for the same reason as the forward. (128, 32, 4) and (128, 64, 8) spill 8-96 B on sm_80 only;
    # (64, 64, 4) spilled up to 164 B there (dropped).
    _DQ_SPACE = [(128, 32, 8, 3), (128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 4)]
    # Head dim 128 (BLOCK_D 128) doubles every (rows, BLOCK_D) tile and fp32 accumulator a program
    # holds, so the spaces above, tuned for d <= 64, spill there on sm_80 (16-380 B; ~10 KB in dK/dV
    # with dropout). That class has its own spaces, picked by the launchers from BLOCK_D
    # (_for_head_dim); registers / spilled bytes below are the worst of padded, packed, key mask,
    # dropout on and off (bf16, Triton 3.9, `compile_report.py --head-dim 128`).
    # Forward: 64×64 with 8 warps, 183 / 0 on sm_80 and 215 / 0 on sm_90; 128×32 (FA2's d=128 tile
    # with dropout) also spills nothing but sits at 255 registers on sm_80. (128, 64, 8) spills
    # 180-192 B with dropout on sm_80 (dropped).
    _FWD_SPACE_D128 = [(64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)]
    # dK/dV: 64 keys per program (two 64×128 fp32 accumulators), 255 / 0 on sm_80, 229 / 0 on sm_90;
    # 128 keys spill ~10 KB with dropout on sm_80. (16, 64, 4) spills 4 B on sm_80 (packed, no
    # dropout); (32, 64, 4) 240-328 B (dropped).
    _DKDV_SPACE_D128 = [(32, 64, 8, 3), (16, 64, 8, 3), (16, 64, 4, 3)]
    # dQ: 64 queries, 8 warps: 184 / 0 on sm_80, 188 / 0 on sm_90. (128, 32, 8), the d <= 64 default,
    # spills 16-32 B on sm_80 with the packed layout.
    _DQ_SPACE_D128 = [(64, 32, 8, 3), (128, 16, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3)]
    # Head dim 16 (BLOCK_D 16), forward only: the same 128×64 tile and 8 warps as _FWD_SPACE, one
    # pipeline stage fewer. Triton 3.9's leaner code brings the padded+mask+dropout forward to ~130
    # registers on sm_80, where ptxas squeezes it into 128 (two 256-thread programs per SM) and
    # spills: 128 / 4 B (3 stages) against 163 / 0 with Triton 3.7.1. Two stages: 128 / 0 on 3.9 and
    # 161 / 0 on 3.7.1 (sm_90: 127 / 0 and 144 / 0, wgmma), every other d=16 layout <= 128 / 0.
    # A 2 KB K/V tile at d=16 is cheap to fetch, so the third stage buys little; 128×32 (100-105
    # registers) would halve the keys per step instead. The d<=64 candidates follow for the tuner.
    _FWD_SPACE_D16 = [(128, 64, 8, 2), *_FWD_SPACE]
    # No fused dK/dV/dQ at d=128: holding dK, dV, K, V for all the sequence's keys plus the dQ
    # products spills on sm_80 in every config tried (16×128 with 8 warps 84 B, 16×64 56-188 B,
    # 16 warps 2.8-10 KB), so short sequences take dK/dV + dQ like long ones (attention_backward).
    _BLOCK_NAMES = ("BLOCK_M", "BLOCK_N")

    if _INTERPRET:
        _FWD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
        _DKDV_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
        _DQ_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
        FUSED_BLOCK_N = 32  # sequences <= 32 take the fused path in the tests, longer ones the split one
        _FUSED_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": FUSED_BLOCK_N}, num_warps=4, num_stages=1)]
        _FWD_CONFIGS_D128, _DKDV_CONFIGS_D128, _DQ_CONFIGS_D128 = _FWD_CONFIGS, _DKDV_CONFIGS, _DQ_CONFIGS
        _FWD_CONFIGS_D16 = _FWD_CONFIGS
    else:  # pragma: no cover - GPU only
        _FWD_CONFIGS = triton_configs(_FWD_SPACE, _BLOCK_NAMES)
        _DKDV_CONFIGS = triton_configs(_DKDV_SPACE, _BLOCK_NAMES)
        _DQ_CONFIGS = triton_configs(_DQ_SPACE, _BLOCK_NAMES)
        _FUSED_CONFIGS = triton_configs(_FUSED_SPACE, _BLOCK_NAMES)
        _FWD_CONFIGS_D128 = triton_configs(_FWD_SPACE_D128, _BLOCK_NAMES)
        _DKDV_CONFIGS_D128 = triton_configs(_DKDV_SPACE_D128, _BLOCK_NAMES)
        _DQ_CONFIGS_D128 = triton_configs(_DQ_SPACE_D128, _BLOCK_NAMES)
        _FWD_CONFIGS_D16 = triton_configs(_FWD_SPACE_D16, _BLOCK_NAMES)

    def _for_head_dim(block_d, small, large, tiny=None):
        """The head-dim class's kernel or space: ``large`` for BLOCK_D 128, ``tiny`` (where a kernel has
        one: the forward) for BLOCK_D 16, ``small`` otherwise. One autotuned wrapper per class (not one
        space pruned by BLOCK_D) because Triton's autotuner skips the pruning when it holds a single
        config, i.e. with ELECTRA_KERNELS_AUTOTUNE=0."""
        if block_d > 64:
            return large
        return tiny if tiny is not None and block_d <= 16 else small

    # Values that change from batch to batch in training (lengths, the packed token count in the LSE
    # strides, the seed) are not specialised on, so they never trigger a recompilation.
    _NO_SPECIALIZE = ["seqlen_q", "seqlen_k", "seed", "rng_offset", "rng_stride_m", "rng_stride_bh", "stride_lb",
                      "stride_lh", "window"]
    _TUNE_KEY = ["SEQ_BUCKET", "BLOCK_D", "IS_VARLEN", "HAS_KPM", "DROPOUT", "WINDOW"]

    def _smem_estimate(block_m, block_n, block_d, stages, stationary, element_size):
        """Shared memory a config needs, roughly: the software pipeline buffers ``stages`` copies of
        the two streamed (rows, BLOCK_D) tiles; the stationary tile and the layout conversions of
        the probability tile (fp32) come on top."""
        streamed, stat = (block_n, block_m) if stationary == "M" else (block_m, block_n)
        return (stages * 2 * streamed * block_d + stat * block_d) * element_size + block_m * block_n * 4

    def _keep_candidate(cand, stationary, seq_bucket, block_d, element_size, smem_budget):
        """Whether a candidate can pay off (and fit) for this shape:

        * a stationary block (the one a program keeps in registers: BLOCK_M for the forward and dQ,
          BLOCK_N for dK/dV) longer than the sequence only computes masked rows;
        * at head dim 128 a 128-row stationary block with 4 warps spills registers (ptxas, sm_90),
          and 128-wide streamed blocks with 4 stages do not fit in shared memory;
        * the estimated shared memory must fit the device's per-block limit.
        """
        block_m, block_n, warps, stages = cand
        stat, streamed = (block_m, block_n) if stationary == "M" else (block_n, block_m)
        if seq_bucket is not None and stat > max(64, seq_bucket):
            return False
        if block_d >= 128 and stat >= 128 and warps < 8:
            return False
        if block_d >= 128 and streamed >= 128 and stages > 3:
            return False
        return _smem_estimate(block_m, block_n, block_d, stages, stationary, element_size) <= smem_budget

    def _prune(stationary: str, by_length: bool = True):
        """Autotune pruning with _keep_candidate; the fused kernel's block always covers the whole
        sequence (by_length=False: no rule on the sequence length)."""

        def prune(configs, named_args, **kwargs):
            seq_bucket = named_args.get("SEQ_BUCKET", kwargs.get("SEQ_BUCKET")) if by_length else None
            block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D")) or 0
            budget = device_smem_limit(named_args)
            element_size = named_args["Q"].element_size() if hasattr(named_args.get("Q"), "element_size") else 2
            kept = [cfg for cfg in configs
                    if _keep_candidate((cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages),
                                       stationary, seq_bucket, block_d, element_size, budget)]
            return kept or configs[:1]

        return {"early_config_prune": prune}

    @triton.jit
    def _sequence_bounds(CU_SEQLENS, KV_LEN, off_b, seqlen_q, seqlen_k,
                         IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr):
        """(first token of the sequence, its query rows, its key rows, keys that can be real).

        Packed layout: the sequence is tokens [cu[b], cu[b+1]) and query rows == key rows.
        Padded layout: rows start at 0; with a key-padding mask, KV_LEN[b] is one past the last real
        key, so the trailing padding (the usual right padding) is skipped without any work.
        """
        if IS_VARLEN:
            seq_start = tl.load(CU_SEQLENS + off_b).to(tl.int64)
            rows_q = (tl.load(CU_SEQLENS + off_b + 1) - seq_start).to(tl.int32)
            rows_k = rows_q
            live_k = rows_q
        else:
            seq_start = tl.zeros([], dtype=tl.int64)
            rows_q = seqlen_q
            rows_k = seqlen_k
            if HAS_KPM:
                live_k = tl.load(KV_LEN + off_b)
            else:
                live_k = seqlen_k
        return seq_start, rows_q, rows_k, live_k

    @triton.jit
    def _window_span(start, window, n_live, n_rows, BLOCK: tl.constexpr, BLOCK_OTHER: tl.constexpr):
        """Sliding window: the streamed rows (multiples of BLOCK) that a stationary block of BLOCK_OTHER
        rows starting at ``start`` can see, |i - j| <= window. Returns (lo, full_end, hi): rows
        [lo, full_end) are whole blocks inside the n_rows bound (no bounds checks), [full_end, hi) the
        one ragged block if the window reaches it. Blocks wholly outside the window are never visited,
        so a windowed layer costs S·window, not S²."""
        lo = (tl.maximum(start - window, 0) // BLOCK) * BLOCK
        hi = tl.minimum(start + BLOCK_OTHER + window, n_live)
        full_end = tl.minimum((n_rows // BLOCK) * BLOCK, tl.cdiv(hi, BLOCK) * BLOCK)
        return lo, tl.maximum(full_end, lo), hi

    @triton.jit
    def _load_tile(ptrs, rows, n_rows, d_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BOUNDARY: tl.constexpr, D_FIRST: tl.constexpr):
        """A (rows, BLOCK_D) tile of q/k/v/dO, or with D_FIRST its (BLOCK_D, rows) transpose.

        Rows are masked (rows < n_rows) only on the one ragged block (BOUNDARY), the head dimension
        only when it is padded: full blocks of a power-of-two head dim get plain vectorised loads."""
        if BOUNDARY:
            row_ok = rows < n_rows
            if D_FIRST:
                tile = tl.load(ptrs, mask=d_ok[:, None] & row_ok[None, :], other=0.0)
            else:
                tile = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        elif D_FIRST:
            tile = tl.load(ptrs, mask=d_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        return tile

    @triton.jit
    def _keep_mask(seed, rng_base, rows, col_start, rng_stride_m, drop_threshold, BLOCK_N: tl.constexpr):
        """Keep decisions (len(rows), BLOCK_N) for query rows ``rows`` and key columns col_start + [0,
        BLOCK_N) (positions inside the sequence; col_start a multiple of 16): 16 per Philox counter
        rng_base + row·rng_stride_m + column // 16 (``dropout_keep16``, see the module docstring)."""
        groups = col_start // 16 + tl.arange(0, BLOCK_N // 16)
        return dropout_keep16(seed, rng_base + rows[:, None] * rng_stride_m + groups[None, :], drop_threshold)

    @triton.jit
    def _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, kpm_ptr, lo, hi, live_k,
                        offs_m, offs_n, offs_d, stride_kn, stride_vn,
                        qk_scale, drop_threshold, seed, rng_base, rng_stride_m, window,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                        BOUNDARY: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr = False):
        d_ok = offs_d < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            k = _load_tile(k_ptrs + start_n * stride_kn, cols, live_k, d_ok, HEAD_DIM, BLOCK_D, BOUNDARY, False)
            v = _load_tile(v_ptrs + start_n * stride_vn, cols, live_k, d_ok, HEAD_DIM, BLOCK_D, BOUNDARY, False)
            qk = dot(q, tl.trans(k), DOT_PRECISION)
            if HAS_KPM:
                key_ok = tl.load(kpm_ptr + cols, mask=cols < live_k, other=0) != 0
                qk = tl.where(key_ok[None, :], qk, float("-inf"))
            elif BOUNDARY:
                qk = tl.where((cols < live_k)[None, :], qk, float("-inf"))
            if WINDOW:
                qk = tl.where(tl.abs(offs_m[:, None] - cols[None, :]) <= window, qk, float("-inf"))
            # Online softmax in the log2 domain: m is the running max of scale·log2(e)·qk.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            if HAS_KPM or WINDOW:
                # A row whose keys so far are all padding (or outside its window) has m = -inf; subtracting
                # 0 instead keeps exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN.
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_sub = m_new
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            # The normaliser sums the probabilities *before* dropout (dropout acts on softmax(S)).
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if DROPOUT:
                keep = _keep_mask(seed, rng_base, offs_m, start_n, rng_stride_m, drop_threshold, BLOCK_N)
                p = tl.where(keep, p, 0.0)  # the 1/q rescale is applied once, at the end
            acc = mma(cast_rne(p, v.dtype), v, acc, DOT_PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _attn_fwd_jit(
        Q, K, V, Out, LSE, CU_SEQLENS, KV_LEN, KPM,
        stride_qb, stride_qm, stride_qh,
        stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh,
        stride_ob, stride_om, stride_oh,
        stride_lb, stride_lh, stride_kpmb,
        n_heads, seqlen_q, seqlen_k, qk_scale, drop_threshold, keep_scale, seed, rng_offset, rng_stride_m,
        rng_stride_bh, window,
        SEQ_BUCKET,  # autotune key only: next power of two of the longest sequence
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr = False,
    ):
        # tl.dot needs every dim >= 16 (one assert each: Triton < 3.4 rejects chained `and`).
        tl.static_assert(BLOCK_M >= 16)
        tl.static_assert(BLOCK_N >= 16)
        tl.static_assert(BLOCK_D >= 16)
        start_m = tl.program_id(0) * BLOCK_M
        off_h = tl.program_id(1)
        off_b = tl.program_id(2)
        seq_start, rows_q, rows_k, live_k = _sequence_bounds(
            CU_SEQLENS, KV_LEN, off_b, seqlen_q, seqlen_k, IS_VARLEN, HAS_KPM)
        if start_m >= rows_q:
            return  # packed layout: this sequence is shorter than max_seqlen

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        row_ok = offs_m < rows_q
        b64 = off_b.to(tl.int64)
        h64 = off_h.to(tl.int64)

        q_ptrs = (Q + b64 * stride_qb + h64 * stride_qh + (seq_start + offs_m[:, None]) * stride_qm
                  + offs_d[None, :])
        k_ptrs = (K + b64 * stride_kb + h64 * stride_kh + (seq_start + offs_n[:, None]) * stride_kn
                  + offs_d[None, :])
        v_ptrs = (V + b64 * stride_vb + h64 * stride_vh + (seq_start + offs_n[:, None]) * stride_vn
                  + offs_d[None, :])
        kpm_ptr = KPM + b64 * stride_kpmb
        rng_base = (b64 * n_heads + h64) * rng_stride_bh + rng_offset

        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # Full key blocks without bounds checks, then the one ragged block with them.
        if WINDOW:
            lo, full_end, hi = _window_span(start_m, window, live_k, live_k, BLOCK_N, BLOCK_M)
        else:
            lo = 0
            full_end = (live_k // BLOCK_N) * BLOCK_N
            hi = live_k
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, kpm_ptr, lo, full_end, live_k,
            offs_m, offs_n, offs_d, stride_kn, stride_vn, qk_scale, drop_threshold, seed, rng_base, rng_stride_m,
            window, HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_KPM, DROPOUT, DOT_PRECISION, WINDOW)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, kpm_ptr, full_end, hi, live_k,
            offs_m, offs_n, offs_d, stride_kn, stride_vn, qk_scale, drop_threshold, seed, rng_base, rng_stride_m,
            window, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_KPM, DROPOUT, DOT_PRECISION, WINDOW)

        # A row with no real key (l = 0) gets output 0 and LSE -inf, like the reference.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        inv_l = 1.0 / l_safe
        if DROPOUT:
            inv_l = inv_l * keep_scale
        out = acc * inv_l[:, None]
        # Back to the natural log: lse = ln Σ_j exp(scale·qk_j) = (m + log2 l)·ln 2.
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)

        o_ptrs = (Out + b64 * stride_ob + h64 * stride_oh + (seq_start + offs_m[:, None]) * stride_om
                  + offs_d[None, :])
        tl.store(o_ptrs, cast_rne(out, Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + b64 * stride_lb + h64 * stride_lh + seq_start + offs_m, lse, mask=row_ok)

    _attn_fwd_kernel = autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_prune("M"))(_attn_fwd_jit)
    _attn_fwd_kernel_d128 = autotune(configs=_FWD_CONFIGS_D128, key=_TUNE_KEY,
                                     prune_configs_by=_prune("M"))(_attn_fwd_jit)
    _attn_fwd_kernel_d16 = autotune(configs=_FWD_CONFIGS_D16, key=_TUNE_KEY,
                                    prune_configs_by=_prune("M"))(_attn_fwd_jit)

    @triton.jit(do_not_specialize=["seqlen_q", "stride_lb", "stride_lh"])
    def _attn_bwd_preprocess_kernel(
        Out, DO, Delta, CU_SEQLENS,
        stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh, stride_lb, stride_lh,
        seqlen_q,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        """delta_i = Σ_d O_id · dO_id in fp32, laid out like the LSE."""
        start_m = tl.program_id(0) * BLOCK_M
        off_h = tl.program_id(1).to(tl.int64)
        off_b = tl.program_id(2).to(tl.int64)
        if IS_VARLEN:
            seq_start = tl.load(CU_SEQLENS + off_b).to(tl.int64)
            rows_q = (tl.load(CU_SEQLENS + off_b + 1) - seq_start).to(tl.int32)
        else:
            seq_start = tl.zeros([], dtype=tl.int64)
            rows_q = seqlen_q
        if start_m >= rows_q:
            return
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m < rows_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
        rows = seq_start + offs_m[:, None]
        o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + rows * stride_om + offs_d[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows * stride_dom + offs_d[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        tl.store(Delta + off_b * stride_lb + off_h * stride_lh + seq_start + offs_m, tl.sum(o * do, 1),
                 mask=offs_m < rows_q)

    @triton.jit
    def _load_lse2(LSE_row_ptr, rows, rows_q):
        # LSE in log2 units; a row without any real key (LSE = -inf) becomes +inf so that
        # P = exp2(s - lse2) = 0 for it instead of NaN.
        lse = tl.load(LSE_row_ptr + rows, mask=rows < rows_q, other=0.0)
        return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)

    @triton.jit
    def _attn_bwd_dkdv_inner(dk, dv, k, v, key_ok, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, lo, hi, rows_q,
                             start_n, offs_m, offs_n, offs_d, stride_qm, stride_dom, stride_dqm,
                             sm_scale, qk_scale, drop_threshold, keep_scale, seed, rng_base, rng_stride_m, window,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr,
                             BOUNDARY: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                             FUSE_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr = False):
        d_ok = offs_d < HEAD_DIM
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            # Qᵀ is loaded transposed straight from memory: (BLOCK_D, BLOCK_M).
            qT = _load_tile(q_ptrs + start_m * stride_qm, rows, rows_q, d_ok, HEAD_DIM, BLOCK_D, BOUNDARY, True)
            do = _load_tile(do_ptrs + start_m * stride_dom, rows, rows_q, d_ok, HEAD_DIM, BLOCK_D, BOUNDARY, False)
            lse2 = _load_lse2(lse_ptr, rows, rows_q)
            delta = tl.load(delta_ptr + rows, mask=rows < rows_q, other=0.0)
            # Rows past the sequence load q = dO = 0, lse2 = delta = 0: they add exactly zero below.
            qkT = dot(k, qT, DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
            pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
            if HAS_KPM or FUSE_DQ:
                # Padding keys (and, for the fused dQ, keys past the sequence, whose k = 0 would
                # otherwise give P = exp2(-lse2) and leak into dQ) carry no probability.
                pT = tl.where(key_ok[:, None], pT, 0.0)
            if WINDOW:
                pT = tl.where(tl.abs(offs_n[:, None] - rows[None, :]) <= window, pT, 0.0)
            dpT = dot(v, tl.trans(do), DOT_PRECISION)
            if DROPOUT:
                # Drawn as (queries, keys) like the forward's, then transposed to (keys, queries).
                keep = tl.trans(_keep_mask(seed, rng_base, rows, start_n, rng_stride_m, drop_threshold, BLOCK_N))
                pT_drop = tl.where(keep, pT * keep_scale, 0.0)
                dpT = tl.where(keep, dpT * keep_scale, 0.0)
            else:
                pT_drop = pT
            dv = mma(cast_rne(pT_drop, do.dtype), do, dv, DOT_PRECISION)
            dsT = cast_rne(pT * (dpT - delta[None, :]), qT.dtype)
            dk = mma(dsT, tl.trans(qT), dk, DOT_PRECISION)
            if FUSE_DQ:
                # This program holds every key of the sequence, so dQ of these query rows is complete:
                # dQ = scale · dS · K, written once, no atomics, no second kernel. Computed transposed,
                # dQᵀ = Kᵀ · dSᵀ (BLOCK_D, BLOCK_M): its M dimension is then the head dim (64), which
                # Hopper's wgmma takes, where the BLOCK_M = 32 rows of dQ fall back to mma.sync.
                dqT = dot(tl.trans(k), dsT, DOT_PRECISION) * sm_scale
                dq_mask = d_ok[:, None] & (rows < rows_q)[None, :]
                tl.store(dq_ptrs + start_m * stride_dqm, cast_rne(dqT, qT.dtype), mask=dq_mask)
        return dk, dv

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _attn_bwd_dkdv_jit(
        Q, K, V, DO, LSE, Delta, DK, DV, DQ, CU_SEQLENS, KV_LEN, KPM,
        stride_qb, stride_qm, stride_qh,
        stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh,
        stride_dob, stride_dom, stride_doh,
        stride_dkb, stride_dkn, stride_dkh,
        stride_dvb, stride_dvn, stride_dvh,
        stride_dqb, stride_dqm, stride_dqh,
        stride_lb, stride_lh, stride_kpmb,
        n_heads, seqlen_q, seqlen_k, sm_scale, qk_scale, drop_threshold, keep_scale, seed, rng_offset, rng_stride_m,
        rng_stride_bh, window,
        SEQ_BUCKET,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, FUSE_DQ: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr = False,
    ):
        """dK, dV of one key block (and with FUSE_DQ, when one block holds the whole sequence, dQ too)."""
        # tl.dot needs every dim >= 16 (one assert each: Triton < 3.4 rejects chained `and`).
        tl.static_assert(BLOCK_M >= 16)
        tl.static_assert(BLOCK_N >= 16)
        tl.static_assert(BLOCK_D >= 16)
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
        d_ok = offs_d < HEAD_DIM
        kv_mask = (offs_n < rows_k)[:, None] & d_ok[None, :]
        b64 = off_b.to(tl.int64)
        h64 = off_h.to(tl.int64)
        kv_rows = seq_start + offs_n[:, None]
        k = tl.load(K + b64 * stride_kb + h64 * stride_kh + kv_rows * stride_kn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b64 * stride_vb + h64 * stride_vh + kv_rows * stride_vn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        if HAS_KPM:
            key_ok = tl.load(KPM + b64 * stride_kpmb + offs_n, mask=offs_n < rows_k, other=0) != 0
        else:
            key_ok = offs_n < rows_k

        q_rows = seq_start + offs_m
        q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + q_rows[None, :] * stride_qm + offs_d[:, None]  # Qᵀ
        do_ptrs = DO + b64 * stride_dob + h64 * stride_doh + q_rows[:, None] * stride_dom + offs_d[None, :]
        dq_ptrs = DQ + b64 * stride_dqb + h64 * stride_dqh + q_rows[None, :] * stride_dqm + offs_d[:, None]  # dQᵀ
        lse_ptr = LSE + b64 * stride_lb + h64 * stride_lh + seq_start
        delta_ptr = Delta + b64 * stride_lb + h64 * stride_lh + seq_start
        rng_base = (b64 * n_heads + h64) * rng_stride_bh + rng_offset

        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # Key blocks that hold only trailing padding get no probability mass: dK = dV = 0, no loop
        # (unless this program also owes dQ for every query row).
        if FUSE_DQ:
            q_hi = rows_q
        else:
            q_hi = tl.where(start_n < live_k, rows_q, 0)
        if WINDOW and not FUSE_DQ:
            # Only the query blocks within the window of this key block (the fused kernel's one key block
            # holds the whole sequence, so every query row is within reach and owes its dQ anyway).
            q_lo, full_end, q_hi = _window_span(start_n, window, q_hi, rows_q, BLOCK_M, BLOCK_N)
        else:
            q_lo = 0
            full_end = (q_hi // BLOCK_M) * BLOCK_M
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, key_ok, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, q_lo, full_end, rows_q,
            start_n, offs_m, offs_n, offs_d, stride_qm, stride_dom, stride_dqm, sm_scale, qk_scale, drop_threshold,
            keep_scale, seed, rng_base, rng_stride_m, window, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, HAS_KPM,
            DROPOUT, FUSE_DQ, DOT_PRECISION, WINDOW)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, key_ok, q_ptrs, do_ptrs, dq_ptrs, lse_ptr, delta_ptr, full_end, q_hi, rows_q,
            start_n, offs_m, offs_n, offs_d, stride_qm, stride_dom, stride_dqm, sm_scale, qk_scale, drop_threshold,
            keep_scale, seed, rng_base, rng_stride_m, window, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, True, HAS_KPM,
            DROPOUT, FUSE_DQ, DOT_PRECISION, WINDOW)
        dk = dk * sm_scale

        tl.store(DK + b64 * stride_dkb + h64 * stride_dkh + kv_rows * stride_dkn + offs_d[None, :],
                 cast_rne(dk, DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + b64 * stride_dvb + h64 * stride_dvh + kv_rows * stride_dvn + offs_d[None, :],
                 cast_rne(dv, DV.dtype.element_ty), mask=kv_mask)

    _attn_bwd_dkdv_kernel = autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY,
                                            prune_configs_by=_prune("N"))(_attn_bwd_dkdv_jit)
    _attn_bwd_dkdv_kernel_d128 = autotune(configs=_DKDV_CONFIGS_D128, key=_TUNE_KEY,
                                          prune_configs_by=_prune("N"))(_attn_bwd_dkdv_jit)
    # Sequences of at most FUSED_BLOCK_N tokens (ELECTRA-Small's 128) at BLOCK_D 64: one program
    # per (sequence, head) holds all keys and also writes dQ, which skips the dQ kernel and its Q·Kᵀ,
    # dO·Vᵀ recomputation (backward = 5 matmuls instead of 7).
    _attn_bwd_fused_kernel = autotune(configs=_FUSED_CONFIGS, key=_TUNE_KEY,
                                      prune_configs_by=_prune("N", by_length=False))(_attn_bwd_dkdv_jit)

    @triton.jit
    def _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, v_ptrs, kpm_ptr, lo, hi, live_k,
                           offs_m, offs_n, offs_d, stride_kn, stride_vn,
                           qk_scale, drop_threshold, keep_scale, seed, rng_base, rng_stride_m, window,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                           BOUNDARY: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, WINDOW: tl.constexpr = False):
        d_ok = offs_d < HEAD_DIM
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            # Kᵀ and Vᵀ loaded transposed: (BLOCK_D, BLOCK_N).
            kT = _load_tile(k_ptrs + start_n * stride_kn, cols, live_k, d_ok, HEAD_DIM, BLOCK_D, BOUNDARY, True)
            vT = _load_tile(v_ptrs + start_n * stride_vn, cols, live_k, d_ok, HEAD_DIM, BLOCK_D, BOUNDARY, True)
            qk = dot(q, kT, DOT_PRECISION)
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
            ds = p * (dp - delta[:, None])
            dq = mma(cast_rne(ds, kT.dtype), tl.trans(kT), dq, DOT_PRECISION)
        return dq

    @triton.jit(do_not_specialize=_NO_SPECIALIZE)
    def _attn_bwd_dq_jit(
        Q, K, V, DO, LSE, Delta, DQ, CU_SEQLENS, KV_LEN, KPM,
        stride_qb, stride_qm, stride_qh,
        stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh,
        stride_dob, stride_dom, stride_doh,
        stride_dqb, stride_dqm, stride_dqh,
        stride_lb, stride_lh, stride_kpmb,
        n_heads, seqlen_q, seqlen_k, sm_scale, qk_scale, drop_threshold, keep_scale, seed, rng_offset, rng_stride_m,
        rng_stride_bh, window,
        SEQ_BUCKET,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr = False,
    ):
        # tl.dot needs every dim >= 16 (one assert each: Triton < 3.4 rejects chained `and`).
        tl.static_assert(BLOCK_M >= 16)
        tl.static_assert(BLOCK_N >= 16)
        tl.static_assert(BLOCK_D >= 16)
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
        d_ok = offs_d < HEAD_DIM
        row_ok = offs_m < rows_q
        qo_mask = row_ok[:, None] & d_ok[None, :]
        b64 = off_b.to(tl.int64)
        h64 = off_h.to(tl.int64)
        rows = seq_start + offs_m[:, None]
        q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + rows * stride_qm + offs_d[None, :],
                    mask=qo_mask, other=0.0)
        do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + rows * stride_dom + offs_d[None, :],
                     mask=qo_mask, other=0.0)
        lse2 = _load_lse2(LSE + b64 * stride_lb + h64 * stride_lh + seq_start, offs_m, rows_q)
        delta = tl.load(Delta + b64 * stride_lb + h64 * stride_lh + seq_start + offs_m, mask=row_ok, other=0.0)

        k_ptrs = K + b64 * stride_kb + h64 * stride_kh + (seq_start + offs_n[None, :]) * stride_kn + offs_d[:, None]
        v_ptrs = V + b64 * stride_vb + h64 * stride_vh + (seq_start + offs_n[None, :]) * stride_vn + offs_d[:, None]
        kpm_ptr = KPM + b64 * stride_kpmb
        rng_base = (b64 * n_heads + h64) * rng_stride_bh + rng_offset

        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if WINDOW:
            lo, full_end, hi = _window_span(start_m, window, live_k, live_k, BLOCK_N, BLOCK_M)
        else:
            lo = 0
            full_end = (live_k // BLOCK_N) * BLOCK_N
            hi = live_k
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, k_ptrs, v_ptrs, kpm_ptr, lo, full_end, live_k,
            offs_m, offs_n, offs_d, stride_kn, stride_vn, qk_scale, drop_threshold, keep_scale, seed, rng_base,
            rng_stride_m, window, HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_KPM, DROPOUT, DOT_PRECISION, WINDOW)
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, k_ptrs, v_ptrs, kpm_ptr, full_end, hi, live_k,
            offs_m, offs_n, offs_d, stride_kn, stride_vn, qk_scale, drop_threshold, keep_scale, seed, rng_base,
            rng_stride_m, window, HEAD_DIM, BLOCK_D, BLOCK_N, True, HAS_KPM, DROPOUT, DOT_PRECISION, WINDOW)
        dq = dq * sm_scale
        tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + rows * stride_dqm + offs_d[None, :],
                 cast_rne(dq, DQ.dtype.element_ty), mask=qo_mask)

    _attn_bwd_dq_kernel = autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by=_prune("M"))(_attn_bwd_dq_jit)
    _attn_bwd_dq_kernel_d128 = autotune(configs=_DQ_CONFIGS_D128, key=_TUNE_KEY,
                                        prune_configs_by=_prune("M"))(_attn_bwd_dq_jit)

    @triton.jit(do_not_specialize=["seed", "rng_offset"])
    def _dropout_mask_kernel(Mask, seqlen_q, seqlen_k, rng_stride_m, drop_threshold, seed, rng_offset,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Writes the keep-mask the attention kernels use, (batch·heads, Sq, Sk) uint8 (1 = keep)."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        off_bh = tl.program_id(1).to(tl.int64)
        rng_base = off_bh * seqlen_q * rng_stride_m + rng_offset
        mask_base = Mask + off_bh * seqlen_q * seqlen_k
        for start_n in range(0, seqlen_k, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            keep = _keep_mask(seed, rng_base, offs_m, start_n, rng_stride_m, drop_threshold, BLOCK_N)
            ptrs = mask_base + offs_m[:, None] * seqlen_k + offs_n[None, :]
            tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m < seqlen_q)[:, None] & (offs_n < seqlen_k)[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
class _Layout:
    """Strides and sizes the kernels need, for either layout.

    Padded (B, S, H, D): batch stride is real, rows start at 0. Packed (T, H, D): batch stride 0, the
    first row of sequence b is cu_seqlens[b]. The LSE/delta is (B, H, S) padded, (H, T) packed.
    """

    def __init__(self, q, k, cu_seqlens, max_seqlen):
        self.is_varlen = cu_seqlens is not None
        if self.is_varlen:
            self.batch = cu_seqlens.shape[0] - 1
            self.heads = q.shape[1]
            self.seqlen_q = self.seqlen_k = int(max_seqlen)
            self.lse_shape = (q.shape[1], q.shape[0])
        else:
            self.batch, self.seqlen_q, self.heads = q.shape[0], q.shape[1], q.shape[2]
            self.seqlen_k = k.shape[1]
            self.lse_shape = (self.batch, self.heads, self.seqlen_q)
        self.head_dim = q.shape[-1]
        self.block_d = max(16, triton.next_power_of_2(self.head_dim))
        self.seq_bucket = triton.next_power_of_2(max(self.seqlen_q, self.seqlen_k, 16))

    def strides(self, t):
        """(batch, row, head) strides."""
        if self.is_varlen:
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)

    def lse_strides(self, lse):
        if self.is_varlen:
            return 0, lse.stride(0)
        return lse.stride(0), lse.stride(1)


def _dot_precision(dtype):
    # fp32 inputs: exact fp32 products; TF32 would lose 3 decimal digits relative to the reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _key_padding_args(key_padding_mask, layout, device):
    """uint8 view of the mask and, per batch element, one past the position of its last real key."""
    if key_padding_mask is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=device)  # a pointer argument never read
        return dummy, dummy, 0
    kpm = key_padding_mask
    if kpm.dtype != torch.bool:
        kpm = kpm != 0
    kpm = kpm.contiguous().view(torch.uint8)
    positions = torch.arange(1, kpm.shape[1] + 1, device=device, dtype=torch.int32)
    kv_len = (kpm.to(torch.int32) * positions).amax(dim=1).to(torch.int32)
    return kpm, kv_len, kpm.stride(0)


def _rng_stride_m(seqlen_k: int) -> int:
    """Philox counters per query row: one per 16 keys (``dropout_keep16``)."""
    return triton.cdiv(seqlen_k, 16)


def _has_window(window) -> bool:
    return window is not None and window >= 0


def _window_arg(window) -> int:
    # The kernels read it only when WINDOW is set; 0 otherwise keeps one specialisation.
    return int(window) if _has_window(window) else 0


def _scale(softmax_scale, head_dim):
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)


def attention_forward(q, k, v, key_padding_mask=None, cu_seqlens=None, max_seqlen=None,
                      dropout_p: float = 0.0, softmax_scale=None, seed: int = 0, rng_offset: int = 0,
                      window: Optional[int] = None):
    """Launch the forward kernel. Returns (out like q, lse fp32: (B, H, S) padded / (H, T) packed).

    Inputs are assumed checked by the public functions (same dtype/device, head_dim <= 128).
    window: sliding window |i - j| <= window (None or < 0: global attention).
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    layout = _Layout(q, k, cu_seqlens, max_seqlen)
    out = _alloc(q.shape, q)
    lse = _alloc(layout.lse_shape, q, torch.float32)
    if q.numel() == 0 or k.numel() == 0:  # nothing to attend to: zeros, LSE = -inf (as the reference)
        return out.zero_(), lse.fill_(float("-inf"))
    kpm, kv_len, stride_kpmb = _key_padding_args(key_padding_mask, layout, q.device)
    cu = cu_seqlens if cu_seqlens is not None else kv_len
    scale = _scale(softmax_scale, layout.head_dim)
    rng_stride_m = _rng_stride_m(layout.seqlen_k)

    def grid(meta):
        return (triton.cdiv(layout.seqlen_q, meta["BLOCK_M"]), layout.heads, layout.batch)

    _for_head_dim(layout.block_d, _attn_fwd_kernel, _attn_fwd_kernel_d128, _attn_fwd_kernel_d16)[grid](
        q, k, v, out, lse, cu, kv_len, kpm,
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(out),
        *layout.lse_strides(lse), stride_kpmb,
        layout.heads, layout.seqlen_q, layout.seqlen_k, scale * LOG2E, dropout_threshold(dropout_p),
        dropout_scale(dropout_p), int(seed), int(rng_offset), rng_stride_m, layout.seqlen_q * rng_stride_m,
        _window_arg(window), layout.seq_bucket,
        HEAD_DIM=layout.head_dim, BLOCK_D=layout.block_d,
        IS_VARLEN=layout.is_varlen, HAS_KPM=key_padding_mask is not None, DROPOUT=dropout_p > 0.0,
        DOT_PRECISION=_dot_precision(q.dtype), WINDOW=_has_window(window),
    )
    return out, lse


def attention_backward(dout, q, k, v, out, lse, key_padding_mask=None, cu_seqlens=None, max_seqlen=None,
                       dropout_p: float = 0.0, softmax_scale=None, seed: int = 0, rng_offset: int = 0,
                       window: Optional[int] = None):
    """Launch the three backward kernels. Returns (dq, dk, dv) shaped and typed like q, k, v."""
    q, k, v, out, dout = (_last_dim_contiguous(t) for t in (q, k, v, out, dout))
    layout = _Layout(q, k, cu_seqlens, max_seqlen)
    dq, dk, dv = _alloc(q.shape, q), _alloc(k.shape, k), _alloc(v.shape, v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = _alloc(layout.lse_shape, q, torch.float32)
    kpm, kv_len, stride_kpmb = _key_padding_args(key_padding_mask, layout, q.device)
    cu = cu_seqlens if cu_seqlens is not None else kv_len
    scale = _scale(softmax_scale, layout.head_dim)
    common = dict(HEAD_DIM=layout.head_dim, BLOCK_D=layout.block_d, IS_VARLEN=layout.is_varlen)

    pre_block = 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(layout.seqlen_q, pre_block), layout.heads, layout.batch)](
        out, dout, delta, cu, *layout.strides(out), *layout.strides(dout), *layout.lse_strides(delta),
        layout.seqlen_q, BLOCK_M=pre_block, num_warps=4, **common,
    )
    rng_stride_m = _rng_stride_m(layout.seqlen_k)
    scalars = (layout.heads, layout.seqlen_q, layout.seqlen_k, scale, scale * LOG2E, dropout_threshold(dropout_p),
               dropout_scale(dropout_p), int(seed), int(rng_offset), rng_stride_m, layout.seqlen_q * rng_stride_m,
               _window_arg(window), layout.seq_bucket)
    flags = dict(common, HAS_KPM=key_padding_mask is not None, DROPOUT=dropout_p > 0.0,
                 DOT_PRECISION=_dot_precision(q.dtype), WINDOW=_has_window(window))

    def grid_k(meta):
        return (triton.cdiv(layout.seqlen_k, meta["BLOCK_N"]), layout.heads, layout.batch)

    fuse_dq = layout.block_d == FUSED_BLOCK_D and layout.seqlen_k <= FUSED_BLOCK_N
    if fuse_dq:
        dkdv_kernel = _attn_bwd_fused_kernel
    else:
        dkdv_kernel = _for_head_dim(layout.block_d, _attn_bwd_dkdv_kernel, _attn_bwd_dkdv_kernel_d128)
    dkdv_kernel[grid_k](
        q, k, v, dout, lse, delta, dk, dv, dq, cu, kv_len, kpm,
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(dout),
        *layout.strides(dk), *layout.strides(dv), *layout.strides(dq), *layout.lse_strides(lse), stride_kpmb,
        *scalars, FUSE_DQ=fuse_dq, **flags,
    )
    if fuse_dq:
        return dq, dk, dv

    def grid_q(meta):
        return (triton.cdiv(layout.seqlen_q, meta["BLOCK_M"]), layout.heads, layout.batch)

    _for_head_dim(layout.block_d, _attn_bwd_dq_kernel, _attn_bwd_dq_kernel_d128)[grid_q](
        q, k, v, dout, lse, delta, dq, cu, kv_len, kpm,
        *layout.strides(q), *layout.strides(k), *layout.strides(v), *layout.strides(dout),
        *layout.strides(dq), *layout.lse_strides(lse), stride_kpmb,
        *scalars, **flags,
    )
    return dq, dk, dv


def attention_dropout_mask(batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float,
                           seed: int, rng_offset: int = 0, device="cuda") -> torch.Tensor:
    """The keep-mask (batch, heads, seqlen_q, seqlen_k) bool the kernels apply for (seed, rng_offset).

    For the packed layout, seqlen_q = seqlen_k = max_seqlen and [b, h, i, j] is the pair of tokens
    i, j inside sequence b. Materialises B·H·S² bytes: for tests and debugging only.
    """
    if not HAS_TRITON:
        raise RuntimeError("attention_dropout_mask needs triton (the mask is the kernels' own Philox stream)")
    mask = new_empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.uint8, device=device)
    if mask.numel() == 0:
        return mask.view(torch.bool)
    block = 32
    _dropout_mask_kernel[(triton.cdiv(seqlen_q, block), batch * heads)](
        mask, seqlen_q, seqlen_k, _rng_stride_m(seqlen_k), dropout_threshold(dropout_p), int(seed), int(rng_offset),
        BLOCK_M=block, BLOCK_N=block,
    )
    return mask.view(torch.bool)


def compile_variants():
    """Every kernel above in every variant the launchers use, with every autotune candidate the
    pruning keeps for some sequence length (the first candidate marked default): the list
    ``benchmarks/compile_report.py`` and ``tests/kernels/test_gpu_compile.py`` compile for real GPUs."""
    from ._gpu_compile import Variant, runtime_args

    def arg_type(name, dtype):
        if name in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"):
            return "*" + dtype
        if name in ("LSE", "Delta"):
            return "*fp32"
        if name in ("CU_SEQLENS", "KV_LEN"):
            return "*i32"
        if name in ("KPM", "Mask"):
            return "*u8"
        if name in ("qk_scale", "sm_scale", "keep_scale"):
            return "fp32"
        return "i32"

    # The packed token count (LSE strides) and the mask's row stride need not be multiples of 16.
    aligned = frozenset({"stride_qb", "stride_qm", "stride_qh", "stride_kb", "stride_kn", "stride_kh", "stride_vb",
                         "stride_vn", "stride_vh", "stride_ob", "stride_om", "stride_oh", "stride_dob", "stride_dom",
                         "stride_doh", "stride_dkb", "stride_dkn", "stride_dkh", "stride_dvb", "stride_dvn",
                         "stride_dvh", "stride_dqb", "stride_dqm", "stride_dqh"})
    layouts = {"packed": dict(IS_VARLEN=True, HAS_KPM=False), "padded": dict(IS_VARLEN=False, HAS_KPM=False),
               "padded+mask": dict(IS_VARLEN=False, HAS_KPM=True)}
    def kernels(block_d):  # the head-dim class's autotuned wrappers and spaces, as the launchers pick them
        def pick(small, large, tiny=None):
            return _for_head_dim(block_d, small, large, tiny)

        return [("attention fwd", pick(_attn_fwd_kernel, _attn_fwd_kernel_d128, _attn_fwd_kernel_d16),
                 pick(_FWD_SPACE, _FWD_SPACE_D128, _FWD_SPACE_D16), "M", {}),
                ("attention dk/dv", pick(_attn_bwd_dkdv_kernel, _attn_bwd_dkdv_kernel_d128),
                 pick(_DKDV_SPACE, _DKDV_SPACE_D128), "N", {"FUSE_DQ": False}),
                ("attention dk/dv/dq fused", _attn_bwd_fused_kernel,
                 _FUSED_SPACE if block_d == FUSED_BLOCK_D else [], "N", {"FUSE_DQ": True}),
                ("attention dq", pick(_attn_bwd_dq_kernel, _attn_bwd_dq_kernel_d128),
                 pick(_DQ_SPACE, _DQ_SPACE_D128), "M", {})]

    variants = []
    dtype_names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    for dtype in (dtype_names[d] for d in GPU_DTYPES):  # fp32 never reaches the kernels on a GPU
        element_size = 4 if dtype == "fp32" else 2
        precision = "ieee" if dtype == "fp32" else "tf32"  # _dot_precision
        for layout, flags in layouts.items():
            for dropout in (False, True):
                # A head dim per BLOCK_D class (16, 32, 64, 128; 96 for a masked, non-power-of-two one).
                for head_dim in (16, 32, 64, 96, 128):
                    block_d = max(16, triton.next_power_of_2(head_dim))  # _Layout.block_d
                    tags = dict(dtype=dtype, layout=layout, dropout=dropout, head_dim=head_dim)
                    for name, kernel, space, stationary, extra in kernels(block_d):
                        types = {a: arg_type(a, dtype) for a in runtime_args(kernel)}
                        if dropout:
                            types["seed"] = "i64"  # _draw_seed: always >= 2^31
                        kept = [c for c in space
                                if _keep_candidate(c, stationary, None, block_d, element_size, 1 << 30)]
                        for i, (block_m, block_n, warps, stages) in enumerate(kept):
                            constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, DROPOUT=dropout,
                                              DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                                              WINDOW=False, **flags, **extra)
                            variants.append(Variant(name, kernel, types, constexprs, warps, stages,
                                                    default=i == 0, matmul=True, tags=tags, aligned=aligned))
                    if head_dim == 64:
                        # Sliding window (ModernBERT's local layers, head dim 64): the default configs with
                        # WINDOW set, which adds the window bounds and one mask per tile.
                        for name, kernel, space, stationary, extra in kernels(block_d):
                            if not space:
                                continue
                            block_m, block_n, warps, stages = space[0]
                            constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, DROPOUT=dropout,
                                              DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                                              WINDOW=True, **flags, **extra)
                            variants.append(Variant(name, kernel, {a: arg_type(a, dtype) for a in runtime_args(kernel)},
                                                    constexprs, warps, stages, default=True, matmul=True,
                                                    tags=dict(tags, window=True), aligned=aligned))
                    if not dropout:
                        pre = _attn_bwd_preprocess_kernel
                        variants.append(Variant(
                            "attention bwd preprocess", pre, {a: arg_type(a, dtype) for a in runtime_args(pre)},
                            dict(HEAD_DIM=head_dim, BLOCK_D=block_d, IS_VARLEN=flags["IS_VARLEN"], BLOCK_M=64),
                            4, tags=dict(tags, dropout=None), aligned=aligned))
    mask_kernel = _dropout_mask_kernel
    variants.append(Variant("attention dropout mask (tests)", mask_kernel,
                            dict({a: arg_type(a, "fp32") for a in runtime_args(mask_kernel)}, seed="i64"),
                            dict(BLOCK_M=32, BLOCK_N=32), 4, tags=dict(dropout=True)))
    return variants


# ----------------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile (fake implementations give the output metadata),
# differentiable through register_autograd. The dropout seed is a 1-element int64 CPU tensor, so a
# compiled graph neither specialises on it nor breaks on .item(); reading it on the host is free.
# ----------------------------------------------------------------------------------------------------
_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? cu_seqlens, int max_seqlen, "
               "float dropout_p, float softmax_scale, Tensor? rng_seed, int rng_offset, int window=-1) "
               "-> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_padding_mask, "
               "Tensor? cu_seqlens, int max_seqlen, float dropout_p, float softmax_scale, Tensor? rng_seed, "
               "int rng_offset, int window=-1) -> (Tensor, Tensor, Tensor)")


def _seed_value(rng_seed) -> int:
    return int(rng_seed.item()) if rng_seed is not None else 0


@torch.library.custom_op("electra_kernels::attention_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _attention_fwd_op(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, rng_seed,
                      rng_offset, window=-1):
    with device_guard(q):  # Triton launches on the current device, which need not be q's
        return attention_forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                                 _seed_value(rng_seed), rng_offset, window)


@_attention_fwd_op.register_fake
def _attention_fwd_fake(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, rng_seed,
                        rng_offset, window=-1):
    if cu_seqlens is not None:
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("electra_kernels::attention_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _attention_bwd_op(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                      rng_seed, rng_offset, window=-1):
    with device_guard(q):
        return attention_backward(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p,
                                  softmax_scale, _seed_value(rng_seed), rng_offset, window)


@_attention_bwd_op.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, dropout_p,
                        softmax_scale, rng_seed, rng_offset, window=-1):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, cu_seqlens, max_seqlen, dropout_p, softmax_scale, rng_seed, rng_offset, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens, rng_seed)
    ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale, ctx.rng_offset = max_seqlen, dropout_p, softmax_scale, rng_offset
    ctx.window = window


def _attention_backward(ctx, dout, dlse):
    # The LSE is an auxiliary output for the backward pass; no gradient flows through it.
    q, k, v, out, lse, key_padding_mask, cu_seqlens, rng_seed = ctx.saved_tensors
    dq, dk, dv = torch.ops.electra_kernels.attention_bwd(
        dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, ctx.max_seqlen, ctx.dropout_p, ctx.softmax_scale,
        rng_seed, ctx.rng_offset, ctx.window)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("electra_kernels::attention_fwd", _attention_backward,
                                setup_context=_attention_setup_context)


# ----------------------------------------------------------------------------------------------------
# Public functions and module
# ----------------------------------------------------------------------------------------------------
def _check_common(q, k, v, dropout_p, what):
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{what}: q is on {q.device} but {name} is on {t.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{what}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype} "
                         "(under torch.autocast they are cast to the autocast dtype)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{what}: unsupported dtype {q.dtype} (fp16, bf16 or fp32)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{what}: dropout_p must be in [0, 1), got {dropout_p}")
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] < 1:
        raise ValueError(f"{what}: head_dim {q.shape[-1]} not supported (1..{MAX_HEAD_DIM})")
    if k.shape != v.shape or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{what}: k {tuple(k.shape)} and v {tuple(v.shape)} must match each other and "
                         f"q's head_dim ({tuple(q.shape)})")


def _autocast(q, k, v):
    """Inside torch.autocast, fp32 q/k/v (e.g. from an fp32 op) become the autocast dtype, as matmul would."""
    device_type = q.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = (t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in (q, k, v))
    return q, k, v


def _sample_keep(shape, dropout_p, device) -> torch.Tensor:
    """A keep-mask with the kernels' quantised keep probability (byte >= threshold), drawn by torch."""
    return torch.randint(0, 256, shape, device=device) >= dropout_threshold(dropout_p)


def _triton_supports(q, k, v, window, rotary_base) -> bool:
    """Whether the Triton kernels run this call (else the PyTorch reference does): fp32 on a GPU takes
    the reference (``GPU_DTYPES``)."""
    if not use_triton(q, k, v, dtype=q.dtype, gpu_dtypes=GPU_DTYPES) or q.dtype == torch.float64:
        return False
    return True


def _rotary_mode(device, dtype=torch.bfloat16) -> str:
    """How ``rotary_base`` runs on the Triton path: "fused" (q/k rotated inside the attention kernels'
    tile loads, electra_kernels/attention_rotary.py) or "separate" (the rotary kernel of
    electra_kernels/rotary.py writes rotated q, k, then the plain attention kernels).

    ELECTRA_KERNELS_ROTARY=fused|separate forces one (read at each call, so benchmarks can compare the
    two); by default ("auto") Hopper and newer (and the interpreter) take the fused kernels, older GPUs
    the separate kernel: on sm_80 the fused dK/dV kernel needs more than 255 registers in every config
    that keeps the tensor cores busy (236-532 B spilled at the default 32x128, 20-156 B at 16x64 / 16x128;
    see attention_rotary.py), where on sm_90 it compiles to 208-247 registers with no spill. fp32 inputs
    (exact products, for checks) take the separate kernel on every GPU: the fused kernels spill 0.2-44 KB
    with fp32 tiles on sm_90."""
    mode = os.environ.get("ELECTRA_KERNELS_ROTARY", "auto")
    if mode not in ("auto", "fused", "separate"):
        raise ValueError(f"ELECTRA_KERNELS_ROTARY must be 'auto', 'fused' or 'separate', got {mode!r}")
    if mode == "auto":
        if device.type != "cuda":
            return "fused"  # the interpreter
        return "fused" if _capability(device) >= (9, 0) and dtype != torch.float32 else "separate"
    return mode


_CAPABILITIES: dict = {}


def _capability(device) -> tuple:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITIES:
        _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITIES[index]


def _draw_seed() -> torch.Tensor:
    # From torch's default CPU generator: torch.manual_seed governs reproducibility, and
    # torch.utils.checkpoint (which restores the CPU RNG state) replays the same dropout mask.
    # 63 bits: Philox's key is 64 bits (Triton splits the seed into two 32-bit words), so layer-steps
    # reuse a mask with probability ~2^-63 per pair, not the 2^-31 of a 31-bit seed (about 3·10⁴
    # colliding pairs over 12 layers × 1M steps). Drawn from [2^31, 2^63): Triton types a Python int
    # argument i32 below 2^31 and i64 above, so every seed takes the one i64 binary the compile gate checks.
    return torch.randint(2**31, 2**63 - 1, (1,), dtype=torch.int64)


def attention(q, k, v, key_padding_mask=None, dropout_p: float = 0.0, softmax_scale=None, *,
              window: Optional[int] = None, rotary_base: Optional[float] = None, return_dropout_mask: bool = False):
    """softmax(Q·Kᵀ·scale + key padding) · V per head, no causal mask.

    q: (batch, seq_q, heads, head_dim); k, v: (batch, seq_k, heads, head_dim); fp16/bf16 (fp32 works and is
    exact: on the GPU it runs ``attention_ref``, torch's fp32 matmuls, which materialise the
    (batch, heads, seq_q, seq_k) scores; see ``GPU_DTYPES``); head_dim <= 128.
    key_padding_mask: (batch, seq_k) bool, True = real token (the Hugging Face ``attention_mask``
    meaning) or None. dropout_p: probability of zeroing an attention
    probability, quantised to 1/256 (the survivors are scaled by 1/q, q = ``dropout_keep_probability(p)``,
    the exact keep probability); the seed is drawn from torch's default CPU
    generator. softmax_scale: defaults to 1/sqrt(head_dim).
    Returns (batch, seq_q, heads, head_dim) in q's dtype. Rows of padded queries are computed like any
    other row (their values are never used by a correct model); a row with no real key returns zeros.
    With ``return_dropout_mask=True`` returns (out, keep_mask (batch, heads, seq_q, seq_k) bool) — the
    mask the kernel applied (debug/test only: it materialises B·H·S² bytes).
    Trailing key padding costs no work; for varying lengths prefer :func:`attention_varlen`.
    window: sliding-window attention, query i attends keys j with |i - j| <= window (flash-attn's
    ``window_size=(window, window)``; ModernBERT's ``local_attention=128`` is window=64); key blocks
    outside every row's window are skipped. rotary_base: rotary embeddings with base θ (transformers'
    ModernBERT layout, :func:`rotary_ref`) applied to q and k at positions 0..seq-1; gradients are
    returned for the unrotated q and k. None (the default) for either: no window / no rotary.
    """
    q, k, v = _autocast(q, k, v)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"attention: q, k, v must be (batch, seq, heads, head_dim), got {tuple(q.shape)}")
    _check_common(q, k, v, dropout_p, "attention")
    batch, seq_q, heads, _ = q.shape
    if k.shape[0] != batch or k.shape[2] != heads:
        raise ValueError(f"attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch or heads")
    seq_k = k.shape[1]
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, seq_k):
        raise ValueError(f"attention: key_padding_mask must be (batch, seq_k) = {(batch, seq_k)}, "
                         f"got {tuple(key_padding_mask.shape)}")
    _check_window_rotary(window, rotary_base, q.shape[-1], "attention")
    if (window is not None or rotary_base is not None) and seq_q != seq_k:
        raise ValueError(f"attention: window and rotary_base need self-attention (seq_q == seq_k), "
                         f"got seq_q={seq_q}, seq_k={seq_k}")

    if not _triton_supports(q, k, v, window, rotary_base):
        keep = None  # the reference samples its own mask unless the caller wants to see it
        if dropout_p > 0.0 and return_dropout_mask:
            keep = _sample_keep((batch, heads, seq_q, seq_k), dropout_p, q.device)
        out = attention_ref(q, k, v, key_padding_mask, dropout_p, softmax_scale, dropout_mask=keep, window=window,
                            rotary_base=rotary_base)
        return (out, keep) if return_dropout_mask else out

    scale = _scale(softmax_scale, q.shape[-1])
    fused_rotary = rotary_base is not None and _rotary_mode(q.device, q.dtype) == "fused"
    if rotary_base is not None and not fused_rotary:  # rotary kernel (electra_kernels.rotary), then attention
        positions = rotary.padded_positions(batch, seq_q, q.device)
        q, k = (rotary.rotate(t.reshape(batch * seq_q, heads, t.shape[-1]), positions, seq_q, rotary_base)
                .view(t.shape) for t in (q, k))
    rng_seed = _draw_seed() if dropout_p > 0.0 else None
    if fused_rotary:
        from .attention_rotary import attention_rotary

        out, _ = attention_rotary(q, k, v, key_padding_mask, None, seq_q, float(dropout_p), scale, rng_seed, window,
                                  rotary_base)
    else:
        out, _ = torch.ops.electra_kernels.attention_fwd(
            q, k, v, key_padding_mask, None, max(seq_q, seq_k), float(dropout_p), scale, rng_seed, 0,
            -1 if window is None else int(window))
    if return_dropout_mask:
        keep = (attention_dropout_mask(batch, heads, seq_q, seq_k, dropout_p, _seed_value(rng_seed), 0, q.device)
                if dropout_p > 0.0 else None)
        return out, keep
    return out


def _check_packed_sizes(cu_seqlens, max_seqlen: int, total_tokens: int) -> None:
    """The packed layout's contract, checked as far as it costs no device synchronisation. The kernels
    trust it: a sequence longer than ``max_seqlen`` keeps its rows past max_seqlen unwritten, and so do
    rows past ``cu_seqlens[-1]``. Host integers always: ``batch · max_seqlen >= total_tokens`` (each
    sequence is at most max_seqlen long). A host (CPU) ``cu_seqlens``, read for free: it starts at 0,
    never decreases, ends at total_tokens, and no length exceeds max_seqlen. A device ``cu_seqlens`` is
    not read (that would wait for the GPU on every layer)."""
    batch = cu_seqlens.shape[0] - 1
    if batch * max_seqlen < total_tokens:
        raise ValueError(f"attention_varlen: {total_tokens} tokens cannot be {batch} sequences of at most "
                         f"max_seqlen={max_seqlen}: max_seqlen (or cu_seqlens) is wrong")
    if cu_seqlens.device.type != "cpu" or torch.compiler.is_compiling() or is_fake(cu_seqlens):
        return  # a device tensor is not read; a traced graph's or a fake tensor's has no values
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or min(lengths, default=0) < 0:
        raise ValueError(f"attention_varlen: cu_seqlens must start at 0 and never decrease, got {bounds[:8]}...")
    if bounds[-1] != total_tokens:
        raise ValueError(f"attention_varlen: cu_seqlens[-1] = {bounds[-1]} but q has {total_tokens} tokens")
    if max(lengths, default=0) > max_seqlen:
        raise ValueError(f"attention_varlen: a sequence of {max(lengths)} tokens exceeds max_seqlen={max_seqlen}")


def attention_varlen(q, k, v, cu_seqlens, max_seqlen: int, dropout_p: float = 0.0, softmax_scale=None, *,
                     window: Optional[int] = None, rotary_base: Optional[float] = None,
                     return_dropout_mask: bool = False):
    """Attention over packed sequences with no padding.

    q, k, v: (total_tokens, heads, head_dim) fp16/bf16 (fp32 works: on the GPU through
    ``attention_varlen_ref``, as in :func:`attention`); cu_seqlens: (batch + 1,) int32 prefix
    sums of the sequence lengths, on q's device, cu_seqlens[-1] == total_tokens; max_seqlen: the longest
    length (python int, >= every length). Returns (total_tokens, heads, head_dim) in q's dtype.
    Contract: cu_seqlens[-1] == total_tokens and max_seqlen >= every length; the kernels trust it (a
    row outside it is left unwritten). Checked without a device sync (``_check_packed_sizes``): fully
    when cu_seqlens is a host tensor, else only batch·max_seqlen >= total_tokens. Pass the sizes the
    loader computed on the host (``electra_fast.model.packed_sizes``).
    Dropout as in :func:`attention`; ``return_dropout_mask=True`` adds the keep-mask
    (batch, heads, max_seqlen, max_seqlen) indexed by positions inside each sequence.
    window, rotary_base: as :func:`attention`, with positions inside each packed sequence (the rotary
    positions restart at every cu_seqlens boundary, and no window crosses one).
    """
    q, k, v = _autocast(q, k, v)
    if q.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1]:
        raise ValueError(f"attention_varlen: q, k, v must be (total_tokens, heads, head_dim) with equal "
                         f"token and head counts, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    _check_common(q, k, v, dropout_p, "attention_varlen")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"attention_varlen: cu_seqlens must be a 1-D int32 tensor (batch + 1,), "
                         f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"attention_varlen: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    max_seqlen = int(max_seqlen)
    if max_seqlen < 0:
        raise ValueError(f"attention_varlen: max_seqlen must be >= 0, got {max_seqlen}")
    batch, heads = cu_seqlens.shape[0] - 1, q.shape[1]
    _check_packed_sizes(cu_seqlens, max_seqlen, q.shape[0])
    _check_window_rotary(window, rotary_base, q.shape[-1], "attention_varlen")

    if not _triton_supports(q, k, v, window, rotary_base):
        keep = None
        if dropout_p > 0.0 and return_dropout_mask:
            keep = _sample_keep((batch, heads, max_seqlen, max_seqlen), dropout_p, q.device)
        out = attention_varlen_ref(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, dropout_mask=keep,
                                   window=window, rotary_base=rotary_base)
        return (out, keep) if return_dropout_mask else out

    scale = _scale(softmax_scale, q.shape[-1])
    fused_rotary = rotary_base is not None and _rotary_mode(q.device, q.dtype) == "fused"
    if rotary_base is not None and not fused_rotary:  # positions restart at every document
        positions = rotary.varlen_positions(cu_seqlens, q.shape[0])
        q, k = (rotary.rotate(t, positions, max_seqlen, rotary_base) for t in (q, k))
    rng_seed = _draw_seed() if dropout_p > 0.0 else None
    if fused_rotary:
        from .attention_rotary import attention_rotary

        out, _ = attention_rotary(q, k, v, None, cu_seqlens, max_seqlen, float(dropout_p), scale, rng_seed, window,
                                  rotary_base)
    else:
        out, _ = torch.ops.electra_kernels.attention_fwd(
            q, k, v, None, cu_seqlens, max_seqlen, float(dropout_p), scale, rng_seed, 0,
            -1 if window is None else int(window))
    if return_dropout_mask:
        keep = (attention_dropout_mask(batch, heads, max_seqlen, max_seqlen, dropout_p, _seed_value(rng_seed), 0,
                                       q.device) if dropout_p > 0.0 else None)
        return out, keep
    return out


class FusedAttention(nn.Module):
    """Attention core of an encoder layer: q, k, v already projected and split into heads.

    forward(q, k, v, key_padding_mask=None) for (batch, seq, heads, head_dim) tensors, or
    forward(q, k, v, cu_seqlens=..., max_seqlen=...) for packed (total_tokens, heads, head_dim) ones.
    Dropout on the probabilities applies only in training mode (``module.train()``), like nn.Dropout.
    """

    def __init__(self, dropout_p: float = 0.0, softmax_scale: Optional[float] = None, *,
                 window: Optional[int] = None, rotary_base: Optional[float] = None):
        super().__init__()
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"FusedAttention: dropout_p must be in [0, 1), got {dropout_p}")
        self.dropout_p = dropout_p
        self.softmax_scale = softmax_scale
        self.window = window
        self.rotary_base = rotary_base

    def forward(self, q, k, v, key_padding_mask=None, cu_seqlens=None, max_seqlen: Optional[int] = None):
        dropout_p = self.dropout_p if self.training else 0.0
        if cu_seqlens is not None:
            if key_padding_mask is not None:
                raise ValueError("FusedAttention: pass either key_padding_mask (padded) or cu_seqlens (packed)")
            if max_seqlen is None:
                raise ValueError("FusedAttention: cu_seqlens needs max_seqlen")
            return attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p, self.softmax_scale,
                                    window=self.window, rotary_base=self.rotary_base)
        return attention(q, k, v, key_padding_mask, dropout_p, self.softmax_scale, window=self.window,
                         rotary_base=self.rotary_base)

    def extra_repr(self) -> str:
        extra = "".join(f", {n}={getattr(self, n)}" for n in ("window", "rotary_base") if getattr(self, n) is not None)
        return f"dropout_p={self.dropout_p}, softmax_scale={self.softmax_scale}{extra}"


# ----------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------
def rotary_cos_sin(positions, head_dim: int, base: float, dtype=torch.float32):
    """cos, sin (positions.shape + (head_dim,)) of the half-split rotary embedding (transformers' ModernBERT
    layout): inv_freq = 1/base^(arange(0, d, 2)/d), angle = position · inv_freq, both halves repeated.
    inv_freq and the angles are computed in fp32 as transformers does, then cast to ``dtype``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                               / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_ref(x, positions, base: float):
    """x (..., seq, heads, head_dim) rotated at ``positions`` (seq,): x·cos + rotate_half(x)·sin, with
    rotate_half(x) = cat(-x2, x1) (x1, x2 the two halves of the head dim). Computed in x's dtype."""
    cos, sin = rotary_cos_sin(positions, x.shape[-1], base, x.dtype)
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _check_window_rotary(window, rotary_base, head_dim, what):
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 0):
        raise ValueError(f"{what}: window must be a non-negative int (query i attends keys |i - j| <= window) "
                         f"or None, got {window!r}")
    if rotary_base is not None:
        if not rotary_base > 0:
            raise ValueError(f"{what}: rotary_base must be > 0, got {rotary_base!r}")
        if head_dim % 2:
            raise ValueError(f"{what}: rotary embeddings need an even head_dim, got {head_dim}")


def attention_ref(q, k, v, key_padding_mask=None, dropout_p: float = 0.0, softmax_scale=None,
                  return_lse: bool = False, dropout_mask=None, *, window: Optional[int] = None,
                  rotary_base: Optional[float] = None):
    """Plain PyTorch attention in fp32 (float64 when q is float64: the tests' ground truth).

    dropout_mask: optional (batch, heads, seq_q, seq_k) bool, True = keep, used instead of sampling one
    (lets tests replay a kernel's own mask). return_lse adds the (batch, heads, seq_q) log-sum-exp of
    the scaled scores (-inf for a row without real keys, whose output is 0). Autocast is turned off
    inside, so the math stays in the stated precision.
    window: query i attends only keys j with |i - j| <= window (flash-attn's window_size=(w, w)).
    rotary_base: q and k rotated by rotary embeddings (:func:`rotary_ref`, base θ) at positions
    0..seq-1 before the scores, in the compute precision.
    """
    _check_window_rotary(window, rotary_base, q.shape[-1], "attention_ref")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
        if rotary_base is not None:
            qf = rotary_ref(qf, torch.arange(q.shape[1], device=q.device), rotary_base)
            kf = rotary_ref(kf, torch.arange(k.shape[1], device=k.device), rotary_base)
        qf, kf, vf = (t.transpose(1, 2) for t in (qf, kf, vf))  # (b, h, s, d)
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask[:, None, None, :].bool(), float("-inf"))
        if window is not None:
            rows = torch.arange(q.shape[1], device=q.device)[:, None]
            cols = torch.arange(k.shape[1], device=q.device)[None, :]
            scores = scores.masked_fill((rows - cols).abs() > window, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # fully padded rows -> zeros
        if dropout_mask is not None:
            probs = probs * dropout_mask.to(probs.dtype) * dropout_scale(dropout_p)
        elif dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        out = torch.matmul(probs, vf).transpose(1, 2).to(q.dtype)
    return (out, lse) if return_lse else out


def attention_varlen_ref(q, k, v, cu_seqlens, max_seqlen: int, dropout_p: float = 0.0, softmax_scale=None,
                         return_lse: bool = False, dropout_mask=None, *, window: Optional[int] = None,
                         rotary_base: Optional[float] = None):
    """Reference for :func:`attention_varlen`: each sequence attended on its own.

    dropout_mask: optional (batch, heads, max_seqlen, max_seqlen) bool indexed by in-sequence positions
    (the layout :func:`attention_dropout_mask` returns). return_lse adds the (heads, total_tokens) LSE.
    window, rotary_base: as :func:`attention_ref`, with positions inside each sequence (they restart at
    every cu_seqlens boundary).
    """
    _check_window_rotary(window, rotary_base, q.shape[-1], "attention_varlen_ref")
    bounds = cu_seqlens.tolist()
    outs, lses = [], []
    for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        mask_b = dropout_mask[b:b + 1, :, : e - s, : e - s] if dropout_mask is not None else None
        out_b, lse_b = attention_ref(q[s:e][None], k[s:e][None], v[s:e][None], None, dropout_p, softmax_scale,
                                     return_lse=True, dropout_mask=mask_b, window=window, rotary_base=rotary_base)
        outs.append(out_b[0])
        lses.append(lse_b[0])
    out = torch.cat(outs, dim=0) if outs else q.new_zeros(q.shape)
    if not return_lse:
        return out
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros((q.shape[1], 0), dtype=compute_dtype)
    return out, lse
