"""Hugging Face interop: export to / import from ``ElectraForPreTraining`` + ``ElectraForMaskedLM`` folders.

    to_hf(model, "runs/demo/export", tokenizer_dir="data/default")
    # -> runs/demo/export/discriminator  (ElectraForPreTraining.from_pretrained)
    #    runs/demo/export/generator      (ElectraForMaskedLM.from_pretrained)
    model = from_hf("runs/demo/export/discriminator", "runs/demo/export/generator")

Our parameter names are HF's with the shared embeddings hoisted out of each network (see model.py), so
the mapping is a rename. Folders are written as config.json + model.safetensors without importing
transformers (it is only needed to load them), into a temporary folder that is renamed at the end.
Reading uses safetensors (or ``torch.load(weights_only=True)`` for legacy ``pytorch_model.bin``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_directory
from .config import Config, ModelConfig, ObjectiveConfig
from .model import ElectraPretrainingModel


class ExportError(ValueError):
    """A folder that is not a usable ELECTRA model; the message names it."""


class WeightsFileError(ExportError):
    """A model folder's weights file exists but cannot be read (truncated, damaged, not weights)."""


_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")


def hf_config_dict(cfg: ModelConfig, network: str) -> dict:
    """The HF ``config.json`` of one network ("discriminator" or "generator") of our model."""
    generator = network == "generator"
    return {
        "architectures": ["ElectraForMaskedLM" if generator else "ElectraForPreTraining"],
        "model_type": "electra",
        "vocab_size": cfg.vocab_size,
        "embedding_size": cfg.embedding_size,
        "hidden_size": cfg.generator_hidden_size if generator else cfg.hidden_size,
        "num_hidden_layers": cfg.generator_num_layers if generator else cfg.num_layers,
        "num_attention_heads": cfg.generator_num_heads if generator else cfg.num_heads,
        "intermediate_size": cfg.generator_intermediate_size if generator else cfg.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.initializer_range,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "summary_type": "first",
        "summary_use_proj": True,
        "summary_activation": "gelu",
        "summary_last_dropout": 0.1,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        # Not read by transformers; lets from_hf restore the full vocabulary description.
        "electra_fast": {
            "special_token_ids": {k: getattr(cfg, f"{k}_token_id") for k in ("pad", "unk", "cls", "sep", "mask")},
            "generator_fraction": cfg.generator_fraction,
        },
    }


def _network_state(model: ElectraPretrainingModel, network: str) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names for one network (shared embeddings copied into both)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("embeddings."):
            state["electra." + name] = tensor
        elif name.startswith(network + "."):
            state["electra." + name[len(network) + 1:]] = tensor
        elif name.startswith(f"{network}_predictions."):
            state[name] = tensor
    if network == "generator":
        # A separate copy: safetensors stores no aliased tensors, and with both keys present the
        # folder loads with no missing keys whether or not the loader re-ties the weights.
        state["generator_lm_head.weight"] = model.embeddings.word_embeddings.weight.detach().clone()
        state["generator_lm_head.bias"] = model.generator_lm_head_bias.detach()
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _write_tokenizer(tokenizer_dir: Path | None, out: Path) -> None:
    if tokenizer_dir is None:
        return
    tokenizer_dir = Path(tokenizer_dir)
    found = [f for f in _TOKENIZER_FILES if (tokenizer_dir / f).is_file()]
    if not found:
        raise ExportError(f"{tokenizer_dir}: no vocab.txt or tokenizer.json to export with the model")
    for name in found:
        shutil.copyfile(tokenizer_dir / name, out / name)
    write_tokenizer_config(out)


def write_tokenizer_config(folder: Path, model_max_length: int = 512) -> None:
    """``tokenizer_config.json`` so that transformers' AutoTokenizer loads the folder's vocabulary."""
    fast = (folder / "tokenizer.json").exists()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ElectraTokenizerFast" if fast else "ElectraTokenizer", "do_lower_case": True,
        "model_max_length": model_max_length, "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
        "sep_token": "[SEP]", "mask_token": "[MASK]",
    }, indent=2))


