"""Resuming on another ZeRO stage keeps the whole optimizer (electra_fast/optimizer_state.py).

One run is interrupted every two steps and resumed on another ZeRO stage each time (1 -> 3 -> 1 -> 2
-> 1), with GDES embedding sharing and the fused-QKV layout; every resume first checks that Adam's
moments and step counts in the new engine equal the checkpoint's exactly, and the losses and weights of
the whole run must equal an uninterrupted ZeRO-1 run's. Then the check is shown able to fail: the same
resume with the optimizer's state left out (what elastic resume did before) is measurably off.
Another world size (1 <-> 2 ranks) is tested in tests/test_checkpoints.py (slow).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from _faults import FailAfterStep
from test_train import COMPARE, _args, clean_env, corpus_dir, losses, run_inprocess  # noqa: F401 (fixtures)

from electra_fast import train as trainer
from electra_fast.checkpoints import checkpoint_optimizer_state, consolidated_state_dict
from electra_fast.optimizer_state import OptimizerState, gather_optimizer_state

STEPS = 10
SETS = (*COMPARE, "model.embedding_sharing=gdes", f"train.max_steps={STEPS}", "train.save_every=2",
        "train.keep_last=5", "train.log_every=1", "train.export_at_end=false")
STAGES = (1, 3, 1, 2, 1)  # each runs two steps: ZeRO-1 -> ZeRO-3 and back, ZeRO-1 -> ZeRO-2 -> ZeRO-1


def zero(stage: int) -> str:
    return f"train.deepspeed_config=configs/deepspeed/zero{stage}.json"


def assert_same_state(got: OptimizerState, saved: OptimizerState, where: str) -> None:
    assert got.steps == saved.steps and set(saved.steps.values()) != {0}, where
    assert sorted(got.tensors) == sorted(saved.tensors) == ["exp_avg", "exp_avg_sq"], where
    for key, tensors in saved.tensors.items():
        for name, value in tensors.items():
            assert torch.equal(got.tensors[key][name], value), (where, key, name)


class CheckRestoredOptimizer(trainer.TrainerCallback):
    """Before the first update after a resume: the engine's Adam state against the checkpoint's."""

    def __init__(self):
        self.checked: list[str] = []

    def on_loss(self, t, loss):
        if t.resumed_from and not self.checked:
            saved = checkpoint_optimizer_state(t.checkpoints.root / t.resumed_from)
            assert_same_state(gather_optimizer_state(t.engine), saved, f"ZeRO-{t.zero_stage} from {t.resumed_from}")
            self.checked.append(t.resumed_from)
        return loss


def resume(corpus_dir, run, stage: int, stop_after: int | None, callbacks=(), sets=SETS) -> None:
    args = _args(run, f"data.path={corpus_dir}", *sets, zero(stage), resume=True)
    args.allow_config_change = ["train.deepspeed_config"]
    fault = [FailAfterStep("raise", stop_after)] if stop_after else []
    if stop_after:
        with pytest.raises(RuntimeError, match="injected failure"):
            trainer.run_train(args, [*callbacks, *fault])
    else:
        assert trainer.run_train(args, list(callbacks)) == 0


def test_resume_on_other_zero_stages_keeps_adam_state_and_matches_uninterrupted(corpus_dir, tmp_path, caplog,
                                                                                   monkeypatch, clean_env):
    reference = tmp_path / "reference"
    assert run_inprocess(corpus_dir, reference, *SETS, zero(1)) == 0

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected failure"):
        run_inprocess(corpus_dir, run, *SETS, zero(STAGES[0]), callbacks=[FailAfterStep("raise", 2)])
    shutil.copytree(run, tmp_path / "at-step-2")
    for index, stage in enumerate(STAGES[1:], start=1):
        check = CheckRestoredOptimizer()
        stop = 2 * (index + 1) if index < len(STAGES) - 1 else None
        with caplog.at_level("WARNING"):
            resume(corpus_dir, run, stage, stop, callbacks=[check])
        assert check.checked == [f"step-{2 * index:08d}"]
        assert f"with ZeRO-{STAGES[index - 1]}, resuming on 1 with ZeRO-{stage}" in caplog.text
        assert "Adam's moments and step counts" in caplog.text and "restart" not in caplog.text
        caplog.clear()

    # ZeRO-1, -2 and -3 on one rank compute the same updates up to float summation order (the
    # uninterrupted runs of different stages differ by ~1e-7 too), so: equal to 1e-6 relative.
    assert len(losses(run)) == STEPS
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(losses(reference)), rtol=1e-6, atol=0)
    for step in (6, 8, 10):
        ours = consolidated_state_dict(run / "checkpoints" / f"step-{step:08d}")
        theirs = consolidated_state_dict(reference / "checkpoints" / f"step-{step:08d}")
        assert ours.keys() == theirs.keys() and "discriminator_word_embeddings_delta" in ours
        assert any("qkv" in name for name in ours)
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7, msg=name)

    # The check can fail: the same ZeRO-1 -> ZeRO-3 resume without Adam's state (moments from zero, as
    # elastic resume did before) is off by far more than the tolerance above from its first update on.
    without = tmp_path / "at-step-2"
    import electra_fast.optimizer_state as optimizer_state

    def no_optimizer_state(tag_dir, config):
        raise optimizer_state.UnsupportedOptimizerLayout("left out by the test")

    monkeypatch.setattr(optimizer_state, "read_optimizer_state", no_optimizer_state)
    with caplog.at_level("WARNING"):
        resume(corpus_dir, without, 3, 4)
    assert "not Adam's moments, which restart from zero: left out by the test" in caplog.text
    restarted, uninterrupted = losses(without), losses(reference)
    assert restarted[:3] == pytest.approx(uninterrupted[:3], rel=1e-6)  # the weights themselves were restored
    assert abs(restarted[3] - uninterrupted[3]) > 1e-3 * uninterrupted[3]


def test_bf16_resume_between_zero0_and_zero1_keeps_adam_state(corpus_dir, tmp_path, clean_env):
    """bf16: ZeRO-0 keeps fp32 masters and Adam's state per parameter in DeepSpeed's FP16 wrapper (no
    per-parameter API there), ZeRO-1 in flat partitions; both directions restore the state exactly."""
    sets = (*SETS[:-4], "train.max_steps=6", "train.save_every=2", "train.keep_last=5", "train.log_every=1",
            "train.export_at_end=false", "train.precision=bf16")
    reference = tmp_path / "reference"
    assert run_inprocess(corpus_dir, reference, *sets, zero(0)) == 0
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected failure"):
        run_inprocess(corpus_dir, run, *sets, zero(0), callbacks=[FailAfterStep("raise", 2)])
    for stage, stop in ((1, 4), (0, None)):
        check = CheckRestoredOptimizer()
        resume(corpus_dir, run, stage, stop, callbacks=[check], sets=sets)
        assert len(check.checked) == 1
    # bf16 rounds the gradients at other points in ZeRO-0's and ZeRO-1's paths, so the trajectories of
    # the two stages are not the same to the last bit (losses ~5e-6 apart after two ZeRO-1 steps, and
    # Adam's normalised updates make small weights such as the GDES delta differ by ~0.2% of their size):
    # the state itself was checked exactly at each resume; moments restarting from zero would move the
    # losses by 1e-3 and more (the fp32 test above).
    run_losses, reference_losses = losses(run), losses(reference)
    assert run_losses[:3] == reference_losses[:3]  # up to the first update after the first resume: exact
    assert run_losses == pytest.approx(reference_losses, rel=5e-5)
