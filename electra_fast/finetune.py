"""Fine-tune an ELECTRA discriminator on a downstream task (GLUE, classification, regression, tagging).

    electra-fast finetune --model runs/small --task sst-2 --data-dir glue_data/SST-2 --out runs/small/sst2
    electra-fast finetune --model runs/small/export/discriminator --task rte --data-dir glue_data/RTE \\
        --out runs/small/rte --seeds 1,2,3,4,5
    electra-fast finetune --model google/electra-small-discriminator-folder --task classification \\
        --data-dir my_data --out out/cls --set task.text_column=review --set task.label_column=stars
    electra-fast finetune --model runs/small --task token-classification --data-dir conll2003 --out out/ner

``--model`` is a pretraining run folder (its ``export/discriminator`` is used), an export folder (its
``discriminator``), or any ``ElectraForPreTraining``-style folder: ``config.json`` +
``model.safetensors`` / ``pytorch_model.bin`` with ``tokenizer.json`` or ``vocab.txt`` beside them.
Task names and file layouts: see :mod:`electra_fast.tasks`.

The recipe defaults are the paper's (Clark et al. 2020, Appendix; google-research/electra
``configure_finetuning.py`` and ``model/optimization.py``):

* AdamW (β=0.9/0.999, ε=1e-6), weight decay 0.01 (the reference code's value) except on LayerNorm
  and bias parameters, gradient clipping at global norm 1.0;
* lr 3e-4 (small) / 1e-4 (base) / 5e-5 (large), size read from the hidden width;
* layer-wise lr decay 0.8 (0.9 for large) exactly as ``_get_layer_lrs``: embeddings (and
  ``embeddings_project``) have depth 0, encoder layer i depth i+1, the task head depth L+2, and each
  gets ``lr · decay^(L+2−depth)``;
* lr schedule ``lr · min(1, (t+1)/warmup) · (1 − t/T)``: linear warm-up over 10% of the T steps and
  linear decay to 0 (the reference's polynomial decay of power 1 times its warm-up factor);
* batch 32, max length 128 (256 for tagging), 3 epochs (10 for RTE and STS-B);
* several seeds with the median reported (``--seeds 1,2,3``; the paper takes the median of 10 runs).

Heads follow Hugging Face so the result loads in transformers: ``ElectraClassificationHead`` (dropout,
dense, GELU, dropout, projection on the [CLS] row) and ``ElectraForTokenClassification``'s dropout +
linear, labelling each word's first sub-word. Differences from the TF reference, on purpose: PyTorch's
AdamW applies Adam's bias correction (BERT's AdamWeightDecayOptimizer does not, which scales update t
by (1−β1^t)/sqrt(1−β2^t): about 3 in the first steps, back to 1 over a few thousand; the warm-up keeps
those steps small in both), and STS-B is trained on the raw 0..5 score as in HF (the reference divides
it by 5; the correlation metrics do not change).

The encoder is built from the pretraining blocks in :mod:`electra_fast.model` (``ElectraEmbeddings`` +
``ElectraBody``), so ``model.attention_impl=auto`` runs the electra_kernels Triton attention on
CUDA (on packed real tokens, with ``model.unpad``) and PyTorch SDPA on the CPU, and
``model.elementwise_impl=auto`` the fused dropout-add-LayerNorm and bias-GELU kernels on CUDA; on CUDA
the forward runs under bf16 autocast. Plain PyTorch, one device: no DeepSpeed.

Outputs in ``--out``:

* ``metrics.json``, rewritten after every seed: per seed the final dev metrics, the best evaluation and
  the evaluation history; ``median`` (of the final metrics over seeds: what the paper reports) and
  ``median_best``; extra dev sets are prefixed (MNLI's ``mismatched_accuracy``); the recipe used.
* ``model/``: the best checkpoint by the selecting dev metric over all seeds and evaluations, as an
  ``ElectraForSequenceClassification`` / ``ElectraForTokenClassification`` folder (config.json with
  num_labels, id2label, label2id, problem_type; model.safetensors; tokenizer files), written to a
  temporary folder and renamed into place.

Python API (what ``electra-fast finetune`` and ``benchmarks/equal_compute.py`` call)::

    from electra_fast.finetune import FinetuneConfig, finetune, finetune_classifier, load_tokenizer

    # a task from files, as the CLI does
    result = finetune("runs/small", "mrpc", "glue_data/MRPC", "runs/small/mrpc",
                      FinetuneConfig.from_overrides(["train.lr=1e-4"]), seeds=(1, 2, 3))
    result["median"]["accuracy"]

    # in-memory examples: (text_a, text_b or None, label id) -- label a float when num_labels == 1
    config = FinetuneConfig.from_overrides(["train.epochs=2", "train.progress=false"])
    result = finetune_classifier(pretraining_model, train, dev, num_labels=2,
                                 tokenizer=load_tokenizer("data/default"), config=config)
    result["median"]["accuracy"], result["per_seed"]["1"]["final"]

``finetune_classifier`` takes the encoder as an ``ElectraPretrainingModel`` (its shared embeddings and
discriminator are copied; the model itself is not changed), a model folder (as ``--model``), or an
:class:`ElectraModel`; the tokenizer as a ``tokenizers.Tokenizer`` or a folder / ``tokenizer.json`` /
``vocab.txt`` path. It returns the same dictionary ``metrics.json`` holds; with ``out_dir`` it writes
the files too. Bad inputs raise :class:`FinetuneError` (a ``ValueError``) naming the file / line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_directory, write_text_atomic
from .config import ConfigError, ModelConfig, apply_section
from .model import (ElectraBody, ElectraEmbeddings, TokenLayout, check_encoder_inputs, encode_tokens, init_weights,
                    resolve_impl, split_qkv, token_layout)
from .tasks import (
    Example,
    FinetuneError,
    TaggedSentence,
    TaskData,
    TaskOptions,
    TaskSpec,
    load_task,
    score,
)

__all__ = [
    "ElectraClassificationHead",
    "ElectraForSequenceClassification",
    "ElectraForTokenClassification",
    "ElectraModel",
    "FinetuneConfig",
    "FinetuneError",
    "ModelOptions",
    "TrainOptions",
    "add_finetune_arguments",
    "finetune",
    "finetune_classifier",
    "finetune_task",
    "layerwise_param_groups",
    "load_encoder",
    "load_tokenizer",
    "lr_multiplier",
    "make_optimizer",
    "parameter_depth",
    "run_finetune",
    "save_hf_model",
]

# Per-size fine-tuning hyper-parameters: the paper's appendix and configure_finetuning.py.
PAPER_RECIPE = {
    "small": {"lr": 3e-4, "layerwise_lr_decay": 0.8},
    "base": {"lr": 1e-4, "layerwise_lr_decay": 0.8},
    "large": {"lr": 5e-5, "layerwise_lr_decay": 0.9},
}


# --------------------------------------------------------------------------------------------
# Configuration: sections task (tasks.TaskOptions), train, model; --set section.key=value
# --------------------------------------------------------------------------------------------
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
        if self.size not in ("auto", *PAPER_RECIPE):
            raise ConfigError(f"train.size must be auto/small/base/large, got {self.size!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision must be auto/bf16/fp32, got {self.precision!r}")
        for key in ("batch_size", "eval_batch_size", "evals_per_epoch"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        for key in ("lr", "epochs", "weight_decay", "grad_clip", "layerwise_lr_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"train.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")


@dataclass
class ModelOptions:
    """``--set model.KEY=VALUE``: how the encoder runs (not its shape, which the checkpoint fixes)."""

    attention_impl: str = "auto"  # auto (Triton on CUDA, SDPA elsewhere) | torch | triton
    elementwise_impl: str = "auto"  # fused dropout-add-LayerNorm and bias-GELU: auto | torch | triton
    unpad: bool = True  # packed real tokens + varlen attention when the Triton attention runs
    activation_checkpointing: bool = False

    def validate(self) -> None:
        for key in ("attention_impl", "elementwise_impl"):
            if getattr(self, key) not in ("auto", "torch", "triton"):
                raise ConfigError(f"model.{key} must be auto/torch/triton, got {getattr(self, key)!r}")


@dataclass
class FinetuneConfig:
    task: TaskOptions = field(default_factory=TaskOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    model: ModelOptions = field(default_factory=ModelOptions)

    @classmethod
    def from_overrides(cls, overrides: Iterable[str] = ()) -> "FinetuneConfig":
        """Defaults plus ``section.key=value`` strings (values parsed as YAML, types checked)."""
        import yaml

        cfg = cls()
        sections = {f.name for f in dataclasses.fields(cls)}
        for text in overrides:
            if "=" not in text:
                raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.lr=1e-4)")
            dotted, raw = text.split("=", 1)
            parts = dotted.strip().split(".")
            if len(parts) != 2 or parts[0] not in sections:
                raise ConfigError(f"override key {dotted!r} must be section.key with section one of "
                                  f"{', '.join(sorted(sections))}")
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as exc:
                raise ConfigError(f"cannot parse the value of {dotted}: {exc}") from None
            target = getattr(cfg, parts[0])
            if isinstance(getattr(target, parts[1], None), str) and not isinstance(value, str) and value is not None:
                value = raw.strip()  # e.g. task.labels=0,1 or task.text_column=2017 stay text
            apply_section(target, parts[0], {parts[1]: value})
        return cfg.validate()

    def validate(self) -> "FinetuneConfig":
        self.train.validate()
        self.model.validate()
        if self.task.max_seq_length < 0 or 0 < self.task.max_seq_length < 8:
            raise ConfigError(f"task.max_seq_length must be 0 (auto) or at least 8, got {self.task.max_seq_length}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Models (Hugging Face parameter names, so the state dict *is* the HF checkpoint)
# --------------------------------------------------------------------------------------------
class ElectraModel(ElectraBody):
    """HF ``ElectraModel``: embeddings + (embeddings_project) + encoder, built from the pretraining
    blocks so the same attention kernels run. Returns rows in a :class:`TokenLayout` (packed real
    tokens when the Triton attention runs with ``unpad``, else the flattened padded batch)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.num_layers, cfg)
        self.config = cfg
        self.embeddings = ElectraEmbeddings(cfg)
        # A fresh encoder is initialised as HF's / the pretraining model's (a random-init baseline is
        # meaningful); loading a checkpoint overwrites all of it.
        init_weights(self, self.config.initializer_range)

    def layout(self, attention_mask: torch.Tensor) -> TokenLayout:
        return token_layout(self.config, attention_mask)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):  # noqa: D401 - see class doc
        """(B, S) ids -> (rows (T, hidden), layout)."""
        attention_mask, token_type_ids = check_encoder_inputs(self.config, input_ids, attention_mask, token_type_ids)
        layout = self.layout(attention_mask)
        return encode_tokens(self.embeddings, super().forward, input_ids, token_type_ids, layout), layout


