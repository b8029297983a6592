"""Fused attention kernels (Triton interpreter on the CPU) against a float64 reference.

Error budget (as flash-attn tests its Triton kernels): in bf16/fp16 the kernel's error against the fp64 reference must stay within
2x the error of PyTorch's own computation in that dtype, plus a small atol. Every output buffer is
allocated full of NaN (the ``poisoned_outputs`` fixture), so an element a kernel forgets to write fails the test.
Shapes are small because the interpreter is slow; block sizes under the interpreter are 32x16 (forward,
dQ) and 16x32 (dK/dV), so lengths 1, 7, 33, 77 cover single, partial and several blocks.
"""

import importlib
import math

import pytest
import torch
import triton
from torch import nn

import electra_kernels
from electra_kernels import FusedAttention, attention, attention_dropout_mask, attention_varlen, pad_input, unpad_input


attn_mod = importlib.import_module("electra_kernels.attention")

ATOL = {torch.bfloat16: 2e-3, torch.float16: 5e-4}


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def _lowp_attention(q, k, v, key_padding_mask=None, dropout_mask=None, dropout_p=0.0):
    """PyTorch's own attention in the inputs' dtype: the error baseline."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    scores = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if key_padding_mask is not None:  # rows without any real key: output 0, like the reference
        probs = probs * key_padding_mask.any(-1)[:, None, None, None].to(probs.dtype)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / electra_kernels.dropout_keep_probability(dropout_p)
    return torch.matmul(probs, vt).transpose(1, 2)


def _packed_to_padded(x, cu_seqlens, max_seqlen):
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    mask = torch.zeros(len(lengths), max_seqlen, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    indices = torch.nonzero(mask.flatten()).flatten()
    return pad_input(x, indices, len(lengths), max_seqlen), mask, indices


def _lowp_attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_mask=None, dropout_p=0.0):
    (qp, mask, indices), kp, vp = (_packed_to_padded(q, cu_seqlens, max_seqlen),
                                   _packed_to_padded(k, cu_seqlens, max_seqlen)[0],
                                   _packed_to_padded(v, cu_seqlens, max_seqlen)[0])
    out = _lowp_attention(qp, kp, vp, mask, dropout_mask, dropout_p)
    return out.reshape(-1, *out.shape[2:]).index_select(0, indices)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_within_budget(name, ours, lowp, ref, dtype, factor=2.0):
    assert not torch.isnan(ours).any(), f"{name}: NaN (an element the kernel never wrote?)"
    err, base = _max_err(ours, ref), _max_err(lowp, ref)
    assert err <= factor * base + ATOL[dtype], f"{name}: kernel error {err:.3g} > {factor} x torch {base:.3g} + atol"


def _grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def _compare_with_references(kernel_fn, lowp_fn, ref_fn, q, k, v, dtype):
    """Forward and dQ/dK/dV: kernel vs fp64 reference, within 2x PyTorch's own low-precision error."""
    dout = torch.randn_like(q)
    out, grads = _grads(kernel_fn, (q, k, v), dout)
    out_lowp, grads_lowp = _grads(lowp_fn, (q, k, v), dout)
    out_ref, grads_ref = _grads(ref_fn, (q.double(), k.double(), v.double()), dout.double())
    assert out.dtype == dtype and out.shape == q.shape
    _assert_within_budget("out", out, out_lowp, out_ref, dtype)
    for name, g, gl, gr in zip(("dq", "dk", "dv"), grads, grads_lowp, grads_ref):
        assert g.dtype == dtype
        _assert_within_budget(name, g, gl, gr, dtype)


