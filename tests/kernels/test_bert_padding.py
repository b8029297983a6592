"""unpad_input / pad_input and the index autograd functions: exact gathers and scatters, both directions."""

import pytest
import torch

from electra_kernels import index_first_axis, index_put_first_axis, pad_input, unpad_input


def _mask(lengths, seqlen):
    return torch.arange(seqlen)[None, :] < torch.as_tensor(lengths)[:, None]


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64])
def test_unpad_input_outputs(mask_dtype):
    lengths, seqlen = [5, 1, 0, 7], 7
    mask = _mask(lengths, seqlen).to(mask_dtype)  # HF attention_mask is int64
    hidden = torch.randn(4, seqlen, 3, 2)
    packed, indices, cu_seqlens, max_seqlen = unpad_input(hidden, mask)
    assert packed.shape == (sum(lengths), 3, 2)
    assert indices.dtype == torch.int64 and indices.shape == (sum(lengths),)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 5, 6, 6, 13]
    assert max_seqlen == 7 and isinstance(max_seqlen, int)
    expected = torch.cat([hidden[b, :n] for b, n in enumerate(lengths)])
    assert torch.equal(packed, expected)  # real tokens in order, batch-major


def test_pad_input_inverts_unpad_input_with_zeros_at_padding():
    mask = torch.rand(3, 11) < 0.5  # any pattern, not only right padding
    hidden = torch.randn(3, 11, 8)
    packed, indices, _, _ = unpad_input(hidden, mask)
    restored = pad_input(packed, indices, 3, 11)
    assert restored.shape == hidden.shape
    assert torch.equal(restored, hidden * mask[..., None])


def test_round_trip_gradients_are_exact_gathers_and_scatters():
    mask = _mask([4, 9, 2], 9)
    hidden = torch.randn(3, 9, 5, dtype=torch.float64, requires_grad=True)
    packed, indices, _, _ = unpad_input(hidden, mask)
    weight = torch.randn_like(packed)
    (packed * weight).sum().backward()
    expected = torch.zeros_like(hidden)
    expected[mask] = weight  # gradient reaches real tokens only
    assert torch.equal(hidden.grad, expected)

    packed = packed.detach().requires_grad_()
    padded = pad_input(packed, indices, 3, 9)
    grad_out = torch.randn_like(padded)
    padded.backward(grad_out)
    assert torch.equal(packed.grad, grad_out[mask])


def test_index_functions_pass_gradcheck():
    values = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([4, 0, 5])
    assert torch.autograd.gradcheck(lambda x: index_first_axis(x, indices), (values,))
    small = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: index_put_first_axis(x, indices, 7), (small,))


def test_bf16_and_empty_batch():
    mask = torch.zeros(2, 4, dtype=torch.bool)
    hidden = torch.randn(2, 4, 3, dtype=torch.bfloat16)
    packed, indices, cu_seqlens, max_seqlen = unpad_input(hidden, mask)
    assert packed.shape == (0, 3) and packed.dtype == torch.bfloat16
    assert cu_seqlens.tolist() == [0, 0, 0] and max_seqlen == 0
    assert torch.equal(pad_input(packed, indices, 2, 4), torch.zeros_like(hidden))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="attention_mask"):
        unpad_input(torch.randn(2, 4, 3), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="indices"):
        pad_input(torch.randn(3, 2), torch.tensor([0, 1]), 1, 4)