def _init_linear(module: nn.Linear, std: float) -> None:
    """HF ElectraPreTrainedModel._init_weights: N(0, initializer_range) weight, zero bias."""
    nn.init.normal_(module.weight, mean=0.0, std=std)
    nn.init.zeros_(module.bias)


class ElectraClassificationHead(nn.Module):
    """HF ``ElectraClassificationHead``: dropout, dense, GELU, dropout, out_proj on the [CLS] row."""

    def __init__(self, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden, num_labels)

    def forward(self, cls_rows: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(F.gelu(self.dense(self.dropout(cls_rows)))))


class ElectraForSequenceClassification(nn.Module):
    """Sentence(-pair) classification or regression (num_labels == 1) on the [CLS] representation."""

    kind = "sequence"

    def __init__(self, cfg: ModelConfig, num_labels: int):
        super().__init__()
        self.num_labels = num_labels
        self.electra = ElectraModel(cfg)
        self.classifier = ElectraClassificationHead(cfg.hidden_size, num_labels, cfg.dropout)
        self.reset_head()

    def reset_head(self) -> None:
        for layer in (self.classifier.dense, self.classifier.out_proj):
            _init_linear(layer, self.electra.config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """(B, S) -> (B, num_labels) float32 logits (the score for regression)."""
        rows, layout = self.electra(input_ids, attention_mask, token_type_ids)
        first = torch.arange(layout.batch, device=input_ids.device) * layout.seq_len  # [CLS] is position 0
        return self.classifier(rows.index_select(0, layout.row_of(first))).float()


class ElectraForTokenClassification(nn.Module):
    """HF ``ElectraForTokenClassification``: dropout + linear on every token's final hidden state."""

    kind = "token"

    def __init__(self, cfg: ModelConfig, num_labels: int):
        super().__init__()
        self.num_labels = num_labels
        self.electra = ElectraModel(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        self.reset_head()

    def reset_head(self) -> None:
        _init_linear(self.classifier, self.electra.config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, positions=None) -> torch.Tensor:
        """``positions`` (N,) flat indices b*S+s of real tokens -> (N, num_labels) logits at just those
        tokens (training labels only first sub-words); None -> (B, S, num_labels), zeros at padding
        when packed. float32."""
        rows, layout = self.electra(input_ids, attention_mask, token_type_ids)
        if positions is not None:
            return self.classifier(self.dropout(rows.index_select(0, layout.row_of(positions)))).float()
        return layout.unflatten(self.classifier(self.dropout(rows)).float())


# --------------------------------------------------------------------------------------------
# Loading the pretrained encoder and its tokenizer
# --------------------------------------------------------------------------------------------
_ENCODER_PREFIXES = ("embeddings.", "embeddings_project.", "encoder.")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A run folder (-> export/discriminator), an export folder (-> discriminator) or a model folder."""
    path = Path(path)
    for candidate in (path / "export" / "discriminator", path / "discriminator", path):
        if (candidate / "config.json").is_file():
            return candidate
    if not path.exists():
        raise FinetuneError(f"{path}: --model does not exist")
    raise FinetuneError(
        f"{path}: not an ELECTRA discriminator: no config.json in it, in its discriminator/ or in "
        "export/discriminator/ (give a pretraining run folder, an export, or a Hugging Face model folder)"
    )


def _check_model_folder(path: str | os.PathLike) -> Path:
    """The discriminator folder, after the cheap checks (config.json says ELECTRA and not a
    generator); the weights are checked when they are loaded."""
    folder = resolve_model_dir(path)
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except (ValueError, OSError) as exc:
        raise FinetuneError(f"{folder / 'config.json'}: cannot read it: {exc}") from None
    if not isinstance(hf_config, dict) or hf_config.get("model_type") != "electra":
        found = hf_config.get("model_type") if isinstance(hf_config, dict) else type(hf_config).__name__
        raise FinetuneError(f"not an ELECTRA discriminator: {folder}: model_type is {found!r}, expected 'electra'")
    architectures = hf_config.get("architectures") or []
    if any(a in ("ElectraForMaskedLM", "ElectraForCausalLM") for a in architectures):
        raise FinetuneError(f"{folder}: this is an ELECTRA generator ({architectures[0]}); fine-tune the "
                            "discriminator (the export's discriminator/ folder)")
    if hf_config.get("hidden_act", "gelu") != "gelu":
        raise FinetuneError(f"{folder}: hidden_act {hf_config['hidden_act']!r} is not supported (ELECTRA uses gelu)")
    return folder


def _encoder_state(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """HF names (``electra.`` prefix, or a bare ElectraModel) -> ElectraModel's, heads dropped."""
    prefixed = any(k.startswith("electra.") for k in state)
    out = {}
    for name, tensor in state.items():
        if prefixed:
            if not name.startswith("electra."):
                continue  # discriminator_predictions / classifier heads
            name = name[len("electra."):]
        if name.startswith(_ENCODER_PREFIXES) and not name.endswith(("position_ids", "token_type_ids")):
            out[name] = tensor
    if not out:
        raise FinetuneError(f"{where}: no ELECTRA encoder weights (expected electra.embeddings.*, "
                            f"electra.encoder.layer.*; found e.g. {sorted(state)[:4]})")
    return out


def _load_state_into(encoder: "ElectraModel", state: dict[str, torch.Tensor], where: str) -> None:
    try:
        result = encoder.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: config.json and the weights disagree
        raise FinetuneError(f"{where}: weights do not fit the model described by config.json: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise FinetuneError(f"{where}: weights do not match an ELECTRA encoder (missing: {result.missing_keys[:6]}, "
                            f"unexpected: {result.unexpected_keys[:6]})")


def _apply_model_options(cfg: ModelConfig, options: ModelOptions | None) -> ModelConfig:
    cfg = copy.copy(cfg)
    for key, value in dataclasses.asdict(options or ModelOptions()).items():
        setattr(cfg, key, value)
    return cfg


def load_encoder(source, options: ModelOptions | None = None) -> tuple[ElectraModel, dict]:
    """The pretrained encoder on the CPU in fp32, and the HF config dict to base the saved one on.

    ``source``: a folder (see :func:`resolve_model_dir`), an ``ElectraPretrainingModel`` (embeddings +
    discriminator copied) or an :class:`ElectraModel` (copied)."""
    from .hf import ExportError, hf_config_dict, model_config_from_hf, read_hf_folder
    from .model import ElectraPretrainingModel

    if isinstance(source, ElectraPretrainingModel):
        cfg = _apply_model_options(source.config, options)
        encoder = ElectraModel(cfg)
        state = {k: v for k, v in source.state_dict().items() if k.startswith("embeddings.")}
        state.update({k[len("discriminator."):]: v for k, v in source.state_dict().items()
                      if k.startswith("discriminator.")})
        _load_state_into(encoder, {k: v.detach().float().cpu() for k, v in state.items()}, "ElectraPretrainingModel")
        return encoder, hf_config_dict(cfg, "discriminator")
    if isinstance(source, ElectraModel):
        cfg = _apply_model_options(source.config, options)
        encoder = ElectraModel(cfg)
        _load_state_into(encoder, {k: v.detach().float().cpu() for k, v in source.state_dict().items()}, "ElectraModel")
        return encoder, hf_config_dict(cfg, "discriminator")
    if not isinstance(source, (str, os.PathLike)):
        raise FinetuneError(f"cannot fine-tune a {type(source).__name__}: give a model folder, an "
                            "ElectraPretrainingModel or an ElectraModel")

    folder = _check_model_folder(source)
    try:
        hf_config, state = read_hf_folder(folder)
    except ExportError as exc:
        raise FinetuneError(f"not an ELECTRA discriminator: {exc}") from None
    except (ValueError, OSError, RuntimeError) as exc:  # unreadable or corrupt weights
        raise FinetuneError(f"{folder}: cannot read the model: {exc}") from None
    try:
        cfg = model_config_from_hf(hf_config, None)
    except KeyError as exc:
        raise FinetuneError(f"{folder / 'config.json'}: lacks {exc} (not an ELECTRA config)") from None
    if cfg.hidden_size % cfg.num_heads:
        raise FinetuneError(f"{folder / 'config.json'}: hidden_size {cfg.hidden_size} is not divisible by "
                            f"num_attention_heads {cfg.num_heads}")
    cfg = _apply_model_options(cfg, options)
    encoder = ElectraModel(cfg)
    _load_state_into(encoder, {k: v.float() for k, v in _encoder_state(state, str(folder)).items()}, str(folder))
    hf_config = dict(hf_config, _name_or_path=str(folder))
    return encoder, hf_config


def load_tokenizer(source):
    """:func:`electra_fast.data.load_tokenizer` (a folder, a tokenizer.json / vocab.txt path or a
    tokenizer; never pads or truncates), with its errors as FinetuneError."""
    from .data import DataError
    from .data import load_tokenizer as load

    try:
        return load(source)
    except DataError as exc:
        raise FinetuneError(str(exc)) from None


@dataclass
class _Specials:
    cls: int
    sep: int
    pad: int


def _special_ids(tokenizer, cfg: ModelConfig) -> _Specials:
    """[CLS]/[SEP]/[PAD] from the tokenizer's vocabulary (falling back to the model config's ids)."""
    ids = {}
    for name, token, fallback in (("cls", "[CLS]", cfg.cls_token_id), ("sep", "[SEP]", cfg.sep_token_id),
                                  ("pad", "[PAD]", cfg.pad_token_id)):
        found = tokenizer.token_to_id(token)
        ids[name] = fallback if found is None else found
    vocab = tokenizer.get_vocab_size()
    if vocab > cfg.vocab_size:
        raise FinetuneError(f"the tokenizer has {vocab} tokens but the model's vocab_size is {cfg.vocab_size} "
                            "(tokenizer and model do not belong together)")
    return _Specials(**ids)


# --------------------------------------------------------------------------------------------
# Featurisation: [CLS] a [SEP] (b [SEP]), token types 0/1; first sub-word positions for tagging
# --------------------------------------------------------------------------------------------
@dataclass
class _Features:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list  # class id / float per sequence, or tag ids per word (all words, for scoring)
    word_positions: list[list[int]] | None = None  # tagging: sequence position of each kept word's first piece


def _truncate_pair(a: list[int], b: list[int], budget: int) -> None:
    """The reference's heuristic: drop the last token of the longer sequence until both fit."""
    while len(a) + len(b) > budget:
        (a if len(a) > len(b) else b).pop()


# Texts are encoded this many at a time: tokenizers' Encoding objects carry strings and offsets, and
# holding all of MNLI's at once would take gigabytes; only the ids (and word ids) are kept.
_ENCODE_CHUNK = 8192


def _encoded(tokenizer, inputs: Sequence, **kwargs) -> Iterable:
    for start in range(0, len(inputs), _ENCODE_CHUNK):
        yield from tokenizer.encode_batch(list(inputs[start:start + _ENCODE_CHUNK]), add_special_tokens=False,
                                          **kwargs)


def _encode_sequences(tokenizer, examples: Sequence[Example], max_len: int, specials: _Specials) -> _Features:
    pieces_a = [encoding.ids for encoding in _encoded(tokenizer, [e.text_a for e in examples])]
    # As the reference, an empty second text makes a single-sentence example.
    pair_index = [i for i, e in enumerate(examples) if e.text_b]
    pieces_b = dict(zip(pair_index, (encoding.ids for encoding in
                                     _encoded(tokenizer, [examples[i].text_b for i in pair_index]))))
    input_ids, token_types = [], []
    for i in range(len(examples)):
        a = list(pieces_a[i])
        b = list(pieces_b.get(i, ()))
        if b:
            _truncate_pair(a, b, max_len - 3)
            ids = [specials.cls, *a, specials.sep, *b, specials.sep]
            types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        else:
            ids = [specials.cls, *a[: max_len - 2], specials.sep]
            types = [0] * len(ids)
        input_ids.append(ids)
        token_types.append(types)
    return _Features(input_ids, token_types, [e.label for e in examples])


def _encode_words(tokenizer, sentences: Sequence[TaggedSentence], max_len: int, specials: _Specials) -> _Features:
    input_ids, token_types, word_positions = [], [], []
    encodings = _encoded(tokenizer, [s.words for s in sentences], is_pretokenized=True)
    for encoding, sentence in zip(encodings, sentences):
        ids, word_ids = list(encoding.ids[: max_len - 2]), encoding.word_ids[: max_len - 2]
        first = {}
        for position, word in enumerate(word_ids, start=1):  # +1: after [CLS]
            if word is not None and word not in first:
                first[word] = position
        # Words that lost all their pieces to truncation (or have none) keep no position; they are
        # scored as predicted "O" so the metric still counts their gold entities.
        word_positions.append([first.get(w, -1) for w in range(len(sentence.words))])
        input_ids.append([specials.cls, *ids, specials.sep])
        token_types.append([0] * (len(ids) + 2))
    return _Features(input_ids, token_types, [s.tags for s in sentences], word_positions)


def _featurize(tokenizer, spec: TaskSpec, examples, max_len: int, specials: _Specials) -> _Features:
    if spec.kind == "token-classification":
        return _encode_words(tokenizer, examples, max_len, specials)
    return _encode_sequences(tokenizer, examples, max_len, specials)


def _collate(features: _Features, indices: Sequence[int], pad_id: int, device: torch.device, kind: str):
    """Pad a batch to its longest sequence; tagging adds flat first-piece positions and their tags."""
    seq_len = max(len(features.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), seq_len), pad_id, dtype=torch.long)
    token_types = torch.zeros((len(indices), seq_len), dtype=torch.long)
    mask = torch.zeros((len(indices), seq_len), dtype=torch.bool)
    for row, i in enumerate(indices):
        n = len(features.input_ids[i])
        input_ids[row, :n] = torch.tensor(features.input_ids[i])
        token_types[row, :n] = torch.tensor(features.token_type_ids[i])
        mask[row, :n] = True
    batch = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types}
    if kind == "token-classification":
        positions, tags = [], []
        for row, i in enumerate(indices):
            for position, tag in zip(features.word_positions[i], features.labels[i]):
                if position >= 0:
                    positions.append(row * seq_len + position)
                    tags.append(tag)
        batch["positions"] = torch.tensor(positions, dtype=torch.long)
        batch["labels"] = torch.tensor(tags, dtype=torch.long)
    elif kind == "regression":
        batch["labels"] = torch.tensor([float(features.labels[i]) for i in indices], dtype=torch.float32)
    else:
        batch["labels"] = torch.tensor([features.labels[i] for i in indices], dtype=torch.long)
    non_blocking = device.type == "cuda"
    return {k: (v.pin_memory() if non_blocking else v).to(device, non_blocking=non_blocking) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# Optimiser: layer-wise learning rates and the reference schedule
# --------------------------------------------------------------------------------------------
def parameter_depth(name: str, num_layers: int) -> int:
    """google-research/electra ``_get_layer_lrs``: embeddings (and their projection) 0, encoder layer i
    i+1, anything else (the task head) num_layers + 2."""
    if name.startswith(("electra.embeddings.", "electra.embeddings_project.")):
        return 0
    prefix = "electra.encoder.layer."
    if name.startswith(prefix):
        return int(name[len(prefix):].split(".", 1)[0]) + 1
    return num_layers + 2


def _no_weight_decay(name: str) -> bool:
    """The reference excludes every variable whose name contains LayerNorm, layer_norm or bias."""
    return any(key in name for key in ("LayerNorm", "layer_norm", "bias"))


def layerwise_param_groups(model: nn.Module, lr: float, decay: float, weight_decay: float) -> list[dict]:
    """AdamW groups: lr · decay^(L+2−depth) per depth, weight decay off for LayerNorm and biases."""
    num_layers = model.electra.num_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth = parameter_depth(name, num_layers)
        no_decay = _no_weight_decay(name)
        group = groups.setdefault((depth, no_decay), {
            "params": [], "names": [], "depth": depth,
            "lr": lr * decay ** (num_layers + 2 - depth),
            "weight_decay": 0.0 if no_decay else weight_decay,
        })
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int) -> float:
    """Factor on each group's lr at update ``step`` (0-based): min(1, (t+1)/W) · (1 − t/T)."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warmup * max(0.0, 1.0 - step / total_steps)


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"train.device={name} but CUDA is not available")
    return device


def _size_of(cfg: ModelConfig, requested: str) -> str:
    if requested != "auto":
        return requested
    return "small" if cfg.hidden_size <= 256 else "base" if cfg.hidden_size <= 768 else "large"


def _higher_is_better(metric: str) -> bool:
    return metric != "mse"


def _build_model(spec: TaskSpec, encoder: ElectraModel) -> nn.Module:
    cls = ElectraForTokenClassification if spec.kind == "token-classification" else ElectraForSequenceClassification
    model = cls(encoder.config, spec.num_labels)
    model.electra.load_state_dict(encoder.state_dict())
    return model


def _amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 autocast on CUDA by default (fp32 master weights and optimizer state), none on the CPU."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, precision: str):
    dtype = _amp_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _forward_loss(model: nn.Module, batch: dict, kind: str) -> torch.Tensor:
    if kind == "token-classification":
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["positions"])
        if logits.shape[0] == 0:  # every word truncated away: a zero loss keeps the step count honest
            return logits.sum() * 0.0
        return F.cross_entropy(logits, batch["labels"])
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    if kind == "regression":
        return F.mse_loss(logits.squeeze(-1), batch["labels"])
    return F.cross_entropy(logits, batch["labels"])


@torch.no_grad()
def predict(model: nn.Module, features: _Features, spec: TaskSpec, batch_size: int, device: torch.device,
            precision: str = "auto", pad_id: int = 0) -> list:
    """Predicted class ids / scores per example, or tag ids per word (tagging)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(features.input_ids)), key=lambda i: len(features.input_ids[i]))  # less padding
    predictions: list = [None] * len(order)
    outside = spec.labels.index("O") if spec.kind == "token-classification" else 0
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batch = _collate(features, indices, pad_id, device, spec.kind)
        with _autocast(device, precision):
            if spec.kind == "token-classification":
                tags = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                             batch["positions"]).argmax(-1).tolist()
            else:
                logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        if spec.kind == "token-classification":
            cursor = 0
            for i in indices:
                sentence = []
                for position in features.word_positions[i]:
                    if position >= 0:
                        sentence.append(tags[cursor])
                        cursor += 1
                    else:
                        sentence.append(outside)
                predictions[i] = sentence
        else:
            values = logits[:, 0].tolist() if spec.kind == "regression" else logits.argmax(-1).tolist()
            for i, value in zip(indices, values):
                predictions[i] = value
    model.train(was_training)
    return predictions


