"""Checkpoints on node-local disks (DeepSpeed's ``checkpoint.use_node_local_storage``; electra_fast/checkpoints.py).

Two nodes of one rank each (two torchrun agents on this machine, as on two hosts), each with its own
checkpoint folder standing in for its own disk (``train.checkpoint_dir=$NODE_DISK/ckpt``, expanded per
node). Each folder holds that node's files and a manifest of them; on resume every rank verifies its
own part and the run continues from the newest step verified on both nodes: here step 2, because one
file of node 1's step 4 is damaged, while node 0's step 4 is intact. A fast test covers
train.checkpoint_dir on one rank (resume and export find the step folders there).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from test_train import (PYTHON, REPO, TINY, _args, child_env, clean_env, corpus_dir, free_port, losses,  # noqa: F401
                        run_inprocess)

from electra_fast import train as trainer

from electra_fast.checkpoints import MANIFEST, verify_checkpoint
from electra_fast.metrics import read_metrics

SETS = ("model.dropout=0", "model.attention_dropout=0", "train.lr=0.003", "train.warmup_steps=2",
        "train.max_steps=6", "train.save_every=2", "train.log_every=1", "train.export_at_end=false",
        "train.checkpoint_dir=$NODE_DISK/ckpt")


def test_checkpoint_dir_outside_the_run_dir_is_found_by_resume_and_export(corpus_dir, tmp_path, monkeypatch,
                                                                          clean_env):
    """train.checkpoint_dir: $VARIABLES expanded, a relative path taken from the run dir; --resume, the
    end-of-run export and `electra-fast export --checkpoint RUN` all look there (the run's config.yaml)."""
    from electra_fast.cli import main as cli_main

    monkeypatch.setenv("SCRATCH", str(tmp_path / "scratch"))
    run = tmp_path / "run"
    sets = ("train.max_steps=3", "train.save_every=2", "train.log_every=1", "train.checkpoint_dir=$SCRATCH/ckpt")
    assert run_inprocess(corpus_dir, run, *sets, "train.export_at_end=false") == 0
    root = tmp_path / "scratch" / "ckpt"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    assert not (run / "checkpoints").exists()
    assert cli_main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "export")]) == 0
    args = _args(run, "train.max_steps=4", "train.export_at_end=true", config=None, resume=True)
    args.allow_config_change = ["train.max_steps"]
    assert trainer.run_train(args) == 0
    assert (root / "step-00000004").is_dir() and (run / "export" / "discriminator").is_dir()
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]


def test_node_local_on_one_rank_seals_its_part_and_falls_back_past_a_damaged_one(corpus_dir, tmp_path, caplog,
                                                                                   clean_env):
    """The node-local code path in one process (the two-node test below is the real thing): the manifest
    names the node's ranks, and a damaged own file makes the resume take the step before."""
    run = tmp_path / "run"
    sets = ("train.max_steps=4", "train.save_every=2", "train.log_every=1", "train.export_at_end=false",
            "train.deepspeed_config=configs/deepspeed/zero1-node-local.json", "train.checkpoint_dir=local")
    assert run_inprocess(corpus_dir, run, *sets) == 0
    tag = run / "local" / "step-00000004"
    manifest = verify_checkpoint(tag)
    assert manifest["node_local"] is True and manifest["ranks"] == [0]
    (tag / "trainer_state_rank00000.pt").write_bytes(b"damaged")
    with caplog.at_level("WARNING"):
        assert trainer.run_train(_args(run, config=None, resume=True)) == 0
    assert "rank 0: skipping checkpoint step-00000004 on this node" in caplog.text
    assert "moved step-00000004 aside" in caplog.text
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]


def launch_two_nodes(tmp_path, train_args: list[str], fault: list[str] = (), timeout: int = 300):
    """``tests/_faults.py`` (python -m electra_fast.train) on two single-rank torchrun "nodes"."""
    port = free_port()
    procs = []
    for node in (0, 1):
        env = child_env()
        env["NODE_DISK"] = str(tmp_path / f"node{node}")
        cmd = [PYTHON, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
               str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(REPO / "tests" / "_faults.py"), *fault, "--", *train_args]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [proc.returncode for proc in procs], outputs


@pytest.mark.slow
def test_node_local_checkpoints_verify_per_node_and_resume_the_newest_verified_everywhere(corpus_dir, tmp_path):
    shipped = json.loads((REPO / "configs" / "deepspeed" / "zero1-node-local.json").read_text())
    assert shipped["checkpoint"]["use_node_local_storage"] is True
    run = tmp_path / "run"  # the run's records (config, metrics) on shared storage, as usual
    start = ["--config", TINY, "--run-dir", str(run), "--set", f"data.path={corpus_dir}", *SETS,
             "train.deepspeed_config=configs/deepspeed/zero1-node-local.json"]
    codes, outputs = launch_two_nodes(tmp_path, start, fault=["--fault", "raise@4"])
    assert codes == [1, 1], outputs[0][-3000:] + outputs[1][-3000:]
    assert not (run / "checkpoints").exists()
    first = losses(run)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]

    # Each node's disk holds its own part of each step, listed in its own manifest.
    for node in (0, 1):
        tag = tmp_path / f"node{node}" / "ckpt" / "step-00000004"
        manifest = verify_checkpoint(tag)
        assert manifest["node_local"] is True and manifest["ranks"] == [node] and manifest["world_size"] == 2
        assert sorted(manifest["files"]) == sorted(["electra_fast_config.json", "mp_rank_00_model_states.pt",
                                                    f"trainer_state_rank0000{node}.pt",
                                                    f"zero_pp_rank_{node}_mp_rank_00_optim_states.pt"])
        assert (tmp_path / f"node{node}" / "ckpt" / "latest").read_text() == "step-00000004"

    # Node 1's part of step 4 is damaged; node 0's is intact: only step 2 verifies on both nodes.
    damaged = tmp_path / "node1" / "ckpt" / "step-00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    codes, outputs = launch_two_nodes(tmp_path, ["--run-dir", str(run), "--resume"], fault=["--step-delay", "0"])
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "rank 1: skipping checkpoint step-00000004 on this node" in outputs[1]
    assert "sha256 differs" in outputs[1] and str(damaged) in outputs[1]
    assert "resumed from step-00000002 at step 2" in outputs[0]
    for node in (0, 1):  # step 4 is set aside on both nodes (it is not a checkpoint of the whole run)
        names = sorted(p.name for p in (tmp_path / f"node{node}" / "ckpt").iterdir())
        assert any(name.startswith("step-00000004.rejected") for name in names), names
        assert "step-00000006" in names
    # Steps 3 and 4 again, from the step-2 checkpoint: the same losses as the first time, bit for bit.
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert losses(run)[:4] == first
