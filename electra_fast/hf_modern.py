"""Hugging Face interop of the modern backbone: transformers' ModernBERT classes, both ways.

    to_hf(model, "runs/modern/export")          # electra_fast.hf.to_hf sends modern models here
    # -> export/generator      ModernBertForMaskedLM.from_pretrained (AutoModelForMaskedLM)
    #    export/discriminator  ModernBertForTokenClassification with one label
    #                          (AutoModelForTokenClassification: the replaced-token logit per token);
    #                          AutoModel loads its encoder as ModernBertModel
    model = from_hf("export/discriminator", "export/generator")
    model = from_hf("answerdotai/ModernBERT-base folder")     # a released ModernBertForMaskedLM: RTD on it

Why ModernBertForTokenClassification for the discriminator: it is transformers' own class whose forward is
exactly the discriminator's head (the prediction head dense -> GELU -> LayerNorm, dropout, then a Linear
to ``num_labels`` outputs with a bias), so with one label its logits are the replaced-token logits and the
folder loads with no custom code. Its encoder sits under ``model.``, the prefix ModernBertModel loads from,
so ``AutoModel.from_pretrained`` finds every encoder key (the head's are the only ones it leaves out).

Names: ours are ModernBertModel's minus the embeddings (see :mod:`electra_fast.modern`); the embedding
module's ``word_embeddings`` is transformers' ``tok_embeddings``. Import accepts ModernBertForMaskedLM,
ModernBertForTokenClassification and ModernBertModel folders (weights with or without ``model.``); a
discriminator read from a masked-LM folder gets a fresh replaced-token head, a missing generator a fresh
one by the config's rules. Embedding sharing follows electra_fast.hf (each folder holds the table its
network reads; gdes recovers the delta).
"""

from __future__ import annotations

import torch

from .config import ConfigError, ModelConfig
from .modern import layer_types

# Options of a ModernBERT config this backbone does not build (value -> what we need).
_FIXED = {"norm_bias": False, "attention_bias": False, "mlp_bias": False, "decoder_bias": True,
          "classifier_bias": False}
_ACTIVATIONS = ("hidden_activation", "classifier_activation")


class ModernExportError(ValueError):
    """Raised as electra_fast.hf.ExportError by the caller (this module does not import hf)."""


def export_record(cfg: ModelConfig) -> dict:
    """The ``electra_fast`` block of an exported config.json (both architectures; transformers does not
    read it): what from_hf needs to restore the vocabulary description and the generator's shape."""
    return {
        "special_token_ids": {k: getattr(cfg, f"{k}_token_id") for k in ("pad", "unk", "cls", "sep", "mask")},
        "generator_fraction": cfg.generator_fraction,
        "generator_layers": cfg.generator_layers,
        "embedding_sharing": cfg.embedding_sharing,
    }


def modernbert_config_dict(cfg: ModelConfig, network: str) -> dict:
    """The transformers ``config.json`` of one network ("generator" / "discriminator")."""
    generator = network == "generator"
    hidden = cfg.generator_hidden_size if generator else cfg.hidden_size
    layers = cfg.generator_num_layers if generator else cfg.num_layers
    extra = {
        "architectures": ["ModernBertForMaskedLM"] if generator else ["ModernBertForTokenClassification"],
    }
    if not generator:
        extra.update(num_labels=1, id2label={"0": "replaced"}, label2id={"replaced": 0})
    return {
        **extra,
        "model_type": "modernbert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": hidden,
        "intermediate_size": cfg.generator_intermediate_size if generator else cfg.intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": cfg.generator_num_heads if generator else cfg.num_heads,
        "hidden_activation": "gelu",
        "classifier_activation": "gelu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "initializer_cutoff_factor": 2.0,
        "norm_eps": cfg.layer_norm_eps,
        "norm_bias": False,
        "pad_token_id": cfg.pad_token_id,
        "cls_token_id": cfg.cls_token_id,
        "sep_token_id": cfg.sep_token_id,
        "bos_token_id": cfg.cls_token_id,
        "eos_token_id": cfg.sep_token_id,
        "attention_bias": False,
        "attention_dropout": cfg.attention_dropout,
        "embedding_dropout": cfg.dropout,
        "mlp_bias": False,
        "mlp_dropout": cfg.dropout,
        "classifier_bias": False,
        "classifier_dropout": 0.0,
        "decoder_bias": True,
        "local_attention": cfg.local_attention,
        "global_attn_every_n_layers": cfg.global_attn_every_n_layers,
        "layer_types": layer_types(layers, cfg.global_attn_every_n_layers),
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": cfg.global_rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}},
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "electra_fast": export_record(cfg),
    }