def _random_lengths(batch, max_seqlen, generator=None):
    return torch.randint(max_seqlen // 2, max_seqlen + 1, (batch,), generator=generator)


def _cu_seqlens(lengths):
    return torch.nn.functional.pad(torch.as_tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


# ---------------------------------------------------------------------------------------------------
# padded layout
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "batch, seqlen, heads, head_dim, mask_kind, dtype",
    [
        (2, 1, 2, 64, None, torch.bfloat16),
        (2, 7, 2, 32, "right", torch.float16),
        (2, 7, 1, 64, "right", torch.bfloat16),
        (2, 77, 1, 64, "right", torch.bfloat16),
        (3, 33, 1, 128, "fully_padded_row", torch.float16),
        (3, 20, 1, 128, "fully_padded_row", torch.bfloat16),
        (2, 40, 1, 64, "scattered", torch.float16),
        (1, 21, 2, 48, None, torch.bfloat16),  # head_dim that is not a power of two: padded in registers
    ],
)
def test_padded_matches_reference(batch, seqlen, heads, head_dim, mask_kind, dtype):
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, dtype=dtype) for _ in range(3))
    mask = None
    if mask_kind == "right":
        mask = torch.arange(seqlen)[None, :] < _random_lengths(batch, seqlen)[:, None]
    elif mask_kind == "fully_padded_row":
        mask = torch.arange(seqlen)[None, :] < torch.tensor([seqlen, 0, 5])[:, None]
    elif mask_kind == "scattered":  # not a prefix: holes in the middle, padding at the front
        mask = torch.rand(batch, seqlen) < 0.6
        mask[:, -1] = False
    _compare_with_references(
        lambda q, k, v: attention(q, k, v, mask),
        lambda q, k, v: _lowp_attention(q, k, v, mask),
        lambda q, k, v: electra_kernels.attention_ref(q, k, v, mask),
        q, k, v, dtype,
    )


@pytest.mark.parametrize("mask_kind", [None, "fully_padded_row"])
def test_padded_log_sum_exp(mask_kind):
    batch, seqlen, heads, head_dim = 2, 45, 2, 32
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, dtype=torch.bfloat16) * 3 for _ in range(3))
    mask = None
    if mask_kind is not None:
        mask = torch.arange(seqlen)[None, :] < torch.tensor([0, 30])[:, None]
    out, lse = attn_mod.attention_forward(q, k, v, mask)
    out_ref, lse_ref = electra_kernels.attention_ref(q.double(), k.double(), v.double(), mask, return_lse=True)
    assert lse.shape == (batch, heads, seqlen) and lse.dtype == torch.float32
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == float("-inf")).all()
    # Q·Kᵀ of bf16 inputs is exact in fp32: the LSE is accurate to fp32 rounding.
    torch.testing.assert_close(lse[finite].double(), lse_ref[finite], atol=1e-4, rtol=1e-5)
    if mask_kind is not None:
        assert (out[0] == 0).all()  # no real key -> zeros, like the reference


def test_fully_padded_rows_have_zero_gradients():
    q, k, v = (torch.randn(2, 19, 1, 32, dtype=torch.float16, requires_grad=True) for _ in range(3))
    mask = torch.arange(19)[None, :] < torch.tensor([0, 11])[:, None]
    attention(q, k, v, mask).backward(torch.randn(2, 19, 1, 32, dtype=torch.float16))
    for g in (q.grad, k.grad, v.grad):
        assert not torch.isnan(g).any()
        assert (g[0] == 0).all()
    assert (k.grad[1, 11:] == 0).all() and (v.grad[1, 11:] == 0).all()  # padded keys get no gradient


def test_cross_attention_lengths_and_noncontiguous_inputs():
    """seq_q != seq_k, and q/k/v as strided views of one fused projection (no copies needed)."""
    batch, seq_q, seq_k, heads, head_dim = 2, 9, 23, 2, 32
    qkv = torch.randn(batch, seq_k, 3, heads, head_dim, dtype=torch.bfloat16)
    q, k, v = qkv[:, :seq_q, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    mask = torch.arange(seq_k)[None, :] < torch.tensor([seq_k, 17])[:, None]
    out = attention(q, k, v, mask)
    ref = electra_kernels.attention_ref(q.double(), k.double(), v.double(), mask)
    lowp = _lowp_attention(q, k, v, mask)
    _assert_within_budget("out", out, lowp, ref, torch.bfloat16)


def test_fp32_inputs_are_exact():
    q, k, v = (torch.randn(2, 29, 2, 64, dtype=torch.float32, requires_grad=True) for _ in range(3))
    mask = torch.arange(29)[None, :] < torch.tensor([29, 12])[:, None]
    dout = torch.randn(2, 29, 2, 64)
    out = attention(q, k, v, mask)
    out.backward(dout)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = electra_kernels.attention_ref(qd, kd, vd, mask)
    ref.backward(dout.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for g, gr in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        torch.testing.assert_close(g.double(), gr, atol=5e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# packed (varlen) layout
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "lengths, heads, head_dim",
    [
        ([1, 77, 7], 1, 64),
        ([35, 0, 2, 16], 2, 32),  # an empty sequence in the middle
        ([50, 3], 1, 128),
    ],
)
def test_varlen_matches_reference(lengths, heads, head_dim, dtype):
    total, max_seqlen = sum(lengths), max(lengths)
    cu = _cu_seqlens(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, dtype=dtype) for _ in range(3))
    _compare_with_references(
        lambda q, k, v: attention_varlen(q, k, v, cu, max_seqlen),
        lambda q, k, v: _lowp_attention_varlen(q, k, v, cu, max_seqlen),
        lambda q, k, v: electra_kernels.attention_varlen_ref(q, k, v, cu, max_seqlen),
        q, k, v, dtype,
    )


def test_varlen_log_sum_exp_and_max_seqlen_larger_than_needed():
    lengths, heads, head_dim = [13, 1, 40], 2, 32
    cu = _cu_seqlens(lengths)
    q, k, v = (torch.randn(sum(lengths), heads, head_dim, dtype=torch.float16) for _ in range(3))
    out, lse = attn_mod.attention_forward(q, k, v, None, cu, 64)  # max_seqlen may over-estimate
    out_ref, lse_ref = electra_kernels.attention_varlen_ref(q.double(), k.double(), v.double(), cu, 40,
                                                           return_lse=True)
    assert lse.shape == (heads, sum(lengths))
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-4, rtol=1e-5)
    _assert_within_budget("out", out, _lowp_attention_varlen(q, k, v, cu, 40), out_ref, torch.float16)


