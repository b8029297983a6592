"""Fused dropout + residual + LayerNorm (kernels/layer_norm.py) against float64 references.

The Triton kernels run in the interpreter here (tests/conftest.py sets TRITON_INTERPRET=1). For bf16/fp16
the kernel's error against the fp64 truth must stay within 2x PyTorch's own same-dtype error plus a
small atol (the flash-attn layer-norm test rule).
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from electra_kernels import (DropoutAddLayerNorm, FusedLayerNorm, _outputs, dropout_keep_probability, layer_norm,
                             layer_norm_ref)
from electra_kernels.layer_norm import layer_norm_forward

from _compare import assert_within_torch_error, leaf


def _torch_same_dtype(x, weight, bias, residual, dropout_p, mask, eps):
    """What PyTorch itself computes in the inputs' dtype (the baseline for the tolerance)."""
    z = x * mask.to(x.dtype) / dropout_keep_probability(dropout_p) if dropout_p > 0 else x
    if residual is not None:
        z = z + residual
    return F.layer_norm(z, (x.shape[-1],), weight, bias, eps)


# Odd sizes, each row count and width at least once (the interpreter runs ~10 ms per row, dropout's
# philox ~3x that, so the full cross product would take minutes).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, hidden", [(1, 768), (7, 100), (77, 32)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_dropout_residual_layer_norm_matches_reference(dtype, rows, hidden, dropout_p):
    eps = 1e-5
    x = torch.randn(rows, hidden, dtype=dtype) * 2 + 0.5
    residual = torch.randn(rows, hidden, dtype=dtype)
    weight = 1 + 0.5 * torch.randn(hidden, dtype=dtype)
    bias = 0.5 * torch.randn(hidden, dtype=dtype)
    inputs = [leaf(t) for t in (x, residual, weight, bias)]
    y, mask = layer_norm(inputs[0], inputs[2], inputs[3], eps, inputs[1], dropout_p, return_dropout_mask=True)
    dy = torch.randn_like(y)
    y.backward(dy)

    truth_inputs = [leaf(t.double()) for t in (x, residual, weight, bias)]
    truth = layer_norm_ref(truth_inputs[0], truth_inputs[2], truth_inputs[3], eps, truth_inputs[1], dropout_p,
                           dropout_mask=mask)
    truth.backward(dy.double())
    base_inputs = [leaf(t) for t in (x, residual, weight, bias)]
    baseline = _torch_same_dtype(base_inputs[0], base_inputs[2], base_inputs[3], base_inputs[1], dropout_p, mask, eps)
    baseline.backward(dy)

    assert y.dtype == dtype and mask.dtype == torch.bool and mask.shape == x.shape
    assert_within_torch_error("y", y, truth, baseline, dtype)
    for name, ours, ref, base in zip(("dx", "dresidual", "dweight", "dbias"), inputs, truth_inputs, base_inputs):
        assert ours.grad.dtype == dtype, name
        assert_within_torch_error(name, ours.grad, ref.grad, base.grad, dtype)


def test_wide_rows_many_rows_fp32():
    x, residual = leaf(torch.randn(77, 768)), leaf(torch.randn(77, 768))
    weight, bias = leaf(torch.randn(768)), leaf(torch.randn(768))
    y = layer_norm(x, weight, bias, 1e-12, residual)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = [leaf(t.double()) for t in (x, residual, weight, bias)]
    truth = layer_norm_ref(ref[0], ref[2], ref[3], 1e-12, ref[1])
    truth.backward(dy.double())
    torch.testing.assert_close(y.double(), truth, atol=2e-5, rtol=1e-5)
    for ours, theirs in zip((x, residual, weight, bias), ref):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("has_residual", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_variants_fp32(has_residual, dropout_p, affine):
    rows, hidden, eps = 5, 100, 1e-12
    x = leaf(torch.randn(rows, hidden))
    residual = leaf(torch.randn(rows, hidden)) if has_residual else None
    weight = leaf(torch.randn(hidden)) if affine != "none" else None
    bias = leaf(torch.randn(hidden)) if affine == "weight+bias" else None
    y, mask = layer_norm(x, weight, bias, eps, residual, dropout_p, return_dropout_mask=True)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves = [t for t in (x, residual, weight, bias) if t is not None]
    ref_leaves = [leaf(t.double()) for t in leaves]
    it = iter(ref_leaves)
    rx = next(it)
    rres = next(it) if has_residual else None
    rw = next(it) if weight is not None else None
    rb = next(it) if bias is not None else None
    truth = layer_norm_ref(rx, rw, rb, eps, rres, dropout_p, dropout_mask=mask)
    truth.backward(dy.double())
    torch.testing.assert_close(y.double(), truth, atol=2e-5, rtol=1e-5)
    for ours, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=5e-5, rtol=1e-5)
    if dropout_p == 0.0:
        assert mask.all()


