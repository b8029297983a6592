"""Hugging Face interop: export to / import from ``ElectraForPreTraining`` + ``ElectraForMaskedLM`` folders
(and, for ``model.architecture: modern``, transformers' ModernBERT classes: :mod:`electra_fast.hf_modern`).

    to_hf(model, "runs/demo/export", tokenizer_dir="data/default")
    # -> runs/demo/export/discriminator  (ElectraForPreTraining.from_pretrained)
    #    runs/demo/export/generator      (ElectraForMaskedLM.from_pretrained)
    model = from_hf("runs/demo/export/discriminator", "runs/demo/export/generator")

Our parameter names are HF's with the shared embeddings hoisted out of each network (see model.py), so
the mapping is a rename, plus the fused QKV projection: export splits ``attention.self.qkv`` into HF's
``query``/``key``/``value`` (``split_qkv``), and import hands the three to the model, whose attention
module fuses them as the state dict loads.

Embedding sharing (``model.embedding_sharing``): each folder holds the embeddings its network reads
(``ElectraPretrainingModel.network_state_dict``), so both load in transformers whatever the mode. gdes
exports the discriminator's effective word table E_gen + E_delta and the generator's E_gen; importing
such a pair as gdes recovers E_delta = E_disc - E_gen (the other embedding tables, shared in gdes as in
tied, are the discriminator's). separate keeps the two folders' embeddings apart. An import as tied
keeps the discriminator's embeddings for both networks.

Generator shape: the generator folder's own shape is used whether or not it follows the rules
electra-fast derives from the discriminator (``ModelConfig.set_generator_shape``); without a generator
folder a fresh generator is built by the rules, recorded in the discriminator's config.json.

Folders are written as config.json + model.safetensors without importing transformers (it is only
needed to load them), into a temporary folder that is renamed at the end.
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
from .config import Config, ConfigError, ModelConfig, ObjectiveConfig
from .model import ElectraPretrainingModel, split_qkv
from . import hf_modern


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
        "electra_fast": hf_modern.export_record(cfg),
    }


def _network_state(model: ElectraPretrainingModel, network: str) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names for one network, with the embeddings that network reads (shared ones
    copied into both)."""
    # HF keeps query/key/value apart.
    state = {"electra." + name: tensor for name, tensor in split_qkv(model.network_state_dict(network)).items()}
    state.update({name: tensor for name, tensor in model.state_dict().items()
                  if name.startswith(f"{network}_predictions.")})
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


