"""Featurisation for fine-tuning: task examples -> token ids, and batches of them -> tensors.

    specials = special_ids(tokenizer, model_config)
    features = featurize(tokenizer, spec, data.train, max_len=128, specials=specials)
    batch = collate(features, indices=[0, 1, 2], pad_id=specials.pad, device=device, kind=spec.kind)

Sentence(-pair) examples become ``[CLS] a [SEP] (b [SEP])`` with token types 0/1, a pair truncated as
the reference implementation does (drop the last token of the longer side until both fit); tagged
sentences become ``[CLS] pieces [SEP]`` with the position of each word's first piece, where its tag is
predicted (a word that lost all its pieces to truncation keeps none and is scored as predicted ``O``).
The tokenizer only splits text: the special tokens, truncation and padding are applied here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from .config import ModelConfig
from .tasks import Example, FinetuneError, TaggedSentence, TaskSpec

__all__ = ["Features", "Specials", "collate", "encode_sequences", "encode_words", "featurize", "special_ids",
           "truncate_pair"]


# --------------------------------------------------------------------------------------------
# Special tokens: taken from the tokenizer, checked against the model
# --------------------------------------------------------------------------------------------
@dataclass
class Specials:
    cls: int
    sep: int
    pad: int


def special_ids(tokenizer, cfg: ModelConfig) -> Specials:
    """[CLS]/[SEP]/[PAD] from the tokenizer's vocabulary (falling back to the model config's ids)."""
    ids = {}
    for name, token, fallback in (("cls", "[CLS]", cfg.cls_token_id), ("sep", "[SEP]", cfg.sep_token_id),
                                  ("pad", "[PAD]", cfg.pad_token_id)):
        found = tokenizer.token_to_id(token)
        ids[name] = fallback if found is None else found
    vocab = tokenizer.get_vocab_size()
    if vocab > cfg.vocab_size:
        raise FinetuneError(f"the tokenizer has {vocab} tokens but the model's vocab_size is {cfg.vocab_size} "
                            "(tokenizer and model do not belong together)")
    return Specials(**ids)


# --------------------------------------------------------------------------------------------
# Featurisation: [CLS] a [SEP] (b [SEP]), token types 0/1; first sub-word positions for tagging
# --------------------------------------------------------------------------------------------
@dataclass
class Features:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list  # class id / float per sequence, or tag ids per word (all words, for scoring)
    word_positions: list[list[int]] | None = None  # tagging: sequence position of each kept word's first piece


def truncate_pair(a: list[int], b: list[int], budget: int) -> None:
    """The reference's heuristic: drop the last token of the longer sequence until both fit."""
    while len(a) + len(b) > budget:
        (a if len(a) > len(b) else b).pop()


# Texts are encoded this many at a time: tokenizers' Encoding objects carry strings and offsets, and
# holding all of MNLI's at once would take gigabytes; only the ids (and word ids) are kept.
_ENCODE_CHUNK = 8192


def _encoded(tokenizer, inputs: Sequence, **kwargs) -> Iterable:
    for start in range(0, len(inputs), _ENCODE_CHUNK):
        yield from tokenizer.encode_batch(list(inputs[start:start + _ENCODE_CHUNK]), add_special_tokens=False,
                                          **kwargs)


def encode_sequences(tokenizer, examples: Sequence[Example], max_len: int, specials: Specials) -> Features:
    pieces_a = [encoding.ids for encoding in _encoded(tokenizer, [e.text_a for e in examples])]
    # As the reference, an empty second text makes a single-sentence example.
    pair_index = [i for i, e in enumerate(examples) if e.text_b]
    pieces_b = dict(zip(pair_index, (encoding.ids for encoding in
                                     _encoded(tokenizer, [examples[i].text_b for i in pair_index]))))
    input_ids, token_types = [], []
    for i in range(len(examples)):
        a = list(pieces_a[i])
        b = list(pieces_b.get(i, ()))
        if b:
            truncate_pair(a, b, max_len - 3)
            ids = [specials.cls, *a, specials.sep, *b, specials.sep]
            types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
        else:
            ids = [specials.cls, *a[: max_len - 2], specials.sep]
            types = [0] * len(ids)
        input_ids.append(ids)
        token_types.append(types)
    return Features(input_ids, token_types, [e.label for e in examples])


def encode_words(tokenizer, sentences: Sequence[TaggedSentence], max_len: int, specials: Specials) -> Features:
    input_ids, token_types, word_positions = [], [], []
    encodings = _encoded(tokenizer, [s.words for s in sentences], is_pretokenized=True)
    for encoding, sentence in zip(encodings, sentences):
        ids, word_ids = list(encoding.ids[: max_len - 2]), encoding.word_ids[: max_len - 2]
        first = {}
        for position, word in enumerate(word_ids, start=1):  # +1: after [CLS]
            if word is not None and word not in first:
                first[word] = position
        # Words that lost all their pieces to truncation (or have none) keep no position; they are
        # scored as predicted "O" so the metric still counts their gold entities.
        word_positions.append([first.get(w, -1) for w in range(len(sentence.words))])
        input_ids.append([specials.cls, *ids, specials.sep])
        token_types.append([0] * (len(ids) + 2))
    return Features(input_ids, token_types, [s.tags for s in sentences], word_positions)


def featurize(tokenizer, spec: TaskSpec, examples, max_len: int, specials: Specials) -> Features:
    if spec.kind == "token-classification":
        return encode_words(tokenizer, examples, max_len, specials)
    return encode_sequences(tokenizer, examples, max_len, specials)


def collate(features: Features, indices: Sequence[int], pad_id: int, device: torch.device, kind: str):
    """Pad a batch to its longest sequence; tagging adds flat first-piece positions and their tags."""
    seq_len = max(len(features.input_ids[i]) for i in indices)
    input_ids = torch.full((len(indices), seq_len), pad_id, dtype=torch.long)
    token_types = torch.zeros((len(indices), seq_len), dtype=torch.long)
    mask = torch.zeros((len(indices), seq_len), dtype=torch.bool)
    for row, i in enumerate(indices):
        n = len(features.input_ids[i])
        input_ids[row, :n] = torch.tensor(features.input_ids[i])
        token_types[row, :n] = torch.tensor(features.token_type_ids[i])
        mask[row, :n] = True
    batch = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types}
    if kind == "token-classification":
        positions, tags = [], []
        for row, i in enumerate(indices):
            for position, tag in zip(features.word_positions[i], features.labels[i]):
                if position >= 0:
                    positions.append(row * seq_len + position)
                    tags.append(tag)
        batch["positions"] = torch.tensor(positions, dtype=torch.long)
        batch["labels"] = torch.tensor(tags, dtype=torch.long)
    elif kind == "regression":
        batch["labels"] = torch.tensor([float(features.labels[i]) for i in indices], dtype=torch.float32)
    else:
        batch["labels"] = torch.tensor([features.labels[i] for i in indices], dtype=torch.long)
    non_blocking = device.type == "cuda"
    return {k: (v.pin_memory() if non_blocking else v).to(device, non_blocking=non_blocking) for k, v in batch.items()}
