"""The WordPiece tokenizer of ``prepare``: BERT's pipeline, trained on the corpus (ids renumbered
canonically) or built from a given ``vocab.txt``, with BERT's special tokens and pair template.
Reading a finished tokenizer is :func:`electra_fast.manifest.load_tokenizer`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from .manifest import SPECIAL_KEYS, SPECIAL_TOKENS, DataError

logger = logging.getLogger(__name__)

# WordPiece is trained on the corpus's first this-many characters (BERT's vocabulary came from a
# sample too); more text changes the vocabulary little and costs linear time.
TOKENIZER_TRAIN_CHARS = 1 << 30


def build_tokenizer(vocab: dict[str, int] | None, lowercase: bool):
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


def finish_tokenizer(tokenizer) -> dict[str, int]:
    """Mark the special tokens and add BERT's [CLS] A [SEP] B [SEP] template; returns their ids."""
    from tokenizers import AddedToken, processors

    vocab = tokenizer.get_vocab()
    ids = {key: vocab[token] for key, token in zip(SPECIAL_KEYS, SPECIAL_TOKENS)}
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["cls"]), ("[SEP]", ids["sep"])])
    return ids


def read_vocab_file(path: str) -> dict[str, int]:
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


def train_tokenizer(texts: Iterable[list[str]], vocab_size: int, lowercase: bool):
    """Train WordPiece; pad the vocabulary with [unusedN] tokens to exactly ``vocab_size`` when the corpus
    has fewer distinct pieces, so the model's embedding size is what was asked for."""
    from tokenizers import trainers
    from tokenizers.models import WordPiece

    tokenizer = build_tokenizer(None, lowercase)
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


def write_vocab_txt(tokenizer, path: Path) -> None:
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise RuntimeError("the tokenizer's ids are not contiguous")
    path.write_text("".join(token + "\n" for token, _ in by_id), encoding="utf-8")