def test_mixed_dtypes_like_autocast():
    """bf16 dense output + fp32 residual stream + fp32 parameters (what autocast hands a post-LN block):
    output in the promoted dtype, each gradient in its input's dtype."""
    rows, hidden = 9, 64
    x = leaf(torch.randn(rows, hidden, dtype=torch.bfloat16))
    residual = leaf(torch.randn(rows, hidden))
    weight, bias = leaf(torch.randn(hidden)), leaf(torch.randn(hidden))
    y = layer_norm(x, weight, bias, 1e-12, residual, 0.0)
    assert y.dtype == torch.float32
    dy = torch.randn_like(y)
    y.backward(dy)
    assert (x.grad.dtype, residual.grad.dtype, weight.grad.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    ref = [leaf(t.double()) for t in (x, residual, weight, bias)]
    truth = layer_norm_ref(ref[0], ref[2], ref[3], 1e-12, ref[1])
    truth.backward(dy.double())
    torch.testing.assert_close(y.double(), truth, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(residual.grad.double(), ref[1].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref[0].grad, atol=2e-2, rtol=1e-2)  # rounded to bf16
    torch.testing.assert_close(weight.grad.double(), ref[2].grad, atol=1e-4, rtol=1e-5)


def test_statistics_are_fp32_mean_and_rstd():
    x = torch.randn(33, 100, dtype=torch.bfloat16) * 3 + 1
    residual = torch.randn(33, 100, dtype=torch.bfloat16)
    y, z, mean, rstd, _ = layer_norm_forward(x, None, None, residual, None, 1e-5, 0.0, False)
    z_true = x.double() + residual.double()
    var, mu = torch.var_mean(z_true, dim=-1, unbiased=False)
    assert mean.dtype == rstd.dtype == torch.float32
    torch.testing.assert_close(mean.double(), mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), (var + 1e-5).rsqrt(), atol=1e-5, rtol=1e-5)
    # z is saved in the I/O dtype (the interpreter's fp32 -> bf16 cast truncates; the GPU rounds).
    assert z.dtype == torch.bfloat16
    torch.testing.assert_close(z.float(), x.float() + residual.float(), atol=0, rtol=2**-7)


def test_dropout_mask_reproducible_and_unbiased():
    x, residual = torch.randn(64, 256), torch.randn(64, 256)
    weight, bias = torch.randn(256), torch.randn(256)
    y1, m1 = layer_norm(x, weight, bias, 1e-12, residual, 0.3, seed=1234, return_dropout_mask=True)
    y2, m2 = layer_norm(x, weight, bias, 1e-12, residual, 0.3, seed=1234, return_dropout_mask=True)
    _, m3 = layer_norm(x, weight, bias, 1e-12, residual, 0.3, seed=1235, return_dropout_mask=True)
    assert torch.equal(m1, m2) and torch.equal(y1, y2)
    assert not torch.equal(m1, m3)
    keep = m1.float().mean().item()
    assert abs(keep - dropout_keep_probability(0.3)) < 0.015, keep  # 16k Bernoulli(0.7) draws: sd 0.0036
    # Without an explicit seed the draw comes from torch's generator: manual_seed reproduces it.
    torch.manual_seed(7)
    _, a = layer_norm(x, weight, bias, 1e-12, residual, 0.3, return_dropout_mask=True)
    torch.manual_seed(7)
    _, b = layer_norm(x, weight, bias, 1e-12, residual, 0.3, return_dropout_mask=True)
    assert torch.equal(a, b)


def test_dropout_keep_rate_is_the_quantised_probability():
    """The drop probability is quantised to 1/256 (16 keep decisions per Philox evaluation, one byte each):
    p = 0.1 keeps with q = 230/256 = 0.8984, not 0.9. 1M draws (sd 0.0003) tell the two apart (5 sd), and
    the survivors are scaled by exactly 1/q, so the mean of dropout(x) is x."""
    q = dropout_keep_probability(0.1)
    assert q == 230 / 256 and dropout_keep_probability(0.5) == 0.5 and dropout_keep_probability(1.0) == 0.0
    x = torch.ones(2048, 512)
    y, mask = layer_norm(x, None, None, 1e-5, torch.zeros_like(x), 0.1, seed=11, return_dropout_mask=True)
    n = mask.numel()
    rate = mask.float().mean().item()
    assert abs(rate - q) < 4 * (q * (1 - q) / n) ** 0.5, rate
    # z = dropout(1) + 0 is 1/q on kept elements and 0 elsewhere: check through the reference replay.
    ref = layer_norm_ref(x, None, None, 1e-5, torch.zeros_like(x), 0.1, dropout_mask=mask)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    z = x * mask / q
    assert abs(z.mean().item() - 1.0) < 4 * ((1 - q) / q / n) ** 0.5


def test_inference_saves_nothing_and_matches():
    x, residual, weight = torch.randn(9, 100), torch.randn(9, 100), torch.randn(100, requires_grad=True)
    _, z, _, _, _ = layer_norm_forward(x, weight, None, residual, None, 1e-5, 0.0, False, keep_for_backward=False)
    assert z.numel() == 0
    with torch.no_grad():
        y = layer_norm(x, weight, None, 1e-5, residual)
    assert not y.requires_grad
    torch.testing.assert_close(y, F.layer_norm(x + residual, (100,), weight, None, 1e-5), atol=1e-5, rtol=1e-5)


def test_dropout_everything_leaves_the_residual():
    x, residual = leaf(torch.randn(5, 32)), torch.randn(5, 32)
    y = layer_norm(x, None, None, 1e-5, residual, 1.0)
    torch.testing.assert_close(y, F.layer_norm(residual, (32,), eps=1e-5), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_outputs_are_fully_written():
    """Every output element comes from the kernel: the poisoned_outputs fixture allocates every buffer
    full of NaN (True for masks)."""
    assert _outputs.POISON
    x, residual = leaf(torch.randn(13, 100)), leaf(torch.randn(13, 100))
    weight, bias = leaf(torch.randn(100)), leaf(torch.randn(100))
    y, mask = layer_norm(x, weight, bias, 1e-12, residual, 0.5, seed=3, return_dropout_mask=True)
    y.backward(torch.randn_like(y))
    for t in (y, x.grad, residual.grad, weight.grad, bias.grad):
        assert torch.isfinite(t).all()
    assert not mask.all()  # the kernel wrote the mask (it was poisoned True)


def test_strided_rows_and_leading_dims():
    base = torch.randn(2, 7, 160)
    x = leaf(base[..., :100].clone())
    strided = base[..., :100]  # row stride 160, unit column stride: used without a copy
    weight, bias = torch.randn(100), torch.randn(100)
    y = layer_norm(strided, weight, bias, 1e-12)
    torch.testing.assert_close(y, F.layer_norm(x, (100,), weight, bias, 1e-12), atol=1e-5, rtol=1e-5)
    transposed = torch.randn(100, 14).t()  # column stride != 1: copied
    torch.testing.assert_close(layer_norm(transposed, weight, bias, 1e-5),
                               F.layer_norm(transposed, (100,), weight, bias, 1e-5), atol=1e-5, rtol=1e-5)


def test_empty_input():
    x = leaf(torch.randn(0, 32))
    weight = leaf(torch.randn(32))
    y = layer_norm(x, weight, None, 1e-12)
    assert y.shape == (0, 32)
    y.sum().backward()
    assert torch.equal(weight.grad, torch.zeros(32))


def test_reference_path_without_triton(monkeypatch):
    """Off CUDA and outside the interpreter the public function is the PyTorch reference."""
    # (electra_kernels.layer_norm is the function; the module is reached through importlib.)
    monkeypatch.setattr(importlib.import_module("electra_kernels.layer_norm"), "use_triton", lambda *t: False)
    x, residual, weight = torch.randn(7, 32), torch.randn(7, 32), torch.randn(32)
    y = layer_norm(x, weight, None, 1e-5, residual, 0.0)
    torch.testing.assert_close(y, F.layer_norm(x + residual, (32,), weight, None, 1e-5))
    y, mask = layer_norm(x, weight, None, 1e-5, residual, 0.4, return_dropout_mask=True)
    torch.testing.assert_close(y, layer_norm_ref(x, weight, None, 1e-5, residual, 0.4, dropout_mask=mask))


def test_fused_layer_norm_is_a_drop_in_for_nn_layer_norm():
    torch_ln = nn.LayerNorm(100, eps=1e-7)
    with torch.no_grad():
        torch_ln.weight.normal_()
        torch_ln.bias.normal_()
    ours = FusedLayerNorm(100, eps=1e-7)
    ours.load_state_dict(torch_ln.state_dict())
    assert isinstance(ours, nn.LayerNorm) and ours.normalized_shape == (100,) and ours.eps == 1e-7
    assert set(ours.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 5, 100)
    torch.testing.assert_close(ours(x), torch_ln(x), atol=1e-5, rtol=1e-5)
    # Multi-dimensional normalized_shape and no affine parameters.
    torch_2d = nn.LayerNorm((4, 8), elementwise_affine=False)
    ours_2d = FusedLayerNorm((4, 8), elementwise_affine=False)
    x2 = torch.randn(3, 4, 8)
    torch.testing.assert_close(ours_2d(x2), torch_2d(x2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected input ending in"):
        ours(torch.randn(3, 99))


def test_dropout_add_layer_norm_module():
    module = DropoutAddLayerNorm(64, eps=1e-12, p=0.25)
    x, residual = torch.randn(4, 64), torch.randn(4, 64)
    module.eval()
    expected = F.layer_norm(x + residual, (64,), module.weight, module.bias, 1e-12)
    torch.testing.assert_close(module(x, residual), expected, atol=1e-5, rtol=1e-5)
    module.train()
    assert not torch.allclose(module(x, residual), module.eval()(x, residual))
    assert "p=0.25" in repr(module)
    with pytest.raises(ValueError, match="probability"):
        DropoutAddLayerNorm(64, p=1.5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(weight=torch.randn(31)), ValueError, r"weight must have shape \(32,\)"),
        (dict(bias=torch.randn(33)), ValueError, r"bias must have shape \(32,\)"),
        (dict(residual=torch.randn(4, 31)), ValueError, "residual shape"),
        (dict(dropout_p=1.5), ValueError, "dropout_p must be in"),
        (dict(x=torch.ones(4, 32, dtype=torch.int64)), TypeError, "floating-point"),
        (dict(x=torch.randn(2, 20000), weight=None, bias=None), ValueError, "supports up to 16384 features"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, error, match):
    args = dict(x=torch.randn(4, 32), weight=torch.randn(32), bias=None, residual=None, dropout_p=0.0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        layer_norm(args["x"], args["weight"], args["bias"], 1e-12, args["residual"], args["dropout_p"])


def test_seeds_are_63_bits_and_the_high_word_counts(monkeypatch):
    """The default seed uses the whole 64-bit Philox key: seeds that differ only above bit 32 drop
    different elements, and the drawn seed reaches the high word (a 31-bit draw never did)."""
    x, weight, bias = torch.randn(4, 64), torch.ones(64), torch.zeros(64)
    _, m1 = layer_norm(x, weight, bias, 1e-12, None, 0.5, seed=7, return_dropout_mask=True)
    _, m2 = layer_norm(x, weight, bias, 1e-12, None, 0.5, seed=7 + 2**40, return_dropout_mask=True)
    assert not torch.equal(m1, m2)
    drawn, randint = [], torch.randint
    monkeypatch.setattr(torch, "randint", lambda *a, **k: drawn.append(randint(*a, **k)) or drawn[-1])
    torch.manual_seed(0)
    for _ in range(4):
        layer_norm(x, weight, bias, 1e-12, None, 0.5)
    assert len(drawn) == 4 and max(int(d) for d in drawn) >= 2**40