def _evaluate(model, dev_features: dict[str, _Features], spec, options: TrainOptions, device, pad_id) -> dict:
    metrics = {}
    for split, features in dev_features.items():
        predictions = predict(model, features, spec, options.eval_batch_size, device, options.precision, pad_id)
        for name, value in score(spec, predictions, features.labels).items():
            metrics[name if split == "dev" else f"{split}_{name}"] = value
    return metrics


@dataclass
class _Recipe:
    size: str
    lr: float
    layerwise_lr_decay: float
    epochs: float
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int
    max_seq_length: int


def _recipe(spec: TaskSpec, cfg: ModelConfig, config: FinetuneConfig, num_train: int) -> _Recipe:
    train = config.train
    size = _size_of(cfg, train.size)
    lr = train.lr or PAPER_RECIPE[size]["lr"]
    decay = train.layerwise_lr_decay or PAPER_RECIPE[size]["layerwise_lr_decay"]
    epochs = train.epochs or spec.epochs
    max_len = config.task.max_seq_length or min(spec.default_max_seq_length, cfg.max_position_embeddings)
    if max_len > cfg.max_position_embeddings:
        raise FinetuneError(f"task.max_seq_length={max_len} exceeds the model's max_position_embeddings "
                            f"({cfg.max_position_embeddings})")
    steps_per_epoch = math.ceil(num_train / train.batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    return _Recipe(size, lr, decay, epochs, train.batch_size, steps_per_epoch, total,
                   int(round(train.warmup_fraction * total)), max(1, steps_per_epoch // train.evals_per_epoch),
                   max_len)


def _epoch_order(num_examples: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]


def make_optimizer(model: nn.Module, lr: float, decay: float, total_steps: int, warmup_steps: int,
                   options: TrainOptions, device: torch.device):
    """AdamW over :func:`layerwise_param_groups` and a LambdaLR applying :func:`lr_multiplier`, so
    group g's lr at update t is lr · decay^(L+2−depth_g) · min(1, (t+1)/W) · (1 − t/T)."""
    optimizer = torch.optim.AdamW(
        layerwise_param_groups(model, lr, decay, options.weight_decay),
        lr=lr, betas=(options.adam_beta1, options.adam_beta2), eps=options.adam_eps,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps))
    return optimizer, scheduler


# The loss is read back (a device sync) only every this many steps, and at evaluations.
_SYNC_EVERY = 10


def _train_seed(model: nn.Module, encoder_state: dict, spec: TaskSpec, train_features: _Features,
                dev_features: dict[str, _Features], recipe: _Recipe, config: FinetuneConfig, seed: int,
                device: torch.device, pad_id: int, selecting: str, on_eval) -> dict:
    options = config.train
    torch.manual_seed(seed)  # head init and dropout
    model.electra.load_state_dict(encoder_state)
    model.reset_head()
    model.train()
    optimizer, scheduler = make_optimizer(model, recipe.lr, recipe.layerwise_lr_decay, recipe.total_steps,
                                          recipe.warmup_steps, options, device)
    generator = torch.Generator().manual_seed(seed)  # data order
    parameters = [p for p in model.parameters() if p.requires_grad]
    sign = 1.0 if _higher_is_better(selecting) else -1.0

    from tqdm.auto import tqdm

    bar = tqdm(total=recipe.total_steps, desc=f"{spec.name} seed {seed}", unit="step", dynamic_ncols=True,
               disable=not options.progress, file=sys.stderr)
    history, best, smoothed_loss, step = [], None, None, 0
    loss_sum, loss_count = torch.zeros((), device=device), 0
    postfix: dict[str, str] = {}
    started = time.perf_counter()
    try:
        while step < recipe.total_steps:
            for indices in _epoch_order(len(train_features.input_ids), recipe.batch_size, generator):
                batch = _collate(train_features, indices, pad_id, device, spec.kind)
                with _autocast(device, options.precision):
                    loss = _forward_loss(model, batch, spec.kind)
                loss.backward()
                if options.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(parameters, options.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_sum += loss.detach()
                loss_count += 1
                bar.update(1)
                evaluate_now = step % recipe.eval_every == 0 or step == recipe.total_steps
                if loss_count == _SYNC_EVERY or evaluate_now:
                    mean_loss = loss_sum.item() / loss_count
                    if not math.isfinite(mean_loss):
                        raise FinetuneError(f"seed {seed}: the training loss became {mean_loss} by step {step} "
                                            f"(lr {recipe.lr:g}; try a lower train.lr)")
                    smoothed_loss = mean_loss if smoothed_loss is None else 0.7 * smoothed_loss + 0.3 * mean_loss
                    loss_sum.zero_()
                    loss_count = 0
                    postfix["loss"] = f"{smoothed_loss:.4f}"
                if evaluate_now:
                    metrics = _evaluate(model, dev_features, spec, options, device, pad_id)
                    entry = {"step": step, "epoch": round(step / recipe.steps_per_epoch, 3),
                             "train_loss": smoothed_loss, "metrics": metrics}
                    history.append(entry)
                    if best is None or sign * metrics[selecting] > sign * best["metrics"][selecting]:
                        best = entry
                    on_eval(seed, entry)
                    postfix[f"dev_{selecting}"] = f"{metrics[selecting]:.4f}"
                bar.set_postfix(postfix, refresh=False)
                if step >= recipe.total_steps:
                    break
    finally:
        bar.close()
    return {"final": history[-1]["metrics"], "best": best["metrics"], "best_step": best["step"],
            "best_epoch": best["epoch"], "history": history, "train_seconds": round(time.perf_counter() - started, 2)}


# --------------------------------------------------------------------------------------------
# Saving (HF ElectraForSequenceClassification / ElectraForTokenClassification folders)
# --------------------------------------------------------------------------------------------
def _hf_task_config(base: dict, spec: TaskSpec) -> dict:
    config = {k: v for k, v in base.items()
              if k not in ("id2label", "label2id", "num_labels", "problem_type", "_name_or_path", "finetuning_task")}
    token = spec.kind == "token-classification"
    names = spec.labels if spec.kind != "regression" else ["LABEL_0"]
    config.update(
        architectures=["ElectraForTokenClassification" if token else "ElectraForSequenceClassification"],
        num_labels=len(names),
        id2label={str(i): name for i, name in enumerate(names)},
        label2id={name: i for i, name in enumerate(names)},
        problem_type="regression" if spec.kind == "regression" else "single_label_classification",
        finetuning_task=spec.name,
        model_type="electra",
    )
    config["classifier_dropout"] = None  # the heads were trained with hidden_dropout_prob
    return config


def save_hf_model(state: dict[str, torch.Tensor], out_dir: str | os.PathLike, spec: TaskSpec, base_config: dict,
                  tokenizer=None, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write ``state`` (our model's state dict: HF names) as a transformers folder, atomically."""
    from safetensors.torch import save_file

    from .hf import write_tokenizer_config

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(_hf_task_config(base_config, spec), indent=2))
        # HF keeps query/key/value apart; our attention fuses them (split_qkv undoes it).
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in split_qkv(state).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        copied = False
        if tokenizer_dir is not None:
            for name in _TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
                    copied = True
        if not copied and tokenizer is not None and hasattr(tokenizer, "save"):
            tokenizer.save(str(tmp / "tokenizer.json"))
        has_tokenizer = (tmp / "vocab.txt").exists() or (tmp / "tokenizer.json").exists()
        if has_tokenizer and not (tmp / "tokenizer_config.json").exists():
            write_tokenizer_config(tmp, base_config.get("max_position_embeddings", 512))
    return out_dir


def _write_json(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2))


def _median(per_seed: dict, key: str) -> dict[str, float]:
    names = next(iter(per_seed.values()))[key].keys()
    return {name: statistics.median(run[key][name] for run in per_seed.values()) for name in names}


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def finetune_task(encoder_source, tokenizer, data: TaskData, config: FinetuneConfig | None = None,
                  seeds: Sequence[int] = (1,), out_dir: str | os.PathLike | None = None,
                  model_name: str = "") -> dict:
    """Fine-tune on already-read task data, once per seed. Returns the metrics dictionary (and writes
    ``out_dir/metrics.json`` + ``out_dir/model`` when ``out_dir`` is given)."""
    config = (config or FinetuneConfig()).validate()
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise FinetuneError(f"seeds must be distinct integers, got {seeds}")
    if not data.train:
        raise FinetuneError("no training examples")
    if not data.dev or not data.dev.get("dev"):
        raise FinetuneError("no dev examples")
    spec = data.spec
    tokenizer_dir = None  # where the saved model's tokenizer files are copied from
    if isinstance(encoder_source, (str, os.PathLike)):
        folder = resolve_model_dir(encoder_source)
        if tokenizer is None:
            tokenizer, tokenizer_dir = load_tokenizer(folder), folder
        model_name = model_name or str(folder)
    if tokenizer is None:
        raise FinetuneError("a tokenizer is required when the encoder is not a model folder")
    tokenizer = load_tokenizer(tokenizer)
    encoder, base_config = load_encoder(encoder_source, config.model)
    cfg = encoder.config
    specials = _special_ids(tokenizer, cfg)
    device = _resolve_device(config.train.device)
    recipe = _recipe(spec, cfg, config, len(data.train))

    train_features = _featurize(tokenizer, spec, data.train, recipe.max_seq_length, specials)
    dev_features = {split: _featurize(tokenizer, spec, examples, recipe.max_seq_length, specials)
                    for split, examples in data.dev.items()}
    selecting = data.selecting_metric
    model = _build_model(spec, encoder).to(device)
    encoder_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    del encoder

    if config.train.progress:
        packed = cfg.unpad and resolve_impl(cfg.attention_impl, device) == "triton"
        print(f"{spec.name}: {len(data.train)} train / {len(data.dev['dev'])} dev examples; {recipe.size} recipe: "
              f"lr {recipe.lr:g}, layer decay {recipe.layerwise_lr_decay:g}, {recipe.epochs:g} epochs = "
              f"{recipe.total_steps} steps (warm-up {recipe.warmup_steps}), batch {recipe.batch_size}, max length "
              f"{recipe.max_seq_length}; {device}, {'bf16' if _amp_dtype(device, config.train.precision) else 'fp32'}, "
              f"{resolve_impl(cfg.attention_impl, device)} attention{' on packed tokens' if packed else ''}",
              file=sys.stderr)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    sign = 1.0 if _higher_is_better(selecting) else -1.0
    best = {"value": None, "seed": None, "step": None, "metrics": None, "state": None}

    def on_eval(seed: int, entry: dict) -> None:
        value = entry["metrics"][selecting]
        if best["value"] is None or sign * value > sign * best["value"]:
            best.update(value=value, seed=seed, step=entry["step"], metrics=entry["metrics"])
            if out is not None and config.train.save_model:
                best["state"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    result = {
        "task": spec.name, "kind": spec.kind, "labels": spec.labels, "model": model_name,
        "selecting_metric": selecting, "higher_is_better": _higher_is_better(selecting),
        "seeds": seeds, "per_seed": {},
        "recipe": {**dataclasses.asdict(recipe), "device": str(device),
                   "precision": "bf16" if _amp_dtype(device, config.train.precision) else "fp32",
                   "attention": resolve_impl(cfg.attention_impl, device),
                   "packed": bool(cfg.unpad and resolve_impl(cfg.attention_impl, device) == "triton")},
        "num_examples": {"train": len(data.train), **{s: len(e) for s, e in data.dev.items()}},
        "files": data.files, "config": config.to_dict(),
        "versions": {"torch": torch.__version__, "electra_fast": _package_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for seed in seeds:
        run = _train_seed(model, encoder_state, spec, train_features, dev_features, recipe, config, seed,
                          device, specials.pad, selecting, on_eval)
        result["per_seed"][str(seed)] = run
        result["median"] = _median(result["per_seed"], "final")
        result["median_best"] = _median(result["per_seed"], "best")
        if out is not None and best["state"] is not None:
            save_hf_model(best["state"], out / "model", spec, base_config, tokenizer, tokenizer_dir)
            best["state"] = None  # written; the next improvement makes a new copy
            best["path"] = str(out / "model")
        result["best_checkpoint"] = {k: best.get(k) for k in ("seed", "step", "metrics", "path")}
        if out is not None:
            _write_json(out / "metrics.json", result)
    return result


def _package_version() -> str:
    from . import __version__

    return __version__


def finetune(model: str | os.PathLike, task: str, data_dir: str | os.PathLike, out_dir: str | os.PathLike | None,
             config: FinetuneConfig | None = None, seeds: Sequence[int] = (1,)) -> dict:
    """Read ``task`` from ``data_dir`` and fine-tune ``model`` (a run / export / HF folder) on it."""
    config = (config or FinetuneConfig()).validate()
    folder = _check_model_folder(model)  # fail on a wrong --model before reading large task files
    data = load_task(task, data_dir, config.task)
    return finetune_task(model, None, data, config, seeds, out_dir, model_name=str(folder))


def finetune_classifier(encoder, train_examples: Sequence, dev_examples: Sequence, *, num_labels: int,
                        tokenizer=None, config: FinetuneConfig | None = None, seeds: Sequence[int] = (1,),
                        out_dir: str | os.PathLike | None = None, label_names: Sequence[str] | None = None,
                        task_name: str = "classification") -> dict:
    """Fine-tune on in-memory (text_a, text_b or None, label) examples; see the module docstring.

    ``num_labels`` >= 2: labels are class ids 0..num_labels-1 (metrics accuracy, plus F1 and MCC for two
    classes); ``num_labels`` == 1: regression on float labels (Spearman, Pearson, MSE)."""
    if num_labels < 1:
        raise FinetuneError(f"num_labels must be >= 1, got {num_labels}")
    regression = num_labels == 1
    if label_names is not None and len(label_names) != num_labels:
        raise FinetuneError(f"label_names has {len(label_names)} names for num_labels={num_labels}")

    def convert(examples, split):
        out = []
        for i, example in enumerate(examples):
            where = f"{split}_examples[{i}]"
            if isinstance(example, Example):
                text_a, text_b, label = example.text_a, example.text_b, example.label
            else:
                try:
                    text_a, text_b, label = example
                except (TypeError, ValueError):
                    raise FinetuneError(f"{where}: expected (text_a, text_b or None, label), got {example!r}") from None
            if not isinstance(text_a, str) or not (text_b is None or isinstance(text_b, str)):
                raise FinetuneError(f"{where}: texts must be strings (text_b may be None)")
            if regression:
                if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
                    raise FinetuneError(f"{where}: regression label must be a finite number, got {label!r}")
                label = float(label)
            elif isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
                raise FinetuneError(f"{where}: label {label!r} is not a class id in 0..{num_labels - 1}")
            out.append(Example(text_a, text_b, label, where))
        return out

    if regression:
        spec = TaskSpec(task_name, "regression", [], ("spearman", "pearson", "mse"))
    else:
        names = list(label_names) if label_names is not None else [str(i) for i in range(num_labels)]
        metrics = ("accuracy", "f1", "mcc") if num_labels == 2 else ("accuracy",)
        spec = TaskSpec(task_name, "classification", names, metrics)
    data = TaskData(spec, convert(train_examples, "train"), {"dev": convert(dev_examples, "dev")})
    if config is not None and config.task.metric:
        if config.task.metric not in spec.metrics:
            raise FinetuneError(f"task.metric={config.task.metric!r} is not one of {spec.metrics}")
        data.selecting_metric = config.task.metric
    return finetune_task(encoder, tokenizer, data, config, seeds, out_dir)


# --------------------------------------------------------------------------------------------
# CLI (wired by electra_fast/cli.py as `electra-fast finetune`)
# --------------------------------------------------------------------------------------------
def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="pretraining run folder, export folder, or ElectraForPreTraining-style HF folder")
    parser.add_argument("--task", required=True,
                        help="cola, sst-2, mrpc, sts-b, qqp, mnli, qnli, rte, classification, regression, "
                             "token-classification")
    parser.add_argument("--data-dir", required=True, help="folder with the task's train and dev files")
    parser.add_argument("--out", required=True, help="output folder: metrics.json and model/ (best checkpoint)")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds; the median is reported (default: 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a fine-tuning option, e.g. train.lr=1e-4, task.text_column=review "
                             "(sections: task, train, model; repeatable)")


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise FinetuneError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise FinetuneError("--seeds is empty")
    return seeds


def _summary(result: dict) -> str:
    names = list(result["median"])
    lines = [f"{result['task']}: selecting metric {result['selecting_metric']} (final dev metrics per seed)"]
    lines.append("  " + "seed".ljust(8) + "".join(n[:18].rjust(20) for n in names))
    for seed, run in result["per_seed"].items():
        lines.append("  " + seed.ljust(8) + "".join(f"{run['final'][n]:20.4f}" for n in names))
    lines.append("  " + "median".ljust(8) + "".join(f"{result['median'][n]:20.4f}" for n in names))
    best = result["best_checkpoint"]
    lines.append(f"  best checkpoint: seed {best['seed']} step {best['step']} "
                 f"{result['selecting_metric']}={best['metrics'][result['selecting_metric']]:.4f}"
                 + (f" -> {best['path']}" if best.get("path") else ""))
    return "\n".join(lines)


def run_finetune(args: argparse.Namespace) -> int:
    try:
        config = FinetuneConfig.from_overrides(args.overrides)
        result = finetune(args.model, args.task, args.data_dir, args.out, config, _parse_seeds(args.seeds))
    except (FinetuneError, ConfigError) as exc:
        print(f"electra-fast finetune: error: {exc}", file=sys.stderr)
        return 2
    print(_summary(result))
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    return 0
