"""Resume is exact or refuses (electra_fast/run_state.py), and SIGINT/SIGTERM stop a run cleanly
(electra_fast/stop_signals.py).

Fast tests build a run directory as a run leaves it after its first checkpoint (its records and a
checkpoint folder) and check that ``--resume`` refuses, before any DeepSpeed work, a changed config or
other data with one message listing each difference. Two in-process runs follow the README's own
commands (start with --set; resume with --config ... --resume, with --run-dir ... --resume alone, and
with --allow-config-change), and a run in a subprocess is stopped by SIGTERM and resumed exactly.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from _faults import FailAfterStep
from test_train import PYTHON, REPO, TINY, _args, child_env, clean_env, corpus_dir, losses  # noqa: F401 (fixtures)

from electra_fast import cli
from electra_fast import train as trainer
from electra_fast.config import ConfigError, load_config
from electra_fast.metrics import read_metrics
from electra_fast.run_state import RUN_RECORD, ResumeRefused, RunRecord, data_identity, launch_record
from electra_fast.stop_signals import StepBoundaryControl

START_SETS = ("train.max_steps=4", "train.save_every=2", "train.log_every=1", "train.export_at_end=false",
              "train.lr=0.003", "train.warmup_steps=1")


def trained_run(run_dir: Path, data: str, *sets: str, config: str = TINY) -> Path:
    """A run directory as ``--config CONFIG --set data.path=DATA SETS`` leaves it after its first
    checkpoint: config.yaml, run_identity.json and a checkpoint folder (no weights: every test using it
    is refused before anything is loaded)."""
    overrides = [f"data.path={data}", *sets]
    cfg = load_config(config, overrides)
    manifest = trainer.apply_data_manifest(cfg)
    RunRecord(run_dir).write(cfg, data_identity(data, manifest), launch=launch_record(config, overrides, None),
                             changes={}, step=0)
    (run_dir / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step-00000002")
    return run_dir


def run_cli(argv: list[str], callbacks=()) -> int:
    """`python -m electra_fast.train ARGV` in this process (run_train: main() would also tear down the
    process group, which DeepSpeed's cached groups of a later in-process run still refer to)."""
    parser = argparse.ArgumentParser()
    trainer.add_train_arguments(parser)
    return trainer.run_train(parser.parse_args(argv), callbacks)


def files(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in ("config.yaml", RUN_RECORD)}


# --------------------------------------------------------------------------------------------------
# Which config a resume trains with: the run's own, plus what the user changed
# --------------------------------------------------------------------------------------------------
def test_resume_resolves_the_runs_config_plus_only_what_the_user_changed(corpus_dir, tmp_path):
    run = trained_run(tmp_path / "run", corpus_dir, *START_SETS)
    stored = load_config(run / "config.yaml").to_dict()

    def resolved(*argv):
        parser = argparse.ArgumentParser()
        trainer.add_train_arguments(parser)
        args = parser.parse_args(["--run-dir", str(run), "--resume", *argv])
        return trainer.resolve_train_config(args)[0].to_dict()

    def changed(values):
        return {f"{s}.{k}" for s in values if isinstance(values[s], dict) for k in values[s]
                if values[s][k] != stored[s][k]}

    assert resolved() == stored  # --run-dir RUN --resume: the run's own config
    assert resolved("--config", TINY) == stored  # the README's form: the start's --set values are kept
    # `make demo` repeats its whole start command with --resume: the same values are no change
    assert resolved("--config", TINY, "--set", f"data.path={corpus_dir}", *START_SETS) == stored
    assert changed(resolved("--config", TINY, "--set", "train.log_every=5")) == {"train.log_every"}
    # An edited YAML: only the keys edited since the run started count
    edited = yaml.safe_load(Path(TINY).read_text())
    edited["model"]["dropout"] = 0.0
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
    assert changed(resolved("--config", str(tmp_path / "edited.yaml"))) == {"model.dropout"}
    # A run that recorded no YAML (older versions): every key the YAML names counts
    record = json.loads((run / RUN_RECORD).read_text())
    record["launch"] = None
    (run / RUN_RECORD).write_text(json.dumps(record))
    assert changed(resolved("--config", TINY)) == {"train.max_steps", "train.warmup_steps"}


# --------------------------------------------------------------------------------------------------
# A changed config or other data is refused, with one message listing each difference
# --------------------------------------------------------------------------------------------------
def test_resume_refuses_a_changed_config_listing_each_difference(corpus_dir, tmp_path, capsys, clean_env):
    run = trained_run(tmp_path / "run", corpus_dir, *START_SETS)
    before = files(run)
    argv = ["--run-dir", str(run), "--resume", "--set", "train.global_batch_size=16", "train.lr=0.01",
            "objective.mask_prob=0.2", "train.max_steps=300", "train.log_every=2"]
    assert trainer.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"cannot resume {run}: 4 difference(s)" in err
    for line in ("config train.global_batch_size: 8 -> 16", "config train.lr: 0.003 -> 0.01",
                 "config objective.mask_prob: 0.15 -> 0.2", "config train.max_steps: 4 -> 300"):
        assert line in err, err
    assert "log_every" not in err  # where and how often to log changes nothing the run computes
    assert "--allow-config-change objective.mask_prob train.global_batch_size train.lr train.max_steps" in err
    # Allowing some of them: the rest are still refused, and nothing in the run dir changed
    assert trainer.main([*argv, "--allow-config-change", "train.max_steps", "train.lr"]) == 2
    err = capsys.readouterr().err
    assert "2 difference(s)" in err and "config train.max_steps" not in err and "config train.lr" not in err
    assert files(run) == before
    # The same run from the YAML the user edited since
    edited = yaml.safe_load(Path(TINY).read_text())
    edited["objective"] = {"mask_prob": 0.25}
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
    assert trainer.main(["--config", str(tmp_path / "edited.yaml"), "--run-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "1 difference(s)" in err and "config objective.mask_prob: 0.15 -> 0.25" in err
    # A key that does not exist cannot be allowed
    assert trainer.main(["--run-dir", str(run), "--resume", "--allow-config-change", "train.max_stepz"]) == 2
    assert "unknown config key(s) train.max_stepz" in capsys.readouterr().err
    assert files(run) == before


def _data_copy(corpus_dir: str, out: Path, edit) -> str:
    shutil.copytree(corpus_dir, out)
    edit(out)
    return str(out)


def _edit_manifest(**changes):
    def edit(folder: Path):
        manifest = json.loads((folder / "manifest.json").read_text())
        for key, value in changes.items():
            if key in ("pad", "unk", "cls", "sep", "mask"):
                manifest["special_token_ids"][key] = value
            else:
                manifest[key] = value
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return edit


def _swap_two_word_pieces(folder: Path):
    """A re-prepared vocabulary: same size, same special tokens, two ids meaning other pieces."""
    lines = (folder / "vocab.txt").read_text().splitlines()
    lines[100], lines[101] = lines[101], lines[100]
    (folder / "vocab.txt").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("edit, named", [
    (_edit_manifest(mask=7), "manifest.json"),
    (_edit_manifest(vocab_size=512, sep=9), "manifest.json"),
    (_swap_two_word_pieces, "vocab.txt"),
    (_edit_manifest(fingerprint="0" * 64), "manifest.json"),
], ids=["special-id", "vocab-size", "reprepared-vocabulary", "fingerprint"])
def test_resume_refuses_tampered_data(corpus_dir, tmp_path, capsys, clean_env, edit, named):
    """A data folder whose manifest no longer matches its own files is refused by the data check itself
    (electra_fast.manifest), before the run's record is compared: one line naming the file."""
    run = trained_run(tmp_path / "run", corpus_dir, *START_SETS)
    before = files(run)
    other = _data_copy(corpus_dir, tmp_path / "other-data", edit)
    for extra in ([], ["--allow-config-change", "data.path", "model.vocab_size"]):
        assert trainer.main(["--run-dir", str(run), "--resume", "--set", f"data.path={other}", *extra]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and named in err and "prepare the data again" in err, err
    assert files(run) == before


def test_resume_refuses_other_data(corpus_dir, tmp_path, capsys, clean_env):
    """A valid, differently prepared folder (the same text with another vocabulary size) is refused by the
    run's record with one message listing each difference, whatever --allow-config-change names."""
    from electra_fast.prepare import prepare

    run = trained_run(tmp_path / "run", corpus_dir, *START_SETS)
    before = files(run)
    corpus = Path(corpus_dir).parent / "corpus.txt"
    other = str(prepare([str(corpus)], str(tmp_path / "other-data"), vocab_size=320, seq_len=64, num_proc=1,
                        verbose=False))
    for extra in ([], ["--allow-config-change", "data.path", "model.vocab_size"]):
        assert trainer.main(["--run-dir", str(run), "--resume", "--set", f"data.path={other}", *extra]) == 2
        err = capsys.readouterr().err
        assert "difference(s)" in err and "Traceback" not in err, err
        assert "data vocab_size: 300 -> 320" in err and "data fingerprint: " in err, err
        assert "only on the data it was trained on" in err
    assert files(run) == before


def test_the_same_data_elsewhere_is_accepted_and_recorded_as_operational(corpus_dir, tmp_path):
    run = trained_run(tmp_path / "run", corpus_dir, *START_SETS)
    moved = _data_copy(corpus_dir, tmp_path / "moved", lambda folder: None)
    record = RunRecord.read(run)
    cfg = load_config(run / "config.yaml", [f"data.path={moved}", "train.keep_last=5"])
    identity = data_identity(moved, json.loads(Path(moved, "manifest.json").read_text()))
    changes = record.check_resume(cfg, identity, allowed=())
    assert changes == {"data.path": (corpus_dir, moved), "train.keep_last": (3, 5)}
    record.write(cfg, identity, launch=None, changes=changes, step=2)
    saved = json.loads((run / RUN_RECORD).read_text())
    assert saved["config_changes"][0]["step"] == 2
    assert saved["config_changes"][0]["accepted"] == {"data.path": "operational", "train.keep_last": "operational"}
    assert load_config(run / "config.yaml").data.path == moved


def test_equivalent_deepspeed_config_references_are_not_a_change(tmp_path, monkeypatch):
    """A run recorded with ``configs/deepspeed/zero1.json`` (older configs) resumed with ``--config`` naming
    ``zero1`` is the same shipped config: no change is reported, from the repository or from elsewhere.
    Another shipped config, or a user's file of that name with other contents, still is a change."""
    from electra_fast.config import Config
    from electra_fast.ds_config import packaged_deepspeed_configs
    from electra_fast.run_state import config_differences

    def configs(old, new):
        stored, current = Config(), Config()
        stored.train.deepspeed_config, current.train.deepspeed_config = old, new
        return config_differences(stored, current)

    key = "train.deepspeed_config"
    for cwd in (REPO, tmp_path):  # the repository's copy on disk, or only the shipped one
        monkeypatch.chdir(cwd)
        assert configs("configs/deepspeed/zero1.json", "zero1") == {}
        assert configs("zero3-offload", "configs/deepspeed/zero3-offload.json") == {}
        assert configs("configs/deepspeed/zero1.json", "zero2") == {key: ("configs/deepspeed/zero1.json", "zero2")}
    copy = tmp_path / "mine" / "zero1.json"  # a byte-identical copy elsewhere is the same config
    copy.parent.mkdir()
    copy.write_bytes(packaged_deepspeed_configs()["zero1"].read_bytes())
    assert configs(str(copy), "zero1") == {}
    edited = json.loads(copy.read_text()) | {"steps_per_print": 7}  # the user's own, under the shipped name
    copy.write_text(json.dumps(edited))
    assert configs("zero1", str(copy)) == {key: ("zero1", str(copy))}
    assert configs("zero1", str(tmp_path / "missing.json")) == {key: ("zero1", str(tmp_path / "missing.json"))}


# --------------------------------------------------------------------------------------------------
# The README's commands, as written, on a real run
# --------------------------------------------------------------------------------------------------
def test_readme_commands_resume_and_an_allowed_change_is_recorded(corpus_dir, tmp_path, capsys, clean_env):
    run = tmp_path / "run"
    start = ["--config", TINY, "--run-dir", str(run), "--set", f"data.path={corpus_dir}", *START_SETS]
    with pytest.raises(RuntimeError, match="injected failure"):  # a crash after the step-2 checkpoint
        run_cli(start, callbacks=[FailAfterStep("raise", 2)])
    config_at_start = (run / "config.yaml").read_bytes()
    identity = json.loads((run / RUN_RECORD).read_text())
    assert identity["data"]["vocab_size"] == 300 and identity["data"]["special_token_ids"]["mask"] == 4
    assert identity["data"]["seq_len"] == 64 and len(identity["data"]["vocab_sha256"]) == 64
    assert identity["launch"]["overrides"] == [f"data.path={corpus_dir}", *START_SETS]

    # README: python -m electra_fast.train --config configs/electra-tiny.yaml --run-dir RUN --resume
    assert run_cli(["--config", TINY, "--run-dir", str(run), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
    assert (run / "config.yaml").read_bytes() == config_at_start  # never silently overwritten

    # More steps: refused as a change, accepted when named, and recorded; a time-based save (an
    # operational key) is accepted by itself and saves after every step here.
    more = ["--run-dir", str(run), "--resume", "--set", "train.max_steps=6", "train.save_every_minutes=1e-9"]
    with pytest.raises(ResumeRefused, match="config train.max_steps: 4 -> 6"):
        run_cli(more)
    # README: electra-fast pretrain --run-dir RUN --resume (the CLI), with the change allowed
    assert cli.main(["pretrain", *more, "--allow-config-change", "train.max_steps"]) == 0
    assert "config change accepted (--allow-config-change): train.max_steps: 4 -> 6" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (run / "checkpoints" / "step-00000005").is_dir()  # save_every=2 alone would not have saved it
    saved = json.loads((run / RUN_RECORD).read_text())
    [change] = saved["config_changes"]
    assert change["step"] == 4 and change["changes"] == {"train.max_steps": [4, 6], "train.save_every_minutes":
                                                         [0.0, 1e-9]}
    assert change["accepted"] == {"train.max_steps": "--allow-config-change", "train.save_every_minutes": "operational"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", change["time"])
    assert load_config(run / "config.yaml").train.max_steps == 6
    assert saved["data"] == identity["data"]


# --------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM
# --------------------------------------------------------------------------------------------------
def test_step_boundary_control_notes_signals_and_the_save_clock(monkeypatch):
    control = StepBoundaryControl(save_every_minutes=2.0)
    previous = signal.getsignal(signal.SIGTERM)
    control.install()
    try:
        assert control.poll() == (0, False)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # after a SIGTERM (a launcher's): still a clean stop
        assert control.poll() == (signal.SIGTERM, False)
    finally:
        control.restore()
    assert signal.getsignal(signal.SIGTERM) is previous
    twice = StepBoundaryControl()
    twice.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert twice.poll() == (signal.SIGINT, False)
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C twice: stop at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        twice.restore()
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    clock = StepBoundaryControl(save_every_minutes=2.0)
    now[0] += 119
    assert clock.poll() == (0, False)
    now[0] += 1
    assert clock.poll() == (0, True)
    clock.saved()
    assert clock.poll() == (0, False)
    with pytest.raises(ConfigError, match="save_every_minutes must be >= 0"):
        load_config(TINY, ["train.save_every_minutes=-1"])


def _stop_by_signal(corpus_dir, run: Path, sets, signum, *, group: bool):
    """Start `python -m electra_fast.train` (half a second per step), signal it once a step is logged."""
    cmd = [PYTHON, str(REPO / "tests" / "_faults.py"), "--step-delay", "0.5", "--", "--config", TINY,
           "--run-dir", str(run), "--set", f"data.path={corpus_dir}", *sets]
    proc = subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not read_metrics(run):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        if group:  # Ctrl-C in a terminal: every process of the group, loader workers included
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out + err


@pytest.mark.parametrize("signum, group, workers", [
    (signal.SIGTERM, False, 0),
    pytest.param(signal.SIGINT, True, 1, marks=pytest.mark.slow),
], ids=["sigterm", "ctrl-c-with-loader-workers"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(corpus_dir, tmp_path, clean_env,
                                                                              signum, group, workers):
    sets = ("train.max_steps=12", "train.save_every=100", "train.log_every=1", "train.export_at_end=false",
            "train.lr=0.003", "train.warmup_steps=2", f"data.num_workers={workers}")
    run = tmp_path / "stopped"
    code, output = _stop_by_signal(corpus_dir, run, sets, signum, group=group)
    assert code == 128 + signum, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    [line] = [text for text in output.splitlines() if "stopped at step" in text]
    step = int(re.search(r"stopped at step (\d+);", line).group(1))
    assert 1 <= step < 12
    tag = f"step-{step:08d}"
    assert f"checkpoint {run / 'checkpoints' / tag}; resume with: python -m electra_fast.train --run-dir {run} " \
           "--resume" in line
    assert (run / "checkpoints" / "latest").read_text() == tag  # saved although save_every=100
    assert [r["step"] for r in read_metrics(run)] == list(range(1, step + 1))

    # The printed command continues the run exactly where the signal stopped it.
    assert trainer.run_train(_args(run, config=None, resume=True)) == 0
    reference = tmp_path / "reference"
    assert trainer.run_train(_args(reference, f"data.path={corpus_dir}", *sets)) == 0
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))
    assert losses(run) == losses(reference)
    # No loader worker outlives its run (they ignore SIGTERM: the interpreter's exit would wait on them).
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_sigterm_to_a_two_rank_launch_stops_every_rank_after_the_same_step(corpus_dir, tmp_path, clean_env):
    """A preemption signals the whole job (launcher and ranks): both ranks finish the same step, save it
    together, rank 0 prints the one line, and nothing prints a traceback."""
    from test_train import free_port

    run = tmp_path / "two"
    cmd = [PYTHON, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--no_local_rank", str(REPO / "tests" / "_faults.py"), "--step-delay", "0.5", "--", "--config", TINY,
           "--run-dir", str(run), "--set", f"data.path={corpus_dir}", "train.max_steps=40", "train.save_every=100",
           "train.log_every=1", "train.export_at_end=false"]
    proc = subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not read_metrics(run):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        output = proc.communicate(timeout=300)[0]  # the pipe closes when the ranks have exited too
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in output, output[-3000:]
    [line] = [text for text in output.splitlines() if "stopped at step" in text]
    step = int(re.search(r"stopped at step (\d+);", line).group(1))
    tag = run / "checkpoints" / f"step-{step:08d}"
    assert (run / "checkpoints" / "latest").read_text() == tag.name
    assert sorted(p.name for p in tag.glob("trainer_state_rank*.pt")) == ["trainer_state_rank00000.pt",
                                                                          "trainer_state_rank00001.pt"]
    assert "the same launcher with --module electra_fast.train" in line