def export_state(model, network: str) -> dict[str, torch.Tensor]:
    """One network's weights under the transformers class's names (with the embeddings it reads)."""
    state = {}
    for name, tensor in model.network_state_dict(network).items():
        state["model." + name.replace("embeddings.word_embeddings.", "embeddings.tok_embeddings.")] = tensor
    own = model.state_dict()
    if network == "generator":
        state["head.dense.weight"] = own["generator_predictions.dense.weight"]
        state["head.norm.weight"] = own["generator_predictions.norm.weight"]
        # A copy: safetensors stores no aliased tensors; with the key present the folder loads whether or
        # not the loader re-ties the decoder to the table.
        state["decoder.weight"] = model.embeddings.word_embeddings.weight.detach().clone()
        state["decoder.bias"] = own["generator_lm_head_bias"]
    else:
        for ours, theirs in (("head.dense.weight", "head.dense.weight"), ("head.norm.weight", "head.norm.weight"),
                             ("dense_prediction.weight", "classifier.weight"),
                             ("dense_prediction.bias", "classifier.bias")):
            state[theirs] = own["discriminator_predictions." + ours]
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _theta(config: dict, kind: str, legacy: str, default: float) -> float:
    params = (config.get("rope_parameters") or {}).get(kind) or {}
    return float(params.get("rope_theta", config.get(legacy, default)))


def _every_n(config: dict, layers: int, where: str) -> int:
    """global_attn_every_n_layers of a config, checked against its layer_types (when it lists them)."""
    every = int(config.get("global_attn_every_n_layers", 3))
    types = config.get("layer_types")
    if types is not None and list(types) != layer_types(layers, every):
        found = [n for n in range(1, layers + 1) if list(types) == layer_types(layers, n)]
        if not found:
            raise ModernExportError(f"{where}: layer_types {types} is not 'global every n-th layer, the first "
                                    "included', the only pattern this backbone builds")
        every = found[0]
    return every


def check_supported(config: dict, where: str) -> None:
    for key, wanted in _FIXED.items():
        if key in config and config[key] != wanted:
            raise ModernExportError(f"{where}: {key}={config[key]!r} is not supported (the modern backbone "
                                    f"builds {key}={wanted})")
    for key in _ACTIVATIONS:
        if config.get(key, "gelu") != "gelu":
            raise ModernExportError(f"{where}: {key}={config[key]!r} is not supported (exact GELU only)")


