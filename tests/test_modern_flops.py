"""FLOPs of the modern backbone: the analytic count against torch's FlopCounterMode on the reference path,
and the sliding-window pair count against enumeration."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from electra_fast.config import build_config
from electra_fast.flops import EncoderDims, Workload, electra_flops, window_pairs
from electra_fast.model import ElectraPretrainingModel

from helpers import random_batch

ROOT = Path(__file__).resolve().parent.parent


def _count_step():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_flops", ROOT / "benchmarks" / "flops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.count_step


def _config(*sets):
    base = ["model.attention_impl=torch", "model.mlm_head_impl=torch", "model.disc_head_impl=torch",
            "model.elementwise_impl=torch", "model.last_layer_subset=false", "model.dropout=0.1",
            "model.attention_dropout=0.1"]
    return build_config("modern-tiny", overrides=base + list(sets))


@pytest.mark.parametrize("sets", [(), ("model.embedding_sharing=separate", "model.generator_fraction=0.5")])
def test_counted_matches_the_modern_count(sets):
    """Every matmul of a modern ELECTRA step (Wqkv, attention, Wo, GeGLU's Wi and Wo, both heads, the
    tied decoder at the chosen rows) is in the formulas, exactly. The reference path's masked SDPA
    computes every pair, so the windows here cover the whole sequence (local_attention 64 > 2·16)."""
    cfg = _config("model.local_attention=64", "data.seq_len=16", *sets)
    batch, seq = 2, 16
    model = ElectraPretrainingModel(cfg).train()
    inputs = random_batch(cfg, batch=batch, seq_len=seq)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        forward, backward = _count_step()(lambda: model(*inputs).loss)
    finally:
        torch.set_num_threads(threads)
    analytic = electra_flops(cfg, seq_len=seq, batch=batch)
    assert forward == pytest.approx(analytic.forward_per_step, rel=1e-9)
    assert backward == pytest.approx(analytic.backward_per_step, rel=1e-9)


def test_window_pairs_by_enumeration():
    for length in (1, 5, 17, 64):
        for window in (0, 1, 8, 64, 100):
            brute = sum(1 for i in range(length) for j in range(length) if abs(i - j) <= window)
            assert window_pairs(length, window) == brute, (length, window)
    # each query attends at most local_attention + 1 keys
    assert window_pairs(8192, 64) <= 8192 * 129


def test_sliding_layers_count_their_window_padded_and_packed():
    cfg = _config()  # 4 layers: global, sliding, sliding, global; window +-8
    seq, lengths = 64, [64, 30, 5]
    dims = EncoderDims.discriminator(cfg.model)
    assert (dims.global_layers, dims.window) == (2, 8)
    for work, pairs in ((Workload.padded(3, seq, 10), 3 * window_pairs(seq, 8)),
                        (Workload.packed(lengths, seq, 10), sum(window_pairs(n, 8) for n in lengths))):
        assert work.pairs_within(8) == pairs
        fl = electra_flops(cfg, seq_len=seq, batch=3, lengths=None if not work.lengths else lengths)
        scores = next(t.flops for t in fl.terms if t.component == "discriminator.layers"
                      and t.name == "attention_scores")
        assert scores == 2 * 64 * (2 * work.attention_pairs + 2 * pairs)
    # a global-only model at the same size counts more
    dense = electra_flops(_config("model.global_attn_every_n_layers=1"), seq_len=seq, batch=3)
    assert dense.forward_per_step > electra_flops(cfg, seq_len=seq, batch=3).forward_per_step


def test_counted_cases_include_transformers_modernbert():
    """benchmarks/flops.py --counted at a modern size: ours, the modern BERT-MLM baseline and transformers'
    ModernBERT pair (full-vocabulary logits) all match the formulas (HF's within 1%, as for ELECTRA)."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_flops", ROOT / "benchmarks" / "flops.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    names = []
    for name, analytic, (forward, backward) in bench.counted_cases("modern-tiny", batch=2, seq_len=16):
        tol = 1e-9 if name.startswith("ours") else 1e-2
        assert forward == pytest.approx(analytic.forward_per_step, rel=tol), name
        assert backward == pytest.approx(analytic.backward_per_step, rel=tol), name
        names.append(name)
    assert any("ModernBert" in n for n in names) and len(names) == 3
