"""GeGLU: ``gelu(a) * b`` on the two halves of one projection, forward and backward fused.

ModernBERT's feed-forward block is ``Wo(drop(gelu(a) * b))`` with ``a, b = Wi(h).chunk(2, -1)``: one
(tokens, 2n) projection whose first half goes through the exact (erf) GELU and whose second half gates
it. Unfused, PyTorch writes gelu(a) (tokens, n), reads it back for the product, and keeps it for the
backward. Here one kernel reads x = [a | b] and writes y; the backward reads x and dy again and
recomputes gelu(a) and gelu'(a) in registers (nothing but x is saved):

    y  = gelu(a)·b,             gelu(a) = a·Φ(a) = ½·a·(1 + erf(a/√2))
    da = dy·b·gelu'(a),         gelu'(a) = Φ(a) + a·φ(a),   φ(a) = exp(-a²/2)/√(2π)
    db = dy·gelu(a)

Arithmetic is fp32; I/O fp32/bf16/fp16; y and dx in x's dtype.

Reading order: Triton kernels -> launchers -> torch.library custom ops + autograd -> public function and
module -> reference.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import HAS_TRITON, use_triton
from ._outputs import new_empty
from ._triton_utils import device_guard

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .bias_gelu import _gelu_and_grad
else:  # pragma: no cover - the reference path needs no triton
    triton = None

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Output elements per program: 16 per thread at 8 warps (as bias_gelu); the backward holds a, b, dy and
# the two results of each element in fp32 registers.
_TILE_ELEMENTS = 4096
_NUM_WARPS = 8


# --------------------------------------------------------------------------------------------------
# 1. Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _load_halves(X, M, N, stride_x_row, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's (BLOCK_M, BLOCK_N) tile: its rows and columns of the output, the in-bounds mask,
        and a = x[rows, cols], b = x[rows, N + cols] in fp32."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = (rows < M)[:, None] & (cols < N)[None, :]
        a_ptrs = X + rows[:, None] * stride_x_row + cols[None, :]
        a = tl.load(a_ptrs, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(a_ptrs + N, mask=inside, other=0.0).to(tl.float32)
        return rows, cols, inside, a, b

    @triton.jit
    def _geglu_fwd_kernel(X, Y, M, N, stride_x_row, stride_y_row, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """y[:, j] = gelu(x[:, j]) · x[:, N + j] for one (BLOCK_M, BLOCK_N) tile of y."""
        rows, cols, inside, a, b = _load_halves(X, M, N, stride_x_row, BLOCK_M, BLOCK_N)
        y = a * 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476)) * b
        tl.store(Y + rows[:, None] * stride_y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=inside)

    @triton.jit
    def _geglu_bwd_kernel(DY, X, DX, M, N, stride_dy_row, stride_x_row, stride_dx_row,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dx = [dy·b·gelu'(a) | dy·gelu(a)], gelu(a) recomputed from x."""
        rows, cols, inside, a, b = _load_halves(X, M, N, stride_x_row, BLOCK_M, BLOCK_N)
        dy = tl.load(DY + rows[:, None] * stride_dy_row + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        gelu, dgelu = _gelu_and_grad(a)
        da_ptrs = DX + rows[:, None] * stride_dx_row + cols[None, :]
        tl.store(da_ptrs, (dy * b * dgelu).to(DX.dtype.element_ty), mask=inside)
        tl.store(da_ptrs + N, (dy * gelu).to(DX.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------------------------------
# 2. Launchers
# --------------------------------------------------------------------------------------------------
def _blocks(n: int) -> tuple[int, int]:
    block_n = min(triton.next_power_of_2(max(n, 1)), 512)
    return _TILE_ELEMENTS // block_n, block_n


def geglu_forward(x: Tensor) -> Tensor:
    """x (M, 2N) with unit column stride -> y (M, N) in x.dtype."""
    M, N = x.shape[0], x.shape[1] // 2
    y = new_empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    block_m, block_n = _blocks(N)
    with device_guard(x):
        _geglu_fwd_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
            x, y, M, N, x.stride(0), y.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_NUM_WARPS)
    return y


def geglu_backward(dy: Tensor, x: Tensor) -> Tensor:
    """dy (M, N), x (M, 2N) -> dx (M, 2N) in x.dtype."""
    M, N = dy.shape
    dx = new_empty(tuple(x.shape), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return dx
    block_m, block_n = _blocks(N)
    with device_guard(x):
        _geglu_bwd_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
            dy, x, dx, M, N, dy.stride(0), x.stride(0), dx.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_NUM_WARPS)
    return dx


def compile_variants():
    """The kernels above for ModernBERT's GeGLU widths (n = intermediate size: base 1152, large 2624; and
    ELECTRA-sized 4 x hidden), tile sizes from ``_blocks`` as the launchers pick them: for
    ``benchmarks/compile_report.py`` and ``tests/kernels/test_gpu_compile.py``."""
    from ._gpu_compile import Variant, runtime_args

    def types(kernel, dtype):
        return {a: ("*" + dtype if a in ("X", "Y", "DY", "DX") else "i32") for a in runtime_args(kernel)}

    variants = []
    for dtype in ("bf16", "fp16", "fp32"):
        for n in (1152, 2624, 3072):
            block_m, block_n = _blocks(n)
            tags = dict(dtype=dtype, features=n)
            for name, kernel in (("geglu fwd", _geglu_fwd_kernel), ("geglu bwd", _geglu_bwd_kernel)):
                variants.append(Variant(name, kernel, types(kernel, dtype), dict(BLOCK_M=block_m, BLOCK_N=block_n),
                                        _NUM_WARPS, tags=tags))
    return variants


# --------------------------------------------------------------------------------------------------
# 3. torch.library custom ops and autograd
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("electra_kernels::geglu_fwd", mutates_args=())
def _geglu_fwd_op(x: Tensor) -> Tensor:
    return geglu_forward(x)


@_geglu_fwd_op.register_fake
def _(x):
    return x.new_empty((x.shape[0], x.shape[1] // 2))


@torch.library.custom_op("electra_kernels::geglu_bwd", mutates_args=())
def _geglu_bwd_op(dy: Tensor, x: Tensor) -> Tensor:
    return geglu_backward(dy, x)


@_geglu_bwd_op.register_fake
def _(dy, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)  # only x: gelu(a) is recomputed in the backward kernel


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    return torch.ops.electra_kernels.geglu_bwd(dy, x)


_geglu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# 4. Public function and module
# --------------------------------------------------------------------------------------------------
def _check_input(x: Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{what}: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"{what}: x's last dimension must be even (the input half and the gate half), "
                         f"got shape {tuple(x.shape)}")


def geglu(x: Tensor) -> Tensor:
    """``gelu(a) * b`` with ``a, b = x.chunk(2, -1)`` (exact erf GELU; ModernBERT's ``Wi`` layout).

    x: (..., 2n) fp32/bf16/fp16. Returns (..., n) in x.dtype. Gradients flow to x; only x is kept for
    the backward. Triton on CUDA (or under TRITON_INTERPRET=1), the PyTorch reference elsewhere.
    """
    _check_input(x, "geglu")
    if not (x.dtype in _KERNEL_DTYPES and use_triton(x)):
        return geglu_ref(x)
    two_n = x.shape[-1]
    rows = x.reshape(-1, two_n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return torch.ops.electra_kernels.geglu_fwd(rows).view(*x.shape[:-1], two_n // 2)


class GeGLU(nn.Module):
    """The activation of ModernBERT's MLP as a module: ``forward(x) = geglu(x)`` on ``Wi``'s output."""

    def forward(self, x: Tensor) -> Tensor:
        return geglu(x)


# --------------------------------------------------------------------------------------------------
# 5. Reference
# --------------------------------------------------------------------------------------------------
def geglu_ref(x: Tensor, *, upcast: bool = False) -> Tensor:
    """PyTorch ``F.gelu(a) * b`` (``a, b = x.chunk(2, -1)``, erf GELU) in fp32 (fp64 with ``upcast=True``
    or fp64 input), returned in x.dtype: the kernel's dtype rules."""
    _check_input(x, "geglu_ref")
    compute = torch.float64 if (upcast or x.dtype == torch.float64) else torch.float32
    a, b = x.to(compute).chunk(2, dim=-1)
    return (F.gelu(a) * b).to(x.dtype)
