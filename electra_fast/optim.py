"""The optimizer decisions shared by pretraining, fine-tuning and the benchmarks, made once.

* Which parameters decay: google-research/electra ``optimization.py`` passes
  ``exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]`` and matches by substring, so every
  LayerNorm parameter and every bias is excluded and the embeddings decay.
* The learning-rate schedule: linear warm-up, then linear decay to zero at the last update, as the
  reference's ``optimization.py`` (polynomial decay with power 1, multiplied by the warm-up ramp); the
  ramp starts at 1/W instead of 0 so that no update is wasted. Pretraining (through
  ``deepspeed.initialize(lr_scheduler=...)``) and fine-tuning both use :func:`lr_multiplier`.

Pure PyTorch: no DeepSpeed, no transformers, so the model-side code and the benchmarks can use it.
"""
from __future__ import annotations

from typing import Iterable

import torch

# "norm.": the modern backbone's (ModernBERT's) bias-free norms, attn_norm / mlp_norm / final_norm / norm
NO_WEIGHT_DECAY = ("LayerNorm", "layer_norm", "bias", "norm.")


def no_weight_decay(name: str) -> bool:
    """True when the parameter called ``name`` is kept out of weight decay (the reference's substring rule)."""
    return any(key in name for key in NO_WEIGHT_DECAY)


def weight_decay_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
                        weight_decay: float) -> list[dict]:
    """Two optimizer groups, decayed first: every trainable parameter except LayerNorm and biases decays."""
    decay, no_decay = [], []
    for name, parameter in named_parameters:
        if parameter.requires_grad:
            (no_decay if no_weight_decay(name) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int) -> float:
    """Factor on each group's peak lr at update ``step`` (0-based): min(1, (t+1)/W) · (1 − t/T)."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warmup * max(0.0, 1.0 - step / total_steps)


def warmup_decay_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                          warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_multiplier` as a torch scheduler: step it once per applied update."""
    return _WarmupDecaySchedule(optimizer, total_steps, warmup_steps)


class _WarmupDecaySchedule(torch.optim.lr_scheduler.LambdaLR):
    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        super().__init__(optimizer, self.multiplier)

    def multiplier(self, step: int) -> float:
        return lr_multiplier(step, self.total_steps, self.warmup_steps)

    def state_dict(self) -> dict:
        # Only the counters are state: the formula and its lengths come from the config of the run that
        # loads it (a resumed run may extend train.max_steps), and no callable is pickled.
        return {key: value for key, value in super().state_dict().items()
                if key not in ("lr_lambdas", "total_steps", "warmup_steps")}

    def load_state_dict(self, state_dict: dict) -> None:
        if "last_batch_iteration" in state_dict and "last_epoch" not in state_dict:
            # DeepSpeed's WarmupDecayLR, which pretraining checkpoints of earlier versions hold: it counts
            # updates from -1, this schedule from 0. The run continues on this schedule.
            self.last_epoch = int(state_dict["last_batch_iteration"]) + 1
            self._step_count = self.last_epoch + 1
            return
        state = {key: value for key, value in state_dict.items() if key not in ("total_steps", "warmup_steps")}
        super().load_state_dict({**state, "lr_lambdas": [None] * len(self.base_lrs)})

