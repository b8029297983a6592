"""A given Hugging Face fast tokenizer (``tokenizer.json``: BPE as ModernBERT's, WordPiece, Unigram) for
``prepare --tokenizer``: its special tokens mapped to the roles ELECTRA needs.

    tokenizer, roles = load_given_tokenizer("models/modernbert/tokenizer.json")
    roles   # {"pad": 50283, "unk": 50280, "cls": 50281, "sep": 50282, "mask": 50284}

Roles: ``cls`` and ``sep`` frame each example, ``pad`` fills it, ``mask`` replaces the masked-LM's chosen
tokens; all four are required, and a tokenizer without one of them is one DataError naming the role and
the spellings tried. ``unk`` is optional (byte-level BPE has none): without it the role takes the pad id,
which the objective never reads. Each role is found, first match wins:

1. ``special_tokens`` given by the caller (``--special mask=<mask>``);
2. ``tokenizer_config.json`` beside ``tokenizer.json`` (``cls_token``, ``sep_token``, ...), as transformers saves;
3. the usual spellings in the vocabulary: BERT's ``[CLS]`` / ``[SEP]`` / ``[PAD]`` / ``[MASK]`` / ``[UNK]``
   (ModernBERT uses these too) and RoBERTa's ``<s>`` / ``</s>`` / ``<pad>`` / ``<mask>`` / ``<unk>``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .manifest import SPECIAL_KEYS, DataError

logger = logging.getLogger(__name__)

REQUIRED_ROLES = ("cls", "sep", "pad", "mask")
SPELLINGS = {
    "pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]", "<s>", "<cls>"),
    "sep": ("[SEP]", "</s>", "<sep>"), "mask": ("[MASK]", "<mask>"),
}


def parse_special_tokens(items: list[str] | None) -> dict[str, str]:
    """``["mask=<mask>", "cls=<s>"]`` -> ``{"mask": "<mask>", "cls": "<s>"}``; DataError for a bad item."""
    out = {}
    for item in items or []:
        role, sep, token = item.partition("=")
        if not sep or role not in SPECIAL_KEYS or not token:
            raise DataError(f"--special {item!r}: expected ROLE=TOKEN with ROLE one of {', '.join(SPECIAL_KEYS)}")
        out[role] = token
    return out


def _config_tokens(folder: Path) -> dict[str, str]:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None
    out = {}
    for role in SPECIAL_KEYS:
        value = config.get(f"{role}_token")
        if isinstance(value, dict):  # AddedToken serialised
            value = value.get("content")
        if isinstance(value, str) and value:
            out[role] = value
    return out


def special_roles(tokenizer, where: str, given: dict[str, str] | None = None,
                  config_tokens: dict[str, str] | None = None) -> dict[str, int]:
    """The id of each role (``SPECIAL_KEYS``) in ``tokenizer``; DataError naming a required role it lacks."""
    given, config_tokens = given or {}, config_tokens or {}
    ids: dict[str, int] = {}
    for role in SPECIAL_KEYS:
        if role in given:
            found = tokenizer.token_to_id(given[role])
            if found is None:
                raise DataError(f"{where}: --special {role}={given[role]}: the tokenizer has no such token")
            ids[role] = found
            continue
        tried = ([config_tokens[role]] if role in config_tokens else []) + list(SPELLINGS[role])
        found = next((tokenizer.token_to_id(t) for t in tried if tokenizer.token_to_id(t) is not None), None)
        if found is not None:
            ids[role] = found
        elif role in REQUIRED_ROLES:
            raise DataError(f"{where}: no token for the {role} role ({SPELLINGS[role][0]}; tried "
                            f"{', '.join(tried)}); ELECTRA needs {', '.join(REQUIRED_ROLES)}: name it with "
                            f"--special {role}=TOKEN")
    if "unk" not in ids:
        logger.info("%s: no unknown-token role (byte-level BPE has none); unk takes the pad id", where)
        ids["unk"] = ids["pad"]
    clash = [role for role in ("cls", "sep", "pad") if ids[role] == ids["mask"]]
    if clash:
        raise DataError(f"{where}: the mask role shares id {ids['mask']} with {', '.join(clash)}; the masked tokens "
                        "must be told apart (name another with --special mask=TOKEN)")
    return {role: ids[role] for role in SPECIAL_KEYS}


def load_given_tokenizer(path: str, given: dict[str, str] | None = None):
    """(tokenizer, role ids) of ``path`` (a ``tokenizer.json`` or a folder holding one), with the
    [CLS] A [SEP] (B [SEP]) template of its own role tokens; DataError naming what is wrong."""
    from tokenizers import Tokenizer, processors

    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise DataError(f"--tokenizer {path}: no tokenizer.json there (a Hugging Face fast tokenizer file, or "
                        "a folder holding one)")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
        raise DataError(f"{file}: cannot load the tokenizer: {exc}") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    roles = special_roles(tokenizer, str(file), given, _config_tokens(file.parent))
    cls, sep = tokenizer.id_to_token(roles["cls"]), tokenizer.id_to_token(roles["sep"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, roles["cls"]), (sep, roles["sep"])])
    return tokenizer, roles


def tokenizer_type(tokenizer) -> str:
    """"BPE", "WordPiece", "Unigram", ...: the tokenizer's model."""
    return json.loads(tokenizer.to_str())["model"]["type"]


def vocab_size_of(tokenizer) -> int:
    """Rows the embedding table needs: one past the largest id (added tokens included)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def folder_roles(folder) -> dict[str, int] | None:
    """The role ids of a model folder's ``tokenizer.json`` (a released ModernBERT's, say), or None when it has
    none or one whose roles cannot all be found."""
    if not (Path(folder) / "tokenizer.json").is_file():
        return None
    try:
        return load_given_tokenizer(str(folder))[1]
    except DataError:
        return None
