"""Continued pretraining: a new run that starts from Hugging Face ELECTRA weights.

    electra-fast pretrain --config configs/electra-small.yaml --run-dir runs/dapt --set data.path=data/domain \
        --init-from runs/small/export/discriminator --init-generator runs/small/export/generator

The folders (an ``electra-fast export``, or a downloaded ``ElectraForPreTraining`` /
``ElectraForMaskedLM`` folder) decide the architecture: the discriminator's sizes, and the generator's
shape when ``--init-generator`` is given (else a fresh generator by the config's rules, which in tied and
gdes sharing reads the imported embeddings). The config decides everything else (objective, training,
dropout, implementations, ``model.embedding_sharing``), and the optimizer and LR schedule start fresh.
The prepared data must use the model's vocabulary: its size and special token ids must match, else
:func:`adopt_architecture` stops the run before anything is built.

Two steps, because the architecture must be known before the model, the DeepSpeed config and the FLOPs
are derived, and the weights go into the model before DeepSpeed partitions it:
:func:`adopt_architecture` (config.json only) and :func:`load_initial_weights`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import Config, ConfigError, ModelConfig
from .hf import ExportError, load_hf_state, model_config_from_hf, read_hf_config, read_hf_folder

logger = logging.getLogger(__name__)

# The discriminator's (and embeddings') shape: taken from the folder, whatever the config says.
ARCHITECTURE = ("architecture", "vocab_size", "embedding_size", "hidden_size", "num_layers", "num_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
                # model.architecture=modern (a ModernBERT folder): its attention pattern and rotary bases
                "global_attn_every_n_layers", "local_attention", "global_rope_theta", "local_rope_theta")
GENERATOR_SHAPE = ("generator_fraction", "generator_layers", "explicit_generator_hidden_size",
                   "explicit_generator_num_heads", "explicit_generator_intermediate_size",
                   "explicit_generator_num_layers")
SPECIALS = ("pad", "unk", "cls", "sep", "mask")
_SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


def _imported_config(init_from: str | Path, init_generator: str | Path | None) -> ModelConfig:
    try:
        disc = read_hf_config(init_from)
        gen = read_hf_config(init_generator) if init_generator is not None else None
        return model_config_from_hf(disc, gen)
    except ExportError as exc:
        raise ConfigError(f"--init-from: {exc}") from None


def folder_special_ids(folder: str | Path, imported: ModelConfig) -> dict[str, int]:
    """The special token ids of a model folder: its vocab.txt's lines when it has one (downloaded models
    carry it; exports do when written with their data), else what its config.json says or implies."""
    vocab = Path(folder) / "vocab.txt"
    if vocab.is_file():
        lines = vocab.read_text(encoding="utf-8").splitlines()
        index = {token: i for i, token in enumerate(lines)}
        if all(_SPECIAL_TOKENS[name] in index for name in SPECIALS):
            return {name: index[_SPECIAL_TOKENS[name]] for name in SPECIALS}
    if not vocab.is_file():  # a ModernBERT folder (a BPE tokenizer.json): its roles, when it names them all
        from .tokenizer_roles import folder_roles

        roles = folder_roles(folder)
        if roles is not None:
            return roles
    return {name: getattr(imported, f"{name}_token_id") for name in SPECIALS}


def adopt_architecture(cfg: Config, manifest: dict, init_from: str | Path, init_generator: str | Path | None) -> None:
    """Give ``cfg.model`` the folders' architecture (see the module docstring); a ConfigError naming both
    sides when the folder's vocabulary (size, special ids) is not the prepared data's."""
    imported = _imported_config(init_from, init_generator)
    model_vocab = (imported.vocab_size, folder_special_ids(init_from, imported))
    data_vocab = (int(manifest["vocab_size"]), {name: int(manifest["special_token_ids"][name]) for name in SPECIALS})
    if model_vocab != data_vocab:
        raise ConfigError(
            f"--init-from {init_from}: the model's vocabulary (size {model_vocab[0]}, special ids {model_vocab[1]}) "
            f"is not the prepared data's in {cfg.data.path} (size {data_vocab[0]}, special ids {data_vocab[1]}); "
            "continued pretraining needs data tokenised with the model's own vocabulary "
            + (f"(electra-fast prepare --tokenizer {Path(init_from) / 'tokenizer.json'} ...)"
               if imported.architecture == "modern"
               else f"(electra-fast prepare --vocab {Path(init_from) / 'vocab.txt'} ...)"))
    changed = {}
    for name in ARCHITECTURE + (GENERATOR_SHAPE if init_generator is not None else ()):
        if getattr(cfg.model, name) != getattr(imported, name):
            changed[name] = (getattr(cfg.model, name), getattr(imported, name))
            setattr(cfg.model, name, getattr(imported, name))
    if changed:
        logger.info("--init-from %s: model shape from the folder: %s", init_from,
                    ", ".join(f"model.{k}={new} (config: {old})" for k, (old, new) in changed.items()))
    cfg.validate()


def load_initial_weights(model, init_from: str | Path, init_generator: str | Path | None) -> None:
    """Load the folders' weights into a freshly built ``model`` (one whose config went through
    :func:`adopt_architecture`); the generator stays fresh without ``init_generator``."""
    try:
        _, disc_state = read_hf_folder(init_from)
        gen_state = read_hf_folder(init_generator)[1] if init_generator is not None else None
        load_hf_state(model, disc_state, gen_state, where=f"--init-from {init_from}")
    except ExportError as exc:
        raise ConfigError(str(exc)) from None
