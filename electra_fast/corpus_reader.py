"""Reading the inputs of ``prepare``: discovery and hashing, and documents from text, jsonl and saved
datasets (the parts that run in datasets' worker processes), with errors that name the file and line.

Text files hold one sentence or paragraph a line and a blank line between documents (the reference
ELECTRA layout); every line is checked (UTF-8, no NUL byte, at most ``MAX_LINE_BYTES``). Large
uncompressed files are cut into byte ranges at blank lines so one big file still uses every process.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import hashlib
import json
import logging
import lzma
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from .hashing import sha256_file
from .manifest import DataError, damaged_arrow_file

logger = logging.getLogger(__name__)

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
TEXT_SUFFIXES_JSONL = (".jsonl", ".ndjson")
COMPRESSED_SUFFIXES = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}

# ==================================================================================================
# Inputs: discovery and hashing
# ==================================================================================================


@dataclasses.dataclass
class Source:
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


def discover_inputs(inputs: Iterable[str], exclude: Path | None = None) -> list[Source]:
    """Expand folders (sorted; hidden files and the output folder ``exclude`` skipped), classify and
    hash every input."""
    sources: list[Source] = []

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
                sha256_file(file, digest)
            sources.append(Source(len(sources), str(path), "arrow", sum(f.stat().st_size for f in files),
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
            sources.append(Source(len(sources), str(file), kind, file.stat().st_size, sha256_file(file),
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


def shards_of(source: Source) -> list[tuple[int, str, str, bool, int, int]]:
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


def file_documents(path: str) -> Iterator[list[str]]:
    """The documents of one text or jsonl file (compressed or not), each a list of stripped lines, read
    and checked exactly as ``prepare`` reads them; DataError names the file and line at fault."""
    kind, compressed = _file_kind(Path(path))
    if kind == "jsonl":
        documents = _jsonl_documents(str(path), compressed)
    else:
        documents = _documents_from_lines(_read_lines(str(path), compressed, 0, -1, MAX_LINE_BYTES))
    for _, lines in documents:
        yield lines


def report_error(error_dir: str, key: tuple[int, int], error: DataError) -> None:
    """Leave a worker's DataError where the parent finds it: datasets re-raises worker failures as a
    generic DatasetGenerationError with only a traceback string, losing the message and its type."""
    if not error_dir:  # running in the parent process: the exception itself arrives
        return
    os.makedirs(error_dir, exist_ok=True)
    with open(os.path.join(error_dir, f"{key[0]:08d}-{key[1]:020d}.txt"), "w", encoding="utf-8") as handle:
        handle.write(str(error))


@contextlib.contextmanager
def worker_errors(error_dir: Path) -> Iterator[None]:
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


def generate_documents(shards: list[tuple], error_dir: str) -> Iterator[dict[str, Any]]:
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
            report_error(error_dir, (input_index, start), error)
            raise


def training_texts(text_shards: list[tuple], arrow_sources: list[Source], budget: int,
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
            dataset = load_text_dataset(source)
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


def load_text_dataset(source: Source):
    """A saved dataset's ``text`` column (a DatasetDict's ``train`` split), memory-mapped."""
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(source.path)
    except Exception as exc:  # noqa: BLE001  datasets raises several types for a broken folder
        folder = Path(source.path)
        damaged = next(filter(None, (damaged_arrow_file(d) for d in [folder, *sorted(folder.iterdir())]
                                     if d.is_dir())), None)
        raise DataError(damaged or f"{source.path}: cannot load the saved dataset: {exc}") from None
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


def document_features():
    from datasets import Features, Value

    return Features({"text": Value("string"), "input": Value("int32"), "offset": Value("int64")})
