"""Sliding-window attention and rotary embeddings (``window=``, ``rotary_base=``).

First the references (attention_ref / attention_varlen_ref / rotary_ref) against independent naive
computations: an explicit per-query loop over the keys in the window, and transformers' own ModernBERT
rotary functions. Then the public functions (Triton kernels in the interpreter) against the references,
forward and every gradient, within the attention tests' error budget (2x PyTorch's own error in the
same dtype). Shapes are tiny: under the interpreter the forward/dQ blocks are 32x16 and dK/dV 16x32, so
lengths 40-77 with windows 3-20 give blocks fully inside, partly inside and fully outside the window.
"""

import math

import pytest
import torch

import electra_kernels
from electra_kernels import attention, attention_ref, attention_varlen, attention_varlen_ref, rotary_ref

THETA = 10000.0


def _naive_rotary(x, positions, base):
    """Rotary embedding written out pair by pair: (x_d, x_{d+h}) rotated by angle pos / base^(2d/D)."""
    out = torch.empty_like(x)
    half = x.shape[-1] // 2
    for s, pos in enumerate(positions.tolist()):
        for d in range(half):
            angle = pos / base ** (2 * d / x.shape[-1])
            c, sn = math.cos(angle), math.sin(angle)
            x1, x2 = x[..., s, :, d], x[..., s, :, d + half]
            out[..., s, :, d] = x1 * c - x2 * sn
            out[..., s, :, d + half] = x2 * c + x1 * sn
    return out


def _naive_window_attention(q, k, v, window, key_padding_mask=None):
    """One query at a time, softmax over the keys j with |i - j| <= window (and real), in float64."""
    batch, seq, heads, dim = q.shape
    out = torch.zeros(batch, seq, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(seq):
                keys = [j for j in range(seq) if abs(i - j) <= window
                        and (key_padding_mask is None or bool(key_padding_mask[b, j]))]
                if not keys:
                    continue  # no key: zeros, as the reference
                scores = torch.stack([q[b, i, h].double() @ k[b, j, h].double() for j in keys]) / math.sqrt(dim)
                probs = torch.softmax(scores, 0)
                out[b, i, h] = sum(p * v[b, j, h].double() for p, j in zip(probs, keys))
    return out


def _cu_seqlens(lengths):
    return torch.nn.functional.pad(torch.as_tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


# ---------------------------------------------------------------------------------------------------
# references against naive computations
# ---------------------------------------------------------------------------------------------------
def test_rotary_ref_matches_pairwise_rotation():
    x = torch.randn(2, 9, 3, 8, dtype=torch.float64)
    positions = torch.arange(9)
    torch.testing.assert_close(rotary_ref(x, positions, THETA), _naive_rotary(x, positions, THETA),
                               rtol=1e-6, atol=1e-6)  # fp32 angles, as transformers computes them


def test_rotary_ref_matches_transformers_modernbert():
    mb = pytest.importorskip("transformers.models.modernbert.modeling_modernbert")
    config = mb.ModernBertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=16,
                                 vocab_size=32, global_rope_theta=160000.0, local_rope_theta=THETA)
    rope = mb.ModernBertRotaryEmbedding(config)
    q, k = torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)  # (batch, heads, seq, head_dim)
    positions = torch.arange(11)[None]
    for layer_type, theta in (("full_attention", 160000.0), ("sliding_attention", THETA)):
        cos, sin = rope(q, positions, layer_type)
        q_hf, k_hf = mb.apply_rotary_pos_emb(q, k, cos, sin)
        ours = [rotary_ref(t.transpose(1, 2), positions[0], theta).transpose(1, 2) for t in (q, k)]
        torch.testing.assert_close(ours[0], q_hf, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[1], k_hf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 2, 5, 30])
def test_attention_ref_window_matches_naive_loop(window):
    q, k, v = (torch.randn(2, 13, 2, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.arange(13)[None, :] < torch.tensor([13, 6])[:, None]
    for kpm in (None, mask):
        ours = attention_ref(q, k, v, kpm, window=window)
        torch.testing.assert_close(ours, _naive_window_attention(q, k, v, window, kpm), rtol=1e-10, atol=1e-10)


def test_attention_ref_rotary_is_attention_of_rotated_inputs():
    q, k, v = (torch.randn(2, 10, 2, 8, dtype=torch.float64) for _ in range(3))
    positions = torch.arange(10)
    expected = attention_ref(_naive_rotary(q, positions, THETA), _naive_rotary(k, positions, THETA), v)
    torch.testing.assert_close(attention_ref(q, k, v, rotary_base=THETA), expected, rtol=1e-6, atol=1e-6)
    # and the rotation matters: without it the result differs
    assert (attention_ref(q, k, v) - expected).abs().max() > 1e-3


def test_varlen_ref_restarts_positions_and_windows_per_document():
    lengths = [5, 9, 1]
    total = sum(lengths)
    q, k, v = (torch.randn(total, 2, 8, dtype=torch.float64) for _ in range(3))
    cu = _cu_seqlens(lengths)
    ours = attention_varlen_ref(q, k, v, cu, max(lengths), window=3, rotary_base=THETA)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        positions = torch.arange(n)  # restart at 0 in every document
        qr, kr = (_naive_rotary(t[sl][None], positions, THETA) for t in (q, k))
        expected = _naive_window_attention(qr, kr, v[sl][None], 3)[0]
        torch.testing.assert_close(ours[sl], expected, rtol=1e-6, atol=1e-6)
        start += n


def test_window_and_rotary_none_is_todays_attention():
    q, k, v = (torch.randn(2, 7, 2, 16) for _ in range(3))
    assert torch.equal(attention_ref(q, k, v, window=None, rotary_base=None), attention_ref(q, k, v))
    # a window at least the sequence length masks nothing
    torch.testing.assert_close(attention_ref(q, k, v, window=6), attention_ref(q, k, v))


def test_bad_window_and_rotary_arguments_raise():
    q = torch.randn(1, 4, 1, 8)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="window"):
            attention(q, q, q, window=bad)
    with pytest.raises(ValueError, match="rotary_base"):
        attention(q, q, q, rotary_base=0.0)
    odd = torch.randn(1, 4, 1, 7)
    with pytest.raises(ValueError, match="even head_dim"):
        attention(odd, odd, odd, rotary_base=THETA)
    with pytest.raises(ValueError, match="seq_q == seq_k"):
        attention(q, torch.randn(1, 5, 1, 8), torch.randn(1, 5, 1, 8), window=2)
