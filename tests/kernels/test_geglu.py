"""Fused GeGLU (kernels/geglu.py) against float64 references, Triton in the interpreter.

For bf16/fp16 the kernel's error against the fp64 truth must stay within 2x PyTorch's own same-dtype
error plus a small atol (tests/kernels/_compare.py); every output buffer starts as NaN.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from electra_kernels import GeGLU, geglu, geglu_ref

from _compare import DEVICE, assert_within_torch_error, leaf


def _naive_geglu(x):
    """ModernBERT's MLP activation as transformers writes it: input, gate = x.chunk(2); gelu(input) * gate."""
    inp, gate = x.chunk(2, dim=-1)
    return F.gelu(inp) * gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 200), (2, 5, 2 * 600)])
def test_geglu_matches_reference(dtype, shape):
    x = torch.randn(*shape, dtype=dtype) * 3  # both GELU tails and the curved middle
    ours = leaf(x)
    y = geglu(ours)
    dy = torch.randn_like(y)
    y.backward(dy)
    truth_x = leaf(x.double())
    truth = _naive_geglu(truth_x)
    truth.backward(dy.double())
    base_x = leaf(x)
    baseline = _naive_geglu(base_x)  # PyTorch in the same dtype
    baseline.backward(dy)
    assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == ours.grad.dtype == dtype
    assert_within_torch_error("y", y, truth, baseline, dtype)
    assert_within_torch_error("dx", ours.grad, truth_x.grad, base_x.grad, dtype)


def test_geglu_ref_matches_naive_and_module():
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.testing.assert_close(geglu_ref(x), _naive_geglu(x))
    torch.testing.assert_close(GeGLU()(x.float()), _naive_geglu(x).float(), rtol=1e-5, atol=1e-5)


def test_geglu_halves_are_not_swapped():
    # input half large negative -> gelu ~ 0 whatever the gate; a swapped kernel would give gelu(gate)·input
    x = torch.cat([torch.full((4, 8), -6.0), torch.randn(4, 8)], dim=-1)
    assert geglu(x).abs().max() < 1e-6
    x2 = torch.cat([torch.randn(4, 8), torch.full((4, 8), -6.0)], dim=-1)
    assert geglu(x2).abs().max() > 1e-2


def test_geglu_noncontiguous_and_empty():
    x = torch.randn(6, 2 * 24)[::2]  # row stride 2x
    torch.testing.assert_close(geglu(x), geglu_ref(x), rtol=1e-5, atol=1e-5)
    assert geglu(torch.randn(0, 16)).shape == (0, 8)


def test_geglu_saves_only_its_input():
    x = torch.randn(5, 32, device=DEVICE, requires_grad=True)  # the kernel path (CUDA or the interpreter)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        geglu(x).sum().backward()
    assert saved == [x.shape], f"geglu kept {saved} for the backward (only x expected: gelu(a) is recomputed)"


def test_geglu_bad_inputs():
    with pytest.raises(ValueError, match="even"):
        geglu(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating-point"):
        geglu(torch.ones(3, 8, dtype=torch.int64))
