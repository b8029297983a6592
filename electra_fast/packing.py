"""Packing tokenised documents into fixed-length ``[CLS] A [SEP] B [SEP]`` examples as the reference
ELECTRA ``build_pretraining_dataset.py`` does, keeping every token, and the statistics of the packed
examples.

A line is a sentence to the packer. A line too long for one example (a paragraph, or a jsonl record
with no line breaks) is split into sentences by :func:`electra_fast.corpus.split_sentences`; a
sentence still too long is cut into even pieces of at most half an example. Nothing is dropped:
what does not fit an example begins the next (see :class:`ExampleBuilder`), and the counts of
tokens read and kept travel with the examples (``STAT_COLUMNS``) for the manifest.
"""

from __future__ import annotations

import bisect
import logging
import os
import random
import re
from typing import Any, Callable, Iterator

import numpy as np

from .corpus import split_sentences
from .corpus_reader import MAX_LINE_BYTES, generate_documents, report_error
from .manifest import DataError

logger = logging.getLogger(__name__)

DOCUMENTS_PER_BATCH = 256
# 2: long lines split into sentences and nothing dropped at an example's end (1: the reference's cuts).
# Part of prepare's settings, so that a dataset packed the old way is not reused.
PACKING_VERSION = 2
# A sentence cut at the end of an example leaves at least this many tokens for the next (see ExampleBuilder._cut).
MIN_CARRIED = 4


