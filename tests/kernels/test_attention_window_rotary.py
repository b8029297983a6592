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
from _compare import DEVICE
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


# ---------------------------------------------------------------------------------------------------
# kernels against the references
# ---------------------------------------------------------------------------------------------------
BUDGET_ATOL = {torch.bfloat16: 2e-3, torch.float16: 5e-4}


def _lowp(fn, *args, **kwargs):
    """PyTorch in the inputs' low precision: the reference math with every tensor kept in that dtype."""
    return fn(*args, **kwargs)


def _grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def _lowp_window_attention(q, k, v, window, key_padding_mask=None, rotary_base=None, dropout_mask=None,
                           dropout_p=0.0):
    """attention_ref's math in q's own dtype (scores, softmax, products): PyTorch's error baseline."""
    if rotary_base is not None:
        q, k = (rotary_ref(t, torch.arange(t.shape[1]), rotary_base) for t in (q, k))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(qt, kt.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    allowed = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool)
    if window is not None:
        allowed = (torch.arange(q.shape[1])[:, None] - torch.arange(k.shape[1])[None, :]).abs() <= window
    allowed = allowed[None, None].expand(q.shape[0], 1, -1, -1)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / electra_kernels.dropout_keep_probability(dropout_p)
    return torch.matmul(probs, vt).transpose(1, 2)


def _check(name, ours, lowp, ref, dtype):
    assert not torch.isnan(ours).any(), f"{name}: NaN (an element the kernel never wrote?)"
    err = (ours.double() - ref.double()).abs().max().item()
    base = (lowp.double() - ref.double()).abs().max().item()
    assert err <= 2 * base + BUDGET_ATOL[dtype], f"{name}: kernel error {err:.3g} > 2 x torch {base:.3g} + atol"


def _compare(kernel_fn, lowp_fn, ref_fn, inputs, dtype):
    dout = torch.randn_like(inputs[0])
    out, grads = _grads(kernel_fn, inputs, dout)
    out_lowp, grads_lowp = _grads(lowp_fn, inputs, dout)
    out_ref, grads_ref = _grads(ref_fn, [t.double() for t in inputs], dout.double())
    _check("out", out, out_lowp, out_ref, dtype)
    for name, g, gl, gr in zip(("dq", "dk", "dv"), grads, grads_lowp, grads_ref):
        _check(name, g, gl, gr, dtype)


