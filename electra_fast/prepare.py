"""``electra-fast prepare``: corpus -> tokenizer + packed Arrow dataset (the offline pipeline's orchestration).

    electra-fast prepare --input corpus/ more.jsonl --out data/owt --vocab-size 30522 --seq-len 128
    electra-fast prepare --default --out data/demo --vocab-size 1024 --seq-len 64   # no download
    python -m electra_fast.prepare --default --out /tmp/demo                        # same, without the CLI

The seams, one module each: reading inputs (``corpus_reader``), tokenizer training
(``tokenizer_training``), packing (``packing``); what is written is read back through ``manifest``
and, for training, ``loader``.

What ``prepare`` writes (``DIR``)::

    DIR/manifest.json    inputs and their sha256, counts (tokens read / kept / dropped), settings,
                         special ids, library versions; the sha256 of vocab.txt, tokenizer.json and
                         every Arrow file, and the ``fingerprint`` over them (see _output_identity)
    DIR/tokenizer.json   the `tokenizers` WordPiece tokenizer (BERT normaliser and pre-tokeniser)
    DIR/vocab.txt        the same vocabulary, one token a line (id = line number)
    DIR/dataset/         `datasets.Dataset.save_to_disk`: input_ids (uint16, or int32 past 65536
                         tokens), token_type_ids and attention_mask (int8), each a fixed-size list of
                         seq_len, padded
    DIR/heldout/         the held-out split in the same layout (``--heldout``; absent when it is 0): examples
                         chosen at random by the seed and left out of dataset/, for evaluation

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
   ``TOKENIZER_TRAIN_CHARS`` characters, or the WordPiece of a given ``vocab.txt``, or any given Hugging
   Face fast tokenizer (``--tokenizer tokenizer.json``: BPE, WordPiece, ...; used as it is, its special
   tokens mapped to ELECTRA's roles by :mod:`electra_fast.tokenizer_roles`, no ``vocab.txt`` written). Training is
   reproducible (the alphabet and the continuation pieces are fixed before the trainer runs, see
   :func:`electra_fast.tokenizer_training.train_tokenizer`) and the ids are renumbered canonically:
   the same text gives a byte-identical ``vocab.txt`` and ``tokenizer.json``.
4. Examples: ``Dataset.map(batched=True, num_proc=...)`` tokenises each document and packs it as the
   reference ``ExampleBuilder`` does, but keeping every token: lines too long for an example are
   split into sentences (or cut), and what the reference would drop at an example's end begins the
   next (see :mod:`electra_fast.packing`). Every document draws its random numbers from its own
   generator, seeded by (seed, input, position in the input), so the result does not depend on
   ``num_proc`` or batch boundaries.
5. Held-out split: ``--heldout`` examples (default 1%, at most 2,000, none when that is under 10) drawn
   by the seed from all examples go to ``heldout/``, the rest to ``dataset/``. ``num_examples`` and the
   other layout counts describe ``dataset/``, ``heldout_layout`` the held-out split, and the token
   account (read / kept / dropped) both. Examples are packed from consecutive sentences, so a held-out
   example may share a document with training ones.
6. Output: ``save_to_disk`` into a hidden sibling folder of ``DIR``, manifest last, then a rename. On
   any error the sibling is removed and ``DIR`` is left as it was; a full disk is one line naming
   ``DIR`` and the space left.

For inputs too large to keep a second, decoded copy on disk ("streaming", chosen automatically past
a quarter of the free disk or the machine's memory), step 2 is skipped: each process reads its files
and packs them as it goes, and only the examples are written (``Dataset.from_generator``); the result
is identical.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .atomic import make_staging_directory, publish_directory
from .corpus_reader import (MAX_DOCUMENT_CHARS, Source, discover_inputs, document_features, generate_documents,
                            load_text_dataset, shards_of, training_texts, worker_errors)
from .hashing import sha256_file
from .manifest import FORMAT_VERSION, SPECIAL_TOKENS, DataError, dataset_files, identity_fingerprint, read_manifest
from .packing import (DOCUMENTS_PER_BATCH, PACKING_VERSION, STAT_COLUMNS, Packer, example_features, example_stats,
                      id_dtype, token_account_line, token_accounting)
from .tokenizer_roles import load_given_tokenizer, parse_special_tokens, tokenizer_type, vocab_size_of
from .tokenizer_training import (TOKENIZER_TRAIN_CHARS, build_tokenizer, finish_tokenizer, read_vocab_file,
                                 train_tokenizer, write_vocab_txt)

logger = logging.getLogger(__name__)


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(f"prepare: {message}", flush=True)

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
    return (manifest.get("inputs_fingerprint") == fingerprint
            and (out / manifest.get("dataset_dir", "dataset")).is_dir() and (out / "tokenizer.json").is_file())


def _disk_full_error(out: Path, exc: BaseException) -> DataError | None:
    """A DataError naming ``out`` and the space left when ``exc`` is (or was caused by) a full disk,
    wherever it happened: in this process, in a datasets worker (re-raised as another type, the
    OSError as its cause or only in its message), or in pyarrow (an OSError without an errno)."""
    cause: BaseException | None = exc
    while cause is not None:
        if (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)) \
                or "No space left on device" in str(cause) or "Disk quota exceeded" in str(cause):
            where = next(p for p in [out, *out.parents] if p.exists())
            free = shutil.disk_usage(where).free
            return DataError(f"disk full while writing {out}: {_format_bytes(free)} free on its disk now; prepare "
                             "needs room for the dataset and a working copy of it beside --out (nothing was written)")
        cause = cause.__cause__ or cause.__context__
    return None


def _format_bytes(count: float) -> str:
    units = ("bytes", "KB", "MB", "GB", "TB")
    step = 0
    while count >= 1000 and step < len(units) - 1:
        count, step = count / 1000, step + 1
    return f"{count:.0f} bytes" if step == 0 else f"{count:.1f} {units[step]}"


def _prefer_streaming(text_bytes: int, where: Path) -> bool:
    """Stream when a decoded copy of the text would crowd the disk or far outgrow the page cache."""
    free = shutil.disk_usage(where).free
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 1 << 62
    return text_bytes > free // 4 or text_bytes > memory


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


# The default held-out split: a small share of the examples, capped so that a large corpus does not
# spend minutes of every evaluation (the trainer evaluates on a fixed sample of it anyway).
DEFAULT_HELDOUT = "1%"
HELDOUT_PERCENT_CAP = 2000
# A percentage that comes to fewer examples than this sets none aside: so few measure nothing.
HELDOUT_PERCENT_MIN = 10
# The manifest keys that describe the examples of one split (the token account covers both splits).
SPLIT_LAYOUT_KEYS = ("num_examples", "num_tokens", "num_text_tokens", "num_padding_tokens", "padding_fraction",
                     "single_segment_fraction", "full_length_fraction")


def parse_heldout(spec: str | int) -> str:
    """``--heldout`` in its canonical form: ``"N"`` (examples) or ``"P%"`` (0 <= P < 100)."""
    text = str(spec).strip()
    try:
        value = float(text[:-1]) if text.endswith("%") else int(text)
    except ValueError:
        value = -1
    if value < 0 or (text.endswith("%") and value >= 100):
        raise DataError(f"--heldout must be a number of examples (e.g. 500) or a percentage below 100 (e.g. 1%), "
                        f"got {spec!r}")
    return f"{value:g}%" if text.endswith("%") else str(value)


def heldout_size(spec: str, num_examples: int) -> int:
    """Examples the split ``spec`` sets aside from ``num_examples``; a percentage is capped at
    ``HELDOUT_PERCENT_CAP`` (and is 0 below ``HELDOUT_PERCENT_MIN``), a count is taken as given. At least
    one training example must remain."""
    if spec.endswith("%"):
        count = min(int(num_examples * float(spec[:-1]) / 100), HELDOUT_PERCENT_CAP)
        return count if count >= HELDOUT_PERCENT_MIN else 0
    count = int(spec)
    if count >= num_examples:
        raise DataError(f"--heldout {count} leaves no training examples: the corpus makes {num_examples} examples")
    return count


def heldout_rows(num_examples: int, count: int, seed: int) -> np.ndarray:
    """The sorted example indices of the held-out split: a function of (count, seed, num_examples) only."""
    rng = np.random.default_rng([seed, 0x4E1D])  # a stream of its own, apart from packing's
    return np.sort(rng.choice(num_examples, size=count, replace=False)) if count else np.zeros(0, np.int64)


def prepare(inputs: list[str], out_dir: str, *, vocab: str | None = None, vocab_size: int = 30522,
            seq_len: int = 128, seed: int = 12345, num_proc: int | None = None, default_corpus: bool = False,
            force: bool = False, lowercase: bool = True, streaming: bool | None = None,
            verbose: bool = True, heldout: str | int = DEFAULT_HELDOUT, tokenizer: str | None = None,
            special_tokens: dict[str, str] | None = None) -> Path:
    """Build (or reuse) a prepared pretraining dataset in ``out_dir``; see the module docstring.

    ``tokenizer``: a Hugging Face fast tokenizer (``tokenizer.json`` or a folder with one; BPE, WordPiece,
    ...) to use as it is instead of training WordPiece, its special tokens mapped to ELECTRA's roles
    (:mod:`electra_fast.tokenizer_roles`; ``special_tokens`` names roles explicitly, ``{"mask": "<mask>"}``).

    ``streaming``: None chooses by input size; True/False force the path (the result is the same).
    ``heldout``: the held-out split, a count (``500``) or a percentage (``"1%"``, at most 2,000 examples).
    Raises :class:`DataError` on bad input, leaving ``out_dir`` as it was.
    """
    out = Path(out_dir).expanduser().absolute()
    inputs = [str(p) for p in (inputs or [])]
    if not inputs and not default_corpus:
        raise DataError("nothing to prepare: give --input PATH... or --default")
    if seq_len < 8 or seq_len > 1 << 16:
        raise DataError(f"--seq-len must be between 8 and 65536, got {seq_len}")
    if vocab is not None and tokenizer is not None:
        raise DataError("give --vocab or --tokenizer, not both")
    if vocab is None and vocab_size < len(SPECIAL_TOKENS) + 1:
        raise DataError(f"--vocab-size must be larger than the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    num_proc = max(1, min(os.cpu_count() or 1, 8) if num_proc is None else int(num_proc))
    heldout = parse_heldout(heldout)
    _check_out_dir(out)
    vocab_table = read_vocab_file(vocab) if vocab is not None else None

    try:
        staging = make_staging_directory(out)
    except OSError as exc:
        raise (_disk_full_error(out, exc) or exc) from None
    started = time.time()
    try:
        with _progress_bars(verbose and sys.stderr.isatty()):  # a bar's carriage returns garble a log file
            manifest = _prepare_into(staging, out, inputs=inputs, vocab_path=vocab, vocab_table=vocab_table,
                                     vocab_size=vocab_size, seq_len=seq_len, seed=seed, num_proc=num_proc,
                                     default_corpus=default_corpus, force=force, lowercase=lowercase,
                                     streaming=streaming, verbose=verbose, heldout=heldout,
                                     tokenizer_path=tokenizer, special_tokens=special_tokens)
        if manifest is None:  # reused
            shutil.rmtree(staging, ignore_errors=True)
            return out
        publish_directory(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        disk_full = _disk_full_error(out, exc)
        if disk_full is not None:
            raise disk_full from None
        raise
    _log(verbose, f"wrote {manifest['num_examples']} examples + {manifest['num_heldout_examples']} held out "
                  f"({manifest['num_tokens']} tokens, "
                  f"{manifest['padding_fraction']:.1%} padding) to {out} in {time.time() - started:.1f}s")
    return out


def _prepare_into(staging: Path, out: Path, *, inputs: list[str], vocab_path: str | None,
                  vocab_table: dict[str, int] | None, vocab_size: int, seq_len: int, seed: int, num_proc: int,
                  default_corpus: bool, force: bool, lowercase: bool, streaming: bool | None,
                  verbose: bool, heldout: str = DEFAULT_HELDOUT, tokenizer_path: str | None = None,
                  special_tokens: dict[str, str] | None = None) -> dict[str, Any] | None:
    from datasets import concatenate_datasets

    cache_dir, error_dir = staging / "cache", staging / "errors"
    sources: list[Source] = []
    corpus_summary = None
    if default_corpus:
        from electra_fast import corpus

        _log(verbose, "building the default corpus from the Python standard library's documentation")
        corpus_file = staging / "default_corpus.txt"
        corpus_summary = corpus.write_corpus(corpus.build_default_corpus(), corpus_file)
        sources.append(Source(0, str(corpus_file), "text", corpus_file.stat().st_size, corpus_summary["sha256"],
                               name="<default corpus>"))
    for source in discover_inputs(inputs, exclude=out):
        source.index = len(sources)
        sources.append(source)
    total_bytes = sum(s.bytes for s in sources)
    _log(verbose, f"{len(sources)} input(s), {total_bytes / 1e6:.1f} MB")

    settings = {"format_version": FORMAT_VERSION, "seq_len": seq_len, "seed": seed, "lowercase": lowercase,
                "vocab_sha256": hashlib.sha256(Path(vocab_path).expanduser().read_bytes()).hexdigest()
                if vocab_path else None,
                "vocab_size": None if vocab_path else vocab_size, "tokenizer_train_chars": TOKENIZER_TRAIN_CHARS,
                "max_document_chars": MAX_DOCUMENT_CHARS, "packing_version": PACKING_VERSION, "heldout": heldout}
    given = None
    if tokenizer_path is not None:  # a given tokenizer: its file and the roles asked for identify the result
        given = load_given_tokenizer(tokenizer_path, special_tokens)
        settings.update(tokenizer_json_sha256=hashlib.sha256(given[0].to_str().encode()).hexdigest(),
                        special_tokens=special_tokens or {}, vocab_size=None)
    fingerprint = hashlib.sha256(json.dumps(
        {"settings": settings, "inputs": [(s.kind, s.sha256) for s in sources]}, sort_keys=True).encode()).hexdigest()
    if not force and _reusable(out, fingerprint):
        _log(verbose, f"reusing {out}: it was prepared from the same inputs with the same settings "
                      "(--force rebuilds it)")
        return None

    text_sources = [s for s in sources if s.kind in ("text", "jsonl")]
    arrow_sources = [s for s in sources if s.kind == "arrow"]
    shards = [shard for source in text_sources for shard in shards_of(source)]

    # Tokenizer ------------------------------------------------------------------------------------
    trained_on: dict[str, int] = {"chars": 0, "documents": 0}
    if given is not None:
        tokenizer, special_ids = given
        tokenizer_info = {"source": str(Path(tokenizer_path).expanduser().absolute()), "trained": False}
        _log(verbose, f"using the given {tokenizer_type(tokenizer)} tokenizer; special tokens "
                      + ", ".join(f"{role}={tokenizer.id_to_token(i)}" for role, i in special_ids.items()))
    elif vocab_table is not None:
        tokenizer = build_tokenizer(vocab_table, lowercase)
        tokenizer_info = {"source": str(Path(vocab_path).expanduser().absolute()), "trained": False}
    else:
        _log(verbose, f"training a WordPiece tokenizer ({vocab_size} tokens)")

        def training_batches():  # read twice: characters are counted first (see train_tokenizer)
            trained_on.update(chars=0, documents=0)
            return training_texts(shards, arrow_sources, TOKENIZER_TRAIN_CHARS, trained_on)

        with worker_errors(error_dir):
            tokenizer = train_tokenizer(training_batches, vocab_size, lowercase)
        if trained_on["chars"] == 0:
            raise DataError(_empty_corpus_message(sources))
        tokenizer_info = {"source": "trained", "trained": True, "trained_on_chars": trained_on["chars"],
                          "trained_on_documents": trained_on["documents"]}
    if given is None:
        special_ids = finish_tokenizer(tokenizer)
        actual_vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    else:
        actual_vocab_size = vocab_size_of(tokenizer)

    # Examples -------------------------------------------------------------------------------------
    use_streaming = _prefer_streaming(sum(s.bytes for s in text_sources), staging) if streaming is None \
        else bool(streaming)
    packer = Packer(tokenizer, seq_len, seed, special_ids, actual_vocab_size, str(error_dir),
                     parallel_tokenizer=num_proc == 1)
    features = example_features(seq_len, actual_vocab_size, with_stats=True)
    parts = []
    if shards and not _any_text(shards):
        shards = []  # datasets cannot build a dataset from a generator that yields nothing
    with worker_errors(error_dir):
        if shards and use_streaming:
            _log(verbose, f"tokenising and packing (streaming, {num_proc} process(es))")
            parts.append(_from_generator(
                packer.generate_examples, error_dir, gen_kwargs={"shards": shards}, features=features,
                cache_dir=str(cache_dir), num_proc=min(num_proc, len(shards))))
        elif shards:
            _log(verbose, f"reading documents ({len(shards)} shard(s), {num_proc} process(es))")
            documents = _from_generator(
                generate_documents, error_dir, gen_kwargs={"shards": shards, "error_dir": str(error_dir)},
                features=document_features(), cache_dir=str(cache_dir), num_proc=min(num_proc, len(shards)))
            if documents is not None:
                _log(verbose, f"tokenising and packing {len(documents)} documents ({num_proc} process(es))")
                parts.append(documents.map(
                    packer.map_documents, batched=True, batch_size=DOCUMENTS_PER_BATCH, features=features,
                    remove_columns=documents.column_names, num_proc=_useful_procs(num_proc, len(documents)),
                    cache_file_name=str(cache_dir / "examples-text.arrow"), desc="packing"))
        for source in arrow_sources:
            rows = load_text_dataset(source)
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
    stats = example_stats(examples, seq_len, unk_id=special_ids["unk"])
    stats.update(token_accounting(stats))
    # datasets' own fingerprint of the result would hash the packer's objects, differently each run; the
    # inputs and settings are what determine the examples, so state.json is reproducible too.
    examples = examples.remove_columns(list(STAT_COLUMNS), new_fingerprint=fingerprint[:16])

    # Held-out split -------------------------------------------------------------------------------
    held = heldout_rows(len(examples), heldout_size(heldout, len(examples)), seed)
    kept = np.setdiff1d(np.arange(len(examples)), held, assume_unique=True)
    heldout_layout = None
    if len(held):
        _log(verbose, f"setting aside {len(held)} held-out examples (--heldout {heldout})")
        examples.select(held, new_fingerprint=fingerprint[16:32]).save_to_disk(str(staging / "heldout"))
        heldout_layout = _split_layout(staging / "heldout", seq_len)
        examples = examples.select(kept, new_fingerprint=fingerprint[32:48])

    # Output ---------------------------------------------------------------------------------------
    examples.save_to_disk(str(staging / "dataset"), num_proc=num_proc if len(examples) > 200_000 else None)
    del examples, parts
    if len(held):
        stats.update(_split_layout(staging / "dataset", seq_len))
    tokenizer.save(str(staging / "tokenizer.json"))
    if given is None:  # vocab.txt is a WordPiece vocabulary with BERT's special tokens; a given tokenizer has
        write_vocab_txt(tokenizer, staging / "vocab.txt")  # only its tokenizer.json
    identity = _output_identity(staging, fingerprint)
    shutil.rmtree(cache_dir, ignore_errors=True)
    if default_corpus:
        (staging / "default_corpus.txt").unlink()

    manifest = {
        "format": "electra-fast-pretraining-data",
        "format_version": FORMAT_VERSION,
        **identity,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": [s.describe() for s in sources],
        "default_corpus": corpus_summary,
        "seq_len": seq_len,
        "seed": seed,
        "lowercase": lowercase,
        "vocab_size": actual_vocab_size,
        "special_token_ids": special_ids,
        "tokenizer": {**tokenizer_info, "type": tokenizer_type(tokenizer), "vocab_size": actual_vocab_size},
        **stats,
        # the layout keys above (SPLIT_LAYOUT_KEYS) describe dataset/, the token account both splits
        "num_heldout_examples": len(held), "heldout": heldout, "heldout_dir": "heldout" if len(held) else None,
        "heldout_layout": heldout_layout,
        "columns": {"input_ids": id_dtype(actual_vocab_size), "token_type_ids": "int8", "attention_mask": "int8"},
        "dataset_dir": "dataset",
        "streaming": use_streaming,
        "num_proc": num_proc,
        "versions": _versions(),
    }
    # Written last: a folder with a manifest is a finished one.
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _split_layout(folder: Path, seq_len: int) -> dict[str, Any]:
    """The ``SPLIT_LAYOUT_KEYS`` counts of one saved split (read back memory-mapped: a selection of
    rows still points at the whole table until it is written)."""
    from datasets import load_from_disk

    stats = example_stats(load_from_disk(str(folder)), seq_len)
    return {key: value for key, value in stats.items() if key in SPLIT_LAYOUT_KEYS}


def _output_identity(staging: Path, inputs_fingerprint: str) -> dict[str, Any]:
    """What identifies the result: hashes of the vocabulary, the tokenizer and every Arrow file, and the
    ``fingerprint`` over all of them (and the inputs and settings). Two preparations with the same
    fingerprint hold the same bytes; a run compares it before it resumes on a dataset."""

    vocab_txt = staging / "vocab.txt"
    identity = {"inputs_fingerprint": inputs_fingerprint,
                "vocab_sha256": sha256_file(vocab_txt) if vocab_txt.is_file() else None,
                "tokenizer_sha256": sha256_file(staging / "tokenizer.json"),
                "dataset_files": dataset_files(staging / "dataset")}
    if (staging / "heldout").is_dir():
        identity["heldout_files"] = dataset_files(staging / "heldout")
    return {**identity, "fingerprint": identity_fingerprint(identity)}


def _any_text(shards: list[tuple]) -> bool:
    """Whether the text inputs hold at least one non-blank line (reads only up to the first one)."""
    return next(iter(generate_documents(shards, error_dir="")), None) is not None


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


def _empty_corpus_message(sources: list[Source]) -> str:
    names = ", ".join(s.name or s.path for s in sources[:5]) + (" ..." if len(sources) > 5 else "")
    return f"empty corpus: no text in {names}"


# ==================================================================================================
# Command line: `electra-fast prepare` (the CLI module calls these) and `python -m electra_fast.prepare`
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
    vocab.add_argument("--tokenizer", metavar="tokenizer.json",
                       help="use this Hugging Face fast tokenizer (a tokenizer.json or a folder with one; BPE as "
                            "ModernBERT's, WordPiece, ...) as it is, its special tokens mapped to ELECTRA's roles")
    parser.add_argument("--special", action="append", default=[], metavar="ROLE=TOKEN",
                        help="with --tokenizer: the token of a role (cls, sep, pad, mask, unk) when its name is "
                             "not one of the usual spellings, e.g. --special mask=<mask>")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per example (default 128)")
    parser.add_argument("--seed", type=int, default=12345, help="seed of the packing randomness (default 12345)")
    parser.add_argument("--num-proc", type=int, default=None, help="processes (default: CPU count, at most 8)")
    parser.add_argument("--cased", dest="lowercase", action="store_false", help="keep case (default: lower-case)")
    parser.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                        help="pack while reading without a decoded copy of the text (default: by input size)")
    parser.add_argument("--heldout", default=DEFAULT_HELDOUT, metavar="N|P%",
                        help="examples set aside for held-out evaluation, a count or a percentage (default 1%%, "
                             f"at most {HELDOUT_PERCENT_CAP:,}, none if under {HELDOUT_PERCENT_MIN}; 0 for none)")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out holds the same preparation")


def run_prepare(args: argparse.Namespace) -> int:
    """Run ``prepare`` from parsed arguments; a DataError becomes one line on stderr and exit code 2."""
    try:
        out = prepare(args.inputs, args.out, vocab=args.vocab, vocab_size=args.vocab_size, seq_len=args.seq_len,
                      seed=args.seed, num_proc=args.num_proc, default_corpus=args.default_corpus, force=args.force,
                      lowercase=args.lowercase, streaming=args.streaming, heldout=args.heldout,
                      tokenizer=args.tokenizer, special_tokens=parse_special_tokens(args.special))
        manifest = read_manifest(str(out))
    except DataError as exc:
        print(f"electra-fast prepare: error: {exc}", file=sys.stderr)
        return 2
    corpus = manifest.get("default_corpus")
    if corpus:
        print(f"default corpus: {corpus['documents']} documents, {corpus['sentences']} sentences, "
              f"{corpus['characters']} characters (Python {corpus['python']})")
    print(f"{out}: {manifest['num_examples']} examples of {manifest['seq_len']} tokens, {manifest['num_tokens']} "
          f"tokens ({manifest['num_text_tokens']} text), {manifest['padding_fraction']:.1%} padding, "
          f"vocabulary {manifest['vocab_size']}; {manifest.get('num_heldout_examples', 0)} more held out")
    if "num_tokens_read" in manifest:  # manifests written before the token account have none
        print(token_account_line(manifest))
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m electra_fast.prepare", description="Prepare pretraining data.")
    add_prepare_arguments(_parser)
    sys.exit(run_prepare(_parser.parse_args()))