class ExampleBuilder:
    """Packs the sentences of one document into examples as the reference ``ExampleBuilder`` does.

    Sentences are added until their tokens reach the target length (``seq_len``; after 5% of examples,
    a random length in [5, seq_len] for the next one). The accumulated sentences are then split into
    segment A and B: 10% of the time everything goes to A (a single-segment example, as in
    classification tasks); otherwise a sentence goes to A while A is empty, while it keeps A under
    half the target, or with probability 1/2 when it would cross that half and B is still empty.
    Output: ``[CLS] A [SEP]`` (+ ``B [SEP]`` when B is not empty), at most ``seq_len`` tokens.

    Two ways to feed it. ``add``/``finish`` (what ``prepare`` uses) keep every token: what does not
    fit an example (the end of A past ``seq_len - 2``, the end of B past what A leaves) begins the
    next example instead, so a long sentence runs on over several examples (a sentence cut there
    leaves at least ``MIN_CARRIED`` tokens for the next, see ``_cut``). ``add_sentence``/
    ``end_document`` are the reference to the letter: those tokens are dropped (about a tenth of the
    text at seq_len 128, half a sentence per example). Both draw the same random numbers in the same
    order and with the same calls as the reference, from ``rng``.

    One difference from the reference either way: it carries its builder (and the next target length)
    from one document to the next; here every document starts fresh with its own generator, which
    makes the output independent of how documents are spread over processes.
    """

    def __init__(self, seq_len: int, rng: random.Random):
        if seq_len < 8:
            raise DataError(f"seq_len must be at least 8, got {seq_len}")
        self.max_length = seq_len
        self.target_length = seq_len
        self.rng = rng
        self.sentences: list[list[int]] = []
        self.length = 0

    def add(self, token_ids: list[int]) -> list[tuple[list[int], list[int]]]:
        """Add a sentence; the examples that are complete now (none, one, or several when the tokens
        carried over from the last one already reach the next target)."""
        self.sentences.append(token_ids)
        self.length += len(token_ids)
        examples = []
        while self.length >= self.target_length:
            examples.append(self._create_example(carry_over=True))
        return examples

    def finish(self) -> list[tuple[list[int], list[int]]]:
        """End the document (or a part of it): examples of everything still pending."""
        examples = []
        while self.length:
            examples.append(self._create_example(carry_over=True))
        self.sentences = []
        return examples

    def add_sentence(self, token_ids: list[int]) -> tuple[list[int], list[int]] | None:
        """The reference's ``add_line``: tokens past the example's end are dropped."""
        self.sentences.append(token_ids)
        self.length += len(token_ids)
        if self.length >= self.target_length:
            return self._create_example(carry_over=False)
        return None

    def end_document(self) -> tuple[list[int], list[int]] | None:
        if self.length:
            return self._create_example(carry_over=False)
        self.sentences = []
        return None

    def _create_example(self, carry_over: bool) -> tuple[list[int], list[int]]:
        rng = self.rng
        if rng.random() < 0.1:
            first_target = 100000  # single segment
        else:
            first_target = (self.target_length - 3) // 2  # -3 for [CLS] and two [SEP]
        first: list[int] = []
        second: list[int] = []
        first_ends: list[int] = []  # where each sentence of a segment ends in it
        second_ends: list[int] = []
        for sentence in self.sentences:
            if (len(first) == 0 or len(first) + len(sentence) < first_target
                    or (len(second) == 0 and len(first) < first_target and rng.random() < 0.5)):
                first += sentence
                first_ends.append(len(first))
            else:
                second += sentence
                second_ends.append(len(second))
        first, first_rest = self._cut(first, first_ends, self.max_length - 2, carry_over, may_empty=False)
        room = max(0, self.max_length - len(first) - 3)
        second, second_rest = self._cut(second, second_ends, room, carry_over, may_empty=True)
        self.sentences = [rest for rest in (first_rest, second_rest) if rest]
        self.length = sum(map(len, self.sentences))
        if rng.random() < 0.05:
            self.target_length = rng.randint(5, self.max_length)
        else:
            self.target_length = self.max_length
        return first, second

    @staticmethod
    def _cut(segment: list[int], ends: list[int], room: int, carry_over: bool,
             may_empty: bool) -> tuple[list[int], list[int]]:
        """(what fits in ``room``, what goes on to the next example: nothing for the reference).

        A sentence cut here leaves at least ``MIN_CARRIED`` of its tokens (or all of them, when it is
        shorter) for the next example, the cut moving earlier if need be: carried tokens may end a
        document and then make an example of their own, which should not be a scrap of one or two.
        """
        if len(segment) <= room:
            return segment, []
        if not carry_over:
            return segment[:room], []
        end = next(end for end in ends if end > room)  # of the sentence the cut falls in
        start = max([0, *(e for e in ends if e <= room)])
        cut = room if end - room >= MIN_CARRIED else max(start, end - MIN_CARRIED)
        if cut == 0 and not may_empty:  # segment A cannot wait: the example would be empty
            cut = room
        return segment[:cut], segment[cut:]


def _document_rng(seed: int, input_index: int, key: int) -> random.Random:
    # Seeding with a str goes through sha512: the same stream in every process and Python run.
    return random.Random(f"electra-fast/{seed}/{input_index}/{key}")


# Per-batch counts that ride along with the examples (on a batch's first example, 0 on the others)
# and are summed into the manifest, then removed: datasets' worker processes return only rows.
STAT_COLUMNS = ("stat_documents", "stat_lines_split", "stat_sentences_chunked", "stat_tokens_read")


def example_features(seq_len: int, vocab_size: int, with_stats: bool = False):
    from datasets import Features, Value

    try:
        from datasets import List as _List

        def fixed(dtype):
            return _List(Value(dtype), length=seq_len)
    except ImportError:  # datasets < 4
        from datasets import Sequence

        def fixed(dtype):
            return Sequence(Value(dtype), length=seq_len)

    columns = {"input_ids": fixed(id_dtype(vocab_size)), "token_type_ids": fixed("int8"),
               "attention_mask": fixed("int8")}
    if with_stats:
        columns.update({name: Value("int64") for name in STAT_COLUMNS})
    return Features(columns)


def id_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "int32"