def test_varlen_equals_padded_on_real_tokens():
    """The two layouts are the same computation: identical outputs (dropout included) on real tokens."""
    batch, seqlen, heads, head_dim = 3, 26, 2, 32
    hidden = torch.randn(batch, seqlen, 3, heads, head_dim, dtype=torch.bfloat16)
    mask = torch.arange(seqlen)[None, :] < torch.tensor([26, 9, 17])[:, None]
    packed, indices, cu, max_seqlen = unpad_input(hidden, mask)
    assert max_seqlen == seqlen
    torch.manual_seed(5)
    out_padded = attention(hidden[:, :, 0], hidden[:, :, 1], hidden[:, :, 2], mask, dropout_p=0.2)
    torch.manual_seed(5)
    out_packed = attention_varlen(packed[:, 0], packed[:, 1], packed[:, 2], cu, max_seqlen, dropout_p=0.2)
    torch.testing.assert_close(out_padded.reshape(-1, heads, head_dim)[indices], out_packed, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------------
def test_dropout_same_seed_same_result():
    q, k, v = (torch.randn(2, 24, 2, 32, dtype=torch.bfloat16) for _ in range(3))
    torch.manual_seed(123)
    first = attention(q, k, v, dropout_p=0.1)
    torch.manual_seed(123)
    again = attention(q, k, v, dropout_p=0.1)
    other = attention(q, k, v, dropout_p=0.1)  # the generator moved on: a new mask
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, attention(q, k, v))


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_keep_mask_statistics(dropout_p):
    batch, heads, seqlen = 2, 2, 48
    keep = attention_dropout_mask(batch, heads, seqlen, seqlen, dropout_p, seed=1234, device="cpu")
    assert keep.shape == (batch, heads, seqlen, seqlen) and keep.dtype == torch.bool
    n = keep.numel()
    q = electra_kernels.dropout_keep_probability(dropout_p)  # quantised to 1/256: 230/256 for p = 0.1
    sigma = math.sqrt(q * (1 - q) / n)
    assert abs(keep.float().mean().item() - q) < 4 * sigma
    # Every (batch, head) slice and every row gets its own stream: no two are equal.
    flat = keep.reshape(batch * heads, -1)
    assert len({tuple(row.tolist()) for row in flat}) == batch * heads
    per_row = keep.float().mean(-1)
    assert per_row.std().item() > 0
    # Same seed -> same mask; new seed or offset -> another mask.
    assert torch.equal(keep, attention_dropout_mask(batch, heads, seqlen, seqlen, dropout_p, 1234, device="cpu"))
    assert not torch.equal(keep, attention_dropout_mask(batch, heads, seqlen, seqlen, dropout_p, 1235, device="cpu"))
    small = attention_dropout_mask(1, 1, 8, 8, dropout_p, 1234, device="cpu")
    shifted = attention_dropout_mask(1, 1, 8, 8, dropout_p, 1234, rng_offset=1, device="cpu")
    # The offset shifts the Philox counter; with 8 keys (<= 16) one counter serves a whole row.
    assert torch.equal(shifted[0, 0, :-1], small[0, 0, 1:])


