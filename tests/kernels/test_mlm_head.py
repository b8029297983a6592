"""mlm_head_loss: the fused Triton kernels (run by Triton's interpreter on the CPU) against float64
references: loss, every gradient, arg-max accuracy, Gumbel-max sampling (exact noise, seeds, the
distribution, temperature -> 0), unused slots, autocast, torch.compile, and NaN-poisoned outputs.

Kernel precision rule (flash-attn's): the kernel's error against fp64 is at most twice PyTorch's own
same-dtype error plus a small atol.

On a GPU machine, ``TRITON_INTERPRET=0 pytest tests/kernels/test_mlm_head.py`` runs the same tests on
CUDA (compiled kernels, autotuning included) plus a check at ELECTRA-Base's shape.
"""

import math

import pytest
import torch

import electra_kernels as ek
from electra_kernels import mlm_head as mh

from _compare import DEVICE, DTYPES, assert_close_to_fp64


def make_inputs(M, E, V, dtype, *, bias=True, unused_frac=0.2, logit_std=2.0):
    hidden = torch.randn(M, E)
    weight = torch.randn(V, E) * (logit_std / math.sqrt(E))
    b = torch.randn(V) * 0.5 if bias else None
    hidden, weight = hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype)
    b = b.to(DEVICE, dtype) if bias else None
    with torch.no_grad():
        logits = torch.nn.functional.linear(hidden.double(), weight.double(), None if b is None else b.double())
    targets = torch.randint(0, V, (M,), device=DEVICE)
    hit = torch.rand(M, device=DEVICE) < 0.3  # some targets at the arg-max, so `correct` has True entries
    targets[hit] = logits.argmax(-1)[hit]
    targets[torch.rand(M, device=DEVICE) < unused_frac] = ek.IGNORE_INDEX
    return hidden, weight, b, targets


