"""Pretraining data: ``electra-fast prepare`` (corpus -> tokenizer + packed Arrow dataset) and the loader.

    electra-fast prepare --input corpus/ more.jsonl --out data/owt --vocab-size 30522 --seq-len 128
    electra-fast prepare --default --out data/demo --vocab-size 1024 --seq-len 64   # no download
    python -m electra_fast.data --default --out /tmp/demo                           # same, without the CLI

    loader = PretrainingLoader("data/owt", micro_batch_size=128, rank=rank, world_size=world, seed=1234)
    for batch in loader:   # {"input_ids", "token_type_ids", "attention_mask"}: int64 (B, S), forever
        ...
    state = loader.state_dict()   # {"epoch", "position", ...}; load_state_dict(state) resumes exactly

What ``prepare`` writes (``DIR``)::

    DIR/manifest.json    inputs and their sha256, counts, settings, special ids, library versions
    DIR/tokenizer.json   the `tokenizers` WordPiece tokenizer (BERT normaliser and pre-tokeniser)
    DIR/vocab.txt        the same vocabulary, one token a line (id = line number)
    DIR/dataset/         `datasets.Dataset.save_to_disk`: input_ids (uint16, or int32 past 65536
                         tokens), token_type_ids and attention_mask (int8), each a fixed-size list of
                         seq_len, padded

The pipeline, and which library does each part:

1. Inputs: text files or folders (one sentence or paragraph a line, a blank line ends a document, as in
   the reference ELECTRA ``build_pretraining_dataset.py``), ``.jsonl`` with a ``text`` field (one
   record, one document), or a ``datasets.save_to_disk`` folder with a ``text`` column (one row, one
   document); ``.gz``/``.bz2``/``.xz`` files are read through the standard library. Each file is
   hashed (sha256) first: the same inputs and settings reuse an existing result.
2. Documents: text and jsonl files are read by a generator that checks every line (UTF-8, no NUL
   byte, at most ``MAX_LINE_BYTES``) and turns them into one Arrow row per document with
   ``Dataset.from_generator(num_proc=...)``; large files are cut into byte ranges at blank lines so
   that one big file still uses every process. Saved datasets are memory-mapped as they are.
3. Tokenizer: a lower-cased WordPiece trained with ``tokenizers`` on the first
   ``TOKENIZER_TRAIN_CHARS`` characters, or the WordPiece of a given ``vocab.txt``. The trained ids
   are renumbered canonically; ``tokenizers`` breaks ties between equally frequent merges in hash
   order, so two trainings may still differ in a few tied pieces (2 of 1024 seen on the default
   corpus). A re-run with the same inputs reuses the saved tokenizer, and ``--vocab`` pins it.
4. Examples: ``Dataset.map(batched=True, num_proc=...)`` tokenises each document and packs it exactly
   as the reference ``ExampleBuilder`` does (see :class:`ExampleBuilder`). Every document draws its
   random numbers from its own generator, seeded by (seed, input, position in the input), so the
   result does not depend on ``num_proc`` or batch boundaries.
5. Output: ``save_to_disk`` into a hidden sibling folder of ``DIR``, manifest last, then a rename. On
   any error the sibling is removed and ``DIR`` is left as it was.

For inputs too large to keep a second, decoded copy on disk ("streaming", chosen automatically past
a quarter of the free disk or the machine's memory), step 2 is skipped: each process reads its files
and packs them as it goes, and only the examples are written (``Dataset.from_generator``); the result
is identical.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import dataclasses
import gzip
import hashlib
import itertools
import json
import lzma
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from .atomic import make_staging_directory, publish_directory

FORMAT_VERSION = 1
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SPECIAL_KEYS = ("pad", "unk", "cls", "sep", "mask")
# A line (sentence or paragraph) longer than this is not text meant for sentence-level packing; it is
# a minified file, a base64 blob or a corpus with no line breaks at all.
MAX_LINE_BYTES = 2 << 20
# One jsonl record may hold a whole book.
MAX_RECORD_BYTES = 256 << 20
# A document longer than this is cut (at a line boundary) into several Arrow rows so that one row stays
# small; the only effect is an example boundary at the cut.
MAX_DOCUMENT_CHARS = 1 << 20
# Uncompressed text files are read by several processes in ranges of about this size.
SHARD_BYTES = 64 << 20
# WordPiece is trained on the corpus's first this-many characters (BERT's vocabulary came from a
# sample too); more text changes the vocabulary little and costs linear time.
TOKENIZER_TRAIN_CHARS = 1 << 30
DOCUMENTS_PER_BATCH = 256
TEXT_SUFFIXES_JSONL = (".jsonl", ".ndjson")
COMPRESSED_SUFFIXES = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


class DataError(ValueError):
    """Input or prepared data that cannot be used; the message names the file (and line) at fault."""


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(f"prepare: {message}", flush=True)


# ==================================================================================================
# Inputs: discovery and hashing
# ==================================================================================================


@dataclasses.dataclass
class _Source:
    """One input: a text or jsonl file, or a saved dataset folder."""

    index: int
    path: str
    kind: str  # "text" | "jsonl" | "arrow"
    bytes: int = 0
    sha256: str = ""
    compressed: bool = False
    name: str = ""  # what the manifest and errors call it (the path, or "<default corpus>")

    def describe(self) -> dict[str, Any]:
        return {"path": self.name or self.path, "kind": self.kind, "bytes": self.bytes, "sha256": self.sha256}


def _file_kind(path: Path) -> tuple[str, bool]:
    suffixes = [s.lower() for s in path.suffixes]
    compressed = bool(suffixes) and suffixes[-1] in COMPRESSED_SUFFIXES
    core = suffixes[:-1] if compressed else suffixes
    return ("jsonl" if core and core[-1] in TEXT_SUFFIXES_JSONL else "text"), compressed


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _sha256_file(path: Path, digest: "hashlib._Hash | None" = None) -> str:
    digest = digest or hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _discover_inputs(inputs: Iterable[str], exclude: Path | None = None) -> list[_Source]:
    """Expand folders (sorted; hidden files and the output folder ``exclude`` skipped), classify and
    hash every input."""
    sources: list[_Source] = []

    def wanted(file: Path, root: Path) -> bool:
        if any(part.startswith(".") for part in file.relative_to(root).parts):
            return False
        return exclude is None or not file.absolute().is_relative_to(exclude)

    for raw in inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise DataError(f"input not found: {raw}")
        if path.is_dir() and _is_saved_dataset(path):
            files = sorted(p for p in path.rglob("*") if p.is_file())
            digest = hashlib.sha256()
            for file in files:
                digest.update(str(file.relative_to(path)).encode() + b"\0")
                _sha256_file(file, digest)
            sources.append(_Source(len(sources), str(path), "arrow", sum(f.stat().st_size for f in files),
                                   digest.hexdigest()))
            continue
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and wanted(p, path))
            if not files:
                raise DataError(f"input folder {raw} holds no files")
        elif path.is_file():
            files = [path]
        else:
            raise DataError(f"input {raw} is neither a file nor a folder")
        for file in files:
            kind, compressed = _file_kind(file)
            sources.append(_Source(len(sources), str(file), kind, file.stat().st_size, _sha256_file(file),
                                   compressed))
    return sources


# ==================================================================================================
# Reading documents (runs in datasets' worker processes)
# ==================================================================================================


def _open_binary(path: str, compressed: bool):
    if compressed:
        return COMPRESSED_SUFFIXES[Path(path).suffix.lower()](path, "rb")
    return open(path, "rb")


def _line_number(path: str, compressed: bool, byte_offset: int) -> int:
    """1-based line holding ``byte_offset`` (only computed when reporting an error)."""
    count, done = 0, 0
    with _open_binary(path, compressed) as handle:
        while done < byte_offset:
            chunk = handle.read(min(8 << 20, byte_offset - done))
            if not chunk:
                break
            count += chunk.count(b"\n")
            done += len(chunk)
    return count + 1


def _shards(source: _Source) -> list[tuple[int, str, str, bool, int, int]]:
    """(input, path, kind, compressed, start, end) byte ranges, each starting right after a blank line.

    A range ends where the next begins; a range boundary that finds no blank line within the next
    quarter shard falls on a line start instead (which cuts a document there, like MAX_DOCUMENT_CHARS).
    """
    whole = [(source.index, source.path, source.kind, source.compressed, 0, -1)]
    if source.compressed or source.kind != "text" or source.bytes <= SHARD_BYTES:
        return whole
    starts = [0]
    with open(source.path, "rb") as handle:
        for approx in range(SHARD_BYTES, source.bytes, SHARD_BYTES):
            handle.seek(approx)
            window = handle.read(SHARD_BYTES // 4)
            cut = window.find(b"\n\n")
            cut = cut + 2 if cut >= 0 else window.find(b"\n") + 1
            if cut > 0 and approx + cut < source.bytes and approx + cut > starts[-1]:
                starts.append(approx + cut)
    ends = starts[1:] + [-1]
    return [(source.index, source.path, source.kind, source.compressed, s, e) for s, e in zip(starts, ends)]


def _read_lines(path: str, compressed: bool, start: int, end: int, limit: int) -> Iterator[tuple[int, str]]:
    """(byte offset, decoded line without its line break) for the lines starting in [start, end)."""

    def fail(offset: int, message: str) -> DataError:
        return DataError(f"{path}:{_line_number(path, compressed, offset)}: {message}")

    try:
        with _open_binary(path, compressed) as handle:
            if start:
                handle.seek(start)
            offset = start
            while end < 0 or offset < end:
                raw = handle.readline(limit + 1)
                if not raw:
                    break
                if len(raw) > limit:
                    raise fail(offset, f"a line longer than {limit} bytes; a sentence or paragraph is never that "
                                       "long (is this a text file with line breaks, one sentence or paragraph a line?)")
                if b"\0" in raw:
                    raise fail(offset, "contains a NUL byte: this is a binary file, not text")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise fail(offset, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the "
                                       "line); convert the file to UTF-8") from None
                if offset == 0 and line.startswith("\ufeff"):  # byte-order mark
                    line = line[1:]
                yield offset, line.rstrip("\r\n")
                offset += len(raw)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None


def _documents_from_lines(lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, list[str]]]:
    """Group (offset, line) into documents at blank lines: (offset of the first line, stripped lines)."""
    document: list[str] = []
    first_offset = chars = 0
    for offset, line in lines:
        line = line.strip()
        if not line:
            if document:
                yield first_offset, document
            document, chars = [], 0
            continue
        if document and chars + len(line) > MAX_DOCUMENT_CHARS:
            yield first_offset, document
            document, chars = [], 0
        if not document:
            first_offset = offset
        document.append(line)
        chars += len(line) + 1
    if document:
        yield first_offset, document


def _jsonl_documents(path: str, compressed: bool) -> Iterator[tuple[int, list[str]]]:
    """One or more documents per record: its ``text``, cut at blank lines.

    A record at byte offset o that yields k documents keys them o, o+1, ..., o+k-1: unique, since a
    record is longer than the number of documents in it.
    """
    for offset, record_line in _read_lines(path, compressed, 0, -1, MAX_RECORD_BYTES):
        if not record_line.strip():
            continue
        try:
            record = json.loads(record_line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{_line_number(path, compressed, offset)}: not valid JSON ({exc.msg} at column "
                            f"{exc.colno})") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{_line_number(path, compressed, offset)}: each line must be a JSON object with a "
                            f"string \"text\" field" + (f" (keys: {', '.join(sorted(record))[:200]})"
                                                       if isinstance(record, dict) else ""))
        lines = text.split("\n")
        for number, line in enumerate(lines):
            if len(line) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{_line_number(path, compressed, offset)}: line {number + 1} of the \"text\" "
                                f"field is longer than {MAX_LINE_BYTES} characters; a sentence or paragraph is never "
                                "that long")
        for part, (_, document) in enumerate(_documents_from_lines(enumerate(lines))):
            yield offset + part, document


def _report_error(error_dir: str, key: tuple[int, int], error: DataError) -> None:
    """Leave a worker's DataError where the parent finds it: datasets re-raises worker failures as a
    generic DatasetGenerationError with only a traceback string, losing the message and its type."""
    if not error_dir:  # running in the parent process: the exception itself arrives
        return
    os.makedirs(error_dir, exist_ok=True)
    with open(os.path.join(error_dir, f"{key[0]:08d}-{key[1]:020d}.txt"), "w", encoding="utf-8") as handle:
        handle.write(str(error))


@contextlib.contextmanager
def _worker_errors(error_dir: Path) -> Iterator[None]:
    """Turn a failure inside datasets' workers back into the DataError a worker reported (the first in
    input order), or pass other exceptions through."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:
        reports = sorted(error_dir.glob("*.txt")) if error_dir.is_dir() else []
        if reports:
            raise DataError(reports[0].read_text(encoding="utf-8")) from None
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, DataError):
                raise DataError(str(cause)) from None
            cause = cause.__cause__ or cause.__context__
        raise


