"""Packing tokenised documents into fixed-length ``[CLS] A [SEP] B [SEP]`` examples, exactly as the
reference ELECTRA ``build_pretraining_dataset.py`` does, and the statistics of the packed examples.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Callable, Iterator

import numpy as np

from .corpus_reader import MAX_LINE_BYTES, generate_documents, report_error
from .manifest import DataError

logger = logging.getLogger(__name__)

DOCUMENTS_PER_BATCH = 256


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


def example_features(seq_len: int, vocab_size: int):
    from datasets import Features, Value

    try:
        from datasets import List as _List

        def fixed(dtype):
            return _List(Value(dtype), length=seq_len)
    except ImportError:  # datasets < 4
        from datasets import Sequence

        def fixed(dtype):
            return Sequence(Value(dtype), length=seq_len)

    return Features({"input_ids": fixed(id_dtype(vocab_size)), "token_type_ids": fixed("int8"),
                     "attention_mask": fixed("int8")})


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


def _rows(columns: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    names = list(columns)
    for values in zip(*(columns[name] for name in names)):
        yield dict(zip(names, values))


def example_stats(dataset, seq_len: int) -> dict[str, Any]:
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
