"""Packed batches rounded up to token buckets, so that CUDA graphs can capture the packed layout.

* the bucket policy (electra_fast.buckets): every token count lands in the smallest bucket above it, less
  than one granule away, and the inert documents always reach the bucket;
* the bucketed layout: the real tokens' rows, ``cu_seqlens`` and labels are the exact layout's, the inert
  rows are never real and never reach the padded view, one shape per bucket, no host synchronisation;
* a bucketed training step gives the exact packed step's losses, metrics and gradients, the inert rows
  get exactly zero gradient (and the check trips when they are counted as real tokens); the same for a
  batch that fills its bucket, for the BERT-MLM baseline and for the held-out evaluation;
* the trainer runs ``train.cuda_graphs`` on the packed layout (``aot_eager``) with the eager run's losses;
* (slow) 24 steps of real packed batches from prepare + the loader, compiled statically as for CUDA graphs
  (``aot_eager``): no more compilations per compiled part than buckets, and the exact packed step's losses;
  without buckets the same compile recompiles for every new token count.
"""

from __future__ import annotations

import collections
import functools

import pytest
import torch

from test_step_sync import sync_counter  # noqa: F401 (the fixture)
from test_train import clean_env, corpus_dir, losses, run_inprocess  # noqa: F401 (fixtures: prepare on a small corpus)

from electra_fast import step as step_module
from electra_fast import train as trainer
from electra_fast.buckets import bucket_granule, bucket_rows, inert_documents, token_buckets
from electra_fast.compile import compile_for_training
from electra_fast.mlm_baseline import BertMLMModel
from electra_fast.model import ElectraPretrainingModel, TokenLayout, packed_sizes

from helpers import random_batch, tiny_config

NO_DROPOUT = ("model.dropout=0.0", "model.attention_dropout=0.0")
# The packed layout needs the attention kernel (Triton's interpreter here); the other hot spots run their
# references, which keeps the interpreted work to the attention alone.
PACKED = ("model.attention_impl=triton", "model.num_layers=1", "model.num_heads=1")


# --------------------------------------------------------------------------------------------------
# The bucket policy
# --------------------------------------------------------------------------------------------------
def test_buckets_are_few_fixed_counts_just_above_the_tokens():
    # ELECTRA-Small's micro-batch: 128 x 128 in 32 buckets of 512 rows, 4 inert documents at most.
    assert bucket_granule(128, 128) == 512 and token_buckets(128, 128)[-1] == 128 * 128
    assert len(token_buckets(128, 128)) == 32 and inert_documents(128, 128) == 4
    assert inert_documents(32, 512) == 1  # Base: one granule (512 rows) is one sequence
    for batch, seq_len, count in ((3, 16, 4), (4, 64, 32), (5, 7, 3), (2, 64, 1)):
        buckets = token_buckets(batch, seq_len, count)
        granule = bucket_granule(batch, seq_len, count)
        assert len(buckets) <= count and granule % 8 == 0 and buckets[-1] == batch * seq_len
        for tokens in range(batch * seq_len + 1):
            rows = bucket_rows(tokens, batch, seq_len, count)
            assert rows == min(b for b in buckets if b >= max(tokens, 1)), (tokens, buckets)
            assert rows - tokens <= inert_documents(batch, seq_len, count) * seq_len
    with pytest.raises(ValueError, match="outside"):
        bucket_rows(4 * 64 + 1, 4, 64)
    with pytest.raises(ValueError, match="count > 0"):
        token_buckets(4, 64, 0)


# --------------------------------------------------------------------------------------------------
# The bucketed layout
# --------------------------------------------------------------------------------------------------
def _layouts(mask: torch.Tensor, sizes: dict | None = None, buckets: int = 4):
    sizes = sizes or packed_sizes(mask)  # the loader's host sizes
    exact = TokenLayout.build(mask, packed=True, **sizes)
    return exact, TokenLayout.build(mask, packed=True, buckets=buckets, **sizes)


