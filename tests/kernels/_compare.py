"""Tolerance rules the kernel tests share (flash-attn's rule: a kernel's error against a float64 truth
may be at most twice PyTorch's own error in the same dtype, plus a small atol).

Imported as ``from _compare import ...``: pytest's default "prepend" import mode puts each test file's
folder (tests/kernels has no __init__.py) on sys.path, as it does for tests/helpers.py.
"""

from __future__ import annotations

import os

import torch

from electra_kernels._dispatch import interpreter_enabled

# The heads' tests run on CUDA when the GPU machine runs them with TRITON_INTERPRET=0.
DEVICE = "cuda" if torch.cuda.is_available() and not interpreter_enabled() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Elementwise kernels (LayerNorm, bias-GELU): absolute slack on top of 2x PyTorch's error.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# Reductions over a row or the vocabulary (the two heads): slack relative to the largest reference value.
REL_ATOL = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 5e-4}


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def assert_within_torch_error(name, actual, truth, baseline, dtype):
    """max|actual - truth| <= 2 * max|baseline - truth| + atol, baseline = PyTorch in the same dtype.

    Triton's interpreter casts fp32 -> bf16 by truncation where the GPU rounds to nearest, so under
    the interpreter bf16 results get one more ulp (2^-7 relative) of slack.
    """
    err = (actual.double() - truth).abs().max().item()
    base = (baseline.double() - truth).abs().max().item()
    slack = ATOL[dtype]
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        slack += truth.abs().max().item() * 2**-7
    assert err <= 2 * base + slack, f"{name}: kernel error {err:.3g} vs PyTorch {dtype} error {base:.3g}"


def assert_close_to_fp64(name, got, same_dtype, exact, dtype):
    """No NaN, and max|got - exact| <= 2 * max|same_dtype - exact| + REL_ATOL[dtype] * max|exact|."""
    exact = exact.double()
    err = (got.double() - exact).abs().max().item()
    torch_err = (same_dtype.double() - exact).abs().max().item()
    atol = REL_ATOL[dtype] * max(exact.abs().max().item(), 1e-6)
    assert not torch.isnan(got).any(), f"{name}: NaN"
    assert err <= 2 * torch_err + atol, f"{name}: kernel err {err:.3g} vs torch {torch_err:.3g} (+{atol:.3g})"
