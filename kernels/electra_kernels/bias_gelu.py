"""Bias add fused with the exact (erf) GELU, forward and backward.

BERT/ELECTRA's feed-forward block is ``gelu(x·Wᵀ + b)``. Running the matmul without its bias and
adding the bias here, inside the activation, costs nothing extra in the forward pass and lets the
backward pass produce the bias gradient from the same registers that compute the input gradient
(per-program partial column sums) instead of re-reading the (tokens, intermediate) gradient in a
separate reduction.

    u = x + b,   gelu(u) = u·Φ(u) = ½·u·(1 + erf(u/√2))
    d gelu/du = Φ(u) + u·φ(u),   φ(u) = exp(-u²/2)/√(2π)
    dx = dy · gelu'(u),   dbias = Σ_rows dx

Arithmetic is fp32; I/O fp32/bf16/fp16; the saved tensor is x (as PyTorch's GELU saves its input).

Reading order: Triton kernels -> launchers -> torch.library custom ops + autograd -> public function and
module -> reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import HAS_TRITON, use_triton
from ._outputs import new_empty
from ._triton_utils import device_guard, target_programs

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - the reference path needs no triton
    triton = None

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements per program: 16 per thread at 8 warps. ptxas for sm_90 (bf16): backward 80 registers, no
# spills (4 warps would need 153 and halve the resident threads).
_TILE_ELEMENTS = 4096
_NUM_WARPS = 8


# --------------------------------------------------------------------------------------------------
# 1. Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _gelu_and_grad(u):
        # gelu(u) = u·Φ(u) with Φ(u) = ½(1 + erf(u/√2)); gelu'(u) = Φ(u) + u·φ(u), φ(u) = e^{-u²/2}/√(2π).
        # 0.7071067811865476 = 1/√2, 0.3989422804014327 = 1/√(2π).
        cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
        return u * cdf, cdf + u * pdf

    @triton.jit
    def _bias_gelu_fwd_kernel(
        X, B, Y, M, N, stride_x_row, stride_y_row,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_cols = cols < N
        inside = (rows < M)[:, None] & in_cols[None, :]
        u = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        if HAS_BIAS:
            u += tl.load(B + cols, mask=in_cols, other=0.0).to(tl.float32)[None, :]
        # erf form only (no tanh approximation): matches nn.GELU() / HF "gelu".
        y = u * 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
        tl.store(Y + rows[:, None] * stride_y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=inside)

    @triton.jit
    def _bias_gelu_bwd_kernel(
        DY, X, B, DX, DB_PARTIAL, M, N, rows_per_program,
        stride_dy_row, stride_x_row, stride_dx_row,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Program (i, j) walks rows [i·rows_per_program, …) of column block j, summing dbias in fp32
        # registers before the values are rounded to dx's dtype.
        program_m = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_cols = cols < N
        row_start = program_m * rows_per_program
        row_end = tl.minimum(row_start + rows_per_program, M)
        if HAS_BIAS:
            b = tl.load(B + cols, mask=in_cols, other=0.0).to(tl.float32)
        db = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for block_start in range(row_start, row_end, BLOCK_M):
            rows = (block_start + tl.arange(0, BLOCK_M)).to(tl.int64)
            inside = (rows < row_end)[:, None] & in_cols[None, :]
            u = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy_row + cols[None, :], mask=inside, other=0.0).to(tl.float32)
            if HAS_BIAS:
                u += b[None, :]
            _, dgelu = _gelu_and_grad(u)
            dx = tl.where(inside, dy * dgelu, 0.0)
            tl.store(DX + rows[:, None] * stride_dx_row + cols[None, :], dx.to(DX.dtype.element_ty), mask=inside)
            db += tl.sum(dx, axis=0)
        if HAS_BIAS:
            tl.store(DB_PARTIAL + program_m * N + cols, db, mask=in_cols)


# --------------------------------------------------------------------------------------------------
# 2. Launchers
# --------------------------------------------------------------------------------------------------
def _blocks(n: int) -> tuple[int, int]:
    block_n = min(triton.next_power_of_2(max(n, 1)), 512)
    return _TILE_ELEMENTS // block_n, block_n


def bias_gelu_forward(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """gelu(x + bias) on (M, N) rows with unit column stride; returns (M, N) in x.dtype."""
    M, N = x.shape
    y = new_empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    block_m, block_n = _blocks(N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    with device_guard(x):
        _bias_gelu_fwd_kernel[grid](
            x, bias, y, M, N, x.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_NUM_WARPS,
        )
    return y


def bias_gelu_backward(dy: Tensor, x: Tensor, bias: Optional[Tensor]):
    """Returns (dx (M, N) in x.dtype, dbias (N,) fp32 or None)."""
    M, N = x.shape
    dx = new_empty((M, N), dtype=x.dtype, device=x.device)
    block_m, block_n = _blocks(N)
    col_blocks = triton.cdiv(N, block_n) if N else 1
    row_blocks = max(1, triton.cdiv(M, block_m))
    programs_m = max(1, min(row_blocks, target_programs(x.device, per_sm=8) // col_blocks))
    rows_per_program = triton.cdiv(row_blocks, programs_m) * block_m
    programs_m = max(1, triton.cdiv(M, rows_per_program))
    # Every program owns at least one row block, so each partial row is written (zeros when M == 0).
    alloc = new_empty if M > 0 else torch.zeros
    db_partial = alloc((programs_m, N), dtype=torch.float32, device=x.device) if bias is not None else None
    if M > 0 and N > 0:
        with device_guard(x):
            _bias_gelu_bwd_kernel[(programs_m, col_blocks)](
                dy, x, bias, dx, db_partial, M, N, rows_per_program,
                dy.stride(0), x.stride(0), dx.stride(0),
                HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_NUM_WARPS,
            )
    return dx, (db_partial.sum(0) if db_partial is not None else None)


def compile_variants():
    """The kernels above for the feed-forward widths ELECTRA uses (4 x hidden; tile sizes from ``_blocks``,
    as the launchers pick them): for ``benchmarks/compile_report.py`` and ``tests/kernels/test_gpu_compile.py``."""
    from ._gpu_compile import Variant, runtime_args

    def types(kernel, dtype):
        return {a: ("*" + dtype if a in ("X", "Y", "DY", "DX") else "*fp32" if a in ("B", "DB_PARTIAL") else "i32")
                for a in runtime_args(kernel)}

    variants = []
    for dtype in ("bf16", "fp16", "fp32"):
        for hidden in (128, 256, 768, 1024):
            block_m, block_n = _blocks(4 * hidden)
            tags = dict(dtype=dtype, hidden=hidden, features=4 * hidden)
            for name, kernel in (("bias gelu fwd", _bias_gelu_fwd_kernel), ("bias gelu bwd", _bias_gelu_bwd_kernel)):
                variants.append(Variant(name, kernel, types(kernel, dtype),
                                        dict(HAS_BIAS=True, BLOCK_M=block_m, BLOCK_N=block_n), _NUM_WARPS, tags=tags))
    return variants


# --------------------------------------------------------------------------------------------------
# 3. torch.library custom ops and autograd
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("electra_kernels::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd_op(x: Tensor, bias: Optional[Tensor]) -> Tensor:
    return bias_gelu_forward(x, bias)


@_bias_gelu_fwd_op.register_fake
def _(x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("electra_kernels::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd_op(dy: Tensor, x: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    dx, dbias = bias_gelu_backward(dy, x, bias)
    # A custom op cannot return None: an empty tensor stands for "no bias".
    return dx, dbias.to(bias.dtype) if dbias is not None else dy.new_empty((0,))


@_bias_gelu_bwd_op.register_fake
def _(dy, x, bias):
    dbias = x.new_empty((x.shape[1],), dtype=bias.dtype) if bias is not None else dy.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), dbias


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx, dbias = torch.ops.electra_kernels.bias_gelu_bwd(dy, x, bias)
    return dx, (dbias if bias is not None else None)


_bias_gelu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# 4. Public function and module
# --------------------------------------------------------------------------------------------------
def _check_inputs(x: Tensor, bias: Optional[Tensor]) -> None:
    if not x.is_floating_point():
        raise TypeError(f"bias_gelu: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("bias_gelu: x must have at least one dimension (the features)")
    if bias is not None and tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias_gelu: bias must have shape ({x.shape[-1]},) to match x's last dim, "
                         f"got {tuple(bias.shape)}")


def bias_gelu(x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Exact GELU of ``x + bias``.

    x: (..., N) fp32/bf16/fp16 (e.g. ``F.linear(h, W)`` without its bias). bias: (N,) any float dtype,
    or None. Returns (..., N) in x.dtype (the bias joins at x's precision, as the bias of an autocast
    Linear does). Gradients flow to x and bias. Triton on CUDA (or under TRITON_INTERPRET=1), the
    PyTorch reference elsewhere.
    """
    _check_inputs(x, bias)
    if not (x.dtype in _KERNEL_DTYPES and use_triton(x, bias)):
        return bias_gelu_ref(x, bias)
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.ops.electra_kernels.bias_gelu_fwd(rows, bias.contiguous() if bias is not None else None)
    return y.view(x.shape)


class LinearGELU(nn.Linear):
    """``gelu(linear(x))`` with the bias added inside the GELU kernel: a drop-in nn.Linear (same
    ``weight``/``bias`` parameters and state dict) followed by exact GELU, e.g. BERT's intermediate
    dense layer."""

    def forward(self, x: Tensor) -> Tensor:
        return bias_gelu(F.linear(x, self.weight), self.bias)


# --------------------------------------------------------------------------------------------------
# 5. Reference
# --------------------------------------------------------------------------------------------------
def bias_gelu_ref(x: Tensor, bias: Optional[Tensor] = None, *, upcast: bool = False) -> Tensor:
    """PyTorch ``F.gelu(x + bias)`` (erf form) computed in fp32 (fp64 with ``upcast=True`` or fp64
    input) and returned in x.dtype, the kernel's dtype rules."""
    _check_inputs(x, bias)
    compute = torch.float64 if (upcast or x.dtype == torch.float64) else torch.float32
    u = x.to(compute)
    if bias is not None:
        u = u + bias.to(compute)
    return F.gelu(u).to(x.dtype)

