"""Checkpoints are verified, safe to load and never lost (electra_fast/checkpoints.py, safe_load.py).

Fast tests work on one saved single-rank run (copied per test) and inject their faults directly:
damaged files, a garbled or escaping `latest`, crafted pickles, non-finite weights, a full disk.
Slow tests resume across world sizes and ZeRO stages under the deepspeed launcher (2 -> 1, 1 -> 2).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _faults import PoisonWeightsAfter
from test_train import (COMPARE, _args, LAUNCH_ENV, PYTHON, REPO, TINY, child_env, clean_env, corpus_dir,  # noqa: F401
                        free_port, losses, run_inprocess)

from electra_fast import train as trainer
from electra_fast.checkpoints import (MANIFEST, CheckpointError, consolidated_state_dict,
                                      find_resume_checkpoint, verify_checkpoint,
                                      write_manifest)
from electra_fast.hf import ExportError, read_hf_folder
from electra_fast.metrics import read_metrics
from electra_fast.safe_load import deepspeed_loads_safely, safe_torch_load

SETS = ("train.max_steps=4", "train.save_every=2", "train.keep_last=2", "train.log_every=1",
        "train.export_at_end=false", "train.lr=0.003", "train.warmup_steps=2")
MODEL_STATES = "mp_rank_00_model_states.pt"
RANK0 = "trainer_state_rank00000.pt"


@pytest.fixture(scope="module")
def saved_run(corpus_dir, tmp_path_factory):
    """One uninterrupted single-rank run with checkpoints at steps 2 and 4 (copied by each test)."""
    for key in LAUNCH_ENV:
        os.environ.pop(key, None)
    run = tmp_path_factory.mktemp("saved") / "run"
    assert run_inprocess(corpus_dir, run, *SETS) == 0
    for key in LAUNCH_ENV:
        os.environ.pop(key, None)
    return run


@pytest.fixture(autouse=True)
def keep_process_group(monkeypatch):
    """trainer.main tears the process group down at exit, as a process should; DeepSpeed keeps groups
    of the first one cached, so in-process tests calling main several times keep the one group."""
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda *args, **kwargs: None)


@pytest.fixture
def run_copy(saved_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    return run


def ckpt(run, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step-{step:08d}"


def main_code(corpus_dir, run, *sets, resume=True) -> int:
    argv = ["--config", TINY, "--run-dir", str(run), "--set", f"data.path={corpus_dir}", *SETS, *sets]
    return trainer.main(argv + (["--resume"] if resume else []))


def export_code(checkpoint, out) -> int:
    """`electra-fast export` (the CLI, so that its exit code and message are what a user sees)."""
    from electra_fast.cli import main as cli_main

    return cli_main(["export", "--checkpoint", str(checkpoint), "--out", str(out)])


class Payload:
    """Unpickling this runs `touch MARKER`: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------
