"""Fused bias + exact GELU (kernels/bias_gelu.py) against float64 references.

Triton runs in the interpreter here. For bf16/fp16 the kernel's error against the fp64 truth must stay
within 2x PyTorch's own same-dtype error plus a small atol.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from electra_kernels import LinearGELU, _outputs, bias_gelu, bias_gelu_ref

from _compare import assert_within_torch_error, leaf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 77])
@pytest.mark.parametrize("hidden", [32, 100, 768])
def test_bias_gelu_matches_reference(dtype, rows, hidden):
    x = torch.randn(rows, hidden, dtype=dtype) * 3  # covers both tails and the curved middle
    bias = torch.randn(hidden, dtype=dtype)
    ours_x, ours_b = leaf(x), leaf(bias)
    y = bias_gelu(ours_x, ours_b)
    dy = torch.randn_like(y)
    y.backward(dy)
    truth_x, truth_b = leaf(x.double()), leaf(bias.double())
    truth = F.gelu(truth_x + truth_b)
    truth.backward(dy.double())
    base_x, base_b = leaf(x), leaf(bias)
    baseline = F.gelu(base_x + base_b)  # PyTorch in the same dtype
    baseline.backward(dy)
    assert y.dtype == ours_x.grad.dtype == ours_b.grad.dtype == dtype
    assert_within_torch_error("y", y, truth, baseline, dtype)
    assert_within_torch_error("dx", ours_x.grad, truth_x.grad, base_x.grad, dtype)
    assert_within_torch_error("dbias", ours_b.grad, truth_b.grad, base_b.grad, dtype)


def test_no_bias_and_leading_dims():
    x = leaf(torch.randn(2, 3, 100))
    y = bias_gelu(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = leaf(x.double())
    F.gelu(ref).backward(dy.double())
    torch.testing.assert_close(y.double(), F.gelu(x.double()), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_dtypes_like_autocast(dtype):
    """16-bit matmul output + fp32 bias parameter: output and dx in x's dtype, dbias fp32; y and dx
    within 2x PyTorch's own same-dtype error of the fp64 truth, dbias (summed in fp32) to 1e-4."""
    x, bias = leaf(torch.randn(9, 64, dtype=dtype) * 3), leaf(torch.randn(64))
    y = bias_gelu(x, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert (y.dtype, x.grad.dtype, bias.grad.dtype) == (dtype, dtype, torch.float32)
    rx, rb = leaf(x.double()), leaf(bias.double())
    truth = F.gelu(rx + rb)
    truth.backward(dy.double())
    bx, bb = leaf(x), leaf(bias)
    baseline = F.gelu(bx + bb.to(dtype))  # PyTorch in x's dtype
    baseline.backward(dy)
    assert_within_torch_error("y", y, truth, baseline, dtype)
    assert_within_torch_error("dx", x.grad, rx.grad, bx.grad, dtype)
    torch.testing.assert_close(bias.grad.double(), rb.grad, atol=1e-4, rtol=1e-4)  # summed in fp32


def test_many_rows_bias_gradient():
    """More row blocks than programs: each program sums several blocks into its dbias partial."""
    x, bias = leaf(torch.randn(300, 48)), leaf(torch.randn(48))
    y = bias_gelu(x, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    rx, rb = leaf(x.double()), leaf(bias.double())
    F.gelu(rx + rb).backward(dy.double())
    torch.testing.assert_close(bias.grad.double(), rb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), rx.grad, atol=1e-6, rtol=1e-5)


def test_outputs_are_fully_written():
    """Every output element comes from the kernel (the poisoned_outputs fixture fills buffers with NaN)."""
    assert _outputs.POISON
    x, bias = leaf(torch.randn(77, 700)), leaf(torch.randn(700))
    y = bias_gelu(x, bias)
    y.backward(torch.randn_like(y))
    for t in (y, x.grad, bias.grad):
        assert torch.isfinite(t).all()


def test_strided_rows_and_empty_input():
    base = torch.randn(7, 160)
    bias = torch.randn(100)
    torch.testing.assert_close(bias_gelu(base[:, :100], bias), F.gelu(base[:, :100] + bias), atol=1e-6, rtol=1e-6)
    x, b = leaf(torch.randn(0, 32)), leaf(torch.randn(32))
    y = bias_gelu(x, b)
    y.sum().backward()
    assert y.shape == (0, 32) and torch.equal(b.grad, torch.zeros(32))


def test_reference_path_without_triton(monkeypatch):
    monkeypatch.setattr(importlib.import_module("electra_kernels.bias_gelu"), "use_triton", lambda *t: False)
    x, bias = torch.randn(7, 32), torch.randn(32)
    torch.testing.assert_close(bias_gelu(x, bias), F.gelu(x + bias))
    torch.testing.assert_close(bias_gelu_ref(x.bfloat16(), bias).float(), F.gelu(x.bfloat16().float() + bias),
                               atol=1e-2, rtol=1e-2)


def test_linear_gelu_is_linear_then_gelu():
    torch_pair = nn.Sequential(nn.Linear(48, 100), nn.GELU())
    ours = LinearGELU(48, 100)
    ours.load_state_dict(torch_pair[0].state_dict())
    assert isinstance(ours, nn.Linear) and set(ours.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 5, 48)
    torch.testing.assert_close(ours(x), torch_pair(x), atol=1e-5, rtol=1e-5)
    no_bias = LinearGELU(48, 16, bias=False)
    torch.testing.assert_close(no_bias(x), F.gelu(F.linear(x, no_bias.weight)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "x, bias, error, match",
    [
        (torch.randn(4, 32), torch.randn(31), ValueError, r"bias must have shape \(32,\)"),
        (torch.ones(4, 32, dtype=torch.int32), None, TypeError, "floating-point"),
        (torch.tensor(1.0), None, ValueError, "at least one dimension"),
    ],
)
def test_bad_inputs_raise_clear_errors(x, bias, error, match):
    with pytest.raises(error, match=match):
        bias_gelu(x, bias)