def _generate_documents(shards: list[tuple], error_dir: str) -> Iterator[dict[str, Any]]:
    """``Dataset.from_generator`` body: one row per document of each shard."""
    for input_index, path, kind, compressed, start, end in shards:
        try:
            if kind == "jsonl":
                documents = _jsonl_documents(path, compressed)
            else:
                documents = _documents_from_lines(_read_lines(path, compressed, start, end, MAX_LINE_BYTES))
            for offset, lines in documents:
                yield {"text": "\n".join(lines), "input": input_index, "offset": offset}
        except DataError as error:
            _report_error(error_dir, (input_index, start), error)
            raise


# ==================================================================================================
# Tokenizer
# ==================================================================================================


def _build_tokenizer(vocab: dict[str, int] | None, lowercase: bool):
    """BERT's WordPiece pipeline: BertNormalizer (clean, CJK spacing, lower-case + strip accents),
    BertPreTokenizer (whitespace and punctuation), WordPiece with ``##`` continuations."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    model = WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##") if vocab else \
        WordPiece(unk_token="[UNK]", continuing_subword_prefix="##")
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _finish_tokenizer(tokenizer) -> dict[str, int]:
    """Mark the special tokens and add BERT's [CLS] A [SEP] B [SEP] template; returns their ids."""
    from tokenizers import AddedToken, processors

    vocab = tokenizer.get_vocab()
    ids = {key: vocab[token] for key, token in zip(SPECIAL_KEYS, SPECIAL_TOKENS)}
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["cls"]), ("[SEP]", ids["sep"])])
    return ids


