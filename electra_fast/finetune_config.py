"""Fine-tuning's options: the ``task``, ``train`` and ``model`` sections of ``--set section.key=value``.

    config = FinetuneConfig.from_overrides(["train.lr=1e-4", "task.text_column=review"])

Parsed and checked by :mod:`electra_fast.config` exactly as the pretraining config is (an unknown key
names the key and lists the valid ones; a wrong type names the key and the expected type); the
defaults are the paper's recipe (:data:`PAPER_RECIPE`, read by the size of the encoder when ``0`` /
``auto``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable

from .config import ConfigError, IMPLEMENTATIONS, apply_overrides, check_choice, check_non_negative, check_positive
from .tasks import TaskOptions

__all__ = ["PAPER_RECIPE", "FinetuneConfig", "ModelOptions", "TrainOptions"]

# Per-size fine-tuning hyper-parameters: the paper's appendix and configure_finetuning.py.
PAPER_RECIPE = {
    "small": {"lr": 3e-4, "layerwise_lr_decay": 0.8},
    "base": {"lr": 1e-4, "layerwise_lr_decay": 0.8},
    "large": {"lr": 5e-5, "layerwise_lr_decay": 0.9},
}


@dataclass
class TrainOptions:
    """``--set train.KEY=VALUE``."""

    size: str = "auto"  # small | base | large | auto (from the hidden width: <=256 small, <=768 base)
    lr: float = 0.0  # 0: the paper's for the size
    layerwise_lr_decay: float = 0.0  # 0: the paper's for the size; 1.0 turns the decay off
    epochs: float = 0.0  # 0: the task's (3; 10 for RTE and STS-B)
    batch_size: int = 32
    eval_batch_size: int = 128
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6
    grad_clip: float = 1.0  # 0 turns clipping off
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    evals_per_epoch: int = 1  # dev evaluations per epoch (and always one at the end)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    progress: bool = True  # tqdm progress bar
    save_model: bool = True  # write the best checkpoint to OUT/model

    def validate(self) -> None:
        check_choice("train.size", self.size, ("auto", *PAPER_RECIPE))
        check_choice("train.precision", self.precision, ("auto", "bf16", "fp32"))
        check_positive(self, "train", ("batch_size", "eval_batch_size", "evals_per_epoch"))
        check_non_negative(self, "train", ("lr", "epochs", "weight_decay", "grad_clip", "layerwise_lr_decay"))
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"train.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


@dataclass
class ModelOptions:
    """``--set model.KEY=VALUE``: how the encoder runs (not its shape, which the checkpoint fixes). The
    names and meanings are :class:`electra_fast.config.ModelConfig`'s, whose fields they replace."""

    attention_impl: str = "auto"  # auto (Triton on CUDA, SDPA elsewhere) | torch | triton
    elementwise_impl: str = "auto"  # fused dropout-add-LayerNorm and bias-GELU: auto | torch | triton
    unpad: bool = True  # packed real tokens + varlen attention when the Triton attention runs
    activation_checkpointing: bool = False

    def validate(self) -> None:
        for key in ("attention_impl", "elementwise_impl"):
            check_choice(f"model.{key}", getattr(self, key), IMPLEMENTATIONS)


@dataclass
class FinetuneConfig:
    task: TaskOptions = field(default_factory=TaskOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    model: ModelOptions = field(default_factory=ModelOptions)

    @classmethod
    def from_overrides(cls, overrides: Iterable[str] = ()) -> "FinetuneConfig":
        """Defaults plus ``section.key=value`` strings (values parsed as YAML, types checked)."""
        cfg = cls()
        apply_overrides(cfg, list(overrides))
        return cfg.validate()

    def validate(self) -> "FinetuneConfig":
        for section in (self.task, self.train, self.model):
            section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