@pytest.mark.parametrize("seqlen, window, mask_kind, dtype", [
    (77, 5, None, torch.bfloat16),      # many blocks wholly outside the window: skipped
    (70, 20, "right", torch.float16),   # key padding + window, ragged last block
    (40, 0, "fully_padded_row", torch.bfloat16),  # window 0: each query sees only itself
    (20, 3, None, torch.float16),       # one key block (the fused dK/dV/dQ kernel under the interpreter)
])
def test_padded_window_matches_reference(seqlen, window, mask_kind, dtype):
    q, k, v = (torch.randn(2, seqlen, 2, 32, dtype=dtype) for _ in range(3))
    mask = None
    if mask_kind == "right":
        mask = torch.arange(seqlen)[None, :] < torch.tensor([seqlen, seqlen // 2 + 3])[:, None]
    elif mask_kind == "fully_padded_row":
        mask = torch.arange(seqlen)[None, :] < torch.tensor([seqlen, 0])[:, None]
    _compare(lambda q, k, v: attention(q, k, v, mask, window=window),
             lambda q, k, v: _lowp_window_attention(q, k, v, window, mask),
             lambda q, k, v: attention_ref(q, k, v, mask, window=window), [q, k, v], dtype)


@pytest.mark.parametrize("lengths, window", [([5, 70, 33], 9), ([17, 40], 0)])
def test_varlen_window_matches_reference(lengths, window):
    dtype = torch.bfloat16
    total = sum(lengths)
    q, k, v = (torch.randn(total, 2, 32, dtype=dtype) for _ in range(3))
    cu = _cu_seqlens(lengths)
    max_len = max(lengths)

    def lowp(q, k, v):
        outs, start = [], 0
        for n in lengths:
            sl = slice(start, start + n)
            outs.append(_lowp_window_attention(q[sl][None], k[sl][None], v[sl][None], window)[0])
            start += n
        return torch.cat(outs)

    _compare(lambda q, k, v: attention_varlen(q, k, v, cu, max_len, window=window), lowp,
             lambda q, k, v: attention_varlen_ref(q, k, v, cu, max_len, window=window), [q, k, v], dtype)


def test_window_with_dropout_replays_the_kernels_mask():
    """Forward and gradients with dropout: the reference replays the kernel's own keep-mask."""
    dtype, p, window = torch.bfloat16, 0.2, 6
    q, k, v = (torch.randn(2, 45, 2, 32, dtype=dtype) for _ in range(3))
    mask = torch.arange(45)[None, :] < torch.tensor([45, 30])[:, None]
    torch.manual_seed(11)
    _, keep = attention(q, k, v, mask, p, window=window, return_dropout_mask=True)
    fixed = lambda fn: (lambda q, k, v: (torch.manual_seed(11), fn(q, k, v))[1])  # same seed, same mask
    _compare(fixed(lambda q, k, v: attention(q, k, v, mask, p, window=window)),
             lambda q, k, v: _lowp_window_attention(q, k, v, window, mask, dropout_mask=keep, dropout_p=p),
             lambda q, k, v: attention_ref(q, k, v, mask, p, dropout_mask=keep, window=window), [q, k, v], dtype)


def test_window_kernel_check_can_fail():
    """The comparison trips when the kernel ignores the window (global attention vs windowed truth)."""
    q, k, v = (torch.randn(1, 40, 1, 32, dtype=torch.bfloat16) for _ in range(3))
    with pytest.raises(AssertionError):
        _compare(lambda q, k, v: attention(q, k, v),
                 lambda q, k, v: _lowp_window_attention(q, k, v, 3),
                 lambda q, k, v: attention_ref(q, k, v, window=3), [q, k, v], torch.bfloat16)


@pytest.fixture(params=["fused", "separate"])
def rotary_mode(request, monkeypatch):
    """Both Triton rotary paths: inside the attention kernels' tile loads, and the separate rotary kernel."""
    monkeypatch.setenv("ELECTRA_KERNELS_ROTARY", request.param)
    return request.param


@pytest.mark.parametrize("window, mask_kind, dtype, head_dim", [
    (None, None, torch.bfloat16, 32),
    (4, "right", torch.float16, 32),
    (None, "right", torch.bfloat16, 48),  # half 24: the half tiles are padded to 32 in registers
    (6, None, torch.float16, 16),         # half 8: padded to tl.dot's minimum 16
])
def test_padded_rotary_matches_reference(window, mask_kind, dtype, head_dim, rotary_mode):
    seqlen = 37
    q, k, v = (torch.randn(2, seqlen, 2, head_dim, dtype=dtype) for _ in range(3))
    mask = None
    if mask_kind == "right":
        mask = torch.arange(seqlen)[None, :] < torch.tensor([seqlen, 20])[:, None]
    _compare(lambda q, k, v: attention(q, k, v, mask, window=window, rotary_base=THETA),
             lambda q, k, v: _lowp_window_attention(q, k, v, window, mask, rotary_base=THETA),
             lambda q, k, v: attention_ref(q, k, v, mask, window=window, rotary_base=THETA), [q, k, v], dtype)


def test_varlen_rotary_restarts_positions_per_document(rotary_mode):
    dtype, lengths, window = torch.bfloat16, [9, 40, 3], 7
    total = sum(lengths)
    q, k, v = (torch.randn(total, 2, 32, dtype=dtype) for _ in range(3))
    cu = _cu_seqlens(lengths)

    def lowp(q, k, v):
        outs, start = [], 0
        for n in lengths:
            sl = slice(start, start + n)
            outs.append(_lowp_window_attention(q[sl][None], k[sl][None], v[sl][None], window, rotary_base=THETA)[0])
            start += n
        return torch.cat(outs)

    _compare(lambda q, k, v: attention_varlen(q, k, v, cu, max(lengths), window=window, rotary_base=THETA), lowp,
             lambda q, k, v: attention_varlen_ref(q, k, v, cu, max(lengths), window=window, rotary_base=THETA),
             [q, k, v], dtype)


def test_fused_rotary_with_dropout_replays_the_kernels_mask(monkeypatch):
    monkeypatch.setenv("ELECTRA_KERNELS_ROTARY", "fused")
    dtype, p, window = torch.bfloat16, 0.2, 9
    q, k, v = (torch.randn(2, 45, 2, 32, dtype=dtype) for _ in range(3))
    mask = torch.arange(45)[None, :] < torch.tensor([45, 30])[:, None]
    torch.manual_seed(5)
    _, keep = attention(q, k, v, mask, p, window=window, rotary_base=THETA, return_dropout_mask=True)

    def ours(q, k, v):
        torch.manual_seed(5)
        return attention(q, k, v, mask, p, window=window, rotary_base=THETA)

    _compare(ours, lambda q, k, v: _lowp_window_attention(q, k, v, window, mask, THETA, keep, p),
             lambda q, k, v: attention_ref(q, k, v, mask, p, dropout_mask=keep, window=window, rotary_base=THETA),
             [q, k, v], dtype)


def test_fused_rotary_writes_no_rotated_copy(monkeypatch):
    """The fused path calls the rotary-attention op only (no separate rotary kernel)."""
    monkeypatch.setenv("ELECTRA_KERNELS_ROTARY", "fused")
    calls = []
    real = torch.ops.electra_kernels.rotary_fwd

    def spy(*args, **kwargs):
        calls.append("rotary_fwd")
        return real(*args, **kwargs)

    from electra_kernels import rotary as rot
    monkeypatch.setattr(rot.torch.ops.electra_kernels, "rotary_fwd", spy, raising=False)
    q = torch.randn(1, 20, 1, 32, dtype=torch.bfloat16, device=DEVICE)  # the Triton path (CUDA or interpreter)
    attention(q, q, q, rotary_base=THETA)
    assert calls == []
    monkeypatch.setenv("ELECTRA_KERNELS_ROTARY", "separate")
    attention(q, q, q, rotary_base=THETA)
    assert calls == ["rotary_fwd", "rotary_fwd"]


def test_rotary_kernel_check_can_fail():
    """Positions that do not restart per document (one 40-token document instead of two of 20) give a
    different result: the comparison trips."""
    q, k, v = (torch.randn(40, 1, 32, dtype=torch.bfloat16) for _ in range(3))
    two_docs = _cu_seqlens([20, 20])
    with pytest.raises(AssertionError):
        _compare(lambda q, k, v: attention_varlen(q, k, v, _cu_seqlens([40]), 40, window=5, rotary_base=THETA),
                 lambda q, k, v: attention_varlen(q, k, v, two_docs, 20, window=5, rotary_base=THETA),
                 lambda q, k, v: attention_varlen_ref(q, k, v, two_docs, 20, window=5, rotary_base=THETA),
                 [q, k, v], torch.bfloat16)


def test_rotary_kernel_matches_rotary_ref_and_inverts():
    from electra_kernels import rotary as rot
    x = torch.randn(2 * 13, 3, 48, dtype=torch.float32, device=DEVICE, requires_grad=True)
    positions = rot.padded_positions(2, 13, x.device)
    ours = rot.rotate(x, positions, 13, THETA)  # the kernel itself: CUDA, or the interpreter on the CPU
    expected = rotary_ref(x.detach().view(2, 13, 3, 48), torch.arange(13, device=DEVICE), THETA).view_as(x)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ours)
    ours.backward(g)
    x2 = x.detach().clone().requires_grad_()
    rotary_ref(x2.view(2, 13, 3, 48), torch.arange(13, device=DEVICE), THETA).view_as(x2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_rotary_table_built_in_inference_mode_serves_training(rotary_mode):
    """The cached cos/sin table, first built under inference_mode, is still saved by a training backward."""
    from electra_kernels import rotary as rot

    rot._TABLES.clear()
    q = torch.randn(1, 18, 1, 32, dtype=torch.bfloat16)
    with torch.inference_mode():
        attention(q, q, q, rotary_base=1234.0)
    leaf = q.clone().requires_grad_()
    attention(leaf, leaf, leaf, rotary_base=1234.0).float().sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad.float()).all()


def test_fused_attention_module_passes_window_and_rotary():
    module = electra_kernels.FusedAttention(window=3, rotary_base=THETA)
    assert "window=3" in repr(module) and "rotary_base" in repr(module)
    q, k, v = (torch.randn(2, 21, 2, 16) for _ in range(3))
    torch.testing.assert_close(module(q, k, v), attention_ref(q, k, v, window=3, rotary_base=THETA),
                               rtol=1e-4, atol=1e-4)
    cu = _cu_seqlens([20, 22])
    packed = [t.reshape(42, 2, 16) for t in (q, k, v)]
    torch.testing.assert_close(module(*packed, cu_seqlens=cu, max_seqlen=22),
                               attention_varlen_ref(*packed, cu, 22, window=3, rotary_base=THETA),
                               rtol=1e-4, atol=1e-4)