def _read_vocab_file(path: str) -> dict[str, int]:
    """vocab.txt (one token a line, id = line number) with every special token, else a DataError."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"vocabulary file not found: {path}")
    vocab: dict[str, int] = {}
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if b"\0" in raw:
                raise DataError(f"{path}:{number}: contains a NUL byte: this is a binary file, not a vocab.txt")
            try:
                token = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{number}: not UTF-8 text") from None
            if not token.strip():
                raise DataError(f"{path}:{number}: empty token (vocab.txt holds one token a line)")
            if token in vocab:
                raise DataError(f"{path}:{number}: token {token!r} already appears on line {vocab[token] + 1}")
            vocab[token] = number - 1
    if not vocab:
        raise DataError(f"{path}: the vocabulary file is empty")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise DataError(f"{path}: the vocabulary lacks the special token(s) {', '.join(missing)} "
                        f"(ELECTRA needs {' '.join(SPECIAL_TOKENS)})")
    return vocab


def _train_tokenizer(texts: Iterable[list[str]], vocab_size: int, lowercase: bool):
    """Train WordPiece; pad the vocabulary with [unusedN] tokens to exactly ``vocab_size`` when the corpus
    has fewer distinct pieces, so the model's embedding size is what was asked for."""
    from tokenizers import trainers
    from tokenizers.models import WordPiece

    tokenizer = _build_tokenizer(None, lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##",
        # BERT's recipe keeps the 1000 most frequent characters; rarer ones become [UNK]. A small
        # vocabulary keeps fewer, so that whole words still fit.
        limit_alphabet=min(1000, max(32, vocab_size // 4)), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise DataError(f"--vocab-size {vocab_size} is too small: the corpus's characters alone need {len(vocab)} "
                        "entries")
    # tokenizers numbers the alphabet (and breaks ties between equally frequent merges) in the order of
    # a randomly seeded hash map, so the same corpus gives other ids in another process. WordPiece's
    # greedy longest match does not depend on ids: renumber canonically (specials, characters,
    # "##" characters, then the other pieces, each sorted; [unusedN] padding last).
    pieces = [token for token in vocab if token not in SPECIAL_TOKENS]
    order = sorted(pieces, key=lambda t: (0 if len(t) == 1 else 1 if t.startswith("##") and len(t) == 3 else 2, t))
    canonical = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *order])}
    for number in range(vocab_size - len(canonical)):
        canonical[f"[unused{number}]"] = len(canonical)
    tokenizer.model = WordPiece(vocab=canonical, unk_token="[UNK]", continuing_subword_prefix="##")
    return tokenizer


def _write_vocab_txt(tokenizer, path: Path) -> None:
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise RuntimeError("the tokenizer's ids are not contiguous")
    path.write_text("".join(token + "\n" for token, _ in by_id), encoding="utf-8")


def _training_texts(text_shards: list[tuple], arrow_sources: list[_Source], budget: int,
                    counter: dict[str, int]) -> Iterator[list[str]]:
    """Batches of document texts in input order, up to ``budget`` characters; counts what it gave."""

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for input_index, path, kind, compressed, start, end in text_shards:
            documents = _jsonl_documents(path, compressed) if kind == "jsonl" else \
                _documents_from_lines(_read_lines(path, compressed, start, end, MAX_LINE_BYTES))
            for _, lines in documents:
                batch.append("\n".join(lines))
                if len(batch) == 1000:
                    yield batch
                    batch = []
        for source in arrow_sources:
            dataset = _load_text_dataset(source)
            for rows in dataset.iter(batch_size=1000):
                yield [t for t in rows["text"] if isinstance(t, str)]
        if batch:
            yield batch

    for texts in batches():
        size = sum(map(len, texts))
        counter["chars"] += size
        counter["documents"] += len(texts)
        yield texts
        if counter["chars"] >= budget:
            return


# ==================================================================================================
# Packing examples, as the reference ELECTRA build_pretraining_dataset.py does
# ==================================================================================================