def to_hf(model: ElectraPretrainingModel, out_dir: str | os.PathLike, tokenizer_dir: str | None = None,
          config: Config | None = None) -> Path:
    """Write ``out_dir/discriminator`` and ``out_dir/generator`` in Hugging Face format.

    The folder appears complete or not at all: it is written next to ``out_dir`` and renamed into place
    (an existing ``out_dir`` is replaced). ``config`` (optional) is saved as electra_fast_config.json.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        for network in ("discriminator", "generator"):
            folder = tmp / network
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(hf_config_dict(model.config, network), indent=2))
            save_file(_network_state(model, network), str(folder / "model.safetensors"), metadata={"format": "pt"})
            _write_tokenizer(tokenizer_dir, folder)
        if config is not None:
            (tmp / "electra_fast_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return out_dir


def read_hf_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, weights) of an HF ELECTRA folder; ExportError when it is not one."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{folder}: no config.json (not a Hugging Face model folder)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "electra":
        raise ExportError(f"{folder}: model_type is {config.get('model_type')!r}, expected 'electra'")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ExportError(f"{folder}: position_embedding_type {config['position_embedding_type']!r} is not supported")
    weights = next((folder / name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()),
                   None)
    if weights is None:
        raise ExportError(f"{folder}: no model.safetensors or pytorch_model.bin")
    try:
        if weights.suffix == ".safetensors":
            state = load_file(str(weights))
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types; any failure means one thing
        cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsFileError(f"{weights}: cannot be read ({type(exc).__name__}: {cause}); the file is truncated, "
                          "damaged or not a weights file") from exc
    return config, state


def model_config_from_hf(disc: dict, gen: dict | None) -> ModelConfig:
    """Our ModelConfig from HF discriminator (and optional generator) config dicts."""
    extra = disc.get("electra_fast", {})
    specials = extra.get("special_token_ids", {})
    cfg = ModelConfig(
        vocab_size=disc["vocab_size"], embedding_size=disc.get("embedding_size", disc["hidden_size"]),
        hidden_size=disc["hidden_size"], num_layers=disc["num_hidden_layers"], num_heads=disc["num_attention_heads"],
        intermediate_size=disc["intermediate_size"], max_position_embeddings=disc["max_position_embeddings"],
        type_vocab_size=disc["type_vocab_size"], dropout=disc.get("hidden_dropout_prob", 0.1),
        attention_dropout=disc.get("attention_probs_dropout_prob", 0.1), layer_norm_eps=disc.get("layer_norm_eps", 1e-12),
        initializer_range=disc.get("initializer_range", 0.02),
        generator_fraction=extra.get("generator_fraction", 0.25),
        pad_token_id=specials.get("pad", disc.get("pad_token_id", 0)),
    )
    if specials:
        cfg.unk_token_id, cfg.cls_token_id = specials["unk"], specials["cls"]
        cfg.sep_token_id, cfg.mask_token_id = specials["sep"], specials["mask"]
    elif cfg.vocab_size == 30522:  # Google's BERT/ELECTRA uncased vocabulary
        cfg.unk_token_id, cfg.cls_token_id, cfg.sep_token_id, cfg.mask_token_id = 100, 101, 102, 103
    if gen is not None:
        cfg.generator_fraction = gen["hidden_size"] / disc["hidden_size"]
        expected = (cfg.generator_hidden_size, cfg.generator_num_heads, cfg.generator_intermediate_size,
                    cfg.generator_num_layers, cfg.embedding_size, cfg.vocab_size)
        given = (gen["hidden_size"], gen["num_attention_heads"], gen["intermediate_size"], gen["num_hidden_layers"],
                 gen.get("embedding_size", gen["hidden_size"]), gen["vocab_size"])
        if expected != given:
            raise ExportError(
                "generator shape (hidden, heads, ffn, layers, embedding, vocab) = "
                f"{given} does not match the shape electra-fast derives from the discriminator: {expected}"
            )
    return cfg


def from_hf(discriminator_dir: str | os.PathLike, generator_dir: str | os.PathLike | None = None,
            objective: ObjectiveConfig | None = None, **model_overrides) -> ElectraPretrainingModel:
    """Build an ElectraPretrainingModel from HF folders; a fresh generator when none is given.

    ``model_overrides`` set ModelConfig fields that are not weights (e.g. attention_impl="torch").
    """
    disc_config, disc_state = read_hf_folder(discriminator_dir)
    gen_config, gen_state = read_hf_folder(generator_dir) if generator_dir is not None else (None, None)
    cfg = model_config_from_hf(disc_config, gen_config)
    for key, value in model_overrides.items():
        if not hasattr(cfg, key):
            raise ExportError(f"unknown model option {key!r}")
        setattr(cfg, key, value)
    model = ElectraPretrainingModel(cfg, objective)

    ours = {}
    for name, tensor in disc_state.items():
        if name.startswith("electra.embeddings."):
            ours[name[len("electra."):]] = tensor
        elif name.startswith("electra."):
            ours["discriminator." + name[len("electra."):]] = tensor
        elif name.startswith("discriminator_predictions."):
            ours[name] = tensor
    if gen_state is not None:
        for name, tensor in gen_state.items():
            if name.startswith("electra.embeddings."):
                continue  # shared: the discriminator's copy is the one we keep
            if name.startswith("electra."):
                ours["generator." + name[len("electra."):]] = tensor
            elif name.startswith("generator_predictions."):
                ours[name] = tensor
            elif name == "generator_lm_head.bias":
                ours["generator_lm_head_bias"] = tensor
    ours = {k: v for k, v in ours.items() if not k.endswith("position_ids")}
    result = model.load_state_dict(ours, strict=False)
    expected_missing = {n for n in result.missing_keys if gen_state is None and (
        n.startswith("generator") or n == "generator_lm_head_bias")}
    missing = sorted(set(result.missing_keys) - expected_missing)
    if missing or result.unexpected_keys:
        raise ExportError(
            f"{discriminator_dir}: weights do not match the model (missing: {missing[:8]}, "
            f"unexpected: {result.unexpected_keys[:8]})"
        )
    return model