def model_config_from_modernbert(disc: dict, gen: dict | None, where: str = "the model folder") -> ModelConfig:
    """Our ModelConfig from transformers ModernBERT config dicts (discriminator and optional generator)."""
    check_supported(disc, where)
    extra = disc.get("electra_fast", {})
    specials = extra.get("special_token_ids", {})
    hidden, layers = disc["hidden_size"], disc["num_hidden_layers"]
    cfg = ModelConfig(
        architecture="modern", vocab_size=disc["vocab_size"], embedding_size=hidden, hidden_size=hidden,
        num_layers=layers, num_heads=disc["num_attention_heads"], intermediate_size=disc["intermediate_size"],
        max_position_embeddings=disc.get("max_position_embeddings", 8192),
        dropout=float(disc.get("mlp_dropout", 0.0)), attention_dropout=float(disc.get("attention_dropout", 0.0)),
        layer_norm_eps=float(disc.get("norm_eps", 1e-5)), initializer_range=float(disc.get("initializer_range", 0.02)),
        local_attention=int(disc.get("local_attention", 128)),
        global_attn_every_n_layers=_every_n(disc, layers, where),
        global_rope_theta=_theta(disc, "full_attention", "global_rope_theta", 160_000.0),
        local_rope_theta=_theta(disc, "sliding_attention", "local_rope_theta", 10_000.0),
        generator_fraction=float(extra.get("generator_fraction", 1.0)),
        generator_layers=float(extra.get("generator_layers", 0.5)),
        embedding_sharing=extra.get("embedding_sharing", "tied"),
    )
    ids = {"pad": disc.get("pad_token_id"), "cls": disc.get("cls_token_id"), "sep": disc.get("sep_token_id"),
           **specials}
    for key, value in ids.items():
        if value is not None:
            setattr(cfg, f"{key}_token_id", int(value))
    if gen is not None:
        check_supported(gen, where)
        if gen["vocab_size"] != cfg.vocab_size:
            raise ModernExportError(f"{where}: the generator's vocabulary ({gen['vocab_size']}) is not the "
                                    f"discriminator's ({cfg.vocab_size})")
        g_hidden, g_layers = gen["hidden_size"], gen["num_hidden_layers"]
        if _every_n(gen, g_layers, where) != cfg.global_attn_every_n_layers:
            raise ModernExportError(f"{where}: the generator's attention pattern differs from the discriminator's")
        if g_hidden != hidden and cfg.embedding_sharing != "separate":
            cfg.embedding_sharing = "separate"  # a narrower generator has its own table
        cfg.generator_fraction = min(1.0, g_hidden / hidden)
        cfg.generator_layers = min(1.0, g_layers / layers)
        cfg.set_generator_shape(g_hidden, gen["num_attention_heads"], gen["intermediate_size"], g_layers)
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ModernExportError(f"{where}: the model folder's shape cannot be built: {exc}") from None
    return cfg


def _encoder_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder weights without ``model.``, embedding weights under our names) of a folder's state."""
    prefix = "model." if any(k.startswith("model.") for k in state) else ""
    body, embeddings = {}, {}
    for name, tensor in state.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix):]
        if name.startswith("embeddings."):
            embeddings[name[len("embeddings."):].replace("tok_embeddings.", "word_embeddings.")] = tensor
        elif name.startswith(("layers.", "final_norm.")):
            body[name] = tensor
    return body, embeddings


def hf_state_to_ours(disc_state: dict[str, torch.Tensor], gen_state: dict[str, torch.Tensor] | None):
    """(our non-embedding weights, the discriminator's embeddings, the generator's embeddings or None,
    whether the discriminator folder held the replaced-token head)."""
    ours = {}
    disc_body, disc_embeddings = _encoder_state(disc_state)
    ours.update({"discriminator." + k: v for k, v in disc_body.items()})
    has_rtd_head = "classifier.weight" in disc_state
    if has_rtd_head:
        for theirs, mine in (("head.dense.weight", "head.dense.weight"), ("head.norm.weight", "head.norm.weight"),
                             ("classifier.weight", "dense_prediction.weight"),
                             ("classifier.bias", "dense_prediction.bias")):
            if theirs in disc_state:
                ours["discriminator_predictions." + mine] = disc_state[theirs]
    gen_embeddings = None
    if gen_state is not None:
        gen_body, gen_embeddings = _encoder_state(gen_state)
        ours.update({"generator." + k: v for k, v in gen_body.items()})
        for theirs, mine in (("head.dense.weight", "generator_predictions.dense.weight"),
                             ("head.norm.weight", "generator_predictions.norm.weight"),
                             ("decoder.bias", "generator_lm_head_bias")):
            if theirs in gen_state:
                ours[mine] = gen_state[theirs]
    return ours, disc_embeddings, gen_embeddings, has_rtd_head
