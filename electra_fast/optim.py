"""The optimizer decisions shared by pretraining, fine-tuning and the benchmarks, made once.

* Which parameters decay: google-research/electra ``optimization.py`` passes
  ``exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]`` and matches by substring, so every
  LayerNorm parameter and every bias is excluded and the embeddings decay.
* The learning-rate schedule: linear warm-up, then linear decay to zero at the last update.

Pure PyTorch: no DeepSpeed, no transformers, so the model-side code and the benchmarks can use it.
"""
from __future__ import annotations

from typing import Iterable

import torch

NO_WEIGHT_DECAY = ("LayerNorm", "layer_norm", "bias")


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