def _special_tokens_of(tokenizer_json: Path) -> dict[str, str]:
    """role -> token string of a given tokenizer.json (no vocab.txt beside it): its special tokens in the
    usual spellings (electra_fast.tokenizer_roles names them)."""
    from .tokenizer_roles import SPELLINGS

    added = {t["content"] for t in json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens", [])}
    return {role: next(t for t in spellings if t in added) for role, spellings in SPELLINGS.items()
            if any(t in added for t in spellings)}


def write_tokenizer_config(folder: Path, model_max_length: int = 512) -> None:
    """``tokenizer_config.json`` so that transformers' AutoTokenizer loads the folder's vocabulary."""
    fast = (folder / "tokenizer.json").exists()
    if fast and not (folder / "vocab.txt").exists():  # a given tokenizer (prepare --tokenizer; BPE, ...)
        roles = _special_tokens_of(folder / "tokenizer.json")  # the generic fast class reads tokenizer.json
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
            **{f"{role}_token": token for role, token in roles.items()}}, indent=2))
        return
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
            modern = model.config.architecture == "modern"  # transformers' ModernBERT classes (hf_modern)
            config_dict = (hf_modern.modernbert_config_dict if modern else hf_config_dict)(model.config, network)
            state = (hf_modern.export_state if modern else _network_state)(model, network)
            (folder / "config.json").write_text(json.dumps(config_dict, indent=2))
            save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
            _write_tokenizer(tokenizer_dir, folder)
        if config is not None:
            (tmp / "electra_fast_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return out_dir


def read_hf_config(folder: str | os.PathLike) -> dict:
    """config.json of an HF ELECTRA folder as a dict; ExportError when it is not one."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{folder}: no config.json (not a Hugging Face model folder)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") == "modernbert":
        return config
    if config.get("model_type") != "electra":
        raise ExportError(f"{folder}: model_type is {config.get('model_type')!r}, expected 'electra' or 'modernbert'")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ExportError(f"{folder}: position_embedding_type {config['position_embedding_type']!r} is not supported")
    return config


def read_hf_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, weights) of an HF ELECTRA folder; ExportError when it is not one,
    WeightsFileError when its weights file cannot be read."""
    folder = Path(folder)
    config = read_hf_config(folder)
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
    if disc.get("model_type") == "modernbert" or (gen or {}).get("model_type") == "modernbert":
        if disc.get("model_type") != (gen or disc).get("model_type"):
            raise ExportError("the discriminator and generator folders are different architectures "
                              f"({disc.get('model_type')} and {gen.get('model_type')})")
        try:
            return hf_modern.model_config_from_modernbert(disc, gen)
        except hf_modern.ModernExportError as exc:
            raise ExportError(str(exc)) from None
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
    cfg.generator_layers = float(extra.get("generator_layers", 1.0))
    if gen is not None:
        adopt_generator_shape(cfg, gen)
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ExportError(f"the model folder's shape cannot be built: {exc}") from None
    return cfg


def adopt_generator_shape(cfg: ModelConfig, gen: dict) -> None:
    """Give ``cfg`` the generator of an HF config dict: the width and depth fractions it implies (so a
    generator that follows the rules stays described by them), explicit sizes where it does not."""
    shared = (gen.get("embedding_size", gen["hidden_size"]), gen["vocab_size"],
              gen.get("max_position_embeddings", cfg.max_position_embeddings),
              gen.get("type_vocab_size", cfg.type_vocab_size))
    expected = (cfg.embedding_size, cfg.vocab_size, cfg.max_position_embeddings, cfg.type_vocab_size)
    if shared != expected:
        raise ExportError(
            "generator shape (embedding, vocab, positions, segment types) = "
            f"{shared} does not match the discriminator's {expected}: the two networks' embeddings must have one shape"
        )
    hidden, heads = gen["hidden_size"], gen["num_attention_heads"]
    if hidden % heads:
        raise ExportError(f"generator shape: hidden size {hidden} is not divisible by its {heads} heads")
    cfg.generator_fraction = min(1.0, hidden / cfg.hidden_size)
    cfg.generator_layers = min(1.0, gen["num_hidden_layers"] / cfg.num_layers)
    cfg.set_generator_shape(hidden, heads, gen["intermediate_size"], gen["num_hidden_layers"])


def from_hf(discriminator_dir: str | os.PathLike, generator_dir: str | os.PathLike | None = None,
            objective: ObjectiveConfig | None = None, **model_overrides) -> ElectraPretrainingModel:
    """Build an ElectraPretrainingModel from HF folders; a fresh generator when none is given.

    ``model_overrides`` set ModelConfig fields that are not weights (e.g. attention_impl="torch"), among
    them ``embedding_sharing``: how to read the pair (default: the mode an electra-fast export recorded,
    else tied), e.g. ``embedding_sharing="gdes"`` recovers E_delta = E_disc - E_gen.
    """
    disc_config, disc_state = read_hf_folder(discriminator_dir)
    gen_config, gen_state = read_hf_folder(generator_dir) if generator_dir is not None else (None, None)
    cfg = model_config_from_hf(disc_config, gen_config)
    if cfg.architecture != "modern":  # (modern: decided by model_config_from_hf, from the widths too)
        cfg.embedding_sharing = disc_config.get("electra_fast", {}).get("embedding_sharing", "tied")
    elif "electra_fast" not in disc_config:  # a released ModernBERT: [MASK] and [UNK] are in its tokenizer only
        from .tokenizer_roles import folder_roles

        for role, token_id in (folder_roles(discriminator_dir) or {}).items():
            setattr(cfg, f"{role}_token_id", token_id)
    for key, value in model_overrides.items():
        if not hasattr(cfg, key):
            raise ExportError(f"unknown model option {key!r}")
        setattr(cfg, key, value)
    model = ElectraPretrainingModel(cfg, objective)
    load_hf_state(model, disc_state, gen_state, where=str(discriminator_dir))
    return model


def _embeddings_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "electra.embeddings."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.endswith("position_ids")}


