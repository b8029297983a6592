"""Faults the trainer tests inject: trainer callbacks, installed by the tests, never read from the config.

    NonFiniteLossAt({2, 3})          rank 0's loss is NaN in optimizer steps 2 and 3 (1-based)
    FailAfterStep("raise", 2, 1)     rank 1 raises once step 2 finished (and its checkpoint was written)
    FailAfterStep("sigkill", 5)      every rank kills itself with SIGKILL after step 5, as `kill -9` does
    StepDelay(0.5)                   every step takes half a second longer (time for a test to send a signal)
    PoisonWeightsAfter(3)            a NaN written into the weights after step 3 (non-finite weights at the next save)

As a script it is ``python -m electra_fast.train`` with one fault installed, for tests that need a
separate process (the trainer's own command line, run by ``electra_fast.train.main``):

    python tests/_faults.py --fault sigkill@5 -- --config configs/electra-tiny.yaml --run-dir RUN ...
    python tests/_faults.py --step-delay 0.5 -- --config configs/electra-tiny.yaml --run-dir RUN ...
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time

import torch

from electra_fast.train import Trainer, TrainerCallback, main as train_main


class NonFiniteLossAt(TrainerCallback):
    """Make the loss NaN on ``rank`` in the given optimizer steps, to exercise the skip/abort path."""

    def __init__(self, steps, rank: int = 0):
        self.steps, self.rank = set(steps), rank

    def on_loss(self, trainer: Trainer, loss: torch.Tensor) -> torch.Tensor:
        if trainer.step + 1 in self.steps and trainer.rank == self.rank:
            return loss * float("nan")
        return loss


class FailAfterStep(TrainerCallback):
    """Die after optimizer step ``step`` on ``rank`` (every rank when None): ``sigkill`` or ``raise``."""

    def __init__(self, kind: str, step: int, rank: int | None = None):
        if kind not in ("sigkill", "raise"):
            raise ValueError(f"fault kind must be sigkill or raise, got {kind!r}")
        self.kind, self.step, self.rank = kind, step, rank

    @classmethod
    def parse(cls, spec: str) -> "FailAfterStep":
        """``KIND@STEP`` or ``KIND@STEP:RANK``."""
        match = re.fullmatch(r"(sigkill|raise)@(\d+)(?::(\d+))?", spec.strip())
        if not match:
            raise ValueError(f"fault {spec!r} must look like sigkill@STEP or raise@STEP:RANK")
        return cls(match.group(1), int(match.group(2)), None if match.group(3) is None else int(match.group(3)))

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.step == self.step and self.rank in (None, trainer.rank):
            if self.kind == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"test fault: injected failure on rank {trainer.rank} after step {trainer.step}")


class StepDelay(TrainerCallback):
    """Sleep after every optimizer step, so that a test can signal the run while it is mid-way."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_step_end(self, trainer: Trainer) -> None:
        time.sleep(self.seconds)


class PoisonWeightsAfter(TrainerCallback):
    """Write a NaN into one weight on every rank once optimizer step ``step`` finished."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.step == self.step:
            with torch.no_grad():
                next(trainer.engine.module.parameters()).view(-1)[0] = float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/_faults.py", description=__doc__.split("\n")[0])
    parser.add_argument("--fault", help="KIND@STEP or KIND@STEP:RANK (KIND: sigkill | raise)")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep after every step")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of electra_fast.train")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    callbacks = [FailAfterStep.parse(args.fault)] if args.fault else []
    if args.step_delay:
        callbacks.append(StepDelay(args.step_delay))
    return train_main(train_args, callbacks=callbacks)


if __name__ == "__main__":
    sys.exit(main())