def test_bucketed_layout_is_the_exact_layout_plus_inert_rows(sync_counter):  # noqa: F811
    cfg = tiny_config()
    batch, seq_len = 5, 16
    _, mask, _ = random_batch(cfg, batch=batch, seq_len=seq_len, min_len=2, seed=3)
    sizes = packed_sizes(mask)
    sync_counter.clear()
    exact, bucketed = _layouts(mask, sizes)
    assert not sync_counter, dict(sync_counter)  # host sizes in, no device value read
    total = int(mask.sum())
    rows = bucket_rows(total, batch, seq_len, 4)
    assert rows > total and bucketed.bucketed and bucketed.max_seqlen == seq_len
    assert torch.equal(bucketed.indices[:total], exact.indices)
    assert (bucketed.indices[total:] == batch * seq_len).all() and bucketed.indices.numel() == rows
    cu = bucketed.cu_seqlens
    assert torch.equal(cu[:batch + 1], exact.cu_seqlens)
    assert cu.numel() == batch + 1 + inert_documents(batch, seq_len, 4)
    inert_lengths = cu[batch + 1:] - cu[batch:-1]
    assert int(cu[-1]) == rows and (inert_lengths >= 0).all() and (inert_lengths <= seq_len).all()
    real = bucketed.real_rows()
    assert int(real.sum()) == total and real[:total].all()

    values = torch.randn(batch, seq_len, 3)
    flat = bucketed.flatten(values)
    assert torch.equal(flat[:total], exact.flatten(values)) and (flat[total:] == 0).all()
    assert torch.equal(bucketed.unflatten(flat), values * mask[..., None])  # inert rows land nowhere
    positions = torch.tensor([[0, 1], [1, 0], [0, 0], [1, 1], [0, 1]])
    flat_positions = (positions + torch.arange(batch)[:, None] * seq_len).flatten()
    assert torch.equal(bucketed.row_of(flat_positions), exact.row_of(flat_positions))

    # Another batch with a token count in the same bucket: the same shapes (what a captured graph needs).
    for seed in range(20):
        _, other, _ = random_batch(cfg, batch=batch, seq_len=seq_len, min_len=2, seed=100 + seed)
        if bucket_rows(int(other.sum()), batch, seq_len, 4) == rows and int(other.sum()) != total:
            _, same_bucket = _layouts(other)
            assert same_bucket.indices.shape == bucketed.indices.shape
            assert same_bucket.cu_seqlens.shape == bucketed.cu_seqlens.shape
            assert same_bucket.max_seqlen == bucketed.max_seqlen
            break
    else:
        pytest.fail("no second batch in the same bucket")


# --------------------------------------------------------------------------------------------------
# A bucketed step is the exact step
# --------------------------------------------------------------------------------------------------
def _forward_backward(model, batch, sizes):
    model.zero_grad(set_to_none=True)
    out = model(*batch, **sizes)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_a_batch_that_fills_its_bucket_gets_empty_inert_documents():
    # Every sequence full: the tokens fill the last bucket exactly, and every inert document has length 0
    # (the attention kernels skip an empty sequence). The step is the exact one.
    cfg = tiny_config(*NO_DROPOUT, *PACKED, "model.vocab_size=128")
    model = ElectraPretrainingModel(cfg)
    batch = random_batch(cfg, batch=2, seq_len=32, min_len=32, seed=1)
    sizes = packed_sizes(batch[1])
    assert sizes["total_tokens"] == bucket_rows(sizes["total_tokens"], 2, 32, 4) == 64
    layout = TokenLayout.build(batch[1], packed=True, buckets=4, **sizes)
    assert layout.cu_seqlens.tolist()[2:] == [64] * (1 + inert_documents(2, 32, 4))
    state = model.rng.state_dict()
    exact, exact_grads = _forward_backward(model, batch, sizes)
    model.rng.load_state_dict(state)
    model.token_buckets = 4
    bucketed, bucketed_grads = _forward_backward(model, batch, sizes)
    torch.testing.assert_close(bucketed.loss, exact.loss, rtol=1e-5, atol=1e-6)
    for name, grad in exact_grads.items():
        torch.testing.assert_close(bucketed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bucketed_step_gives_the_exact_steps_losses_metrics_and_gradients(sync_counter, monkeypatch):  # noqa: F811
    cfg = tiny_config(*NO_DROPOUT, *PACKED, "model.vocab_size=128")
    model = ElectraPretrainingModel(cfg)
    batch = random_batch(cfg, batch=3, seq_len=32, min_len=4, seed=1)
    sizes = packed_sizes(batch[1])
    assert bucket_rows(sizes["total_tokens"], 3, 32, 4) > sizes["total_tokens"]  # there are inert rows

    state = model.rng.state_dict()
    exact, exact_grads = _forward_backward(model, batch, sizes)
    model.rng.load_state_dict(state)  # the same masks and samples
    model.token_buckets = 4
    disc_rows = []

    def keep_rows(module, args, output):
        output.retain_grad()
        disc_rows.append(output)

    handle = model.discriminator.register_forward_hook(keep_rows)
    sync_counter.clear()
    bucketed, bucketed_grads = _forward_backward(model, batch, sizes)
    assert not sync_counter, dict(sync_counter)  # the bucket is host arithmetic: still no sync
    handle.remove()
    # No loss reaches the inert rows: the discriminator's output there has exactly zero gradient (the
    # generator's last layer computes the masked rows only, all of them real).
    total, (rows,) = sizes["total_tokens"], disc_rows
    assert rows.shape[0] == bucket_rows(total, 3, 32, 4)
    assert (rows.grad[total:] == 0).all() and rows.grad[:total].abs().sum() > 0

    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bucketed.loss, exact.loss, **close)
    torch.testing.assert_close(bucketed.mlm_loss, exact.mlm_loss, **close)
    torch.testing.assert_close(bucketed.disc_loss, exact.disc_loss, **close)
    torch.testing.assert_close(bucketed.metrics, exact.metrics, **close)  # accuracies, counts: real tokens only
    assert bucketed_grads.keys() == exact_grads.keys()
    for name, grad in exact_grads.items():
        torch.testing.assert_close(bucketed_grads[name], grad, **close, msg=name)

    # The check can fail: inert rows counted as real tokens change the replaced-token loss and its metrics.
    monkeypatch.setattr(TokenLayout, "real_rows", lambda self: torch.ones_like(self.indices, dtype=torch.bool))
    model.rng.load_state_dict(state)
    leaky, _ = _forward_backward(model, batch, sizes)
    assert not torch.allclose(leaky.disc_loss, exact.disc_loss, **close)


