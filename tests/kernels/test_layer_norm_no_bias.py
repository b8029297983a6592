"""LayerNorm without bias (ModernBERT's norm_bias=False) and without weight, through the LayerNorm
kernel (Triton in the interpreter) against float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from electra_kernels import FusedLayerNorm, layer_norm, layer_norm_ref

from _compare import assert_within_torch_error, leaf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", ["weight_only", "none"])
def test_layer_norm_without_bias_matches_reference(dtype, affine):
    x = torch.randn(7, 96, dtype=dtype) * 2 + 1
    weight = torch.randn(96, dtype=dtype) if affine == "weight_only" else None
    inputs = [x] + ([weight] if weight is not None else [])

    def run(fn, ts):
        leaves = [leaf(t) for t in ts]
        y = fn(*leaves)
        y.backward(dy.to(y.dtype))
        return y, [t.grad for t in leaves]

    dy = torch.randn(7, 96, dtype=torch.float64)
    y, grads = run(lambda x, *w: layer_norm(x, w[0] if w else None, eps=1e-5), inputs)
    truth, grads_truth = run(lambda x, *w: F.layer_norm(x, (96,), w[0] if w else None, None, 1e-5),
                             [t.double() for t in inputs])
    base, grads_base = run(lambda x, *w: F.layer_norm(x, (96,), w[0] if w else None, None, 1e-5), inputs)
    assert_within_torch_error("y", y, truth, base, dtype)
    for name, g, gt, gb in zip(("dx", "dweight"), grads, grads_truth, grads_base):
        assert_within_torch_error(name, g, gt, gb, dtype)


def test_layer_norm_ref_bias_defaults_to_none():
    x, w = torch.randn(3, 16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    torch.testing.assert_close(layer_norm_ref(x, w), F.layer_norm(x, (16,), w, None, 1e-12))
    torch.testing.assert_close(layer_norm_ref(x), F.layer_norm(x, (16,), None, None, 1e-12))


def test_fused_layer_norm_bias_false_is_a_drop_in():
    ref = nn.LayerNorm(48, eps=1e-5, bias=False)
    nn.init.normal_(ref.weight)
    fused = FusedLayerNorm(48, eps=1e-5, bias=False)
    fused.load_state_dict(ref.state_dict())
    assert fused.bias is None and set(fused.state_dict()) == {"weight"}
    x = torch.randn(2, 5, 48)
    xa, xb = leaf(x), leaf(x)
    ya, yb = fused(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