class ExampleBuilder:
    """Packs the sentences of one document into examples exactly as the reference ``ExampleBuilder``.

    Sentences are added until their tokens reach the target length (``seq_len``; after 5% of examples,
    a random length in [5, seq_len] for the next one). The accumulated sentences are then split into
    segment A and B: 10% of the time everything goes to A (a single-segment example, as in
    classification tasks); otherwise a sentence goes to A while A is empty, while it keeps A under
    half the target, or with probability 1/2 when it would cross that half and B is still empty.
    Tokens past ``seq_len`` (counting [CLS] and the two [SEP]) are dropped, as in the reference.
    Output: ``[CLS] A [SEP]`` (+ ``B [SEP]`` when B is not empty).

    Random numbers are drawn in the same order and with the same calls as the reference, from ``rng``.
    One difference: the reference carries its builder (and the next target length) from one document
    to the next; here every document starts fresh with its own generator, which makes the output
    independent of how documents are spread over processes.
    """

    def __init__(self, seq_len: int, rng: random.Random):
        if seq_len < 8:
            raise DataError(f"seq_len must be at least 8, got {seq_len}")
        self.max_length = seq_len
        self.target_length = seq_len
        self.rng = rng
        self.sentences: list[list[int]] = []
        self.length = 0

    def add_sentence(self, token_ids: list[int]) -> tuple[list[int], list[int]] | None:
        self.sentences.append(token_ids)
        self.length += len(token_ids)
        if self.length >= self.target_length:
            return self._create_example()
        return None

    def end_document(self) -> tuple[list[int], list[int]] | None:
        if self.length:
            return self._create_example()
        self.sentences = []
        return None

    def _create_example(self) -> tuple[list[int], list[int]]:
        rng = self.rng
        if rng.random() < 0.1:
            first_target = 100000  # single segment
        else:
            first_target = (self.target_length - 3) // 2  # -3 for [CLS] and two [SEP]
        first: list[int] = []
        second: list[int] = []
        for sentence in self.sentences:
            if (len(first) == 0 or len(first) + len(sentence) < first_target
                    or (len(second) == 0 and len(first) < first_target and rng.random() < 0.5)):
                first += sentence
            else:
                second += sentence
        first = first[:self.max_length - 2]
        second = second[:max(0, self.max_length - len(first) - 3)]
        self.sentences = []
        self.length = 0
        if rng.random() < 0.05:
            self.target_length = rng.randint(5, self.max_length)
        else:
            self.target_length = self.max_length
        return first, second


def _document_rng(seed: int, input_index: int, key: int) -> random.Random:
    # Seeding with a str goes through sha512: the same stream in every process and Python run.
    return random.Random(f"electra-fast/{seed}/{input_index}/{key}")


def _example_features(seq_len: int, vocab_size: int):
    from datasets import Features, Value

    try:
        from datasets import List as _List

        def fixed(dtype):
            return _List(Value(dtype), length=seq_len)
    except ImportError:  # datasets < 4
        from datasets import Sequence

        def fixed(dtype):
            return Sequence(Value(dtype), length=seq_len)

    return Features({"input_ids": fixed(_id_dtype(vocab_size)), "token_type_ids": fixed("int8"),
                     "attention_mask": fixed("int8")})


def _id_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


class _Packer:
    """Tokenise documents and pack them into padded examples; picklable, so datasets' workers can run it."""

    def __init__(self, tokenizer, seq_len: int, seed: int, special_ids: dict[str, int], vocab_size: int,
                 error_dir: str, parallel_tokenizer: bool):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        self.special_ids = special_ids
        self.id_dtype = np.dtype(_id_dtype(vocab_size))
        self.error_dir = error_dir
        self.parallel_tokenizer = parallel_tokenizer

    def pack(self, texts: list[str | None], inputs: list[int], keys: list[int],
             where: Callable[[int], str] | None = None) -> dict[str, np.ndarray]:
        if not self.parallel_tokenizer:
            # In a worker process: tokenizers' own thread pool would oversubscribe the cores
            # (and warns after a fork).
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        documents: list[list[str]] = []
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"{where(row) if where else 'row'}: \"text\" is {type(text).__name__}, not a string")
            lines = text.split("\n")
            if where is not None:  # rows of a saved dataset have not been checked line by line yet
                for number, line in enumerate(lines):
                    if len(line) > MAX_LINE_BYTES:
                        raise DataError(f"{where(row)}: line {number + 1} is longer than {MAX_LINE_BYTES} characters; "
                                        "a sentence or paragraph is never that long")
            documents.append([line.strip() for line in lines])
        flat = [line for lines in documents for line in lines if line]
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encoded = iter(encode(flat, add_special_tokens=False)) if flat else iter(())

        examples: list[tuple[list[int], list[int]]] = []
        for lines, input_index, key in zip(documents, inputs, keys):
            builder = ExampleBuilder(self.seq_len, _document_rng(self.seed, int(input_index), int(key)))
            for line in lines:
                if not line:  # a blank line inside a row's text ends a document (reference rule)
                    example = builder.end_document()
                else:
                    example = builder.add_sentence(next(encoded).ids)
                if example is not None:
                    examples.append(example)
            example = builder.end_document()
            if example is not None:
                examples.append(example)
        return self._to_arrays(examples)

    def _to_arrays(self, examples: list[tuple[list[int], list[int]]]) -> dict[str, np.ndarray]:
        count, seq_len = len(examples), self.seq_len
        input_ids = np.full((count, seq_len), self.special_ids["pad"], dtype=self.id_dtype)
        token_type_ids = np.zeros((count, seq_len), dtype=np.int8)
        attention_mask = np.zeros((count, seq_len), dtype=np.int8)
        cls, sep = self.special_ids["cls"], self.special_ids["sep"]
        for row, (first, second) in enumerate(examples):
            ids = [cls, *first, sep]
            first_length = len(ids)
            if second:
                ids += [*second, sep]
            input_ids[row, :len(ids)] = ids
            token_type_ids[row, first_length:len(ids)] = 1
            attention_mask[row, :len(ids)] = 1
        return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}

    # datasets.map bodies --------------------------------------------------------------------------

    def map_documents(self, batch: dict[str, list]) -> dict[str, np.ndarray]:
        """Rows from the document generator: keyed by (input, byte offset)."""
        try:
            return self.pack(batch["text"], batch["input"], batch["offset"])
        except DataError as error:
            _report_error(self.error_dir, (int(batch["input"][0]), int(batch["offset"][0])), error)
            raise

    def map_saved_rows(self, batch: dict[str, list], indices: list[int], *, input_index: int,
                       name: str) -> dict[str, np.ndarray]:
        """Rows of a saved dataset: keyed by (input, row index)."""
        try:
            return self.pack(batch["text"], [input_index] * len(indices), indices,
                             where=lambda row: f"{name}: row {indices[row]}")
        except DataError as error:
            _report_error(self.error_dir, (input_index, int(indices[0])), error)
            raise

    def generate_examples(self, shards: list[tuple]) -> Iterator[dict[str, np.ndarray]]:
        """Streaming body for ``Dataset.from_generator``: read, pack and yield examples shard by shard."""
        for shard in shards:
            pending: dict[str, list] = {"text": [], "input": [], "offset": []}
            for row in _generate_documents([shard], self.error_dir):
                for column in pending:
                    pending[column].append(row[column])
                if len(pending["text"]) == DOCUMENTS_PER_BATCH:
                    yield from _rows(self.map_documents(pending))
                    pending = {"text": [], "input": [], "offset": []}
            if pending["text"]:
                yield from _rows(self.map_documents(pending))