def run(fn, hidden, weight, bias, targets, grad_out, **kwargs):
    """Forward + backward with a given grad_output; returns outputs and input gradients."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss, sampled, correct = fn(*leaves, targets, **kwargs)
    loss.backward(grad_out.to(loss.dtype))
    grads = [t.grad if t is not None else None for t in leaves]
    return loss.detach(), sampled, correct, grads


def top2_gap(scores):
    top = scores.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def check_against_reference(M, E, V, dtype, bias=True, unused_frac=0.2):
    hidden, weight, b, targets = make_inputs(M, E, V, dtype, bias=bias, unused_frac=unused_frac)
    grad_out = torch.randn((), device=DEVICE)  # != 1: the scale must reach every gradient
    loss, sampled, correct, grads = run(ek.mlm_head_loss, hidden, weight, b, targets, grad_out, seed=11)
    loss_t, _, _, grads_t = run(ek.mlm_head_loss_ref, hidden, weight, b, targets, grad_out)
    as64 = [t.double() if t is not None else None for t in (hidden, weight, b)]
    loss_x, _, _, grads_x = run(ek.mlm_head_loss_ref, *as64, targets, grad_out.double())

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_to_fp64("loss", loss, loss_t, loss_x, dtype)
    for name, g, g_t, g_x, src in zip(("hidden", "weight", "bias"), grads, grads_t, grads_x,
                                      (hidden, weight, b)):
        if src is None:
            continue
        assert g.dtype == src.dtype and g.shape == src.shape
        assert_close_to_fp64(f"d{name}", g, g_t, g_x, dtype)

    logits = torch.nn.functional.linear(*as64[:2], as64[2])
    used = targets != ek.IGNORE_INDEX
    clear = top2_gap(logits) > 1e-3  # ignore near-ties that rounding may flip
    expected_correct = (logits.argmax(-1) == targets) & used
    assert correct.dtype == torch.bool and correct.shape == (M,)
    assert torch.equal(correct[clear], expected_correct[clear])
    assert not correct[~used].any()
    assert sampled.dtype == torch.int64 and sampled.shape == (M,)
    assert ((sampled >= 0) & (sampled < V)).all()
    assert not sampled.requires_grad and not correct.requires_grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_fp64_with_vocab_chunks(monkeypatch, dtype):
    # 77 rows = a full and a partial 64-row block; 1013 columns = 3 full and a partial vocab block over
    # 3 splits (one empty); 48 features = a full and a partial E block. Small dlogits chunks make the
    # backward take 4 vocabulary chunks (dH accumulated over chunks, dW written per chunk).
    monkeypatch.setattr(mh, "_DLOGITS_CHUNK_BYTES", 77 * 2 * 256)
    monkeypatch.setattr(mh, "_DLOGITS_MIN_CHUNK_COLS", 256)
    accumulated = []
    accumulate = mh._accumulate_mm
    monkeypatch.setattr(mh, "_accumulate_mm", lambda acc, a, b: (accumulated.append(acc), accumulate(acc, a, b)))
    check_against_reference(77, 48, 1013, dtype)
    # dH summed in place over the 4 chunks: one fp32 accumulator, no other (M, E) buffer.
    assert len(accumulated) == 4 and all(a is accumulated[0] for a in accumulated)
    assert accumulated[0].dtype == torch.float32


def test_backward_chunks_and_bytes_moved():
    """The chunk floor: at M = 80k masked rows (E 768, bf16) dH's accumulation moves 7.4 GB per backward,
    not the ~118 GB of 256-column chunks with a fresh product per chunk (the model that
    benchmarks/heads.py --bytes prints)."""
    assert mh._dlogits_chunk_cols(2457, 30522, 2) == 6656  # 32 MiB of dlogits
    assert mh._dlogits_chunk_cols(80_000, 30522, 2) == mh._DLOGITS_MIN_CHUNK_COLS == 2048
    assert mh._dlogits_chunk_cols(7, 300, 2) == 300
    old = mh.backward_bytes(80_000, 30522, 768, in_place=False, min_chunk_cols=256)
    new = mh.backward_bytes(80_000, 30522, 768)
    assert old["chunks"] == 120 and 115e9 < old["accumulator"] < 120e9 and old["total"] > 160e9
    assert new["chunks"] == 15 and new["accumulator"] < 7.5e9 and new["total"] < 27e9


@pytest.mark.parametrize("used", [True, False])
def test_a_nan_row_makes_the_loss_nan(used):
    """A NaN hidden row, in a used or an unused slot, makes the loss NaN (kernel and reference), so the
    trainer's non-finite guard drops a step whose sampled ids are garbage (on the GPU the arg-max
    skips NaN and would return a plausible id)."""
    hidden, weight, b, targets = make_inputs(9, 32, 300, torch.float32, unused_frac=0.0)
    hidden[4] = float("nan")
    if not used:
        targets[4] = ek.IGNORE_INDEX
    for fn in (ek.mlm_head_loss, ek.mlm_head_loss_ref):
        loss, sampled, correct = fn(hidden, weight, b, targets, seed=3)
        assert torch.isnan(loss), fn.__name__
        assert not correct[4]
    hidden[4] = 0.0
    assert torch.isfinite(ek.mlm_head_loss(hidden, weight, b, targets, seed=3)[0])


@pytest.mark.parametrize("M, E, V, bias", [(1, 32, 1013, False), (7, 16, 300, True)])
def test_small_shapes_single_chunk(M, E, V, bias):
    check_against_reference(M, E, V, torch.float32, bias=bias)


@pytest.mark.skipif(DEVICE != "cuda", reason="ELECTRA-Base shape: too slow for the interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_electra_base_shape_on_gpu(dtype):
    # 2457 gathered rows x 768 features x the 30522-id BERT vocabulary, default chunking.
    check_against_reference(2457, 768, 30522, dtype)


def test_all_rows_unused_gives_zero_loss_and_gradients():
    hidden, weight, b, targets = make_inputs(7, 16, 300, torch.float32)
    targets[:] = ek.IGNORE_INDEX
    grad_out = torch.tensor(3.0, device=DEVICE)
    loss, sampled, correct, grads = run(ek.mlm_head_loss, hidden, weight, b, targets, grad_out)
    assert loss.item() == 0.0
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))
    assert not correct.any()
    assert ((sampled >= 0) & (sampled < 300)).all()


def test_unused_slots_contribute_nothing():
    # Changing an unused slot's hidden row must not change the loss or the other gradients.
    hidden, weight, b, targets = make_inputs(7, 16, 300, torch.float32, unused_frac=0.0)
    targets[2] = ek.IGNORE_INDEX
    one = torch.tensor(1.0, device=DEVICE)
    loss1, _, _, grads1 = run(ek.mlm_head_loss, hidden, weight, b, targets, one)
    hidden2 = hidden.clone()
    hidden2[2] = torch.randn(16, device=DEVICE) * 5
    loss2, _, _, grads2 = run(ek.mlm_head_loss, hidden2, weight, b, targets, one)
    assert torch.allclose(loss1, loss2, rtol=1e-6)
    assert torch.equal(grads1[0][2], torch.zeros(16, device=DEVICE))
    torch.testing.assert_close(grads1[1], grads2[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads1[2], grads2[2], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_samples_are_gumbel_argmax_of_the_kernel_noise(temperature):
    # The kernel's sample must be exactly argmax(z/T + g) for the noise gumbel_noise() materialises.
    hidden, weight, b, targets = make_inputs(77, 16, 600, torch.float32)
    with torch.no_grad():
        _, sampled, _ = ek.mlm_head_loss(hidden, weight, b, targets, temperature=temperature, seed=1234)
        noise = mh.gumbel_noise((77, 600), 1234, DEVICE).double()
        logits = torch.nn.functional.linear(hidden.double(), weight.double(), b.double())
    assert torch.isfinite(noise).all()
    scores = logits / temperature + noise
    clear = top2_gap(scores) > 1e-4
    assert clear.float().mean() > 0.9
    assert torch.equal(sampled[clear], scores.argmax(-1)[clear])


def test_same_seed_same_samples_different_seed_different_samples():
    hidden, weight, b, targets = make_inputs(77, 16, 300, torch.float32, logit_std=0.5)
    with torch.no_grad():
        s1 = ek.mlm_head_loss(hidden, weight, b, targets, seed=5)[1]
        s2 = ek.mlm_head_loss(hidden, weight, b, targets, seed=5)[1]
        s3 = ek.mlm_head_loss(hidden, weight, b, targets, seed=6)[1]
    assert torch.equal(s1, s2)
    # Near-flat logits over 300 ids: two seeds agree on a row with probability ~1/300.
    assert (s1 != s3).float().mean() > 0.8


def test_sample_distribution_matches_tempered_softmax():
    scipy_stats = pytest.importorskip("scipy.stats")
    # One row repeated M times: M independent draws (distinct Philox counters) from one softmax.
    M, E, V, T = 384, 16, 8, 0.7
    hidden = torch.zeros(M, E, device=DEVICE)
    hidden[:, 0] = 1.0
    weight = torch.randn(V, E, device=DEVICE)
    weight[:, 0] = torch.linspace(-1.0, 1.0, V)  # the logits, in an order the sampler cannot exploit
    weight[:, 0] = weight[torch.randperm(V), 0]
    targets = torch.zeros(M, dtype=torch.long, device=DEVICE)
    with torch.no_grad():
        _, sampled, _ = ek.mlm_head_loss(hidden, weight, None, targets, temperature=T, seed=2024)
    expected = torch.softmax(weight[:, 0].double() / T, dim=-1) * M
    assert expected.min() > 5  # chi-square validity
    observed = torch.bincount(sampled, minlength=V).double()
    result = scipy_stats.chisquare(observed.cpu().numpy(), expected.cpu().numpy())
    assert result.pvalue > 1e-3, (observed, expected)


def test_low_temperature_gives_the_argmax():
    hidden, weight, b, targets = make_inputs(77, 16, 300, torch.float32)
    with torch.no_grad():
        _, sampled, correct = ek.mlm_head_loss(hidden, weight, b, targets, temperature=1e-7, seed=3)
        logits = torch.nn.functional.linear(hidden.double(), weight.double(), b.double())
    clear = top2_gap(logits) > 1e-3
    assert torch.equal(sampled[clear], logits.argmax(-1)[clear])
    used = targets != ek.IGNORE_INDEX
    assert torch.equal(correct[clear], ((sampled == targets) & used)[clear])


def test_autocast_uses_bf16_and_returns_fp32_gradients():
    hidden, weight, b, targets = make_inputs(7, 32, 300, torch.float32)
    grad_out = torch.tensor(2.0, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, _, _, grads = run(ek.mlm_head_loss, hidden, weight, b, targets, grad_out)
        loss_t, _, _, grads_t = run(ek.mlm_head_loss_ref, hidden, weight, b, targets, grad_out)
    loss_x, _, _, grads_x = run(ek.mlm_head_loss_ref, hidden.double(), weight.double(), b.double(),
                                targets, grad_out.double())
    assert [g.dtype for g in grads] == [torch.float32] * 3
    assert_close_to_fp64("loss", loss, loss_t, loss_x, torch.bfloat16)
    for name, g, g_t, g_x in zip(("hidden", "weight", "bias"), grads, grads_t, grads_x):
        assert_close_to_fp64(f"d{name}", g, g_t, g_x, torch.bfloat16)


def test_torch_compile_fullgraph():
    class TinyGenerator(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = torch.nn.Linear(16, 16)
            self.embedding = torch.nn.Parameter(torch.randn(300, 16) * 0.3)
            self.bias = torch.nn.Parameter(torch.zeros(300))
            self.head = ek.MLMHeadLoss(temperature=0.9)

        def forward(self, x, targets, seed: int):
            h = torch.nn.functional.gelu(self.dense(x))
            return self.head(h, self.embedding, self.bias, targets, seed)

    model = TinyGenerator().to(DEVICE)
    x = torch.randn(7, 16, device=DEVICE)
    targets = torch.randint(0, 300, (7,), device=DEVICE)
    targets[1] = ek.IGNORE_INDEX

    def step(m):
        model.zero_grad()
        loss, sampled, correct = m(x, targets, 9)
        (3.0 * loss).backward()
        return loss.detach(), sampled, correct, [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    compiled = step(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0])
    assert torch.equal(compiled[1], eager[1]) and torch.equal(compiled[2], eager[2])
    for g_c, g_e in zip(compiled[3], eager[3]):
        torch.testing.assert_close(g_c, g_e)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU fallback")
def test_reference_path_without_interpreter(monkeypatch):
    # CPU tensors without the interpreter fall back to the reference (same samples, same seed).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, b, targets = make_inputs(7, 16, 50, torch.float32)
    got = ek.mlm_head_loss(hidden, weight, b, targets, temperature=0.5, seed=4)
    want = ek.mlm_head_loss_ref(hidden, weight, b, targets, temperature=0.5, seed=4)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_bad_inputs_raise_clear_errors():
    hidden, weight, b, targets = make_inputs(7, 16, 50, torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        ek.mlm_head_loss(hidden, weight, b, targets, temperature=0.0)
    with pytest.raises(ValueError, match="features"):
        ek.mlm_head_loss(hidden, weight[:, :8], b, targets)
    with pytest.raises(ValueError, match="bias"):
        ek.mlm_head_loss(hidden, weight, b[:10], targets)
    with pytest.raises(ValueError, match="targets"):
        ek.mlm_head_loss(hidden, weight, b, targets[:3])
    with pytest.raises(ValueError, match="integer"):
        ek.mlm_head_loss(hidden, weight, b, targets.float())
    with pytest.raises(ValueError, match="temperature"):
        ek.MLMHeadLoss(temperature=-1.0)


def test_reference_computes_in_float64_when_called_so():
    """The fp64 truth the kernel tests compare against is fp64: the loss of float64 inputs matches a
    hand-written float64 cross-entropy to 1e-12 (an fp32 computation is ~1e-7 off)."""
    hidden, weight, b, targets = (t.double() if t.is_floating_point() else t
                                  for t in make_inputs(33, 48, 1013, torch.float32, unused_frac=0.2))
    loss, _, _ = ek.mlm_head_loss_ref(hidden, weight, b, targets)
    logits = hidden @ weight.T + b
    used = targets != ek.IGNORE_INDEX
    per_row = torch.logsumexp(logits, -1) - logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    expected = per_row[used].sum() / used.sum()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_dlogits_tunes_on_the_row_bucket_not_the_chunk_width():
    """The chunk width follows M and the last chunk is narrower: keyed on it, every new masked-row count
    re-tuned. The key is M's power-of-two bucket (with V and E)."""
    keys = list(mh._mlm_head_dlogits_kernel.keys)
    assert keys == ["M_BUCKET", "V", "E"], keys