def test_dropout_keep_rate_is_the_quantised_probability():
    """16 keep decisions per Philox evaluation (one byte each) quantise p to 1/256: p = 0.1 keeps with
    q = 230/256 = 0.8984, not 0.9; 1M draws (sd 0.0003) tell the two apart, and every kernel rescales by
    exactly 1/q (the reference replays the mask with that scale), so E[dropout(P)] = P."""
    q = electra_kernels.dropout_keep_probability(0.1)
    assert q == 230 / 256
    keep = attention_dropout_mask(4, 4, 256, 256, 0.1, seed=99, device="cpu")
    n = keep.numel()
    assert abs(keep.float().mean().item() - q) < 4 * math.sqrt(q * (1 - q) / n)
    # Columns in each 16-key group come from one Philox output but are not copies of each other.
    assert not torch.equal(keep[..., 0::16], keep[..., 1::16])


@pytest.mark.parametrize("layout", ["padded", "varlen"])
def test_dropout_forward_and_backward_match_reference_with_kernel_mask(layout):
    dtype, heads, head_dim, dropout_p = torch.bfloat16, 1, 32, 0.3
    if layout == "padded":
        batch, seqlen = 2, 29
        q, k, v = (torch.randn(batch, seqlen, heads, head_dim, dtype=dtype) for _ in range(3))
        mask = torch.arange(seqlen)[None, :] < torch.tensor([29, 20])[:, None]
        torch.manual_seed(7)
        _, keep = attention(q, k, v, mask, dropout_p, return_dropout_mask=True)
        assert keep.shape == (batch, heads, seqlen, seqlen)

        def kernel_fn(q, k, v):
            torch.manual_seed(7)  # same seed -> the kernel applies `keep` again
            return attention(q, k, v, mask, dropout_p)

        lowp_fn = lambda q, k, v: _lowp_attention(q, k, v, mask, keep, dropout_p)  # noqa: E731
        ref_fn = lambda q, k, v: electra_kernels.attention_ref(  # noqa: E731
            q, k, v, mask, dropout_p, dropout_mask=keep)
    else:
        lengths = [30, 5, 17, 2]
        cu, max_seqlen = _cu_seqlens(lengths), max(lengths)
        q, k, v = (torch.randn(sum(lengths), heads, head_dim, dtype=dtype) for _ in range(3))
        torch.manual_seed(7)
        _, keep = attention_varlen(q, k, v, cu, max_seqlen, dropout_p, return_dropout_mask=True)
        assert keep.shape == (len(lengths), heads, max_seqlen, max_seqlen)

        def kernel_fn(q, k, v):
            torch.manual_seed(7)
            return attention_varlen(q, k, v, cu, max_seqlen, dropout_p)

        lowp_fn = lambda q, k, v: _lowp_attention_varlen(q, k, v, cu, max_seqlen, keep, dropout_p)  # noqa: E731
        ref_fn = lambda q, k, v: electra_kernels.attention_varlen_ref(  # noqa: E731
            q, k, v, cu, max_seqlen, dropout_p, dropout_mask=keep)
    # About 1 - p of the probabilities survive.
    assert abs(keep.float().mean().item() - (1 - dropout_p)) < 0.05
    _compare_with_references(kernel_fn, lowp_fn, ref_fn, q, k, v, dtype)


