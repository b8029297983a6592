"""The discriminator's per-token replaced/original logit fused with masked binary cross-entropy.

For N token rows h_n (H features) after the head's dense + GELU, the projection w (1, H), bias b,
labels y_n (1 = replaced) and the real-token mask r_n:

    z_n   = h_n · w + b                                               (returned, fp32)
    loss  = (1/R) Σ_n r_n · (max(z_n, 0) - z_n y_n + log(1 + exp(-|z_n|)))      R = max(Σ r_n, 1)
    dz_n  = r_n · (sigmoid(z_n) - y_n)          (the gradient of R · loss with respect to z_n)
    dH    = (g/R) dz ⊗ w        dw = (g/R) Σ_n dz_n h_n        db = (g/R) Σ_n dz_n      g = grad_loss

One forward pass reads each row once: programs own contiguous runs of rows, hold a whole row block in
registers, and produce logits, the per-token loss, dz, accuracy counts and the row-sums Σ dz_n h_n and
Σ dz_n (fp32, one partial per program, reduced by a small second kernel - no atomics, so results are
bitwise reproducible). The backward pass then needs no second read of H: dH is the rank-1 product of
the saved dz (N floats) and w, written in one pass with the factor g/R applied in the same
instruction; dw and db are the saved sums times g/R.

Why not save dH itself in the forward and rescale it in the backward (Liger's fused linear
cross-entropy, which skips the rescale when grad_output == 1)? dH is N x H: holding it from forward
to backward costs 24 MiB at 16,384 x 768 bf16, writing it in the forward and rescaling it later costs
a write plus a read+write, and the ELECTRA objective scales this loss by disc_weight = 50, so the
skip would never fire. Saving dz costs 64 KiB and one write of dH, whatever grad_output is, and
g is read from device memory in-kernel (no host sync to test it).

The logits output is differentiable too (rarely used; e.g. an extra loss on them): its gradient adds
to dz in the same dH pass, and costs one extra read of H for dw only when it is present.

Accuracy follows HF's ELECTRA: predicted replaced <=> sigmoid(z) > 0.5 <=> z > 0; it is counted over
real tokens against labels > 0.5.

Reading order: Triton kernels -> launchers -> torch.library custom ops + autograd -> public functions
and module -> reference.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import HAS_TRITON, interpreter_enabled, use_triton
from ._outputs import new_empty
from ._triton_utils import device_guard, target_programs

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_utils import cast_rne
else:  # pragma: no cover - the reference path needs no triton
    triton = None

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A row block lives in registers: BLOCK_N x next_pow2(H) fp32 values per program.
_MAX_HIDDEN = 8192
_TILE_ELEMENTS = 8192


# --------------------------------------------------------------------------------------------------
# 1. Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _disc_head_fwd_kernel(
        HIDDEN, W, BIAS, LABELS, MASK,
        LOGITS, DLOGITS, PART_DW, PART_SUMS, PART_COUNTS,
        N, HID, stride_hn, rows_per_program,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_H)
        col_ok = cols < HID
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(BIAS).to(tl.float32)
        else:
            b = 0.0

        dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
        loss_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        dz_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        n_real = tl.zeros((BLOCK_N,), dtype=tl.int32)
        n_correct = tl.zeros((BLOCK_N,), dtype=tl.int32)
        row_begin = pid * rows_per_program
        row_end = tl.minimum(row_begin + rows_per_program, N)
        for r0 in range(row_begin, row_end, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            row_ok = rows < row_end
            h = tl.load(HIDDEN + rows.to(tl.int64)[:, None] * stride_hn + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            z = tl.sum(h * w[None, :], axis=1) + b
            y = tl.load(LABELS + rows, mask=row_ok, other=0).to(tl.float32)
            real = (tl.load(MASK + rows, mask=row_ok, other=0) != 0) & row_ok
            tl.store(LOGITS + rows, z, mask=row_ok)

            # BCE with logits, stable for either sign of z: max(z, 0) - z·y + log(1 + e^-|z|).
            bce = tl.maximum(z, 0.0) - z * y + tl.log(1.0 + tl.exp(-tl.abs(z)))
            dz = tl.where(real, tl.sigmoid(z) - y, 0.0)
            tl.store(DLOGITS + rows, dz, mask=row_ok)
            dw += tl.sum(dz[:, None] * h, axis=0)
            loss_sum += tl.where(real, bce, 0.0)
            dz_sum += dz
            n_real += real.to(tl.int32)
            n_correct += (real & ((z > 0.0) == (y > 0.5))).to(tl.int32)

        tl.store(PART_DW + pid * HID + cols, dw, mask=col_ok)
        tl.store(PART_SUMS + 2 * pid, tl.sum(loss_sum, axis=0))
        tl.store(PART_SUMS + 2 * pid + 1, tl.sum(dz_sum, axis=0))
        tl.store(PART_COUNTS + 2 * pid, tl.sum(n_real, axis=0))
        tl.store(PART_COUNTS + 2 * pid + 1, tl.sum(n_correct, axis=0))

    @triton.jit
    def _disc_head_finalize_kernel(
        PART_DW, PART_SUMS, PART_COUNTS, num_parts, HID,
        DW_SUM, DB_SUM, LOSS, NUM_TOKENS, NUM_CORRECT,
        BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """Reduce the per-program partials: program i sums a block of dw columns, program 0 also the
        scalars (loss = Σ bce / max(R, 1))."""
        pid = tl.program_id(0)
        cols = pid * BLOCK_H + tl.arange(0, BLOCK_H)
        col_ok = cols < HID
        dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for p0 in range(0, num_parts, BLOCK_P):
            parts = p0 + tl.arange(0, BLOCK_P)
            ok = (parts[:, None] < num_parts) & col_ok[None, :]
            dw += tl.sum(tl.load(PART_DW + parts[:, None] * HID + cols[None, :], mask=ok, other=0.0), axis=0)
        tl.store(DW_SUM + cols, dw, mask=col_ok)
        if pid == 0:
            loss_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
            dz_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
            n_real = tl.zeros((BLOCK_P,), dtype=tl.int64)
            n_correct = tl.zeros((BLOCK_P,), dtype=tl.int64)
            for p0 in range(0, num_parts, BLOCK_P):
                parts = p0 + tl.arange(0, BLOCK_P)
                ok = parts < num_parts
                loss_sum += tl.load(PART_SUMS + 2 * parts, mask=ok, other=0.0)
                dz_sum += tl.load(PART_SUMS + 2 * parts + 1, mask=ok, other=0.0)
                n_real += tl.load(PART_COUNTS + 2 * parts, mask=ok, other=0).to(tl.int64)
                n_correct += tl.load(PART_COUNTS + 2 * parts + 1, mask=ok, other=0).to(tl.int64)
            total_real = tl.sum(n_real, axis=0)
            tl.store(LOSS, tl.sum(loss_sum, axis=0) / tl.maximum(total_real, 1).to(tl.float32))
            tl.store(DB_SUM, tl.sum(dz_sum, axis=0))
            tl.store(NUM_TOKENS, total_real)
            tl.store(NUM_CORRECT, tl.sum(n_correct, axis=0))

    @triton.jit
    def _disc_head_bwd_kernel(
        GRAD_LOSS, GRAD_LOGITS, NUM_TOKENS, DLOGITS, W, DW_SUM, DB_SUM,
        DHIDDEN, DW, DB, N, HID, stride_dn,
        HAS_GRAD_LOSS: tl.constexpr, HAS_GRAD_LOGITS: tl.constexpr, WRITE_DH: tl.constexpr,
        WRITE_DW: tl.constexpr, WRITE_DB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """dH = (g/R · dz + grad_logits) ⊗ w; program 0 also writes dw = g/R · Σ dz h and
        db = g/R · Σ dz from the sums the forward saved."""
        pid = tl.program_id(0)
        if HAS_GRAD_LOSS:
            # g/R from device memory: no host sync, and no separate rescale pass to skip when g == 1.
            scale = tl.load(GRAD_LOSS).to(tl.float32) / tl.maximum(tl.load(NUM_TOKENS), 1).to(tl.float32)
        else:
            scale = 0.0
        cols = tl.arange(0, BLOCK_H)
        col_ok = cols < HID
        if WRITE_DH:
            rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = rows < N
            dz = tl.load(DLOGITS + rows, mask=row_ok, other=0.0) * scale
            if HAS_GRAD_LOGITS:
                dz += tl.load(GRAD_LOGITS + rows, mask=row_ok, other=0.0).to(tl.float32)
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            tl.store(DHIDDEN + rows.to(tl.int64)[:, None] * stride_dn + cols[None, :],
                     cast_rne(dz[:, None] * w[None, :], DHIDDEN.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
        if pid == 0:
            if WRITE_DW:
                dw = tl.load(DW_SUM + cols, mask=col_ok, other=0.0) * scale
                tl.store(DW + cols, cast_rne(dw, DW.dtype.element_ty), mask=col_ok)
            if WRITE_DB:
                tl.store(DB, cast_rne(tl.load(DB_SUM) * scale, DB.dtype.element_ty))


# --------------------------------------------------------------------------------------------------
# 2. Launchers
# --------------------------------------------------------------------------------------------------
def _blocks(hid: int, element_size: int = 2):
    """(BLOCK_N, BLOCK_H, num_warps) for hidden size ``hid``. The forward passes its input's element
    size: 4-byte (fp32) rows take half the tile, 4,096 elements. With 8,192, Triton 3.9's sm_80 forward
    sat just above 128 registers and ptxas squeezed it into 128 (two programs per SM), spilling 16 B at
    H = 128 (128 / 16 B; Triton 3.7.1: 169 / 0, sm_90 158 / 0 and 177 / 0); every fp32 hidden size sat
    at 152-190 registers on both Tritons. Half the tile: 91-119 registers, 0 spilled, on sm_80 and
    sm_90 with both Tritons for H = 128 ... 1024, still 16 KB loaded per step. 16-bit rows (at most
    128 registers, 0 spilled) keep 8,192."""
    block_h = triton.next_power_of_2(hid)
    tile = _TILE_ELEMENTS // 2 if element_size >= 4 else _TILE_ELEMENTS
    block_n = max(1, tile // block_h)
    if interpreter_enabled():
        block_n = max(block_n, 16)  # fewer, larger steps: the interpreter pays per operation
    num_warps = 8 if block_n * block_h >= tile else 4
    return block_n, block_h, num_warps


def _as_loadable(t: Tensor) -> Tensor:
    # Triton loads bytes for bool (i1) pointers; give it the same bytes as uint8.
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _check_inputs(hidden, weight, bias, labels, mask):
    if hidden.dim() != 2:
        raise ValueError(f"replaced_token_bce: hidden must be (N, H), got {tuple(hidden.shape)}")
    N, HID = hidden.shape
    if tuple(weight.shape) != (1, HID):
        raise ValueError(f"replaced_token_bce: weight must be (1, {HID}), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (1,):
        raise ValueError(f"replaced_token_bce: bias must be (1,), got {tuple(bias.shape)}")
    if tuple(labels.shape) != (N,):
        raise ValueError(f"replaced_token_bce: labels must be ({N},), got {tuple(labels.shape)}")
    if tuple(mask.shape) != (N,):
        raise ValueError(f"replaced_token_bce: mask must be ({N},), got {tuple(mask.shape)}")


def disc_head_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                      mask: Tensor):
    """Launch the forward. Returns (loss () fp32, logits (N,) fp32, num_correct () int64,
    num_tokens () int64, dz (N,) fp32, dw_sum (H,) fp32, db_sum () fp32); see the module docstring."""
    _check_inputs(hidden, weight, bias, labels, mask)
    N, HID = hidden.shape
    if HID > _MAX_HIDDEN:
        raise ValueError(f"replaced_token_bce: the Triton kernel holds rows in registers and supports "
                         f"H <= {_MAX_HIDDEN}, got {HID}")
    device = hidden.device
    block_n, block_h, num_warps = _blocks(HID, hidden.element_size())
    # Forward programs: four per SM keeps every SM streaming while the (programs, H) partials stay
    # small (528 x 768 fp32 = 1.5 MiB on an H100); the interpreter runs programs serially, so few.
    num_parts = max(1, min(target_programs(device, per_sm=4, interpreted=3), triton.cdiv(N, block_n)))
    rows_per_program = block_n * triton.cdiv(triton.cdiv(N, block_n), num_parts) if N else block_n
    num_parts = max(1, triton.cdiv(N, rows_per_program))

    logits = new_empty((N,), dtype=torch.float32, device=device)
    dz = new_empty((N,), dtype=torch.float32, device=device)
    part_dw = new_empty((num_parts, HID), dtype=torch.float32, device=device)
    part_sums = new_empty((num_parts, 2), dtype=torch.float32, device=device)
    part_counts = new_empty((num_parts, 2), dtype=torch.int32, device=device)
    dw_sum = new_empty((HID,), dtype=torch.float32, device=device)
    loss = new_empty((), dtype=torch.float32, device=device)
    db_sum = new_empty((), dtype=torch.float32, device=device)
    num_tokens = new_empty((), dtype=torch.int64, device=device)
    num_correct = new_empty((), dtype=torch.int64, device=device)

    block_f = min(block_h, 128)
    with device_guard(hidden):
        _disc_head_fwd_kernel[(num_parts,)](
            hidden, weight, bias if bias is not None else weight, _as_loadable(labels), _as_loadable(mask),
            logits, dz, part_dw, part_sums, part_counts,
            N, HID, hidden.stride(0), rows_per_program,
            HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_H=block_h, num_warps=num_warps,
        )
        _disc_head_finalize_kernel[(triton.cdiv(HID, block_f),)](
            part_dw, part_sums, part_counts, num_parts, HID,
            dw_sum, db_sum, loss, num_tokens, num_correct,
            BLOCK_P=32, BLOCK_H=block_f, num_warps=4,
        )
    return loss, logits, num_correct, num_tokens, dz, dw_sum, db_sum


def disc_head_backward(grad_loss: Optional[Tensor], grad_logits: Optional[Tensor], hidden: Tensor,
                       weight: Tensor, bias: Optional[Tensor], dz: Tensor, dw_sum: Tensor,
                       db_sum: Tensor, num_tokens: Tensor, need_hidden: bool, need_weight: bool,
                       need_bias: bool):
    """(dH in hidden's dtype, dw in weight's dtype, db in bias's dtype), None where not needed."""
    N, HID = hidden.shape
    device = hidden.device
    block_n, block_h, num_warps = _blocks(HID)
    grad_hidden = new_empty((N, HID), dtype=hidden.dtype, device=device) if need_hidden else None
    grad_weight = new_empty((1, HID), dtype=weight.dtype, device=device) if need_weight else None
    grad_bias = new_empty((1,), dtype=bias.dtype, device=device) if need_bias else None
    if grad_logits is not None and grad_logits.stride(-1) != 1:
        grad_logits = grad_logits.contiguous()
    grid = (max(1, triton.cdiv(N, block_n)) if need_hidden else 1,)
    with device_guard(hidden):
        _disc_head_bwd_kernel[grid](
            grad_loss if grad_loss is not None else dz, grad_logits if grad_logits is not None else dz,
            num_tokens, dz, weight, dw_sum, db_sum,
            grad_hidden if need_hidden else dz, grad_weight if need_weight else dz,
            grad_bias if need_bias else dz,
            N, HID, HID,
            HAS_GRAD_LOSS=grad_loss is not None, HAS_GRAD_LOGITS=grad_logits is not None,
            WRITE_DH=need_hidden and N > 0, WRITE_DW=need_weight, WRITE_DB=need_bias,
            BLOCK_N=block_n, BLOCK_H=block_h, num_warps=num_warps,
        )
    if grad_logits is not None:
        # The logits' own gradient: dw needs one more read of H (only on this rare path).
        gl = grad_logits.to(torch.float32)
        if need_weight:
            grad_weight += (gl @ hidden.to(torch.float32)).to(weight.dtype)[None, :]
        if need_bias:
            grad_bias += gl.sum().to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


def compile_variants():
    """The kernels above in the variants the launchers use (dtypes x hidden sizes; tile sizes and warps
    from ``_blocks``, as the launchers pick them): for ``benchmarks/compile_report.py`` and
    ``tests/kernels/test_gpu_compile.py``. These kernels have one config per size, no candidates."""
    from ._gpu_compile import Variant, runtime_args

    def types(kernel, dtype):
        def arg_type(name):
            if name in ("HIDDEN", "W", "BIAS", "DHIDDEN", "DW", "DB"):
                return "*" + dtype
            if name in ("LABELS",):
                return "*i64"
            if name == "MASK":
                return "*u8"
            if name in ("PART_COUNTS",):
                return "*i32"
            if name in ("NUM_TOKENS", "NUM_CORRECT"):
                return "*i64"
            if name.isupper() and name not in ("N", "HID") or name.startswith(("PART_", "DW_", "DB_", "GRAD_")):
                return "*fp32"
            return "i32"

        return {a: arg_type(a) for a in runtime_args(kernel)}

    variants = []
    for dtype in ("bf16", "fp16", "fp32"):
        for hidden in (128, 256, 768, 1024):
            block_n, block_h, num_warps = _blocks(hidden, 4 if dtype == "fp32" else 2)
            tags = dict(dtype=dtype, hidden=hidden)
            variants.append(Variant("disc head fwd", _disc_head_fwd_kernel, types(_disc_head_fwd_kernel, dtype),
                                    dict(HAS_BIAS=True, BLOCK_N=block_n, BLOCK_H=block_h), num_warps, tags=tags,
                                    aligned=frozenset({"stride_hn"})))
            block_n, block_h, num_warps = _blocks(hidden)  # the backward: one tile size for every dtype
            variants.append(Variant("disc head bwd", _disc_head_bwd_kernel, types(_disc_head_bwd_kernel, dtype),
                                    dict(HAS_GRAD_LOSS=True, HAS_GRAD_LOGITS=False, WRITE_DH=True, WRITE_DW=True,
                                         WRITE_DB=True, BLOCK_N=block_n, BLOCK_H=block_h), num_warps, tags=tags,
                                    aligned=frozenset({"stride_dn"})))
            variants.append(Variant("disc head finalize", _disc_head_finalize_kernel,
                                    types(_disc_head_finalize_kernel, "fp32"),
                                    dict(BLOCK_P=32, BLOCK_H=min(block_h, 128)), 4, tags=dict(hidden=hidden)))
    return variants


# --------------------------------------------------------------------------------------------------
# 3. torch.library custom ops (opaque to torch.compile, with fake shapes) and their autograd
# --------------------------------------------------------------------------------------------------
_EMPTY = (0,)


@torch.library.custom_op("electra_kernels::disc_head_fwd", mutates_args=())
def _disc_head_fwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                      mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return disc_head_forward(hidden, weight, bias, labels, mask)


@_disc_head_fwd_op.register_fake
def _(hidden, weight, bias, labels, mask):
    N, HID = hidden.shape
    f32, i64 = torch.float32, torch.int64
    return (hidden.new_empty((), dtype=f32), hidden.new_empty((N,), dtype=f32),
            hidden.new_empty((), dtype=i64), hidden.new_empty((), dtype=i64),
            hidden.new_empty((N,), dtype=f32), hidden.new_empty((HID,), dtype=f32),
            hidden.new_empty((), dtype=f32))


@torch.library.custom_op("electra_kernels::disc_head_bwd", mutates_args=())
def _disc_head_bwd_op(grad_loss: Optional[Tensor], grad_logits: Optional[Tensor], hidden: Tensor,
                      weight: Tensor, bias: Optional[Tensor], dz: Tensor, dw_sum: Tensor,
                      db_sum: Tensor, num_tokens: Tensor, need_hidden: bool, need_weight: bool,
                      need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    dh, dw, db = disc_head_backward(grad_loss, grad_logits, hidden, weight, bias, dz, dw_sum, db_sum,
                                    num_tokens, need_hidden, need_weight, need_bias)
    # Custom ops may not return None: empty placeholders stand for "not needed".
    empty = hidden.new_empty(_EMPTY)
    return (dh if dh is not None else empty, dw if dw is not None else empty,
            db if db is not None else empty)


@_disc_head_bwd_op.register_fake
def _(grad_loss, grad_logits, hidden, weight, bias, dz, dw_sum, db_sum, num_tokens, need_hidden,
      need_weight, need_bias):
    return (hidden.new_empty(hidden.shape if need_hidden else _EMPTY),
            weight.new_empty(weight.shape if need_weight else _EMPTY),
            hidden.new_empty(bias.shape if need_bias else _EMPTY,
                             dtype=bias.dtype if need_bias else None))


def _disc_setup_context(ctx, inputs, output):
    hidden, weight, bias, _labels, _mask = inputs
    _loss, _logits, num_correct, num_tokens, dz, dw_sum, db_sum = output
    ctx.mark_non_differentiable(num_correct, num_tokens, dz, dw_sum, db_sum)
    # An unused logits (or loss) output then arrives as None instead of a materialised zero tensor,
    # which would cost a pointless read of H in the backward.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, dz, dw_sum, db_sum, num_tokens)


def _disc_backward(ctx, grad_loss, grad_logits, *_unused):
    hidden, weight, bias, dz, dw_sum, db_sum, num_tokens = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and bias is not None
    if (grad_loss is None and grad_logits is None) or not (need_hidden or need_weight or need_bias):
        return None, None, None, None, None
    dh, dw, db = torch.ops.electra_kernels.disc_head_bwd(
        grad_loss, grad_logits, hidden, weight, bias, dz, dw_sum, db_sum, num_tokens,
        need_hidden, need_weight, need_bias)
    return (dh if need_hidden else None, dw if need_weight else None, db if need_bias else None,
            None, None)


_disc_head_fwd_op.register_autograd(_disc_backward, setup_context=_disc_setup_context)


# --------------------------------------------------------------------------------------------------
# 4. Public functions and module
# --------------------------------------------------------------------------------------------------
def replaced_token_bce_with_stats(hidden, weight, bias, labels, mask):
    """``replaced_token_bce`` plus accuracy counts from the same pass.

    Returns loss: () fp32, logits: (N,) fp32, num_correct: () int64 (real tokens where
    (logit > 0) == (label > 0.5)), num_tokens: () int64 (real tokens). Shapes as in
    ``replaced_token_bce``."""
    _check_inputs(hidden, weight, bias, labels, mask)
    if not use_triton(hidden, weight, bias, labels, mask):
        return replaced_token_bce_with_stats_ref(hidden, weight, bias, labels, mask)
    if hidden.dtype not in _KERNEL_DTYPES or weight.dtype not in _KERNEL_DTYPES:
        # e.g. float64 for gradient checks: the reference handles it
        return replaced_token_bce_with_stats_ref(hidden, weight, bias, labels, mask)
    if mask.dtype != torch.bool:
        mask = mask != 0
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    loss, logits, num_correct, num_tokens, *_saved = torch.ops.electra_kernels.disc_head_fwd(
        hidden, weight.contiguous(), bias, labels.contiguous(), mask.contiguous())
    return loss, logits, num_correct, num_tokens


def replaced_token_bce(hidden, weight, bias, labels, mask):
    """Replaced-token detection loss.

    hidden: (N, H) after the discriminator head's dense + GELU. weight: (1, H). bias: (1,) or None.
    labels: (N,) 0/1 (1 = replaced), any integer or float dtype. mask: (N,) bool, True = real token.
    Returns loss: () fp32 mean BCE-with-logits over masked-in tokens (0 when none),
    logits: (N,) fp32 = hidden·weightᵀ + bias.

    On CUDA (or under TRITON_INTERPRET=1) one fused Triton pass computes the logits, the loss and
    everything the backward needs (see the module docstring). The dot product runs in fp32 whatever
    the input dtypes (there is no autocast cast of the weight: it is read as it is).
    """
    loss, logits, _, _ = replaced_token_bce_with_stats(hidden, weight, bias, labels, mask)
    return loss, logits


class ReplacedTokenBCE(nn.Module):
    """The discriminator's final ``Linear(H, 1)`` fused with the masked BCE loss.

    Holds ``weight`` (1, H) and ``bias`` (1,) under the names and with the initialisation of
    ``nn.Linear(hidden_size, 1)``, so a state dict of that layer loads as it is.
    forward(hidden (N, H), labels (N,), mask (N,) bool) -> (loss, logits), or with
    ``return_stats=True`` -> (loss, logits, num_correct, num_tokens).
    """

    def __init__(self, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.weight = nn.Parameter(torch.empty((1, self.hidden_size), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty((1,), device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation: kaiming-uniform weight, bias uniform in ±1/sqrt(fan_in).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, hidden: Tensor, labels: Tensor, mask: Tensor, return_stats: bool = False):
        if return_stats:
            return replaced_token_bce_with_stats(hidden, self.weight, self.bias, labels, mask)
        return replaced_token_bce(hidden, self.weight, self.bias, labels, mask)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, bias={self.bias is not None}"


# --------------------------------------------------------------------------------------------------
# 5. Reference
# --------------------------------------------------------------------------------------------------
def replaced_token_bce_ref(hidden, weight, bias, labels, mask):
    """Reference: fp32 logits and loss, float64 when called with float64 (the tests' ground truth)."""
    logits = F.linear(hidden, weight, bias).squeeze(-1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    per_token = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    mask_f = mask.to(per_token.dtype)
    loss = (per_token * mask_f).sum() / mask_f.sum().clamp(min=1.0)
    return loss, logits


def replaced_token_bce_with_stats_ref(hidden, weight, bias, labels, mask):
    """Reference for ``replaced_token_bce_with_stats``: the counts from the reference logits."""
    loss, logits = replaced_token_bce_ref(hidden, weight, bias, labels, mask)
    with torch.no_grad():
        real = mask.bool()
        correct = ((logits.detach() > 0) == (labels.float() > 0.5)) & real
        return loss, logits, correct.sum(), real.sum()