class Packer:
    """Tokenise documents and pack them into padded examples; picklable, so datasets' workers can run it."""

    def __init__(self, tokenizer, seq_len: int, seed: int, special_ids: dict[str, int], vocab_size: int,
                 error_dir: str, parallel_tokenizer: bool):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        self.special_ids = special_ids
        self.id_dtype = np.dtype(id_dtype(vocab_size))
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
        # With offsets (about 5% slower than encode_batch_fast): a line too long for one example is
        # split into sentences at their character positions, without tokenising it again.
        encoded = iter(self.tokenizer.encode_batch(flat, add_special_tokens=False)) if flat else iter(())

        stats = dict.fromkeys(STAT_COLUMNS, 0)
        examples: list[tuple[list[int], list[int]]] = []
        for lines, input_index, key in zip(documents, inputs, keys):
            builder = ExampleBuilder(self.seq_len, _document_rng(self.seed, int(input_index), int(key)))
            before = len(examples)
            for line in lines:
                if not line:  # a blank line inside a row's text ends a document (reference rule)
                    examples += builder.finish()
                    continue
                for sentence in self._sentences(line, next(encoded), stats):
                    examples += builder.add(sentence)
            examples += builder.finish()
            stats["stat_documents"] += len(examples) > before
        arrays = self._to_arrays(examples)
        for name, value in stats.items():
            arrays[name] = np.zeros(len(examples), dtype=np.int64)
            if len(examples):
                arrays[name][0] = value
        return arrays

    def _sentences(self, line: str, encoding, stats: dict[str, int]) -> list[list[int]]:
        """The line's tokens as the packer's sentences: the line itself when it fits one example (as
        the reference takes a line), else its sentences, each cut into even pieces of at most half an
        example when it is still too long."""
        ids = encoding.ids
        stats["stat_tokens_read"] += len(ids)
        fits = self.seq_len - 2  # [CLS] + [SEP]
        if len(ids) <= fits:
            return [ids]
        stats["stat_lines_split"] += 1
        starts = _sentence_starts(line)
        pieces: list[list[int]] = [[] for _ in starts]
        for token, (begin, _) in zip(ids, encoding.offsets):
            pieces[bisect.bisect_right(starts, begin) - 1].append(token)
        sentences: list[list[int]] = []
        half = max(1, (self.seq_len - 3) // 2)
        for piece in pieces:
            if len(piece) <= fits:
                if piece:
                    sentences.append(piece)
                continue
            stats["stat_sentences_chunked"] += 1
            count = -(-len(piece) // half)
            bounds = [len(piece) * i // count for i in range(count + 1)]
            sentences += [piece[a:b] for a, b in zip(bounds, bounds[1:])]
        return sentences

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
            report_error(self.error_dir, (int(batch["input"][0]), int(batch["offset"][0])), error)
            raise

    def map_saved_rows(self, batch: dict[str, list], indices: list[int], *, input_index: int,
                       name: str) -> dict[str, np.ndarray]:
        """Rows of a saved dataset: keyed by (input, row index)."""
        try:
            return self.pack(batch["text"], [input_index] * len(indices), indices,
                             where=lambda row: f"{name}: row {indices[row]}")
        except DataError as error:
            report_error(self.error_dir, (input_index, int(indices[0])), error)
            raise

    def generate_examples(self, shards: list[tuple]) -> Iterator[dict[str, np.ndarray]]:
        """Streaming body for ``Dataset.from_generator``: read, pack and yield examples shard by shard."""
        for shard in shards:
            pending: dict[str, list] = {"text": [], "input": [], "offset": []}
            for row in generate_documents([shard], self.error_dir):
                for column in pending:
                    pending[column].append(row[column])
                if len(pending["text"]) == DOCUMENTS_PER_BATCH:
                    yield from _rows(self.map_documents(pending))
                    pending = {"text": [], "input": [], "offset": []}
            if pending["text"]:
                yield from _rows(self.map_documents(pending))


_WORD = re.compile(r"\S+")


def _sentence_starts(line: str) -> list[int]:
    """Character positions where the sentences of ``line`` begin (the first is 0). ``split_sentences``
    returns each sentence's words joined by one space; counting those words finds its start in the
    line (``str.split`` and ``\\S+`` agree on what whitespace is)."""
    word_starts = [match.start() for match in _WORD.finditer(line)]
    starts, word = [0], 0
    for sentence in split_sentences(line)[:-1]:
        word += len(sentence.split())
        starts.append(word_starts[word])
    return starts


def _rows(columns: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    names = list(columns)
    for values in zip(*(columns[name] for name in names)):
        yield dict(zip(names, values))


def example_stats(dataset, seq_len: int, unk_id: int | None = None) -> dict[str, Any]:
    """Counts straight from the Arrow columns, a chunk at a time (nothing is loaded whole): the layout of
    the examples, [UNK] tokens when ``unk_id`` is given, and the sums of the ``STAT_COLUMNS`` the
    dataset still has."""
    examples = tokens = two_segment = full_length = unknown = 0
    table = dataset.data.table if hasattr(dataset.data, "table") else dataset.data
    for mask_chunk, type_chunk, ids_chunk in zip(table.column("attention_mask").chunks,
                                                 table.column("token_type_ids").chunks,
                                                 table.column("input_ids").chunks):
        mask = mask_chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, seq_len)
        types = type_chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, seq_len)
        lengths = mask.sum(axis=1, dtype=np.int64)
        examples += len(lengths)
        tokens += int(lengths.sum())
        full_length += int((lengths == seq_len).sum())
        two_segment += int(types.any(axis=1).sum())
        if unk_id is not None:
            unknown += int((ids_chunk.flatten().to_numpy(zero_copy_only=False) == unk_id).sum())
    specials = 2 * examples + two_segment  # [CLS] + [SEP] each, one more [SEP] with a B segment
    slots = examples * seq_len
    stats = {
        "num_examples": examples,
        "num_tokens": tokens,
        "num_text_tokens": tokens - specials,
        "num_padding_tokens": slots - tokens,
        "padding_fraction": round((slots - tokens) / slots, 6) if slots else 0.0,
        "single_segment_fraction": round(1 - two_segment / examples, 6) if examples else 0.0,
        "full_length_fraction": round(full_length / examples, 6) if examples else 0.0,
    }
    if unk_id is not None:
        stats["num_unk_tokens"] = unknown
    for name in STAT_COLUMNS:
        if name in table.column_names:
            stats["num_" + name[len("stat_"):]] = _column_sum(table.column(name))
    return stats


def _column_sum(column) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(column).as_py() or 0)


def token_accounting(stats: dict[str, Any]) -> dict[str, Any]:
    """The manifest's account of the text: tokens read from the inputs, kept in the examples, dropped.

    Packing drops nothing, so a difference between read and kept is a bug, not a property of the
    data: it stops ``prepare`` rather than being written down.
    """
    read, kept = stats["num_tokens_read"], stats["num_text_tokens"]
    if read != kept:
        raise RuntimeError(f"packing lost tokens: {read} read, {kept} in the examples (a bug in electra_fast.packing)")
    return {"num_tokens_read": read, "num_tokens_kept": kept, "num_tokens_dropped": read - kept,
            "tokens_dropped_by_reason": {}}


def token_account_line(manifest: dict[str, Any]) -> str:
    """One line for people: what was read, kept and dropped, and what packing did to long lines."""
    dropped = manifest["num_tokens_dropped"]
    reasons = ", ".join(f"{count} {why}" for why, count in manifest.get("tokens_dropped_by_reason", {}).items())
    return (f"tokens: {manifest['num_tokens_read']} read, {manifest['num_tokens_kept']} kept, {dropped} dropped"
            f"{f' ({reasons})' if reasons else ''}; {manifest.get('num_unk_tokens', 0)} of them [UNK]; "
            f"{manifest['num_lines_split']} line(s) longer than an example split into sentences, "
            f"{manifest['num_sentences_chunked']} sentence(s) still too long cut into pieces")