def load_hf_state(model: ElectraPretrainingModel, disc_state: dict[str, torch.Tensor],
                  gen_state: dict[str, torch.Tensor] | None, where: str = "the model folder") -> None:
    """Load HF discriminator (and optional generator) weights into ``model`` as its sharing mode reads
    them (see the module docstring); without generator weights the generator keeps the model's own
    (fresh) weights, and in tied / gdes mode shares the imported embeddings. ExportError naming
    ``where`` when the weights do not fit the model."""
    fresh_head: tuple[str, ...] = ()
    if model.config.architecture == "modern":
        ours, disc_embeddings, gen_embeddings, has_rtd_head = hf_modern.hf_state_to_ours(disc_state, gen_state)
        if not has_rtd_head:  # a masked-LM (or bare encoder) folder as the discriminator: a fresh RTD head
            fresh_head = ("discriminator_predictions.",)
    else:
        ours, disc_embeddings, gen_embeddings = _electra_state_to_ours(disc_state, gen_state)
    _load_shared(model, ours, disc_embeddings, gen_embeddings, gen_state is not None, fresh_head, where)


def _electra_state_to_ours(disc_state, gen_state):
    ours = {}
    for name, tensor in disc_state.items():
        if name.startswith("electra.") and not name.startswith("electra.embeddings."):
            ours["discriminator." + name[len("electra."):]] = tensor
        elif name.startswith("discriminator_predictions."):
            ours[name] = tensor
    if gen_state is not None:
        for name, tensor in gen_state.items():
            if name.startswith("electra.") and not name.startswith("electra.embeddings."):
                ours["generator." + name[len("electra."):]] = tensor
            elif name.startswith("generator_predictions."):
                ours[name] = tensor
            elif name == "generator_lm_head.bias":
                ours["generator_lm_head_bias"] = tensor
    disc_embeddings = _embeddings_of(disc_state)
    gen_embeddings = _embeddings_of(gen_state) if gen_state is not None else None
    return ours, disc_embeddings, gen_embeddings


def _load_shared(model, ours, disc_embeddings, gen_embeddings, has_generator: bool, fresh_head: tuple[str, ...],
                 where: str) -> None:
    """Load ``ours`` plus the embeddings as the model's sharing mode reads them (module docstring)."""
    sharing = model.config.embedding_sharing
    if sharing == "separate":
        ours.update({"discriminator_embeddings." + k: v for k, v in disc_embeddings.items()})
        ours.update({"embeddings." + k: v for k, v in (gen_embeddings or {}).items()})
    else:  # tied, gdes: one embedding module, the discriminator's tables
        ours.update({"embeddings." + k: v for k, v in disc_embeddings.items()})
    if sharing == "gdes" and "word_embeddings.weight" in disc_embeddings:
        disc_words = disc_embeddings["word_embeddings.weight"]
        gen_words = disc_words if gen_embeddings is None else gen_embeddings.get("word_embeddings.weight", disc_words)
        if gen_words.shape != disc_words.shape:
            raise ExportError(f"{where}: the generator's word table {tuple(gen_words.shape)} and the "
                              f"discriminator's {tuple(disc_words.shape)} differ in shape")
        ours["embeddings.word_embeddings.weight"] = gen_words
        ours["discriminator_word_embeddings_delta"] = disc_words.float() - gen_words.float()
    result = model.load_state_dict(ours, strict=False)
    fresh_generator = ("generator.", "generator_predictions.", "generator_lm_head_bias")
    if sharing == "separate":
        fresh_generator += ("embeddings.",)
    missing = sorted(n for n in result.missing_keys
                     if not (not has_generator and n.startswith(fresh_generator)) and not n.startswith(fresh_head))
    if missing or result.unexpected_keys:
        raise ExportError(
            f"{where}: weights do not match the model (missing: {missing[:8]}, "
            f"unexpected: {result.unexpected_keys[:8]})"
        )
