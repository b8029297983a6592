"""LayerNorm with an optional fused dropout + residual add on the incoming branch.

Post-LN BERT/ELECTRA ends every sub-layer with ``LayerNorm(dropout(dense_out) + residual)``: three
elementwise passes over (tokens, hidden) in PyTorch (dropout, add, normalise), each reading and writing
the whole activation, plus a saved dropout mask. Here one program normalises whole rows in registers:

    z    = dropout(x) + residual              (dropout mask drawn in-kernel from a seed)
    y    = (z - mean(z)) * rstd(z) * weight + bias,   rstd = 1 / sqrt(var(z) + eps)

Statistics are fp32 whatever the I/O dtype. The dropout mask comes 16 keep decisions per Philox
evaluation (``dropout_keep16``: four random words = 16 bytes against an 8-bit threshold, a sixteenth
of the integer work of one ``tl.rand`` per element, which would cost more than this memory-bound
kernel's loads); the drop probability is therefore quantised to 1/256 and survivors are scaled by 1/q,
q the exact quantised keep probability (``dropout_keep_probability``), so E[dropout(x)] = x. The mask
depends only on (seed, row, column), so the backward pass regenerates it and no mask is stored; the
forward saves z (or x when there is neither residual nor dropout), mean and rstd. For one row, with
x̂ = (z - mean)·rstd, g = dy·weight:

    dz = rstd · (g - mean(g) - x̂ · mean(g · x̂))
    dx = dz · keep / q,   dresidual = dz,   dweight = Σ_rows dy·x̂,   dbias = Σ_rows dy

Weight and bias gradients are accumulated per program over a contiguous block of rows in registers and
the (programs, N) partial sums reduced once at the end (the flash-attn / Liger backward layout). Narrow
rows go several to a program (a ~4096-element tile), so hidden 256 does not launch one tiny program per
token. Nothing is saved for backward when no input needs a gradient (inference writes y only).

Reading order: Triton kernels -> launchers -> torch.library custom ops + autograd -> public function and
modules -> reference.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import HAS_TRITON, use_triton
from ._outputs import new_empty
from ._triton_utils import device_guard, dropout_scale, dropout_threshold, target_programs

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._triton_utils import dropout_keep16
else:  # pragma: no cover - the reference path needs no triton
    triton = None

# Features above this many bytes per row would not fit a row in registers (flash-attn's limit too).
_MAX_FUSED_BYTES = 65536
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# ~8 elements per thread: a 2048-element tile at 8 warps. Checked with ptxas for sm_90 (no spills in
# either kernel up to 8192 features with dropout; 16384 spills a little in the backward pass).
_TILE_ELEMENTS = 2048


# --------------------------------------------------------------------------------------------------
# 1. Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _keep_mask(SEED, rows, N, drop_threshold, BLOCK_N: tl.constexpr):
        """Keep decisions (len(rows), BLOCK_N) for whole rows: element (r, c) is byte c % 16 of Philox
        counter r·⌈N/16⌉ + c // 16 (``dropout_keep16``: one Philox evaluation per 16 elements)."""
        counters = rows[:, None] * tl.cdiv(N, 16) + tl.arange(0, BLOCK_N // 16)[None, :]
        return dropout_keep16(tl.load(SEED), counters, drop_threshold)

    @triton.jit
    def _layer_norm_fwd_kernel(
        X, RESIDUAL, W, B, Y, Z, MEAN, RSTD, DROPOUT_MASK, SEED,
        stride_x_row, stride_res_row, stride_y_row, stride_z_row,
        M, N, eps, drop_threshold, dropout_scale,
        HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, STORE_Z: tl.constexpr, STORE_DROPOUT_MASK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # A program normalises BLOCK_M whole rows (BLOCK_M = 1 for wide rows; several narrow rows
        # per program keep the GPU's programs busy at hidden 256). int64 rows: rows·stride > 2^31.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_in = rows < M
        col_in = cols < N
        inside = row_in[:, None] & col_in[None, :]
        z = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            # The backward pass regenerates the same mask from the seed (_keep_mask).
            keep = _keep_mask(SEED, rows, N, drop_threshold, BLOCK_N)
            z = tl.where(keep, z * dropout_scale, 0.0)
            if STORE_DROPOUT_MASK:
                tl.store(DROPOUT_MASK + rows[:, None] * N + cols[None, :], keep, mask=inside)
        if HAS_RESIDUAL:
            z += tl.load(RESIDUAL + rows[:, None] * stride_res_row + cols[None, :], mask=inside,
                         other=0.0).to(tl.float32)
        if STORE_Z:
            tl.store(Z + rows[:, None] * stride_z_row + cols[None, :], z.to(Z.dtype.element_ty), mask=inside)
        # Two-pass statistics on rows held in registers: no E[z²] - E[z]² cancellation.
        mean = tl.sum(z, axis=1) / N
        centered = tl.where(inside, z - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(MEAN + rows, mean, mask=row_in)
        tl.store(RSTD + rows, rstd, mask=row_in)
        y = centered * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * stride_y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=inside)

    @triton.jit
    def _layer_norm_bwd_kernel(
        DY, Z, W, MEAN, RSTD, DX, DRESIDUAL, DW_PARTIAL, DB_PARTIAL, SEED,
        stride_dy_row, stride_z_row, stride_dx_row, stride_dres_row,
        M, N, rows_per_program, drop_threshold, dropout_scale,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
        STORE_DRESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Each program owns rows [row_start, row_end), walks them BLOCK_M at a time and keeps its
        # dweight/dbias sums in registers; one (N,) partial per program is reduced by the launcher.
        program = tl.program_id(0)
        row_start = program * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, M)
        cols = tl.arange(0, BLOCK_N)
        col_in = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_in, other=0.0).to(tl.float32)
        # 1-D accumulators (one cross-row sum per row block) keep register pressure at one row's worth.
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for block_start in range(row_start, row_end, BLOCK_M):
            rows = (block_start + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_in = rows < row_end
            inside = row_in[:, None] & col_in[None, :]
            z = tl.load(Z + rows[:, None] * stride_z_row + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy_row + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_in, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_in, other=0.0)
            xhat = tl.where(inside, (z - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_WEIGHT:
                g = dy * w[None, :]
            else:
                g = dy
            dw += tl.sum(dy * xhat, axis=0)
            if HAS_BIAS:
                db += tl.sum(dy, axis=0)
            # dz = rstd·(g - mean(g) - x̂·mean(g·x̂)); padded columns and rows have g = x̂ = 0.
            mean_gx = tl.sum(g * xhat, axis=1) / N
            mean_g = tl.sum(g, axis=1) / N
            dz = (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None]
            if STORE_DRESIDUAL:
                tl.store(DRESIDUAL + rows[:, None] * stride_dres_row + cols[None, :],
                         dz.to(DRESIDUAL.dtype.element_ty), mask=inside)
            if HAS_DROPOUT:
                keep = _keep_mask(SEED, rows, N, drop_threshold, BLOCK_N)
                dz = tl.where(keep, dz * dropout_scale, 0.0)
            tl.store(DX + rows[:, None] * stride_dx_row + cols[None, :], dz.to(DX.dtype.element_ty), mask=inside)
        if HAS_WEIGHT:
            tl.store(DW_PARTIAL + program * N + cols, dw, mask=col_in)
        if HAS_BIAS:
            tl.store(DB_PARTIAL + program * N + cols, db, mask=col_in)


# --------------------------------------------------------------------------------------------------
# 2. Launchers
# --------------------------------------------------------------------------------------------------
def _block_n(n: int, element_size: int) -> int:
    block_n = max(16, triton.next_power_of_2(n))  # >= 16: the dropout mask comes 16 columns at a time
    if n * element_size > _MAX_FUSED_BYTES:
        raise ValueError(
            f"layer_norm: the Triton kernel holds a row in registers and supports up to "
            f"{_MAX_FUSED_BYTES // element_size} features for this dtype, got {n}"
        )
    return block_n


def _block_m(block_n: int) -> int:
    """Rows per tile: a ~2048-element tile (BLOCK_M = 1 from 2048 features up)."""
    return max(1, min(16, _TILE_ELEMENTS // block_n))


def _num_warps(tile_elements: int) -> int:
    return min(max(tile_elements // 256, 1), 32)


def layer_norm_forward(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
    seed: Optional[Tensor], eps: float, dropout_p: float, return_dropout_mask: bool, keep_for_backward: bool = True,
):
    """Launch the forward kernel on 2-D (M, N) rows.

    Returns (y, z, mean, rstd, dropout_mask): y in promote(x, residual) dtype; z = dropout(x) +
    residual in that dtype, or an empty tensor when there is neither dropout nor residual (then x
    itself is what the backward pass needs) or when ``keep_for_backward`` is False; mean and rstd (M,)
    fp32; dropout_mask (M, N) bool (True = kept) when requested, else empty.
    """
    M, N = x.shape
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    has_dropout = dropout_p > 0.0
    store_z = keep_for_backward and (residual is not None or has_dropout)
    y = new_empty((M, N), dtype=out_dtype, device=x.device)
    z = new_empty((M, N) if store_z else (0,), dtype=out_dtype, device=x.device)
    mean = new_empty((M,), dtype=torch.float32, device=x.device)
    rstd = new_empty((M,), dtype=torch.float32, device=x.device)
    store_mask = has_dropout and return_dropout_mask
    dropout_mask = new_empty((M, N) if store_mask else (0,), dtype=torch.bool, device=x.device)
    if M == 0:
        return y, z, mean, rstd, dropout_mask
    block_n = _block_n(N, max(x.element_size(), y.element_size()))
    block_m = _block_m(block_n)
    with device_guard(x):
        _layer_norm_fwd_kernel[(triton.cdiv(M, block_m),)](
            x, residual, weight, bias, y, z, mean, rstd, dropout_mask, seed,
            x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
            z.stride(0) if store_z else 0,
            M, N, eps, dropout_threshold(dropout_p), dropout_scale(dropout_p),
            HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_DROPOUT=has_dropout, STORE_Z=store_z, STORE_DROPOUT_MASK=store_mask,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_num_warps(block_m * block_n),
        )
    return y, z, mean, rstd, dropout_mask


def layer_norm_backward(
    dy: Tensor, z: Tensor, weight: Optional[Tensor], has_bias: bool, mean: Tensor, rstd: Tensor,
    seed: Optional[Tensor], dropout_p: float, x_dtype: torch.dtype, residual_dtype: Optional[torch.dtype],
):
    """Launch the backward kernel. z: the saved (M, N) pre-norm rows (x itself without dropout and
    residual). Returns (dx, dresidual, dweight, dbias); dresidual is None when it equals dx (no
    dropout, same dtype) and the caller should reuse dx; dweight/dbias fp32 or None."""
    M, N = z.shape
    has_dropout = dropout_p > 0.0
    store_dresidual = residual_dtype is not None and (has_dropout or residual_dtype != x_dtype)
    dx = new_empty((M, N), dtype=x_dtype, device=z.device)
    dresidual = new_empty((M, N), dtype=residual_dtype, device=z.device) if store_dresidual else None
    block_n = _block_n(N, max(z.element_size(), dy.element_size()))
    block_m = _block_m(block_n)
    # Whole row blocks per program, and every program gets at least one row.
    row_blocks = max(1, triton.cdiv(M, block_m))
    # Enough programs to fill the GPU, few enough that reducing the (programs, N) dweight/dbias
    # partials stays cheap.
    programs = max(1, min(target_programs(z.device, per_sm=8), row_blocks))
    rows_per_program = triton.cdiv(row_blocks, programs) * block_m
    programs = max(1, triton.cdiv(M, rows_per_program))
    # Every program owns at least one row, so each partial row is written; with no rows at all the
    # gradients are zeros.
    alloc = new_empty if M > 0 else torch.zeros
    dw_partial = alloc((programs, N), dtype=torch.float32, device=z.device) if weight is not None else None
    db_partial = alloc((programs, N), dtype=torch.float32, device=z.device) if has_bias else None
    if M > 0:
        with device_guard(z):
            _layer_norm_bwd_kernel[(programs,)](
                dy, z, weight, mean, rstd, dx, dresidual, dw_partial, db_partial, seed,
                dy.stride(0), z.stride(0), dx.stride(0), dresidual.stride(0) if store_dresidual else 0,
                M, N, rows_per_program, dropout_threshold(dropout_p), dropout_scale(dropout_p),
                HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, HAS_DROPOUT=has_dropout,
                STORE_DRESIDUAL=store_dresidual, BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=_num_warps(block_m * block_n),
            )
    dweight = dw_partial.sum(0) if dw_partial is not None else None
    dbias = db_partial.sum(0) if db_partial is not None else None
    return dx, dresidual, dweight, dbias


def compile_variants():
    """The kernels above in the variants the launchers use (dtypes x hidden sizes x residual / dropout;
    tile sizes and warps from ``_block_n``, ``_block_m`` and ``_num_warps``, as the launchers pick them):
    for ``benchmarks/compile_report.py`` and ``tests/kernels/test_gpu_compile.py``. One config per size."""
    from ._gpu_compile import Variant, runtime_args

    def types(kernel, dtype):
        def arg_type(name):
            if name in ("X", "RESIDUAL", "Y", "Z", "DY", "DX", "DRESIDUAL"):
                return "*" + dtype
            if name == "DROPOUT_MASK":
                return "*i1"
            if name == "SEED":
                return "*i64"
            if name.isupper() and name not in ("M", "N") or name.endswith("_PARTIAL"):
                return "*fp32"
            return "fp32" if name in ("eps", "dropout_scale") else "i32"

        return {a: arg_type(a) for a in runtime_args(kernel)}

    variants = []
    for dtype in ("bf16", "fp16", "fp32"):
        element_size = 4 if dtype == "fp32" else 2
        for hidden in (128, 256, 768, 1024):
            block_n = _block_n(hidden, element_size)
            block_m = _block_m(block_n)
            warps = _num_warps(block_m * block_n)
            for dropout in (False, True):
                for residual in (False, True):
                    tags = dict(dtype=dtype, hidden=hidden, dropout=dropout, residual=residual)
                    variants.append(Variant(
                        "layer norm fwd", _layer_norm_fwd_kernel, types(_layer_norm_fwd_kernel, dtype),
                        dict(HAS_RESIDUAL=residual, HAS_WEIGHT=True, HAS_BIAS=True, HAS_DROPOUT=dropout,
                             STORE_Z=residual or dropout, STORE_DROPOUT_MASK=False, BLOCK_M=block_m, BLOCK_N=block_n),
                        warps, tags=tags))
                    variants.append(Variant(
                        "layer norm bwd", _layer_norm_bwd_kernel, types(_layer_norm_bwd_kernel, dtype),
                        dict(HAS_WEIGHT=True, HAS_BIAS=True, HAS_DROPOUT=dropout, STORE_DRESIDUAL=residual and dropout,
                             BLOCK_M=block_m, BLOCK_N=block_n), warps, tags=tags))
    variants += _bias_free_variants(types)
    return variants


def _bias_free_variants(types):
    """ModernBERT's LayerNorm (norm_bias=False, pre-LN: no residual, no dropout) at hidden 768 / 1024."""
    from ._gpu_compile import Variant

    variants = []
    for dtype in ("bf16", "fp16", "fp32"):
        element_size = 4 if dtype == "fp32" else 2
        for hidden in (768, 1024):
            block_n = _block_n(hidden, element_size)
            block_m = _block_m(block_n)
            warps = _num_warps(block_m * block_n)
            tags = dict(dtype=dtype, hidden=hidden, dropout=False, residual=False, bias=False)
            variants.append(Variant(
                "layer norm fwd", _layer_norm_fwd_kernel, types(_layer_norm_fwd_kernel, dtype),
                dict(HAS_RESIDUAL=False, HAS_WEIGHT=True, HAS_BIAS=False, HAS_DROPOUT=False, STORE_Z=False,
                     STORE_DROPOUT_MASK=False, BLOCK_M=block_m, BLOCK_N=block_n), warps, tags=tags))
            variants.append(Variant(
                "layer norm bwd", _layer_norm_bwd_kernel, types(_layer_norm_bwd_kernel, dtype),
                dict(HAS_WEIGHT=True, HAS_BIAS=False, HAS_DROPOUT=False, STORE_DRESIDUAL=False,
                     BLOCK_M=block_m, BLOCK_N=block_n), warps, tags=tags))
    return variants


# --------------------------------------------------------------------------------------------------
# 3. torch.library custom ops (opaque to torch.compile, with fake shapes) and their autograd
# --------------------------------------------------------------------------------------------------
_EMPTY = (0,)


@torch.library.custom_op("electra_kernels::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
    seed: Optional[Tensor], eps: float, dropout_p: float, return_dropout_mask: bool, keep_for_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return layer_norm_forward(x, weight, bias, residual, seed, eps, dropout_p, return_dropout_mask,
                              keep_for_backward)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, residual, seed, eps, dropout_p, return_dropout_mask, keep_for_backward):
    M, N = x.shape
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    store_z = keep_for_backward and (residual is not None or dropout_p > 0.0)
    store_mask = dropout_p > 0.0 and return_dropout_mask
    return (
        x.new_empty((M, N), dtype=out_dtype),
        x.new_empty((M, N) if store_z else _EMPTY, dtype=out_dtype),
        x.new_empty((M,), dtype=torch.float32),
        x.new_empty((M,), dtype=torch.float32),
        x.new_empty((M, N) if store_mask else _EMPTY, dtype=torch.bool),
    )


@torch.library.custom_op("electra_kernels::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    dy: Tensor, z: Tensor, weight: Optional[Tensor], has_bias: bool, mean: Tensor, rstd: Tensor,
    seed: Optional[Tensor], dropout_p: float, x_dtype: torch.dtype, has_residual: bool,
    residual_dtype: torch.dtype, weight_dtype: torch.dtype, bias_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dresidual, dweight, dbias = layer_norm_backward(
        dy, z, weight, has_bias, mean, rstd, seed, dropout_p, x_dtype, residual_dtype if has_residual else None
    )
    # Custom ops may not return None: empty placeholders stand for "not computed / same as dx".
    # (Distinct placeholders: a custom op's outputs may not alias each other.)
    return (
        dx,
        dresidual if dresidual is not None else dy.new_empty(_EMPTY),
        dweight.to(weight_dtype) if dweight is not None else dy.new_empty(_EMPTY),
        dbias.to(bias_dtype) if dbias is not None else dy.new_empty(_EMPTY),
    )


@_layer_norm_bwd_op.register_fake
def _(dy, z, weight, has_bias, mean, rstd, seed, dropout_p, x_dtype, has_residual, residual_dtype,
      weight_dtype, bias_dtype):
    M, N = z.shape
    store_dresidual = has_residual and (dropout_p > 0.0 or residual_dtype != x_dtype)
    return (
        dy.new_empty((M, N), dtype=x_dtype),
        dy.new_empty((M, N) if store_dresidual else _EMPTY, dtype=residual_dtype),
        dy.new_empty((N,) if weight is not None else _EMPTY, dtype=weight_dtype),
        dy.new_empty((N,) if has_bias else _EMPTY, dtype=bias_dtype),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, seed, eps, dropout_p, _, _ = inputs
    _, z, mean, rstd, _ = output
    saved_rows = z if (residual is not None or dropout_p > 0.0) else x
    ctx.save_for_backward(saved_rows, weight, mean, rstd, seed)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else x.dtype
    ctx.has_residual = residual is not None
    ctx.residual_dtype = residual.dtype if residual is not None else x.dtype
    ctx.x_dtype = x.dtype
    ctx.dropout_p = dropout_p


def _backward(ctx, dy, _dz, _dmean, _drstd, _dmask):
    saved_rows, weight, mean, rstd, seed = ctx.saved_tensors
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx, dresidual, dweight, dbias = torch.ops.electra_kernels.layer_norm_bwd(
        dy, saved_rows, weight, ctx.has_bias, mean, rstd, seed, ctx.dropout_p, ctx.x_dtype,
        ctx.has_residual, ctx.residual_dtype, weight.dtype if weight is not None else ctx.x_dtype,
        ctx.bias_dtype,
    )
    if ctx.has_residual and ctx.dropout_p == 0.0 and ctx.residual_dtype == ctx.x_dtype:
        dresidual = dx  # no dropout and same dtype: the residual's gradient is dx itself
    return (
        dx,
        dweight if weight is not None else None,
        dbias if ctx.has_bias else None,
        dresidual if ctx.has_residual else None,
        None, None, None, None, None,
    )


_layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# 4. Public function and modules
# --------------------------------------------------------------------------------------------------
def _check_inputs(x, weight, bias, residual, dropout_p):
    if not x.is_floating_point():
        raise TypeError(f"layer_norm: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("layer_norm: x must have at least one dimension (the normalised features)")
    n = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"layer_norm: {name} must have shape ({n},) to match x's last dim, got {tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"layer_norm: residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"layer_norm: dropout_p must be in [0, 1], got {dropout_p}")


def _rows(t: Optional[Tensor], n: int) -> Optional[Tensor]:
    """(..., N) -> (M, N) with unit stride along N (rows may keep any stride)."""
    if t is None:
        return None
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def layer_norm(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-12,
    residual: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    *,
    seed: Optional[int] = None,
    return_dropout_mask: bool = False,
):
    """LayerNorm over the last dimension of ``dropout(x) + residual``.

    x: (..., N) fp32/bf16/fp16. weight, bias: (N,) any float dtype, or None (no affine / no shift).
    residual: same shape as x, or None. dropout_p: drop probability applied to x only (pass 0.0 in
    eval mode). seed: python int for the dropout mask (same seed, same shape -> same mask); by
    default one is drawn from torch's generator on x's device, so ``torch.manual_seed`` governs it.
    Returns y: (..., N) in ``torch.promote_types(x.dtype, residual.dtype)`` (x.dtype without residual);
    with ``return_dropout_mask=True`` also the (..., N) bool keep-mask (debugging and tests).
    Statistics and arithmetic are fp32. Gradients flow to x, residual, weight and bias. Runs the Triton
    kernel on CUDA (or under TRITON_INTERPRET=1) for fp32/bf16/fp16, the PyTorch reference elsewhere.
    """
    _check_inputs(x, weight, bias, residual, dropout_p)
    n = x.shape[-1]
    in_kernel_dtypes = x.dtype in _KERNEL_DTYPES and (residual is None or residual.dtype in _KERNEL_DTYPES)
    if not (in_kernel_dtypes and use_triton(x, weight, bias, residual)):
        return layer_norm_ref(x, weight, bias, eps, residual, dropout_p, return_dropout_mask=return_dropout_mask)
    seed_tensor = None
    if dropout_p > 0.0:
        if seed is None:
            seed_tensor = torch.randint(0, 2**31 - 1, (), device=x.device, dtype=torch.int64)
        else:
            seed_tensor = torch.tensor(int(seed), device=x.device, dtype=torch.int64)
    # z is written only when autograd will need it (inference writes y alone).
    keep_for_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual))
    y, _, _, _, mask = torch.ops.electra_kernels.layer_norm_fwd(
        _rows(x, n), weight.contiguous() if weight is not None else None,
        bias.contiguous() if bias is not None else None, _rows(residual, n), seed_tensor,
        float(eps), float(dropout_p), bool(return_dropout_mask), keep_for_backward,
    )
    y = y.view(x.shape)
    if not return_dropout_mask:
        return y
    mask = mask.view(x.shape) if dropout_p > 0.0 else torch.ones(x.shape, dtype=torch.bool, device=x.device)
    return y, mask


class FusedLayerNorm(nn.LayerNorm):
    """Drop-in :class:`torch.nn.LayerNorm` running :func:`layer_norm`.

    Same constructor, parameters (``weight``, ``bias``) and attributes (``normalized_shape``, ``eps``,
    ``elementwise_affine``), so state dicts load either way and ``isinstance(m, nn.LayerNorm)`` code
    (weight-decay filters, initialisers) keeps working. ``forward(x, residual=None)`` also takes the
    residual of a post-LN block.
    """

    def _flat_affine(self):
        weight = self.weight.reshape(-1) if self.weight is not None else None
        bias = self.bias.reshape(-1) if self.bias is not None else None
        return weight, bias

    def _normalize(self, x: Tensor, residual: Optional[Tensor], dropout_p: float) -> Tensor:
        k = len(self.normalized_shape)
        if tuple(x.shape[-k:]) != tuple(self.normalized_shape):
            raise ValueError(
                f"{type(self).__name__}: expected input ending in {tuple(self.normalized_shape)}, got {tuple(x.shape)}"
            )
        features = math.prod(self.normalized_shape)
        weight, bias = self._flat_affine()
        x_rows = x.reshape(*x.shape[:-k], features) if k != 1 else x
        res_rows = residual.reshape(*residual.shape[:-k], features) if (residual is not None and k != 1) else residual
        y = layer_norm(x_rows, weight, bias, self.eps, res_rows, dropout_p)
        return y.reshape(x.shape) if k != 1 else y

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return self._normalize(x, residual, 0.0)


class DropoutAddLayerNorm(FusedLayerNorm):
    """``LayerNorm(dropout(x) + residual)`` in one kernel: the end of a post-LN BERT sub-layer.

    ``p`` is the dropout probability on x (the dense output), applied only in training mode.
    Parameters are named like nn.LayerNorm's, so a model's ``LayerNorm`` can be replaced in place.
    """

    def __init__(self, normalized_shape, eps: float = 1e-12, p: float = 0.1, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
            raise ValueError(f"DropoutAddLayerNorm: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return self._normalize(x, residual, self.p if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


# --------------------------------------------------------------------------------------------------
# 5. Reference
# --------------------------------------------------------------------------------------------------
def layer_norm_ref(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-12,
    residual: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    *,
    dropout_mask: Optional[Tensor] = None,
    return_dropout_mask: bool = False,
    upcast: bool = False,
):
    """PyTorch LayerNorm(dropout(x) + residual) with the kernel's dtype rules.

    Computes in fp32 (fp64 when any input is fp64 or ``upcast=True``, which tests use as ground
    truth) and returns promote(x, residual) dtype. dropout_mask: (..., N) bool keep-mask to replay
    instead of sampling one (tests replay the kernel's own mask with it).
    """
    _check_inputs(x, weight, bias, residual, dropout_p)
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    wide = upcast or any(t is not None and t.dtype == torch.float64 for t in (x, weight, bias, residual))
    compute = torch.float64 if wide else torch.float32
    z = x.to(compute)
    if dropout_mask is None and dropout_p > 0.0 and return_dropout_mask:
        dropout_mask = torch.randint(0, 256, x.shape, device=x.device) >= dropout_threshold(dropout_p)
    if dropout_mask is not None:
        z = z * dropout_mask.to(compute) * dropout_scale(dropout_p) if dropout_p > 0.0 else z
    elif dropout_p > 0.0:
        z = F.dropout(z, p=dropout_p, training=True)
    if residual is not None:
        z = z + residual.to(compute)
    y = F.layer_norm(
        z, (x.shape[-1],),
        weight.to(compute) if weight is not None else None,
        bias.to(compute) if bias is not None else None,
        eps,
    ).to(out_dtype)
    if not return_dropout_mask:
        return y
    if dropout_mask is None:
        dropout_mask = torch.ones(x.shape, dtype=torch.bool, device=x.device)
    return y, dropout_mask
