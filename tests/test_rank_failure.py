"""A rank that dies ends the job promptly, and --resume continues from the newest verified checkpoint.

The slow test kills one of two CPU ranks with SIGKILL in the middle of a run (torchrun, which names
the rank that failed); the job must end within 60 s, and the resumed run must recompute the steps
lost since the last checkpoint bit for bit. The fast test checks that the collective timeout of
train.dist_timeout_minutes reaches the process group (with NCCL, the bound on how long the ranks of
other nodes wait for a dead one).
"""

from __future__ import annotations

import datetime
import re
import subprocess
import time

import pytest

from test_train import COMPARE, PYTHON, REPO, TINY, child_env, clean_env, corpus_dir, free_port, losses  # noqa: F401

from electra_fast.config import ConfigError, load_config
from electra_fast.metrics import read_metrics


def test_dist_timeout_from_config_reaches_init_distributed(monkeypatch, clean_env):
    import deepspeed

    from electra_fast import distributed

    seen = {}

    class Stop(Exception):
        pass

    def capture(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(deepspeed, "init_distributed", capture)
    with pytest.raises(Stop):
        distributed.init_distributed(-1, load_config(TINY, ["train.dist_timeout_minutes=2.5"]).train.dist_timeout_minutes)
    assert seen["timeout"] == datetime.timedelta(minutes=2.5)
    with pytest.raises(ConfigError, match="train.dist_timeout_minutes must be > 0"):
        load_config(TINY, ["train.dist_timeout_minutes=0"])


def torchrun_two_ranks(args: list[str]) -> subprocess.Popen:
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "_faults.py"), *args]
    return subprocess.Popen(cmd, env=child_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.slow
def test_kill9_of_one_rank_ends_the_job_promptly_and_resume_matches(corpus_dir, tmp_path):
    run = tmp_path / "run"
    sets = (*COMPARE, "train.max_steps=6", "train.save_every=3", "train.log_every=1", "train.export_at_end=false")
    proc = torchrun_two_ranks(["--fault", "sigkill@5:1", "--", "--config", TINY, "--run-dir", str(run), "--set",
                               f"data.path={corpus_dir}", *sets])
    try:
        deadline = time.monotonic() + 300
        while not any(r.get("step") == 5 for r in read_metrics(run)) and proc.poll() is None:
            assert time.monotonic() < deadline, "the run did not reach step 5"
            time.sleep(0.05)
        killed_at = time.monotonic()  # rank 1 kills itself right after step 5, as rank 0 logs it
        output = proc.communicate(timeout=120)[0]
        ended_after = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, output[-3000:]
    assert ended_after < 60, f"the job took {ended_after:.0f} s to end after rank 1 died"
    # The launcher names the rank that died and how.
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", output) and re.search(r"exitcode\s*:\s*-9", output), \
        output[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "step-00000003"
    before = losses(run)
    assert len(before) >= 4  # steps 4 (and 5) were computed, then lost with the kill

    proc = torchrun_two_ranks(["--step-delay", "0", "--", "--run-dir", str(run), "--resume"])
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from step-00000003 at step 3" in output
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    after = losses(run)
    assert after[:len(before)] == before  # the lost steps again, bit for bit: weights, Adam, data, masks