def _rows(columns: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    names = list(columns)
    for values in zip(*(columns[name] for name in names)):
        yield dict(zip(names, values))


def _load_text_dataset(source: _Source):
    """A saved dataset's ``text`` column (a DatasetDict's ``train`` split), memory-mapped."""
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(source.path)
    except Exception as exc:  # noqa: BLE001  datasets raises several types for a broken folder
        raise DataError(f"{source.path}: cannot load the saved dataset: {exc}") from None
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{source.path}: a saved DatasetDict needs a 'train' split (has: {', '.join(dataset)})")
        dataset = dataset["train"]
    assert isinstance(dataset, Dataset)
    feature = dataset.features.get("text")
    if feature is None or getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"{source.path}: the saved dataset needs a string column 'text' (columns: "
                        f"{', '.join(dataset.column_names)})")
    return dataset.select_columns(["text"])


# ==================================================================================================
# prepare
# ==================================================================================================


def _versions() -> dict[str, str]:
    import datasets
    import pyarrow
    import tokenizers

    from electra_fast import __version__ as electra_fast_version

    return {"python": sys.version.split()[0], "datasets": datasets.__version__, "tokenizers": tokenizers.__version__,
            "pyarrow": pyarrow.__version__, "numpy": np.__version__, "electra_fast": electra_fast_version}


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise DataError(f"--out {out} is a non-empty folder that is not a prepared dataset (no manifest.json); "
                        "choose a new or empty folder")


def _reusable(out: Path, fingerprint: str) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (manifest.get("fingerprint") == fingerprint and (out / manifest.get("dataset_dir", "dataset")).is_dir()
            and (out / "tokenizer.json").is_file())


def _prefer_streaming(text_bytes: int, where: Path) -> bool:
    """Stream when a decoded copy of the text would crowd the disk or far outgrow the page cache."""
    free = shutil.disk_usage(where).free
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 1 << 62
    return text_bytes > free // 4 or text_bytes > memory


def _example_stats(dataset, seq_len: int) -> dict[str, Any]:
    """Counts straight from the Arrow columns, a chunk at a time (nothing is loaded whole)."""
    examples = tokens = two_segment = full_length = 0
    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    for mask_chunk, type_chunk in zip(table.column("attention_mask").chunks, table.column("token_type_ids").chunks):
        mask = mask_chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, seq_len)
        types = type_chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, seq_len)
        lengths = mask.sum(axis=1, dtype=np.int64)
        examples += len(lengths)
        tokens += int(lengths.sum())
        full_length += int((lengths == seq_len).sum())
        two_segment += int(types.any(axis=1).sum())
    specials = 2 * examples + two_segment  # [CLS] + [SEP] each, one more [SEP] with a B segment
    slots = examples * seq_len
    return {
        "num_examples": examples,
        "num_tokens": tokens,
        "num_text_tokens": tokens - specials,
        "num_padding_tokens": slots - tokens,
        "padding_fraction": round((slots - tokens) / slots, 6) if slots else 0.0,
        "single_segment_fraction": round(1 - two_segment / examples, 6) if examples else 0.0,
        "full_length_fraction": round(full_length / examples, 6) if examples else 0.0,
    }


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    if enabled:
        datasets.enable_progress_bars()
    else:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