# ---------------------------------------------------------------------------------------------------
# torch.compile, autocast, module, dispatch, errors
# ---------------------------------------------------------------------------------------------------
class _TinyEncoderAttention(nn.Module):
    """A projection, then attention in both layouts (what an encoder layer does)."""

    def __init__(self, hidden=32, heads=2, dropout_p=0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn = FusedAttention(dropout_p)

    def forward(self, x, mask, packed, cu_seqlens, max_seqlen: int):
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        padded_out = self.attn(q, k, v, key_padding_mask=mask)
        pq, pk, pv = self.qkv(packed).view(packed.shape[0], 3, self.heads, h // self.heads).unbind(1)
        packed_out = self.attn(pq, pk, pv, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return padded_out.float().sum() + packed_out.float().square().sum()


def test_torch_compile_fullgraph_traces_through_custom_ops():
    torch._dynamo.reset()
    model = _TinyEncoderAttention(dropout_p=0.1).train()
    x = torch.randn(2, 11, 32)
    mask = torch.arange(11)[None, :] < torch.tensor([11, 6])[:, None]
    packed = torch.randn(15, 32)
    cu = _cu_seqlens([4, 11])

    def run(fn):
        model.zero_grad()
        torch.manual_seed(3)
        loss = fn(x, mask, packed, cu, 11)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = run(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled_loss, compiled_grads = run(compiled)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for g, ge in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, ge)


def test_fake_tensor_shapes_match_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = torch.randn(2, 9, 2, 32, dtype=torch.bfloat16)
    real_out, real_lse = torch.ops.electra_kernels.attention_fwd(q, q, q, None, None, 9, 0.0, 0.2, None, 0)
    with FakeTensorMode() as mode:
        fq = mode.from_tensor(q)
        fake_out, fake_lse = torch.ops.electra_kernels.attention_fwd(fq, fq, fq, None, None, 9, 0.0, 0.2, None, 0)
    for real, fake in ((real_out, fake_out), (real_lse, fake_lse)):
        assert fake.shape == real.shape and fake.dtype == real.dtype and fake.stride() == real.stride()
    torch.library.opcheck(torch.ops.electra_kernels.attention_fwd.default,
                          (q, q, q, None, None, 9, 0.0, 0.2, None, 0), test_utils=("test_schema", "test_faketensor"))


def test_autocast_casts_fp32_inputs():
    q, k, v = (torch.randn(1, 12, 2, 32, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32  # the gradient flows back through the cast
    ref = electra_kernels.attention_ref(*(t.detach().to(torch.bfloat16).double() for t in (q, k, v)))
    assert _max_err(out, ref) < 2e-2


def test_module_dropout_only_in_training():
    module = FusedAttention(dropout_p=0.5)
    q, k, v = (torch.randn(1, 16, 1, 32, dtype=torch.float16) for _ in range(3))
    module.eval()
    torch.testing.assert_close(module(q, k, v), attention(q, k, v), atol=0, rtol=0)
    module.train()
    assert not torch.equal(module(q, k, v), attention(q, k, v))
    assert "dropout_p=0.5" in repr(module)


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setattr(attn_mod, "use_triton", lambda *tensors, **kwargs: False)
    q, k, v = (torch.randn(2, 10, 2, 16) for _ in range(3))
    mask = torch.arange(10)[None, :] < torch.tensor([10, 3])[:, None]
    torch.testing.assert_close(attention(q, k, v, mask), electra_kernels.attention_ref(q, k, v, mask))
    out, keep = attention(q, k, v, mask, 0.2, return_dropout_mask=True)
    torch.testing.assert_close(out, electra_kernels.attention_ref(q, k, v, mask, 0.2, dropout_mask=keep))
    cu = _cu_seqlens([4, 6])
    packed = q.reshape(20, 2, 16)[:10]
    torch.testing.assert_close(attention_varlen(packed, packed, packed, cu, 6),
                               electra_kernels.attention_varlen_ref(packed, packed, packed, cu, 6))


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 4, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="share one dtype"):
        attention(q, q.half(), q)
    with pytest.raises(ValueError, match="head_dim"):
        attention(*(torch.randn(1, 4, 1, 160) for _ in range(3)))
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, q, q, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match="batch, seq, heads, head_dim"):
        attention(q[0], q[0], q[0])
    packed = q[0]
    with pytest.raises(ValueError, match="int32"):
        attention_varlen(packed, packed, packed, torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="total_tokens"):
        attention_varlen(packed, packed[:3], packed[:3], _cu_seqlens([4]), 4)


def test_autotune_spaces_and_pruning():
    """The GPU search spaces are small, every candidate is a valid tl.dot shape, and pruning keeps at
    least one config while dropping blocks longer than the sequence."""
    for space, stationary in ((attn_mod._FWD_SPACE, "M"), (attn_mod._DKDV_SPACE, "N"), (attn_mod._DQ_SPACE, "M"),
                              (attn_mod._FUSED_SPACE, "N"), (attn_mod._FWD_SPACE_D16, "M")):
        assert 1 <= len(space) <= 8
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in space]
        for block_m, block_n, warps, stages in space:
            assert block_m >= 16 and block_n >= 16 and block_m & (block_m - 1) == 0 and block_n & (block_n - 1) == 0
        prune = attn_mod._prune(stationary)["early_config_prune"]
        for bucket in (16, 128, 512, 2048):
            for block_d in (32, 64, 128):
                kept = prune(configs, {"SEQ_BUCKET": bucket}, BLOCK_D=block_d)
                assert kept
                for cfg in kept:
                    stat = cfg.kwargs["BLOCK_M" if stationary == "M" else "BLOCK_N"]
                    assert stat <= max(64, bucket) or len(kept) == 1


def test_head_dim_classes():
    """BLOCK_D 128 takes the large spaces, BLOCK_D 16 the forward's own (two pipeline stages: spill-free
    on sm_80 with Triton 3.9), 32 and 64 the default ones; kernels without a d=16 class keep theirs."""
    pick = attn_mod._for_head_dim
    assert [pick(d, "small", "large", "tiny") for d in (16, 32, 64, 128)] == ["tiny", "small", "small", "large"]
    assert pick(16, "small", "large") == "small"
    assert attn_mod._FWD_SPACE_D16[0] == (*attn_mod._FWD_SPACE[0][:3], 2)


def test_pruning_respects_the_shared_memory_limit():
    """A candidate whose estimated shared memory exceeds the device's per-block limit is never launched:
    with an A100's 163 KiB the d=128 candidates that need more are dropped, with a tiny budget all are."""
    for space, stationary in ((attn_mod._FWD_SPACE, "M"), (attn_mod._DKDV_SPACE, "N"), (attn_mod._DQ_SPACE, "M")):
        for cand in space:
            if not attn_mod._keep_candidate(cand, stationary, None, 128, 2, 1 << 30):
                continue  # dropped for another reason (registers at d=128)
            need = attn_mod._smem_estimate(cand[0], cand[1], 128, cand[3], stationary, 2)
            assert attn_mod._keep_candidate(cand, stationary, None, 128, 2, need)
            assert not attn_mod._keep_candidate(cand, stationary, None, 128, 2, need - 1)


def test_activation_checkpointing_replays_the_same_dropout():
    """torch.utils.checkpoint restores the CPU RNG before recomputing, so the recomputed forward draws
    the same seed: gradients equal those of the plain run."""
    from torch.utils.checkpoint import checkpoint

    q, k, v = (torch.randn(1, 20, 1, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 20, 1, 32, dtype=torch.bfloat16)

    def run(use_checkpoint):
        for t in (q, k, v):
            t.grad = None
        torch.manual_seed(21)
        fn = lambda q, k, v: attention(q, k, v, dropout_p=0.3)  # noqa: E731
        out = checkpoint(fn, q, k, v, use_reentrant=False) if use_checkpoint else fn(q, k, v)
        out.backward(dout)
        return out.detach(), [t.grad.clone() for t in (q, k, v)]

    plain_out, plain_grads = run(False)
    ckpt_out, ckpt_grads = run(True)
    assert torch.equal(plain_out, ckpt_out)
    for g, gc in zip(plain_grads, ckpt_grads):
        assert torch.equal(g, gc)


def test_packed_sizes_are_checked_where_it_costs_no_sync():
    """A wrong max_seqlen or cu_seqlens[-1] would leave rows unwritten: host-side they are refused."""
    lengths, heads, head_dim = [5, 9, 3], 1, 32
    q = torch.randn(sum(lengths), heads, head_dim, dtype=torch.bfloat16)
    cu = _cu_seqlens(lengths)
    attention_varlen(q, q, q, cu, 9)  # the contract holds
    with pytest.raises(ValueError, match="exceeds max_seqlen"):
        attention_varlen(q, q, q, cu, 8)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\]"):
        attention_varlen(q[:-1], q[:-1], q[:-1], cu, 9)
    with pytest.raises(ValueError, match="cannot be 3 sequences"):  # host ints only: what a GPU call checks
        attention_varlen(q, q, q, cu, 5)
    with pytest.raises(ValueError, match="never decrease"):
        attention_varlen(q, q, q, torch.tensor([0, 9, 5, 17], dtype=torch.int32), 9)


def test_seeds_are_63_bits_and_the_high_word_counts():
    """Seeds are drawn from [2^31, 2^63) (one i64 kernel binary), and the Philox key uses the seed's high
    word: two seeds that differ only above bit 32 give different masks (with 31-bit seeds it was always 0)."""
    attention_module = importlib.import_module("electra_kernels.attention")
    seeds = torch.cat([attention_module._draw_seed() for _ in range(64)])
    assert (seeds >= 2**31).all() and (seeds >> 40).ne(0).any()
    low = attention_dropout_mask(1, 1, 16, 16, 0.5, seed=2**31 + 5, device="cpu")
    assert not torch.equal(low, attention_dropout_mask(1, 1, 16, 16, 0.5, seed=2**31 + 5 + 2**40, device="cpu"))
    assert torch.equal(low, attention_dropout_mask(1, 1, 16, 16, 0.5, seed=2**31 + 5, device="cpu"))