def test_cuda_graphs_with_packed_layout_turn_buckets_on():
    model = ElectraPretrainingModel(tiny_config(*PACKED))
    compile_for_training(model, "default", cuda_graphs=True, backend="aot_eager", token_buckets=6)
    assert model.token_buckets == 6
    with pytest.raises(ValueError, match="token_buckets"):
        compile_for_training(ElectraPretrainingModel(tiny_config()), "default", cuda_graphs=True, token_buckets=0)
    bert = BertMLMModel(tiny_config(*PACKED))  # the BERT-MLM baseline takes them too
    compile_for_training(bert, "default", cuda_graphs=True, backend="aot_eager", token_buckets=6)
    assert bert.token_buckets == 6

    class Foreign(torch.nn.Module):  # a packed model without token buckets: refused, as before them
        config = tiny_config(*PACKED).model

    with pytest.raises(ValueError, match="needs token buckets"):
        compile_for_training(Foreign(), "default", cuda_graphs=True, backend="aot_eager")
    plain = ElectraPretrainingModel(tiny_config(*PACKED))
    compile_for_training(plain, "default", backend="aot_eager")  # no CUDA graphs: exact rows, dynamic shapes
    assert plain.token_buckets == 0
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# 24 real packed batches, compiled as for CUDA graphs
# --------------------------------------------------------------------------------------------------
STEPS = 24
# 4 buckets rather than the default 32: for a micro-batch of 4 x 64 the bound "no more compilations than
# buckets" is then well below the number of distinct token counts in 24 batches (20, three buckets met:
# 24 steps show it as 50 did, in 40 s instead of 70).
BUCKETS = 4
MICRO_BATCH = 4


class _CountingBackend:
    """aot_eager, counting the graphs compiled per part of the model (each call of the backend is one
    compilation; the part is the one whose parameters the graph takes as inputs)."""

    PARTS = ("embeddings", "generator", "discriminator", "generator_predictions", "discriminator_predictions")

    def __init__(self):
        self.graphs: collections.Counter = collections.Counter()
        self.owner: dict[int, str] = {}

    def watch(self, model) -> None:
        self.owner = {p.data_ptr(): part for part in self.PARTS for p in getattr(model, part).parameters()}

    def __call__(self, graph, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        parts = {self.owner.get(t.data_ptr()) for t in example_inputs if isinstance(t, torch.Tensor)} - {None}
        self.graphs["+".join(sorted(parts)) or "no parameters"] += 1
        return aot_eager(graph, example_inputs)


def _train(cfg, state, batches, *, buckets: int, backend: _CountingBackend | None = None):
    torch._dynamo.reset()
    model = ElectraPretrainingModel(cfg)
    model.load_state_dict(state)
    if backend is not None:
        backend.watch(model)
        compile_for_training(model, "default", cuda_graphs=True, backend=backend, token_buckets=max(buckets, 1))
    model.token_buckets = buckets  # 0 after a static compile: exact rows, to show what buckets prevent
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for batch in batches:
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], **batch["packed_sizes"])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(torch.stack([out.mlm_loss, out.disc_loss]))
    torch._dynamo.reset()
    return torch.stack(losses)


