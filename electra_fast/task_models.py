"""The fine-tuning models and their folders: the encoder, the task heads, loading and saving.

    encoder, hf_config = load_encoder("runs/small")          # run / export / HF discriminator folder
    model = build_task_model(spec, encoder)                  # encoder weights copied, fresh head
    logits = model(input_ids, attention_mask, token_type_ids)
    save_hf_model(model.state_dict(), "out/model", spec, hf_config, tokenizer)

Parameter names are Hugging Face's, so the state dict *is* the HF checkpoint:
:class:`ElectraModel` is HF's ``ElectraModel`` (embeddings, ``embeddings_project``, encoder), built
from the pretraining blocks of :mod:`electra_fast.model` so the same attention kernels run;
:class:`ElectraForSequenceClassification` carries HF's ``ElectraClassificationHead`` (dropout,
dense, GELU, dropout, projection on the [CLS] row) and :class:`ElectraForTokenClassification` its
dropout + linear. A saved folder loads in transformers as ``ElectraForSequenceClassification`` /
``ElectraForTokenClassification``.

A model folder is a pretraining run (its ``export/discriminator``), an export (its
``discriminator``) or any ``ElectraForPreTraining``-style folder (``config.json`` + weights); a
folder that is not an ELECTRA discriminator is a :class:`~electra_fast.tasks.FinetuneError` naming it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_directory
from .config import ModelConfig
from .finetune_config import ModelOptions
from .model import (ElectraBody, ElectraEmbeddings, TokenLayout, check_encoder_inputs, encode_tokens, init_weights,
                    split_qkv, token_layout)
from .tasks import FinetuneError, TaskSpec

__all__ = [
    "ElectraClassificationHead",
    "ElectraForSequenceClassification",
    "ElectraForTokenClassification",
    "ElectraModel",
    "build_task_model",
    "check_model_folder",
    "load_encoder",
    "resolve_model_dir",
    "save_hf_model",
]


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


def build_task_model(spec: TaskSpec, encoder: ElectraModel) -> nn.Module:
    """The task's model (a sequence or a token classifier) with ``encoder``'s weights and a fresh head."""
    token = spec.kind == "token-classification"
    if encoder.config.architecture == "modern":  # transformers' ModernBERT heads (task_models_modern)
        from . import task_models_modern

        cls = task_models_modern.task_model_class(token)
    else:
        cls = ElectraForTokenClassification if token else ElectraForSequenceClassification
    model = cls(encoder.config, spec.num_labels)
    model.electra.load_state_dict(encoder.state_dict())
    return model


# --------------------------------------------------------------------------------------------
# Loading the pretrained encoder from a folder or a model
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


def check_model_folder(path: str | os.PathLike) -> Path:
    """The discriminator folder, after the cheap checks (config.json says ELECTRA and not a
    generator); the weights are checked when they are loaded."""
    folder = resolve_model_dir(path)
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except (ValueError, OSError) as exc:
        raise FinetuneError(f"{folder / 'config.json'}: cannot read it: {exc}") from None
    if isinstance(hf_config, dict) and hf_config.get("model_type") == "modernbert":
        if "ModernBertForMaskedLM" in (hf_config.get("architectures") or []) and "electra_fast" in hf_config:
            raise FinetuneError(f"{folder}: this is an ELECTRA generator (ModernBertForMaskedLM); fine-tune the "
                                "discriminator (the export's discriminator/ folder)")
        return folder  # a modern discriminator export, or any ModernBERT encoder (electra_fast.hf_modern checks it)
    if not isinstance(hf_config, dict) or hf_config.get("model_type") != "electra":
        found = hf_config.get("model_type") if isinstance(hf_config, dict) else type(hf_config).__name__
        raise FinetuneError(f"not an ELECTRA discriminator: {folder}: model_type is {found!r}, expected 'electra' "
                            "or 'modernbert'")
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


def encoder_class(cfg: ModelConfig):
    """ElectraModel, or the modern backbone's ModernEncoder (model.architecture=modern)."""
    if cfg.architecture == "modern":
        from .task_models_modern import ModernEncoder

        return ModernEncoder
    return ElectraModel


def _is_modern_encoder(source) -> bool:
    from .task_models_modern import ModernEncoder

    return isinstance(source, ModernEncoder)


def _hf_config_of(cfg: ModelConfig) -> dict:
    from .hf import hf_config_dict
    from .hf_modern import modernbert_config_dict

    return (modernbert_config_dict if cfg.architecture == "modern" else hf_config_dict)(cfg, "discriminator")


def load_encoder(source, options: ModelOptions | None = None) -> tuple[ElectraModel, dict]:
    """The pretrained encoder on the CPU in fp32, and the HF config dict to base the saved one on.

    ``source``: a folder (see :func:`resolve_model_dir`), an ``ElectraPretrainingModel`` (embeddings +
    discriminator copied) or an :class:`ElectraModel` (copied)."""
    from .hf import ExportError, WeightsFileError, model_config_from_hf, read_hf_folder
    from .model import ElectraPretrainingModel

    if isinstance(source, ElectraPretrainingModel):
        cfg = _apply_model_options(source.config, options)
        encoder = encoder_class(cfg)(cfg)
        state = source.network_state_dict("discriminator")  # the embeddings it reads, whatever the sharing
        _load_state_into(encoder, {k: v.detach().float().cpu() for k, v in state.items()}, "ElectraPretrainingModel")
        return encoder, _hf_config_of(cfg)
    if isinstance(source, ElectraModel) or _is_modern_encoder(source):
        cfg = _apply_model_options(source.config, options)
        encoder = encoder_class(cfg)(cfg)
        _load_state_into(encoder, {k: v.detach().float().cpu() for k, v in source.state_dict().items()}, "ElectraModel")
        return encoder, _hf_config_of(cfg)
    if not isinstance(source, (str, os.PathLike)):
        raise FinetuneError(f"cannot fine-tune a {type(source).__name__}: give a model folder, an "
                            "ElectraPretrainingModel or an ElectraModel")

    folder = check_model_folder(source)
    try:
        hf_config, state = read_hf_folder(folder)
    except WeightsFileError as exc:  # the file names itself and the cause
        raise FinetuneError(f"cannot read the model: {exc}") from None
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
    encoder = encoder_class(cfg)(cfg)
    if cfg.architecture == "modern":
        from .task_models_modern import encoder_state_from_hf

        encoder_state = encoder_state_from_hf(state)
    else:
        encoder_state = _encoder_state(state, str(folder))
    _load_state_into(encoder, {k: v.float() for k, v in encoder_state.items()}, str(folder))
    hf_config = dict(hf_config, _name_or_path=str(folder))
    return encoder, hf_config


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

    config = _hf_task_config(base_config, spec)
    if base_config.get("model_type") == "modernbert":  # ModernBertFor{Sequence,Token}Classification
        from . import task_models_modern

        config = task_models_modern.hf_task_config(config, spec.kind == "token-classification",
                                                   float(base_config.get("mlp_dropout", 0.0)))
        state = task_models_modern.hf_state(state)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
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
