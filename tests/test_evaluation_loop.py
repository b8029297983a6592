"""Held-out evaluation wired through the pipeline: prepare's split (size, determinism, manifest,
fingerprint), the loader's fixed held-out batches, and the trainer's eval rows in metrics.jsonl, the
log lines and the end-of-run plot (electra_fast.evaluation's numbers are tested in test_evaluation.py).
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from electra_fast import train as trainer
from electra_fast.loader import heldout_batches
from electra_fast.manifest import DataError, load_examples, read_manifest
from electra_fast.metrics import MetricsLog, is_eval_record, read_metrics
from electra_fast.prepare import heldout_rows, heldout_size, parse_heldout, prepare

from test_train import REPO, TINY, clean_env  # noqa: F401 (the fixture: no launcher variables, one thread)


def _corpus(root: Path) -> Path:
    rng = random.Random(1)
    words = ["the cat", "a dog", "the chef", "saw", "cooked", "the meal", "a ball", "in the kitchen", "at the park"]
    lines = []
    for _ in range(80):
        lines += [" ".join(rng.choice(words) for _ in range(6)) + "." for _ in range(rng.randint(3, 7))] + [""]
    path = root / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="module")
def split_data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("heldout_corpus")
    return str(prepare([str(_corpus(root))], str(root / "data"), vocab_size=200, seq_len=32, num_proc=1,
                       verbose=False, heldout=12))


# ------------------------------------------------------------------------------------------------ prepare
def test_heldout_spec_and_size():
    assert parse_heldout("1%") == "1%" and parse_heldout(" 250 ") == "250" and parse_heldout(0) == "0"
    for bad in ("-3", "100%", "ten", "1.5"):
        with pytest.raises(DataError, match="--heldout"):
            parse_heldout(bad)
    assert heldout_size("1%", 50) == 0 and heldout_size("1%", 999) == 0  # under 10: too few to measure
    assert heldout_size("1%", 1000) == 10 and heldout_size("1%", 10_000) == 100
    assert heldout_size("1%", 10_000_000) == 2000  # a percentage is capped
    assert heldout_size("300", 1000) == 300
    with pytest.raises(DataError, match="leaves no training examples"):
        heldout_size("1000", 1000)
    rows = heldout_rows(1000, 20, seed=5)
    assert len(set(rows.tolist())) == 20 and list(rows) == sorted(rows)
    assert np.array_equal(rows, heldout_rows(1000, 20, seed=5)) and not np.array_equal(rows, heldout_rows(1000, 20, 6))


def test_prepare_sets_aside_a_recorded_deterministic_split(split_data, tmp_path):
    manifest = read_manifest(split_data)
    assert manifest["num_heldout_examples"] == 12 and manifest["heldout"] == "12"
    assert manifest["heldout_dir"] == "heldout" and manifest["heldout_files"]
    train, held = load_examples(split_data, manifest), load_examples(split_data, manifest, split="heldout")
    assert len(train) == manifest["num_examples"] and len(held) == 12
    # no example is in both splits, and the two together are what the corpus packs into
    # the layout counts describe each split; the token account covers both
    train_mask, held_mask = np.asarray(train["attention_mask"]), np.asarray(held["attention_mask"])
    assert manifest["num_tokens"] == int(train_mask.sum())
    assert manifest["heldout_layout"]["num_tokens"] == int(held_mask.sum())
    assert manifest["heldout_layout"]["num_examples"] == 12
    assert manifest["num_tokens_kept"] == manifest["num_text_tokens"] + manifest["heldout_layout"]["num_text_tokens"]
    train_rows = {tuple(r) for r in train["input_ids"]}
    assert not any(tuple(r) in train_rows for r in held["input_ids"])
    # the same inputs and options give the same split, byte for byte
    again = prepare([str(Path(split_data).parent / "corpus.txt")], str(tmp_path / "again"), vocab_size=200, seq_len=32,
                    num_proc=1, verbose=False, heldout=12)
    assert read_manifest(str(again))["fingerprint"] == manifest["fingerprint"]
    # --heldout 0: no split, no folder, and a different preparation
    none = read_manifest(str(prepare([str(Path(split_data).parent / "corpus.txt")], str(tmp_path / "none"),
                                     vocab_size=200, seq_len=32, num_proc=1, verbose=False, heldout=0)))
    assert none["num_heldout_examples"] == 0 and none["heldout_dir"] is None and "heldout_files" not in none
    assert none["num_examples"] == manifest["num_examples"] + 12
    assert load_examples(str(tmp_path / "none"), none, split="heldout") is None


def test_fingerprint_covers_the_heldout_files(split_data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(split_data, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    name = next(iter(manifest["heldout_files"]))
    manifest["heldout_files"][name]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="fingerprint"):
        read_manifest(str(copy))


def test_heldout_batches_are_fixed(split_data):
    first = heldout_batches(split_data, batch_size=5, max_batches=2)
    assert [len(b["input_ids"]) for b in first] == [5, 5]
    assert all(b["input_ids"].dtype == torch.int64 and b["input_ids"].shape[1] == 32 for b in first)
    second = heldout_batches(split_data, batch_size=5, max_batches=10)
    assert [len(b["input_ids"]) for b in second] == [5, 5, 2]  # all 12, the last batch shorter
    assert all(torch.equal(a[key], b[key]) for a, b in zip(first, second) for key in a)
    assert heldout_batches(split_data, batch_size=5, max_batches=0) == []


# ------------------------------------------------------------------------------------------------ the trainer
def _run(data, run_dir, *sets, resume=False) -> int:
    parser = argparse.ArgumentParser()
    trainer.add_train_arguments(parser)
    argv = ["--run-dir", str(run_dir), "--config", TINY, "--set", f"data.path={data}", "data.seq_len=32",
            "train.global_batch_size=4", "train.warmup_steps=1", "train.lr=0.003", "train.log_every=1", *sets]
    return trainer.run_train(parser.parse_args(argv + (["--resume"] if resume else [])))


def test_a_tiny_run_writes_eval_rows(split_data, tmp_path, clean_env, capsys):
    run = tmp_path / "run"
    assert _run(split_data, run, "train.max_steps=5", "train.eval_every=2", "train.eval_batches=2",
                "train.save_every=5") == 0
    records = read_metrics(run)
    evals = [r for r in records if is_eval_record(r)]
    # at the start, every eval_every steps, and at the end
    assert [r["step"] for r in evals] == [0, 2, 4, 5]
    for r in evals:
        assert r["split"] == "heldout" and r["eval"] is True
        assert 0.0 <= r["disc_auc"] <= 1.0 and 0.0 <= r["disc_ap"] <= 1.0 and r["disc_prior_loss"] > 0
        assert r["num_tokens"] > 0 and r["num_predictions"] > 0 and 0 <= r["gen_accuracy"] <= 1
    # fixed masks and samples: the step-0 numbers are those of the untrained model, whatever came later
    assert evals[1]["disc_auc"] != evals[0]["disc_auc"] or evals[1]["disc_loss"] != evals[0]["disc_loss"]
    assert evals[0]["num_tokens"] == evals[-1]["num_tokens"]  # the same sample every time
    # training rows are still there and are not mistaken for eval rows
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]
    err = capsys.readouterr().err
    assert err.index("[electra-fast] 1 rank(s)") < err.index("held-out at step 0: discriminator ROC-AUC")
    # not a terminal here: plain progress lines instead of a bar
    assert "[electra-fast] step 3/5: loss" in err and "heldout_auc" in err
    pytest.importorskip("matplotlib")
    assert (run / "curves.png").is_file()


def test_no_heldout_split_says_so(tmp_path, clean_env, capsys):
    data = prepare([str(_corpus(tmp_path))], str(tmp_path / "data"), vocab_size=200, seq_len=32, num_proc=1,
                   verbose=False, heldout=0)
    assert _run(data, tmp_path / "run", "train.max_steps=2", "train.eval_every=1", "train.export_at_end=false") == 0
    assert not any(is_eval_record(r) for r in read_metrics(tmp_path / "run"))
    assert "no held-out evaluation" in capsys.readouterr().err


def test_metrics_log_plain_lines_and_eval_rows(tmp_path):
    log = MetricsLog(tmp_path, enabled=True, start_step=0, max_steps=10, resumed=False, interactive=False)
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stderr(out):
        log.record_eval({"step": 0, "split": "heldout", "eval": True, "disc_auc": 0.5, "disc_ap": 0.15,
                         "disc_loss": 0.7, "disc_prior_loss": 0.42, "gen_accuracy": 0.0, "unigram_accuracy": 0.05,
                         "gen_loss": 8.3, "replaced_fraction": 0.15})
        log.advance()
        log.record({"step": 1, "loss": 9.0, "gen_accuracy": 0.0, "disc_accuracy": 0.8, "seq_per_s": 3.0,
                    "tokens_per_s": 100.0, "tflops": 0.0, "lr": 1e-3, "mfu": None, "eta_s": 60.0})
    log.close()
    assert log.bar is None  # no progress bar off a terminal
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[electra-fast] held-out at step 0: discriminator ROC-AUC 0.500")
    assert "prior 0.4200" in lines[0] and "unigram 0.050" in lines[0]
    assert lines[1].startswith("[electra-fast] step 1/10: loss 9.0000") and "heldout_auc 0.500" in lines[1]
    assert [is_eval_record(r) for r in read_metrics(tmp_path)] == [True, False]


def test_zero3_evaluates_through_the_partitioned_module(split_data, tmp_path, clean_env):
    """ZeRO-3 replaces every parameter by a placeholder gathered around its module's forward: the
    evaluation runs through the engine's module and must score exactly what ZeRO-0 scores at step 0
    (same initial weights, same fixed sample, masks and samples)."""
    rows = {}
    for stage in (0, 3):
        run = tmp_path / f"zero{stage}"
        assert _run(split_data, run, "train.max_steps=2", "train.eval_every=2", "train.eval_batches=2",
                    "train.save_every=2", "train.export_at_end=false",
                    f"train.deepspeed_config={REPO}/configs/deepspeed/zero{stage}.json") == 0
        rows[stage] = [r for r in read_metrics(run) if is_eval_record(r)]
    assert [r["step"] for r in rows[3]] == [0, 2]
    for key in ("disc_auc", "disc_loss", "gen_loss", "gen_accuracy", "num_tokens"):
        assert rows[3][0][key] == pytest.approx(rows[0][0][key], rel=1e-5), key
        assert rows[3][1][key] == pytest.approx(rows[0][1][key], rel=1e-3), key
