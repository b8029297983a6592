"""A prepared dataset as its readers see it: the manifest, the checks a consumer makes against it,
the one tokenizer loader, and the error type of every data problem.

The offline side (``electra_fast.prepare``) writes what this module reads; the training loader
(``electra_fast.loader``), the trainer and fine-tuning read it through here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .hashing import sha256_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SPECIAL_KEYS = ("pad", "unk", "cls", "sep", "mask")


class DataError(ValueError):
    """Input or prepared data that cannot be used; the message names the file (and line) at fault."""


_REQUIRED_MANIFEST_KEYS = ("vocab_size", "seq_len", "num_examples", "special_token_ids")


def read_manifest(data_dir: str) -> dict[str, Any]:
    """The manifest of a folder written by ``prepare``; DataError if it is not one."""
    folder = Path(data_dir).expanduser()
    path = folder / "manifest.json"
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared dataset (no manifest.json); run `electra-fast prepare` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the manifest: {exc}") from None
    missing = [key for key in _REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: not a manifest of this version of electra-fast (format_version "
                        f"{manifest.get('format_version')!r}, expected {FORMAT_VERSION}; missing: {missing}); "
                        "prepare the data again")
    if not (folder / manifest.get("dataset_dir", "dataset")).is_dir():
        raise DataError(f"{data_dir}: the manifest is there but the dataset folder is missing")
    _check_against_files(folder, manifest)
    return manifest


# What a model's ids depend on; an edited manifest or a swapped vocabulary must not pass unnoticed.
IDENTITY_KEYS = ("inputs_fingerprint", "vocab_sha256", "tokenizer_sha256", "dataset_files")
# Covered too when present: the held-out split's files (a preparation with --heldout 0 has none).
OPTIONAL_IDENTITY_KEYS = ("heldout_files",)


def identity_fingerprint(identity: dict[str, Any]) -> str:
    """The manifest's ``fingerprint``: sha256 over the ``IDENTITY_KEYS`` entries and those of the
    ``OPTIONAL_IDENTITY_KEYS`` it has (JSON, sorted keys)."""
    covered = {key: identity[key] for key in IDENTITY_KEYS}
    covered.update({key: identity[key] for key in OPTIONAL_IDENTITY_KEYS if key in identity})
    return hashlib.sha256(json.dumps(covered, sort_keys=True).encode()).hexdigest()


def _check_against_files(folder: Path, manifest: dict[str, Any]) -> None:
    """The manifest must describe the files beside it: the recorded hashes of vocab.txt and
    tokenizer.json, the fingerprint over them, and vocab_size and the special ids read off vocab.txt
    (which is small; the Arrow files are checked by size when loaded, see :func:`load_examples`)."""
    path = folder / "manifest.json"
    for key, name in (("vocab_sha256", "vocab.txt"), ("tokenizer_sha256", "tokenizer.json")):
        if manifest.get(key) and (folder / name).is_file():
            found = sha256_file(folder / name)
            if found != manifest[key]:
                raise DataError(f"{folder / name}: its sha256 is {found[:12]}..., the manifest recorded "
                                f"{manifest[key][:12]}...: the file was changed after prepare; prepare the data again")
    if all(key in manifest for key in IDENTITY_KEYS) and manifest.get("fingerprint") != identity_fingerprint(manifest):
        raise DataError(f"{path}: the fingerprint does not match the hashes the manifest lists (the manifest was "
                        "edited); prepare the data again")
    vocab_file = folder / "vocab.txt"
    if not vocab_file.is_file():
        return
    tokens = vocab_file.read_text(encoding="utf-8").splitlines()
    if int(manifest["vocab_size"]) != len(tokens):
        raise DataError(f"{path}: vocab_size is {manifest['vocab_size']} but {vocab_file} holds {len(tokens)} tokens "
                        "(the manifest was edited); prepare the data again")
    ids = {token: index for index, token in enumerate(tokens)}
    for key, token in zip(SPECIAL_KEYS, SPECIAL_TOKENS):
        recorded = manifest["special_token_ids"].get(key)
        if recorded != ids.get(token):
            raise DataError(f"{path}: special_token_ids.{key} is {recorded} but {token} is id {ids.get(token)} in "
                            f"{vocab_file} (the manifest was edited); prepare the data again")


def dataset_files(dataset_dir: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` of the Arrow files of a saved dataset, by name: what the manifest
    records so that a reader can tell a truncated or replaced file (and the fingerprint covers)."""
    files = {}
    for path in sorted(Path(dataset_dir).glob("*.arrow")):
        files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return files