@pytest.mark.slow  # 24 + 24 + 6 interpreted kernel-path steps: about 40 s on one core
def test_real_packed_steps_compile_once_per_bucket(corpus_dir):  # noqa: F811
    from electra_fast.loader import PretrainingLoader

    loader = PretrainingLoader(corpus_dir, micro_batch_size=MICRO_BATCH, num_workers=0, seed=0)
    stream = iter(loader)
    batches = [next(stream) for _ in range(STEPS)]
    totals = [batch["packed_sizes"]["total_tokens"] for batch in batches]
    seq_len = loader.seq_len
    hit = {bucket_rows(total, MICRO_BATCH, seq_len, BUCKETS) for total in totals}
    print(f"{len(set(totals))} distinct token counts in {STEPS} batches, {len(hit)} of {BUCKETS} buckets met")
    assert len(set(totals)) > BUCKETS >= len(hit) >= 2  # many token counts, a few buckets, more than one

    cfg = tiny_config(*NO_DROPOUT, *PACKED, f"model.vocab_size={loader.vocab_size}", f"data.seq_len={seq_len}")
    torch.manual_seed(0)
    state = ElectraPretrainingModel(cfg).state_dict()
    exact = _train(cfg, state, batches, buckets=0)  # eager, exact rows: the unbucketed packed step
    backend = _CountingBackend()
    bucketed = _train(cfg, state, batches, buckets=BUCKETS, backend=backend)
    torch.testing.assert_close(bucketed, exact, rtol=1e-5, atol=1e-5)
    assert {"embeddings", "generator", "discriminator"} <= set(backend.graphs), dict(backend.graphs)
    for part, graphs in backend.graphs.items():
        assert graphs <= BUCKETS, dict(backend.graphs)
    assert backend.graphs["discriminator"] == len(hit), dict(backend.graphs)  # one graph per bucket met

    # The check can fail: the same static compile without buckets compiles again for every new count.
    distinct = []
    for batch in batches:
        if batch["packed_sizes"]["total_tokens"] not in {b["packed_sizes"]["total_tokens"] for b in distinct}:
            distinct.append(batch)
    unbucketed = _CountingBackend()
    _train(cfg, state, distinct[:BUCKETS + 2], buckets=0, backend=unbucketed)
    assert unbucketed.graphs["discriminator"] == BUCKETS + 2 > BUCKETS, dict(unbucketed.graphs)


def test_held_out_evaluation_ignores_the_inert_rows():
    from electra_fast.evaluation import evaluate_pretraining

    cfg = tiny_config(*NO_DROPOUT, *PACKED, "model.vocab_size=128")
    model = ElectraPretrainingModel(cfg)
    batches = []
    for seed in range(2):
        input_ids, attention_mask, token_type_ids = random_batch(cfg, batch=3, seq_len=32, min_len=4, seed=seed)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids})
    exact = evaluate_pretraining(model, batches, seed=0).to_dict()
    model.token_buckets = 4
    bucketed = evaluate_pretraining(model, batches, seed=0).to_dict()
    assert bucketed["num_tokens"] == exact["num_tokens"] == sum(int(b["attention_mask"].sum()) for b in batches)
    assert bucketed == pytest.approx(exact, rel=1e-5, nan_ok=True)  # ROC-AUC, AP, losses, accuracies


def test_trainer_runs_cuda_graphs_on_the_packed_layout(corpus_dir, tmp_path, clean_env,  # noqa: F811
                                                       monkeypatch, capsys):
    # train.cuda_graphs with model.unpad=true is accepted and trains as the eager packed run does (aot_eager
    # stands in for inductor + CUDA graphs on the CPU, as in tests/test_fast_step.py).
    monkeypatch.setattr(trainer, "compile_model", functools.partial(step_module.compile_model, backend="aot_eager"))
    common = (*NO_DROPOUT, *PACKED, "train.max_steps=3", "train.log_every=1", "train.lr=0.003", "train.warmup_steps=1",
              "train.export_at_end=false")
    assert run_inprocess(corpus_dir, tmp_path / "eager", *common) == 0
    graphs_on = ("train.compile=default", "train.cuda_graphs=true")
    assert run_inprocess(corpus_dir, tmp_path / "graphs", *common, *graphs_on) == 0
    assert "torch.compile default + CUDA graphs" in "".join(capsys.readouterr())
    eager, graphs = losses(tmp_path / "eager"), losses(tmp_path / "graphs")
    assert len(eager) == 3 and eager[0] != eager[-1]
    assert graphs == pytest.approx(eager, rel=1e-5)
    torch._dynamo.reset()


def test_bert_mlm_baseline_bucketed_step_is_its_exact_step():
    cfg = tiny_config(*NO_DROPOUT, *PACKED, "model.vocab_size=128")
    model = BertMLMModel(cfg)
    batch = random_batch(cfg, batch=3, seq_len=32, min_len=4, seed=2)
    state = model.rng.state_dict()
    exact = model(*batch, **packed_sizes(batch[1]))
    model.rng.load_state_dict(state)
    model.token_buckets = 4
    bucketed = model(*batch, **packed_sizes(batch[1]))
    torch.testing.assert_close(bucketed.loss, exact.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bucketed.metrics, exact.metrics, rtol=1e-5, atol=1e-6)
