"""Stopping a run cleanly on SIGINT/SIGTERM, and the time-based save: decisions every rank agrees on.

Ctrl-C, ``kill``, a scheduler's preemption and the launchers (``deepspeed`` and ``torchrun`` pass
SIGINT/SIGTERM on to every rank as SIGTERM and kill the ranks some 30 s later) all end the same way:
the step in progress finishes, a checkpoint is saved, rank 0 prints one line (``stopped at step N;
checkpoint ...; resume with: ...``) and every rank exits with 128 + the signal's number (130 for
SIGINT, 143 for SIGTERM), with no traceback. A second Ctrl-C stops at once, without saving (the last
checkpoint stays as it was).

The handler only notes the signal; the loop asks :meth:`StepBoundaryControl.poll` after each step.
The ranks may see a signal at different moments (or only some of them see it), and
``train.save_every_minutes`` is measured on each rank's clock, so ``poll`` takes the maximum over
the ranks: every rank stops, or saves, after the same step. The values are host-side integers, all-
reduced over a gloo group of their own so that the poll never waits for the accelerator.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(Exception):
    """The run stopped after a step on a signal, with a checkpoint of that step saved on every rank."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped at step {step} on {signal.Signals(signum).name}; checkpoint {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by that signal


def host_group():
    """A process group for host-side integers: None (the default group) when it is gloo or there is no
    group; else a new gloo group. Every rank must call this at the same point (it is a collective)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


class StepBoundaryControl:
    """Notes SIGINT/SIGTERM while installed; :meth:`poll` turns them and the save clock into decisions
    taken by every rank at the same step."""

    def __init__(self, save_every_minutes: float = 0.0, group=None):
        self.save_every_s = 60.0 * save_every_minutes
        self.group = group
        self.signum = 0
        self.last_save = time.monotonic()
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers belong to the main thread; a run in another thread stops as before
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._note)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without a checkpoint
        # The first signal decides; a launcher passing a Ctrl-C on as SIGTERM must not make it "stop at once".
        self.signum = self.signum or signum

    def saved(self) -> None:
        """A checkpoint was written: the save clock starts again."""
        self.last_save = time.monotonic()

    def poll(self) -> tuple[int, bool]:
        """(the signal to stop on, or 0; whether to save now for train.save_every_minutes), the same on
        every rank."""
        save_due = int(self.save_every_s > 0 and time.monotonic() - self.last_save >= self.save_every_s)
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.signum, bool(save_due)
        values = torch.tensor([self.signum, save_due], dtype=torch.int64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        signum, save_due = values.tolist()
        return int(signum), bool(save_due)