def damaged_arrow_file(dataset_dir: Path) -> str | None:
    """``"FILE: what is wrong"`` for the first Arrow file of a saved dataset that cannot be read to its
    end, else None (pyarrow's own errors do not say which file they were reading)."""
    import pyarrow as pa

    for path in sorted(Path(dataset_dir).glob("*.arrow")):
        try:
            with pa.memory_map(str(path)) as source:
                reader = pa.ipc.open_stream(source)
                for _ in reader:
                    pass
        except (OSError, pa.ArrowException) as exc:
            return f"{path}: not a readable Arrow file, truncated or damaged ({' '.join(str(exc).split())})"
    return None


def load_examples(data_dir: str, manifest: dict[str, Any], split: str = "train"):
    """The prepared examples of ``data_dir`` (``split`` "train", or "heldout" for the held-out split,
    None when the data has none), memory-mapped. A file the manifest lists that is missing or has
    another size, or an Arrow file that cannot be read, is a DataError naming that file."""
    from datasets import load_from_disk

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if split == "heldout" and not manifest.get("heldout_dir"):
        return None
    folder = Path(data_dir).expanduser() / (manifest.get("dataset_dir", "dataset") if split == "train"
                                            else manifest["heldout_dir"])
    files_key = "dataset_files" if split == "train" else "heldout_files"
    for name, entry in sorted((manifest.get(files_key) or {}).items()):
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"]:
            found = "is missing" if size is None else f"has {size} bytes"
            raise DataError(f"{path}: the file {found}, the manifest says {entry['bytes']} bytes (truncated or "
                            "replaced); prepare the data again")
    try:
        return load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001  datasets and pyarrow raise several types for a broken folder
        raise DataError(damaged_arrow_file(folder) or f"{folder}: cannot load the prepared dataset: {exc}") from None


def check_vocab(manifest: dict[str, Any], model_vocab_size: int) -> None:
    """The model's embedding table must match the data's vocabulary exactly."""
    data_vocab_size = int(manifest["vocab_size"])
    if data_vocab_size != int(model_vocab_size):
        raise DataError(f"vocabulary mismatch: the prepared data uses {data_vocab_size} tokens but the model has "
                        f"vocab_size={model_vocab_size}; set model.vocab_size={data_vocab_size} or prepare the data "
                        f"with --vocab-size {model_vocab_size}")


def check_seq_len(manifest: dict[str, Any], seq_len: int) -> None:
    """Examples are packed to one length at prepare time; the config must ask for that length."""
    data_seq_len = int(manifest["seq_len"])
    if data_seq_len != int(seq_len):
        raise DataError(f"sequence length mismatch: the data was prepared with seq_len={data_seq_len} (examples of "
                        f"{data_seq_len} tokens) but the config has data.seq_len={seq_len}; set "
                        f"data.seq_len={data_seq_len} or prepare the data again with --seq-len {seq_len}")


def load_tokenizer(source):
    """A ``tokenizers.Tokenizer`` that never pads or truncates (callers assemble the sequences).

    source: a prepared dataset or model folder (``tokenizer.json`` preferred, else ``vocab.txt`` read as a
    BERT WordPiece vocabulary, lower-cased unless tokenizer_config.json says do_lower_case=false), a
    path to either file, or an existing tokenizer (copied with padding and truncation switched off when
    it has them, so the caller's object is left as it is). DataError names the path it cannot use.
    """
    from tokenizers import BertWordPieceTokenizer, Tokenizer

    if not isinstance(source, (str, os.PathLike)):
        if not hasattr(source, "encode_batch"):
            raise DataError(f"tokenizer must be a tokenizers.Tokenizer or a path, got {type(source).__name__}")
        if getattr(source, "padding", None) is None and getattr(source, "truncation", None) is None:
            return source
        source = Tokenizer.from_str(source.to_str())
        source.no_truncation()
        source.no_padding()
        return source

    path = Path(source).expanduser()
    folder = path if path.is_dir() else path.parent
    candidates = [folder / "tokenizer.json", folder / "vocab.txt"] if path.is_dir() else [path]
    chosen = next((c for c in candidates if c.is_file()), None)
    if chosen is None:
        raise DataError(f"{path}: no tokenizer.json or vocab.txt (the tokenizer belongs beside the model or data)")
    try:
        if chosen.suffix == ".json":
            tokenizer = Tokenizer.from_file(str(chosen))
        else:
            lowercase = True
            if (folder / "tokenizer_config.json").is_file():
                lowercase = bool(json.loads((folder / "tokenizer_config.json").read_text()).get("do_lower_case", True))
            tokenizer = BertWordPieceTokenizer(str(chosen), lowercase=lowercase)
    except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
        raise DataError(f"{chosen}: cannot load the tokenizer: {exc}") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer
