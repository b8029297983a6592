"""`make demo`'s closing summary (electra_fast.demo) on a tiny run: held-out progress against its start
and baselines, the export corrupting a held-out example with its own generator, and how to continue."""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from electra_fast import demo
from electra_fast import train as trainer
from electra_fast.prepare import prepare

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "electra-tiny.yaml")
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 4-step run with held-out evaluations and an export (in-process, one rank)."""
    root = tmp_path_factory.mktemp("demo_run")
    rng = random.Random(2)
    words = ["the function", "returns", "a list", "of items", "from the iterable", "in sorted order", "the module"]
    lines = []
    for _ in range(60):
        lines += [" ".join(rng.choice(words) for _ in range(7)) + "." for _ in range(rng.randint(3, 6))] + [""]
    (root / "corpus.txt").write_text("\n".join(lines))
    data = prepare([str(root / "corpus.txt")], str(root / "data"), vocab_size=200, seq_len=32, num_proc=1,
                   verbose=False, heldout=8)
    saved = {key: os.environ.get(key) for key in LAUNCH_ENV}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    trainer.add_train_arguments(parser)
    run = root / "run"
    try:
        args = parser.parse_args(["--run-dir", str(run), "--config", TINY, "--set", f"data.path={data}",
                                  "data.seq_len=32", "train.global_batch_size=4", "train.max_steps=4",
                                  "train.warmup_steps=1", "train.lr=0.003", "train.eval_every=2",
                                  "train.eval_batches=2", "train.save_every=4"])
        assert trainer.run_train(args) == 0
    finally:
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return run


def test_summary_reports_progress_against_start_and_baselines(tiny_run):
    out = io.StringIO()
    last = demo.heldout_progress(tiny_run, out)
    text = out.getvalue()
    assert last is not None and last["step"] == 4
    assert "step 0 -> step 4" in text
    for label in ("discriminator ROC-AUC", "discriminator AP", "discriminator loss", "generator accuracy"):
        assert label in text
    assert "prior entropy" in text and "unigram baseline" in text and "ROC-AUC by step: 0: " in text
    # a 4-step tiny model is far from the target: the summary says how far it got, not that it learned
    if last["disc_auc"] < demo.AUC_TARGET:
        assert f"short of {demo.AUC_TARGET:.2f}" in text


def test_export_scores_generator_replacements_on_a_heldout_example(tiny_run):
    out = io.StringIO()
    result = demo.generator_example(tiny_run, out, seed=0)
    text = out.getvalue()
    assert result is not None and result["tokens"] > 0
    assert "the export on held-out example 0" in text
    if result["replaced"]:
        assert f"of the {result['replaced']} tokens the discriminator scores highest, {result['top_hits']}" in text
        assert 0 <= result["top_hits"] <= result["replaced"]
        assert "replaced, was '" in text
        assert len(result["ranks"]) == result["replaced"] and "places in the ranking" in text
        assert sum(rank <= result["replaced"] for rank in result["ranks"]) == result["top_hits"]
    # no loading bars or transformers advice in the summary
    assert "Loading" not in text and "%|" not in text


def test_status_says_complete_and_how_to_continue(tiny_run, tmp_path):
    out = io.StringIO()
    demo.run_status(tiny_run, out)
    text = out.getvalue()
    assert "the run is complete at step 4" in text and "make demo DEMO_STEPS=104" in text
    assert "continued" not in text and "trained nothing" not in text
    # a continued run says from where; one resumed at its last step says it trained nothing
    for resumed_at, expected in ((2, "continued"), (4, "trained nothing")):
        other = tmp_path / f"resumed{resumed_at}"
        other.mkdir()
        (other / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
        (other / "env.json").write_text(json.dumps({"resumed_from": f"runs/demo/checkpoints/step-{resumed_at:08d}"}))
        out = io.StringIO()
        demo.run_status(other, out)
        first = out.getvalue().strip().splitlines()[0]
        assert first.startswith(f"this run {expected}"), first
        if resumed_at == 2:
            assert "from step 2 to step 4" in first


def test_main_prints_the_whole_summary(tiny_run, capsys):
    assert demo.main([str(tiny_run)]) == 0
    text = capsys.readouterr().out
    assert text.index("held-out evaluation") < text.index("the export on held-out example") < text.index("complete")


def test_without_export_the_error_names_the_folder(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("data: {path: nowhere}\n")
    assert demo.main([str(tmp_path)]) == 2
    assert "no export" in capsys.readouterr().err


def _run_from_the_root(*args: str) -> subprocess.CompletedProcess:
    """``python -m ...`` with the checkout's root as the working directory, as the Makefile runs it: the
    root is then first on sys.path, where a root-level `kernels` package once shadowed Hugging Face's."""
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_ENV}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_makefile_summary_step_runs_from_the_checkout_root(tiny_run):
    done = _run_from_the_root("electra_fast.demo", str(tiny_run))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.index("held-out evaluation") < done.stdout.index("the export on held-out example")


@pytest.mark.slow
def test_export_runs_from_the_checkout_root(tiny_run, tmp_path):
    done = _run_from_the_root("electra_fast.cli", "export", "--checkpoint", str(tiny_run), "--out",
                              str(tmp_path / "export"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "export" / "discriminator" / "config.json").is_file()
    assert (tmp_path / "export" / "generator" / "config.json").is_file()