def prepare(inputs: list[str], out_dir: str, *, vocab: str | None = None, vocab_size: int = 30522,
            seq_len: int = 128, seed: int = 12345, num_proc: int | None = None, default_corpus: bool = False,
            force: bool = False, lowercase: bool = True, streaming: bool | None = None,
            verbose: bool = True) -> Path:
    """Build (or reuse) a prepared pretraining dataset in ``out_dir``; see the module docstring.

    ``streaming``: None chooses by input size; True/False force the path (the result is the same).
    Raises :class:`DataError` on bad input, leaving ``out_dir`` as it was.
    """
    out = Path(out_dir).expanduser().absolute()
    inputs = [str(p) for p in (inputs or [])]
    if not inputs and not default_corpus:
        raise DataError("nothing to prepare: give --input PATH... or --default")
    if seq_len < 8 or seq_len > 1 << 16:
        raise DataError(f"--seq-len must be between 8 and 65536, got {seq_len}")
    if vocab is None and vocab_size < len(SPECIAL_TOKENS) + 1:
        raise DataError(f"--vocab-size must be larger than the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    num_proc = max(1, min(os.cpu_count() or 1, 8) if num_proc is None else int(num_proc))
    _check_out_dir(out)
    vocab_table = _read_vocab_file(vocab) if vocab is not None else None

    staging = make_staging_directory(out)
    started = time.time()
    try:
        with _progress_bars(verbose):
            manifest = _prepare_into(staging, out, inputs=inputs, vocab_path=vocab, vocab_table=vocab_table,
                                     vocab_size=vocab_size, seq_len=seq_len, seed=seed, num_proc=num_proc,
                                     default_corpus=default_corpus, force=force, lowercase=lowercase,
                                     streaming=streaming, verbose=verbose)
        if manifest is None:  # reused
            shutil.rmtree(staging, ignore_errors=True)
            return out
        publish_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log(verbose, f"wrote {manifest['num_examples']} examples ({manifest['num_tokens']} tokens, "
                  f"{manifest['padding_fraction']:.1%} padding) to {out} in {time.time() - started:.1f}s")
    return out


def _prepare_into(staging: Path, out: Path, *, inputs: list[str], vocab_path: str | None,
                  vocab_table: dict[str, int] | None, vocab_size: int, seq_len: int, seed: int, num_proc: int,
                  default_corpus: bool, force: bool, lowercase: bool, streaming: bool | None,
                  verbose: bool) -> dict[str, Any] | None:
    from datasets import concatenate_datasets

    cache_dir, error_dir = staging / "cache", staging / "errors"
    sources: list[_Source] = []
    corpus_summary = None
    if default_corpus:
        from electra_fast import corpus

        _log(verbose, "building the default corpus from the Python standard library's documentation")
        corpus_file = staging / "default_corpus.txt"
        corpus_summary = corpus.write_corpus(corpus.build_default_corpus(), corpus_file)
        sources.append(_Source(0, str(corpus_file), "text", corpus_file.stat().st_size, corpus_summary["sha256"],
                               name="<default corpus>"))
    for source in _discover_inputs(inputs, exclude=out):
        source.index = len(sources)
        sources.append(source)
    total_bytes = sum(s.bytes for s in sources)
    _log(verbose, f"{len(sources)} input(s), {total_bytes / 1e6:.1f} MB")

    settings = {"format_version": FORMAT_VERSION, "seq_len": seq_len, "seed": seed, "lowercase": lowercase,
                "vocab_sha256": hashlib.sha256(Path(vocab_path).expanduser().read_bytes()).hexdigest()
                if vocab_path else None,
                "vocab_size": None if vocab_path else vocab_size, "tokenizer_train_chars": TOKENIZER_TRAIN_CHARS,
                "max_document_chars": MAX_DOCUMENT_CHARS}
    fingerprint = hashlib.sha256(json.dumps(
        {"settings": settings, "inputs": [(s.kind, s.sha256) for s in sources]}, sort_keys=True).encode()).hexdigest()
    if not force and _reusable(out, fingerprint):
        _log(verbose, f"reusing {out}: it was prepared from the same inputs with the same settings "
                      "(--force rebuilds it)")
        return None

    text_sources = [s for s in sources if s.kind in ("text", "jsonl")]
    arrow_sources = [s for s in sources if s.kind == "arrow"]
    shards = [shard for source in text_sources for shard in _shards(source)]

    # Tokenizer ------------------------------------------------------------------------------------
    trained_on: dict[str, int] = {"chars": 0, "documents": 0}
    if vocab_table is not None:
        tokenizer = _build_tokenizer(vocab_table, lowercase)
        tokenizer_info = {"source": str(Path(vocab_path).expanduser().absolute()), "trained": False}
    else:
        _log(verbose, f"training a WordPiece tokenizer ({vocab_size} tokens)")
        with _worker_errors(error_dir):
            tokenizer = _train_tokenizer(
                _training_texts(shards, arrow_sources, TOKENIZER_TRAIN_CHARS, trained_on), vocab_size, lowercase)
        if trained_on["chars"] == 0:
            raise DataError(_empty_corpus_message(sources))
        tokenizer_info = {"source": "trained", "trained": True, "trained_on_chars": trained_on["chars"],
                          "trained_on_documents": trained_on["documents"]}
    special_ids = _finish_tokenizer(tokenizer)
    actual_vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    # Examples -------------------------------------------------------------------------------------
    use_streaming = _prefer_streaming(sum(s.bytes for s in text_sources), staging) if streaming is None \
        else bool(streaming)
    packer = _Packer(tokenizer, seq_len, seed, special_ids, actual_vocab_size, str(error_dir),
                     parallel_tokenizer=num_proc == 1)
    features = _example_features(seq_len, actual_vocab_size)
    parts = []
    if shards and not _any_text(shards):
        shards = []  # datasets cannot build a dataset from a generator that yields nothing
    with _worker_errors(error_dir):
        if shards and use_streaming:
            _log(verbose, f"tokenising and packing (streaming, {num_proc} process(es))")
            parts.append(_from_generator(
                packer.generate_examples, error_dir, gen_kwargs={"shards": shards}, features=features,
                cache_dir=str(cache_dir), num_proc=min(num_proc, len(shards))))
        elif shards:
            _log(verbose, f"reading documents ({len(shards)} shard(s), {num_proc} process(es))")
            documents = _from_generator(
                _generate_documents, error_dir, gen_kwargs={"shards": shards, "error_dir": str(error_dir)},
                features=_document_features(), cache_dir=str(cache_dir), num_proc=min(num_proc, len(shards)))
            if documents is not None:
                _log(verbose, f"tokenising and packing {len(documents)} documents ({num_proc} process(es))")
                parts.append(documents.map(
                    packer.map_documents, batched=True, batch_size=DOCUMENTS_PER_BATCH, features=features,
                    remove_columns=documents.column_names, num_proc=_useful_procs(num_proc, len(documents)),
                    cache_file_name=str(cache_dir / "examples-text.arrow"), desc="packing"))
        for source in arrow_sources:
            rows = _load_text_dataset(source)
            _log(verbose, f"tokenising and packing {len(rows)} rows of {source.path}")
            parts.append(rows.map(
                packer.map_saved_rows, batched=True, batch_size=DOCUMENTS_PER_BATCH, with_indices=True,
                fn_kwargs={"input_index": source.index, "name": source.path}, features=features,
                remove_columns=rows.column_names, num_proc=_useful_procs(num_proc, len(rows)),
                cache_file_name=str(cache_dir / f"examples-{source.index}.arrow"), desc="packing"))
    parts = [part for part in parts if part is not None and len(part)]
    if not parts:
        raise DataError(_empty_corpus_message(sources))
    examples = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    stats = _example_stats(examples, seq_len)

    # Output ---------------------------------------------------------------------------------------
    examples.save_to_disk(str(staging / "dataset"), num_proc=num_proc if len(examples) > 200_000 else None)
    del examples, parts
    tokenizer.save(str(staging / "tokenizer.json"))
    _write_vocab_txt(tokenizer, staging / "vocab.txt")
    shutil.rmtree(cache_dir, ignore_errors=True)
    if default_corpus:
        (staging / "default_corpus.txt").unlink()

    manifest = {
        "format": "electra-fast-pretraining-data",
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": [s.describe() for s in sources],
        "default_corpus": corpus_summary,
        "seq_len": seq_len,
        "seed": seed,
        "lowercase": lowercase,
        "vocab_size": actual_vocab_size,
        "special_token_ids": special_ids,
        "tokenizer": {**tokenizer_info, "type": "WordPiece", "vocab_size": actual_vocab_size},
        **stats,
        "columns": {"input_ids": _id_dtype(actual_vocab_size), "token_type_ids": "int8", "attention_mask": "int8"},
        "dataset_dir": "dataset",
        "streaming": use_streaming,
        "num_proc": num_proc,
        "versions": _versions(),
    }
    # Written last: a folder with a manifest is a finished one.
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _document_features():
    from datasets import Features, Value

    return Features({"text": Value("string"), "input": Value("int32"), "offset": Value("int64")})


def _any_text(shards: list[tuple]) -> bool:
    """Whether the text inputs hold at least one non-blank line (reads only up to the first one)."""
    return next(iter(_generate_documents(shards, error_dir="")), None) is not None


def _from_generator(generator, error_dir: Path, **kwargs):
    """``Dataset.from_generator``, or None when the generator yielded no row at all (datasets raises on
    an empty split; an input whose text tokenises to nothing gets there)."""
    from datasets import Dataset

    try:
        return Dataset.from_generator(generator, **kwargs)
    except Exception as exc:  # noqa: BLE001
        reported = error_dir.is_dir() and any(error_dir.iterdir())
        if "corresponds to no data" in str(exc) and not reported:
            return None
        raise


def _useful_procs(num_proc: int, rows: int) -> int | None:
    """datasets' map starts processes even for a handful of rows; one batch per process at least."""
    procs = min(num_proc, max(1, rows // DOCUMENTS_PER_BATCH))
    return procs if procs > 1 else None


def _empty_corpus_message(sources: list[_Source]) -> str:
    names = ", ".join(s.name or s.path for s in sources[:5]) + (" ..." if len(sources) > 5 else "")
    return f"empty corpus: no text in {names}"


# ==================================================================================================
# Reading a prepared folder
# ==================================================================================================

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
    return manifest


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
        raise DataError(f"sequence length mismatch: the prepared data holds examples of {data_seq_len} tokens but the "
                        f"config has data.seq_len={seq_len}; set data.seq_len={data_seq_len} or prepare the data "
                        f"with --seq-len {seq_len}")


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


# ==================================================================================================
# The training loader
# ==================================================================================================


class EpochPermutation:
    """A seeded pseudo-random permutation of ``range(n)``, evaluated per index in O(1) memory.

    A full ``np.random.permutation(n)`` is 8n bytes in every loader worker (400 MB each for 50M
    examples). This is a Feistel network on the smallest power-of-two domain 2^b >= n (so < 2n):
    each round maps (hi, lo) -> (lo, hi XOR F(lo)), a bijection whatever F is; with b odd the two
    halves differ by a bit and swap widths every round, so an even number of rounds returns to the
    original layout. Restricting it to [0, n) by cycle walking (apply it again until the value is in
    range) keeps it a bijection; fewer than two steps are needed on average. Round keys come from
    ``SeedSequence([seed, epoch])``, so every rank and worker computes the same order.
    """

    ROUNDS = 4  # even; 4 rounds of a pseudo-random F give a pseudo-random permutation (Luby-Rackoff)

    def __init__(self, n: int, seed: int, epoch: int):
        if n <= 0:
            raise ValueError("cannot permute an empty range")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.hi_bits, self.lo_bits = (bits + 1) // 2, bits // 2
        self.keys = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]).generate_state(
            self.ROUNDS, dtype=np.uint64)

    @staticmethod
    def _mix(z: np.ndarray) -> np.ndarray:
        # splitmix64's finaliser: a cheap, well-tested 64-bit avalanche (uint64 arithmetic wraps).
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        hi_bits, lo_bits = self.hi_bits, self.lo_bits
        hi, lo = x >> np.uint64(lo_bits), x & np.uint64((1 << lo_bits) - 1)
        for key in self.keys:
            hi, lo = lo, hi ^ (self._mix(lo ^ key) & np.uint64((1 << hi_bits) - 1))
            hi_bits, lo_bits = lo_bits, hi_bits
        return (hi << np.uint64(lo_bits)) | lo

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        values = self._encrypt(np.asarray(positions, dtype=np.uint64))
        outside = np.flatnonzero(values >= self.n)
        while len(outside):
            values[outside] = self._encrypt(values[outside])
            outside = outside[values[outside] >= self.n]
        return values.astype(np.int64)


_BATCH_COLUMNS = ("input_ids", "token_type_ids", "attention_mask")


class _RowGather:
    """Rows by index from the memory-mapped Arrow record batches, as numpy views (no copy of the data).

    ``Dataset.__getitem__`` with a list of indices formats row by row (~20 ms per 128 rows here), and
    pyarrow's ``take`` on a chunked column concatenates every chunk first, which costs the whole
    dataset per batch. Here each record batch's fixed-size-list column is viewed as a (rows, seq_len)
    array over the mapped file, and a batch is gathered with one fancy index per record batch touched.
    """

    def __init__(self, dataset, seq_len: int):
        table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
        self.batches = table.to_batches()
        self.offsets = np.cumsum([0] + [batch.num_rows for batch in self.batches])
        self.seq_len = seq_len
        self._views: dict[int, dict[str, np.ndarray]] = {}

    def _view(self, index: int) -> dict[str, np.ndarray]:
        if index not in self._views:
            batch = self.batches[index]
            self._views[index] = {
                name: batch.column(name).flatten().to_numpy(zero_copy_only=True).reshape(-1, self.seq_len)
                for name in _BATCH_COLUMNS}
        return self._views[index]

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        batch_of_row = np.searchsorted(self.offsets, rows, side="right") - 1
        out = {name: np.empty((len(rows), self.seq_len), dtype=np.int64) for name in _BATCH_COLUMNS}
        for index in np.unique(batch_of_row):
            chosen = np.flatnonzero(batch_of_row == index)
            local = rows[chosen] - self.offsets[index]
            view = self._view(int(index))
            for name in _BATCH_COLUMNS:
                out[name][chosen] = view[name][local]
        return out


class _RankBatches(torch.utils.data.Dataset):
    """Item k = this rank's k-th micro-batch after stream position ``start`` (a map-style dataset, so
    DataLoader workers can build batches in any order and the loader still yields them in order).

    The sample stream is epoch 0's permutation, then epoch 1's, ... Global batch k covers stream
    positions [start + k·G, start + (k+1)·G) with G = micro_batch_size · world_size; rank r takes the
    r-th slice of B. Ranks are thus disjoint, each epoch is covered exactly once, every rank gets the
    same count, and a global batch may straddle an epoch boundary instead of dropping or repeating.
    """

    def __init__(self, dataset, num_examples: int, seed: int, rank: int, world_size: int, micro_batch_size: int,
                 start: int, seq_len: int = 0):
        self.dataset = dataset
        self.seq_len = seq_len
        self.num_examples = num_examples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.micro_batch_size = micro_batch_size
        self.start = start
        self._permutations: dict[int, EpochPermutation] = {}
        self._gather: _RowGather | None = None  # built in each worker process, never pickled

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_gather": None}

    def example_ids(self, k: int) -> np.ndarray:
        global_batch = self.micro_batch_size * self.world_size
        first = self.start + k * global_batch + self.rank * self.micro_batch_size
        positions = np.arange(first, first + self.micro_batch_size, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_examples)
        ids = np.empty_like(positions)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            ids[chosen] = self._permutation(int(epoch))(within[chosen])
        return ids

    def _permutation(self, epoch: int) -> EpochPermutation:
        if epoch not in self._permutations:
            if len(self._permutations) > 4:
                self._permutations.clear()
            self._permutations[epoch] = EpochPermutation(self.num_examples, self.seed, epoch)
        return self._permutations[epoch]

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if self._gather is None:
            self._gather = _RowGather(self.dataset, self.seq_len)
        return {name: torch.from_numpy(rows) for name, rows in self._gather(self.example_ids(k)).items()}

    def __len__(self) -> int:  # the stream is endless; DataLoader only needs a number
        return sys.maxsize


class _Forever(torch.utils.data.Sampler):
    def __iter__(self) -> Iterator[int]:
        return itertools.count()


class PretrainingLoader:
    """Endless, rank-sharded, seeded, resumable batches of a prepared dataset (masking happens on device).

    Each yielded batch is ``{"input_ids", "token_type_ids", "attention_mask"}``, int64 of shape
    (micro_batch_size, seq_len), in pinned memory when CUDA is available, prepared ahead by
    ``num_workers`` DataLoader processes reading the memory-mapped Arrow files. See
    :class:`_RankBatches` for which examples each rank gets.

    ``state_dict()`` records the stream position after the last batch handed out (every rank holds
    the same one); a loader given it with ``load_state_dict`` yields exactly the batches an
    uninterrupted loader would have, across epoch boundaries too. The position is counted in examples,
    so a run may even resume on a different number of ranks.
    """

    def __init__(self, data_dir: str, *, micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 2, prefetch_factor: int = 4, pin_memory: bool = True):
        from datasets import load_from_disk

        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.manifest = read_manifest(data_dir)
        self.data_dir = str(data_dir)
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_workers = max(0, num_workers)
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._dataset = load_from_disk(str(Path(data_dir).expanduser() / self.manifest.get("dataset_dir", "dataset")))
        if len(self._dataset) != self.manifest["num_examples"]:
            raise DataError(f"{data_dir}: the dataset has {len(self._dataset)} examples but the manifest says "
                            f"{self.manifest['num_examples']}; prepare it again")
        if len(self._dataset) == 0:
            raise DataError(f"{data_dir}: the dataset is empty")
        self._position = 0  # examples of the global stream handed out so far (all ranks together)
        self._generation = 0

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def num_examples(self) -> int:
        return int(self.manifest["num_examples"])

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank in one pass over the data (rounded down; batches run across epochs)."""
        return max(1, self.num_examples // self.global_batch_size)

    @property
    def epoch(self) -> int:
        return self._position // self.num_examples

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._position // self.num_examples, "position": self._position % self.num_examples,
                "num_examples": self.num_examples, "seed": self.seed, "format_version": FORMAT_VERSION}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_examples") != self.num_examples:
            raise DataError(f"the loader state was saved on a dataset of {state.get('num_examples')} examples, but "
                            f"{self.data_dir} has {self.num_examples}: resume with the same prepared data")
        if state.get("seed") != self.seed:
            raise DataError(f"the loader state was saved with seed {state.get('seed')}, this loader has seed "
                            f"{self.seed}: the example order would differ")
        self._position = int(state["epoch"]) * self.num_examples + int(state["position"])
        self._generation += 1  # an iterator made before this point would continue from the old position

    def _batches(self, start: int) -> torch.utils.data.DataLoader:
        batches = _RankBatches(self._dataset, self.num_examples, self.seed, self.rank, self.world_size,
                               self.micro_batch_size, start, self.seq_len)
        workers = self.num_workers
        # A generator of its own: without one, DataLoader draws its workers' base seed from torch's global
        # CPU generator whenever iteration starts, which would shift the training's random streams
        # (dropout) by when a run was started or resumed.
        return torch.utils.data.DataLoader(
            batches, batch_size=None, sampler=_Forever(), num_workers=workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers else None, persistent_workers=False,
            generator=torch.Generator().manual_seed(self.seed))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        generation = self._generation
        for batch in self._batches(self._position):
            if generation != self._generation:
                raise RuntimeError("load_state_dict() was called while iterating; start a new iteration")
            self._position += self.global_batch_size
            yield batch


# ==================================================================================================
# Command line: `electra-fast prepare` (the CLI module calls these) and `python -m electra_fast.data`
# ==================================================================================================


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``electra-fast prepare``."""
    parser.add_argument("--input", dest="inputs", nargs="+", action="extend", default=[], metavar="PATH",
                        help="text files or folders (one sentence or paragraph a line, blank line between "
                             "documents), .jsonl files with a 'text' field, or datasets.save_to_disk folders")
    parser.add_argument("--default", dest="default_corpus", action="store_true",
                        help="use the embedded corpus built from the Python standard library's documentation")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--vocab", metavar="vocab.txt", help="use this WordPiece vocabulary instead of training one")
    vocab.add_argument("--vocab-size", type=int, default=30522, help="size of the trained vocabulary (default 30522)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per example (default 128)")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the packing randomness (default 12345)")
    parser.add_argument("--num-proc", type=int, default=None, help="processes (default: CPU count, at most 8)")
    parser.add_argument("--cased", dest="lowercase", action="store_false", help="keep case (default: lower-case)")
    parser.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                        help="pack while reading without a decoded copy of the text (default: by input size)")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out holds the same preparation")


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``prepare`` from parsed arguments; a DataError becomes one line on stderr and exit code 2."""
    try:
        out = prepare(args.inputs, args.out, vocab=args.vocab, vocab_size=args.vocab_size, seq_len=args.seq_len,
                      seed=args.seed, num_proc=args.num_proc, default_corpus=args.default_corpus, force=args.force,
                      lowercase=args.lowercase, streaming=args.streaming)
        manifest = read_manifest(str(out))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    corpus = manifest.get("default_corpus")
    if corpus:
        print(f"default corpus: {corpus['documents']} documents, {corpus['sentences']} sentences, "
              f"{corpus['characters']} characters (Python {corpus['python']})")
    print(f"{out}: {manifest['num_examples']} examples of {manifest['seq_len']} tokens, {manifest['num_tokens']} "
          f"tokens ({manifest['num_text_tokens']} text), {manifest['padding_fraction']:.1%} padding, "
          f"vocabulary {manifest['vocab_size']}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m electra_fast.data", description="Prepare pretraining data.")
    add_prepare_arguments(_parser)
    sys.exit(run_prepare(_parser.parse_args()))