def test_manifest_lists_every_file_with_size_and_hash(saved_run):
    import hashlib

    tag = ckpt(saved_run, 4)
    manifest = json.loads((tag / MANIFEST).read_text())
    assert (manifest["step"], manifest["world_size"], manifest["zero_stage"]) == (4, 1, 0)
    on_disk = sorted(p.name for p in tag.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk and MODEL_STATES in on_disk and RANK0 in on_disk
    for name, entry in manifest["files"].items():
        data = (tag / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checkpoint(tag)["step"] == 4
    assert sorted(p.name for p in tag.parent.iterdir()) == ["latest", "step-00000002", "step-00000004"]


@pytest.mark.parametrize("damage, cause", [
    ("overwrite", r"mp_rank_00_model_states.pt: sha256 differs from the manifest"),
    ("truncate", r"mp_rank_00_model_states.pt: \d+ bytes, the manifest says \d+"),
    ("delete-model-states", r"mp_rank_00_model_states.pt: missing \(listed in checkpoint.json\)"),
    ("delete-rank-state", r"trainer_state_rank00000.pt: missing"),
    ("garble-manifest", r"checkpoint.json: garbled manifest"),
    ("extra-pt", r"zero_pp_rank_0_mp_rank_00_optim_states.pt: not listed in checkpoint.json"),
])
def test_damaged_checkpoint_is_skipped_with_file_and_cause(run_copy, caplog, damage, cause):
    tag = ckpt(run_copy, 4)
    states = tag / MODEL_STATES
    if damage == "overwrite":
        data = bytearray(states.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(64)
        states.write_bytes(bytes(data))
    elif damage == "truncate":
        states.write_bytes(states.read_bytes()[:1000])
    elif damage == "delete-model-states":
        states.unlink()
    elif damage == "delete-rank-state":
        (tag / RANK0).unlink()
    elif damage == "garble-manifest":
        (tag / MANIFEST).write_text('{"format": 1, "files": ')
    else:
        shutil.copy(states, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=cause):
        verify_checkpoint(tag)
    with caplog.at_level(logging.WARNING, logger="electra_fast.checkpoints"):
        assert find_resume_checkpoint(run_copy) == "step-00000002"
    assert "skipping checkpoint step-00000004" in caplog.text and str(tag) in caplog.text


def test_resume_from_the_newest_verified_checkpoint_is_exact(run_copy, saved_run, corpus_dir, capsys, clean_env):
    """Bytes overwritten in the newest checkpoint: skipped (renamed aside), step 2 resumed bit for bit."""
    states = ckpt(run_copy, 4) / MODEL_STATES
    data = bytearray(states.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
    states.write_bytes(bytes(data))
    assert run_inprocess(corpus_dir, run_copy, *SETS, resume=True) == 0
    assert losses(run_copy) == losses(saved_run)  # steps 3 and 4 again, identical to the first time
    rejected = [p.name for p in (run_copy / "checkpoints").iterdir() if ".rejected" in p.name]
    assert len(rejected) == 1 and rejected[0].startswith("step-00000004.rejected")
    assert verify_checkpoint(ckpt(run_copy, 4))["step"] == 4
    assert (run_copy / "checkpoints" / "latest").read_text() == "step-00000004"


# --------------------------------------------------------------------------------------------------
# `latest` is a name inside the run's checkpoint folder, and only a hint
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("latest", ["../../elsewhere/evil", "/tmp/step-00000004", "step-00000009", "\x00garbage",
                                    None, "symlink"])
def test_latest_must_name_a_step_folder_inside_the_run(run_copy, tmp_path, caplog, latest):
    root = run_copy / "checkpoints"
    elsewhere = tmp_path / "elsewhere" / "evil"
    shutil.copytree(ckpt(run_copy, 4), elsewhere)
    if latest is None:
        (root / "latest").unlink()
    elif latest == "symlink":  # a step folder that points out of the run is not one of its checkpoints
        (root / "step-00000009").symlink_to(elsewhere)
        (root / "latest").write_text("step-00000009")
    else:
        (root / "latest").write_text(latest)
    shutil.rmtree(ckpt(run_copy, 4))  # the newest real checkpoint is gone as well
    with caplog.at_level(logging.WARNING, logger="electra_fast.checkpoints"):
        assert find_resume_checkpoint(run_copy) == "step-00000002"
    assert "using the newest verified checkpoint step-00000002" in caplog.text
    assert "latest" in caplog.text


def test_a_newer_sealed_checkpoint_wins_over_a_stale_latest(run_copy, caplog):
    """A kill between the rename and the `latest` update: the sealed newer folder is complete."""
    (run_copy / "checkpoints" / "latest").write_text("step-00000002")
    with caplog.at_level(logging.WARNING, logger="electra_fast.checkpoints"):
        assert find_resume_checkpoint(run_copy) == "step-00000004"
    assert "names step-00000002; using the newest verified checkpoint step-00000004" in caplog.text


def test_no_checkpoint_but_metrics_history_refuses_to_start_over(run_copy, corpus_dir, capsys, clean_env):
    shutil.rmtree(run_copy / "checkpoints")
    history = (run_copy / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="has a metrics history .* refusing to start over"):
        find_resume_checkpoint(run_copy)
    assert main_code(corpus_dir, run_copy) == 2
    err = capsys.readouterr().err
    assert "refusing to start over" in err and "Traceback" not in err
    assert (run_copy / "metrics.jsonl").read_text() == history
    assert not (run_copy / "checkpoints").exists() or not list((run_copy / "checkpoints").iterdir())


def test_every_checkpoint_damaged_refuses_and_keeps_them(run_copy, corpus_dir, capsys, clean_env):
    for step in (2, 4):
        (ckpt(run_copy, step) / RANK0).unlink()
    history = (run_copy / "metrics.jsonl").read_text()
    assert main_code(corpus_dir, run_copy) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "trainer_state_rank00000.pt: missing" in err and "Traceback" not in err
    assert ckpt(run_copy, 2).is_dir() and ckpt(run_copy, 4).is_dir()
    assert (run_copy / "metrics.jsonl").read_text() == history


def test_checkpoint_without_manifest_is_accepted_with_a_warning(run_copy, corpus_dir, caplog, clean_env):
    """A checkpoint of an earlier version: accepted if its files pass the weights-only load; its
    missing rank state makes the resume inexact, and the warning says exactly that."""
    shutil.rmtree(ckpt(run_copy, 4))
    (ckpt(run_copy, 2) / MANIFEST).unlink()
    (ckpt(run_copy, 2) / RANK0).unlink()
    with caplog.at_level(logging.WARNING):
        assert run_inprocess(corpus_dir, run_copy, *SETS, resume=True) == 0
    assert "has no checkpoint.json (written by an earlier version)" in caplog.text
    assert "not exact: rank state missing" in caplog.text and "random streams reseeded" in caplog.text
    assert "written by 1 ranks" not in caplog.text
    assert [r["step"] for r in read_metrics(run_copy) if "loss" in r] == [1, 2, 3, 4]
    assert verify_checkpoint(ckpt(run_copy, 4))["step"] == 4  # new saves carry a manifest again


# --------------------------------------------------------------------------------------------------
# Nothing is unpickled that could run code: resume and export refuse a crafted file
# --------------------------------------------------------------------------------------------------
def test_crafted_payload_would_run_without_the_guard(tmp_path):
    """The test payload is real: an unguarded load runs it; the guarded ones refuse it."""
    marker = tmp_path / "ran"
    torch.save({"module": Payload(marker)}, tmp_path / "crafted.pt")
    torch.load(tmp_path / "crafted.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"crafted.pt: refused to load: it would import .*system"):
        safe_torch_load(tmp_path / "crafted.pt")
    with deepspeed_loads_safely(), pytest.raises(CheckpointError, match="refused to load"):
        torch.load(tmp_path / "crafted.pt", map_location="cpu", weights_only=False)  # what DeepSpeed calls
    assert torch.load is not None and not marker.exists()


@pytest.mark.parametrize("with_manifest", [True, False])
def test_crafted_model_states_refused_on_resume_and_export(run_copy, corpus_dir, tmp_path, capsys, clean_env,
                                                           with_manifest):
    """The payload replaces the model states of every checkpoint; the manifest is rewritten to match
    (a manifest is a checksum, not a signature) or removed (an old checkpoint)."""
    marker = tmp_path / "ran"
    for step in (2, 4):
        tag = ckpt(run_copy, step)
        torch.save({"module": Payload(marker), "step": step}, tag / MODEL_STATES)
        (tag / MANIFEST).unlink()
        if with_manifest:
            write_manifest(tag, step=step, world_size=1, zero_stage=0)
    assert main_code(corpus_dir, run_copy) == 2
    err = capsys.readouterr().err
    assert "mp_rank_00_model_states.pt: refused to load: it would import" in err and "Traceback" not in err
    assert export_code(run_copy, tmp_path / "export") == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and not (tmp_path / "export").exists()
    assert export_code(ckpt(run_copy, 4), tmp_path / "export") == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()


def test_crafted_zero_optimizer_states_refused_on_export(corpus_dir, tmp_path, capsys, clean_env):
    """ZeRO-1: export goes through DeepSpeed's zero_to_fp32, which unpickles the optimizer states."""
    run = tmp_path / "zero1"
    assert run_inprocess(corpus_dir, run, "train.max_steps=1", "train.export_at_end=false",
                         "train.deepspeed_config=configs/deepspeed/zero1.json") == 0
    tag = ckpt(run, 1)
    optim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    consolidated_state_dict(tag)  # the allowlist covers a real ZeRO-1 checkpoint
    marker = tmp_path / "ran"
    torch.save({"optimizer_state_dict": Payload(marker)}, optim)
    (tag / MANIFEST).unlink()
    write_manifest(tag, step=1, world_size=1, zero_stage=1)
    assert export_code(run, tmp_path / "export") == 2
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: refused to load" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="refused to load"):  # DeepSpeed's own loader, guarded
        consolidated_state_dict(tag)
    assert trainer.main(["--run-dir", str(run), "--resume"]) == 2  # the run's own config (ZeRO-1)
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# Saves: never from non-finite weights, a full disk leaves the last checkpoint, nothing half-written
# --------------------------------------------------------------------------------------------------
def test_nonfinite_weights_are_never_saved(corpus_dir, tmp_path, capsys, clean_env):
    run = tmp_path / "run"
    argv = ["--config", TINY, "--run-dir", str(run), "--set", f"data.path={corpus_dir}", *SETS]
    assert trainer.main(argv, callbacks=[PoisonWeightsAfter(3)]) == 2
    err = capsys.readouterr().err
    assert "step 4: the weights hold NaN or inf values, so no checkpoint was written" in err
    assert f"the last checkpoint {ckpt(run, 2)} is intact" in err and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    assert (run / "checkpoints" / "latest").read_text() == "step-00000002"
    verify_checkpoint(ckpt(run, 2))
    weights = consolidated_state_dict(ckpt(run, 2))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_disk_full_during_save_names_path_and_free_space(corpus_dir, tmp_path, capsys, clean_env, monkeypatch):
    run = tmp_path / "run"
    real_save = torch.save

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        if "step-00000004" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 half a file")
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    assert main_code(corpus_dir, run, resume=False) == 2
    err = capsys.readouterr().err
    assert "disk full: could not write checkpoint" in err and "step-00000004.tmp" in err
    assert "MiB free there" in err and "the partial folder was removed" in err and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    verify_checkpoint(ckpt(run, 2))
    monkeypatch.setattr(torch, "save", real_save)
    assert main_code(corpus_dir, run) == 0  # room again: the run resumes from the intact checkpoint
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]


def test_pruning_waits_for_the_new_checkpoint_to_verify(corpus_dir, tmp_path, capsys, clean_env, monkeypatch):
    """A save whose read-back fails (a file changed under it) keeps every older checkpoint."""
    import electra_fast.checkpoints as checkpoints

    real_manifest = checkpoints.write_manifest

    def manifest_then_damage(tag_dir, **kwargs):
        manifest = real_manifest(tag_dir, **kwargs)
        if kwargs["step"] == 4:
            with open(Path(tag_dir) / RANK0, "ab") as handle:
                handle.write(b"late bytes")
        return manifest

    monkeypatch.setattr(checkpoints, "write_manifest", manifest_then_damage)
    run = tmp_path / "run"
    assert main_code(corpus_dir, run, "train.keep_last=1", resume=False) == 2
    err = capsys.readouterr().err
    assert "trainer_state_rank00000.pt" in err and "the manifest says" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000002"]


# --------------------------------------------------------------------------------------------------
# Another ZeRO stage on the same ranks; a truncated Hugging Face weights file
# --------------------------------------------------------------------------------------------------
def test_zero2_checkpoint_resumes_with_zero0(corpus_dir, tmp_path, caplog, clean_env):
    run = tmp_path / "run"
    zero2 = "train.deepspeed_config=configs/deepspeed/zero2.json"
    assert run_inprocess(corpus_dir, run, *SETS, zero2, "train.max_steps=2") == 0
    saved = consolidated_state_dict(ckpt(run, 2))
    resumed = {}

    class CaptureWeights(trainer.TrainerCallback):
        def on_loss(self, t, loss):
            if not resumed:
                resumed.update({n: p.detach().clone() for n, p in t.engine.module.named_parameters()})
                resumed["lr"] = t.engine.get_lr()[0]
            return loss

    args = _args(run, f"data.path={corpus_dir}", *SETS, "train.deepspeed_config=configs/deepspeed/zero0.json",
                 resume=True)
    args.allow_config_change = ["train.max_steps", "train.deepspeed_config"]  # the resume rules: named changes
    with caplog.at_level(logging.WARNING):
        assert trainer.run_train(args, [CaptureWeights()]) == 0
    assert "written by 1 rank(s) with ZeRO-2, resuming on 1 with ZeRO-0" in caplog.text
    assert "Adam's moments and step counts" in caplog.text and "random streams" not in caplog.text
    assert "restart" not in caplog.text
    assert all(torch.equal(resumed[name], saved[name]) for name in saved)  # the fp32 weights, exactly
    reference = tmp_path / "reference"
    assert run_inprocess(corpus_dir, reference, *SETS, zero2) == 0
    lrs = {r["step"]: r["lr"] for r in read_metrics(reference) if "lr" in r}
    assert resumed["lr"] == pytest.approx(lrs[2])  # the schedule continues where it was
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]


def test_truncated_safetensors_names_the_file(saved_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert export_code(saved_run, out) == 0
    weights = out / "discriminator" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ExportError, match=r"model.safetensors: cannot be read .* truncated"):
        read_hf_folder(out / "discriminator")
    from electra_fast.hf import from_hf

    with pytest.raises(ExportError, match="model.safetensors: cannot be read"):
        from_hf(out / "discriminator", out / "generator")
    from electra_fast.task_models import load_encoder
    from electra_fast.tasks import FinetuneError

    with pytest.raises(FinetuneError, match=r"cannot read the model: .*discriminator/model.safetensors: cannot be read"):
        load_encoder(out / "discriminator")  # what `electra-fast finetune --model` loads


# --------------------------------------------------------------------------------------------------
# Another world size: 2 ranks -> 1 and 1 -> 2 (deepspeed launcher, gloo)
# --------------------------------------------------------------------------------------------------
def _launch(ranks: int, args: list[str], timeout: int = 600):
    script = str(REPO / "tests" / "_resume_world.py")
    if ranks == 1:
        cmd = [PYTHON, script, *args]
    else:
        cmd = [PYTHON, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
               str(free_port()), script, *args]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("first, then, sharing", [((2, 2), (1, 0), "tied"), ((1, 1), (2, 3), "gdes")],
                         ids=["2xZeRO2->1xZeRO0", "1xZeRO1->2xZeRO3-gdes"])
def test_resume_on_another_world_size_and_stage(corpus_dir, tmp_path, first, then, sharing):
    run = tmp_path / "run"
    common = ["--data", corpus_dir, "--run", str(run), "--set", *COMPARE, "train.save_every=3",
              "train.log_every=1", "train.export_at_end=false", f"model.embedding_sharing={sharing}"]
    dump = tmp_path / "optimizer.pt"
    _launch(first[0], [*common, "train.max_steps=3", "--stage", str(first[1]), "--optimizer-dump", str(dump)])
    report = tmp_path / "report.json"
    proc = _launch(then[0], [*common, "train.max_steps=5", "--stage", str(then[1]), "--resume",
                             "--report", str(report), "--optimizer-dump", str(dump)])
    result = json.loads(report.read_text())
    assert result["names"] and result["step"] == 3 and result["world_size"] == then[0]
    assert result["max_abs_difference"] == 0.0  # the fp32 weights (masters) exactly as saved
    assert result["module_max_abs_difference"] in (0.0, None)
    # Adam's state as the saving engine held it (DeepSpeed's per-parameter getter on N ranks) and as the
    # resumed one holds it (the same getter on M ranks): every moment and step count exactly.
    assert result["optimizer_keys"] == ["exp_avg", "exp_avg_sq"] and result["optimizer_names_equal"]
    assert result["optimizer_steps_equal"] and result["optimizer_steps"] == [3]
    assert result["optimizer_max_abs_difference"] == 0.0
    assert "Adam's moments and step counts" in proc.stdout + proc.stderr
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    # The step-4 loss is computed from the restored weights before any update: it agrees with the
    # step-3 loss level (masks are drawn anew, so within the masking noise, not bit for bit).
    assert abs(records[3]["loss"] - records[2]["loss"]) < 0.5 * records[2]["loss"]
    manifest = json.loads((ckpt(run, 5) / MANIFEST).read_text())
    assert (manifest["world_size"], manifest["zero_stage"]) == then
