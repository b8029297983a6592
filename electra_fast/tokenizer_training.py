"""The WordPiece tokenizer of ``prepare``: BERT's pipeline, trained on the corpus (ids renumbered
canonically) or built from a given ``vocab.txt``, with BERT's special tokens and pair template.
Reading a finished tokenizer is :func:`electra_fast.manifest.load_tokenizer`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

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


class _AlphabetCount:
    """The characters of the training text as the WordPiece trainer sees them, counted in a fixed order:
    how often each occurs in words, and which occur inside a word (after its first character), i.e.
    which ``##c`` tokens the trainer makes.

    The BERT normaliser works character by character (clean-up, CJK spacing, accents, case), so it is
    applied once per distinct character and the text itself is only counted, as numpy code points
    (the normaliser on whole texts runs at about 2 MB/s, the counting at 100s of MB/s). Whether a
    character belongs to words, is a word of its own (punctuation) or separates words is asked of the
    tokenizer's own pre-tokeniser, once per distinct character.
    """

    CHUNK_CHARS = 4 << 20  # count this many characters at a time (bounded memory)
    _WORD, _PUNCTUATION, _SPACE = 1, 2, 3

    def __init__(self, lowercase: bool):
        tokenizer = build_tokenizer(None, lowercase)
        self.normalizer, self.pre_tokenizer = tokenizer.normalizer, tokenizer.pre_tokenizer
        self.raw_counts = np.zeros(0x110000, dtype=np.int64)
        self.normalized: dict[int, str] = {}  # raw code point -> its normalisation
        self.kinds: dict[str, int] = {}  # normalised character -> _WORD, _PUNCTUATION or _SPACE
        self.inside_word: set[str] = set()  # from within one character's normalisation
        # Per raw code point: bit flags of its normalisation (kept at all, starts / ends with a word
        # character), and whether it was seen right after a character whose normalisation ends a word.
        self._flags = np.zeros(0x110000, dtype=np.uint8)
        self._after_word = np.zeros(0x110000, dtype=bool)
        self._removed: list[int] = []  # seen code points the normaliser removes

    _KEPT, _STARTS_WORD, _ENDS_WORD = 1, 2, 4

    def _kind(self, char: str) -> int:
        if char not in self.kinds:
            # "a" + c + "a" is one word when c belongs in words, three when c is punctuation, two when c
            # separates words.
            pieces = len(self.pre_tokenizer.pre_tokenize_str(f"a{char}a"))
            self.kinds[char] = {1: self._WORD, 3: self._PUNCTUATION}.get(pieces, self._SPACE)
        return self.kinds[char]

    def _learn(self, code: int) -> None:
        text = self.normalizer.normalize_str(chr(code))
        self.normalized[code] = text
        if not text:
            self._removed.append(code)
            return
        words = [self._kind(char) == self._WORD for char in text]
        self._flags[code] = (self._KEPT | (self._STARTS_WORD if words[0] else 0)
                             | (self._ENDS_WORD if words[-1] else 0))
        self.inside_word.update(text[i] for i in range(1, len(text)) if words[i - 1] and words[i])

    def add(self, texts: list[str]) -> None:
        codes = np.frombuffer("\n".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        counts = np.bincount(codes, minlength=0x110000)
        for code in np.flatnonzero(counts).tolist():
            if code not in self.normalized:
                self._learn(code)
        self.raw_counts += counts
        flags = self._flags[codes]
        if self._removed and counts[self._removed].any():  # what the normaliser removes joins its neighbours
            kept = flags != 0
            codes, flags = codes[kept], flags[kept]
        joined = (flags[:-1] & self._ENDS_WORD).astype(bool) & (flags[1:] & self._STARTS_WORD).astype(bool)
        self._after_word[codes[1:][joined]] = True

    def count(self, batches: Iterable[list[str]]) -> None:
        pending: list[str] = []
        size = 0
        for texts in batches:
            for text in texts:
                pending.append(text)
                size += len(text)
                if size >= self.CHUNK_CHARS:
                    self.add(pending)
                    pending, size = [], 0
        if pending:
            self.add(pending)

    def alphabet(self, limit: int) -> tuple[list[str], list[str]]:
        """(the ``limit`` most frequent characters of words, ties broken by code point; those of them
        that occur inside words), each sorted by code point."""
        counts: dict[str, int] = {}
        for code in np.flatnonzero(self.raw_counts).tolist():
            for char in self.normalized[code]:
                if self._kind(char) != self._SPACE:
                    counts[char] = counts.get(char, 0) + int(self.raw_counts[code])
        inside = self.inside_word | {self.normalized[code][0] for code in np.flatnonzero(self._after_word).tolist()}
        kept = sorted(sorted(counts, key=lambda char: (-counts[char], ord(char)))[:limit], key=ord)
        return kept, [char for char in kept if char in inside]


def train_tokenizer(batches: Callable[[], Iterable[list[str]]], vocab_size: int, lowercase: bool):
    """Train WordPiece, reproducibly, on the texts ``batches()`` yields; pad the vocabulary with
    [unusedN] tokens to exactly ``vocab_size`` when the corpus has fewer distinct pieces, so the model's
    embedding size is what was asked for.

    ``tokenizers``' trainer is not reproducible on its own (measured: two runs on the default corpus
    with 8192 tokens differed in 7 to 9 pieces, whatever PYTHONHASHSEED or the thread count): past
    ``limit_alphabet`` it drops the rarest characters in the order of a randomly seeded hash map when
    their counts tie, and it numbers the ``##c`` continuation characters in the order it meets words in
    such a map; merges of equal count are then chosen by those numbers. So the characters are counted
    first (one extra pass over the text) and the trainer is handed the alphabet to keep (most frequent
    first, ties by code point) and every ``##c`` it will make, both registered up front in code-point
    order (as special tokens, numbered in list order). Every id the merges are ranked by is then fixed,
    and so is the vocabulary. ``batches`` is called twice (count, train); should the trainer still make a
    ``##c`` that was not foreseen, that token is registered too and the training repeated.
    """
    counting = _AlphabetCount(lowercase)
    counting.count(batches())
    kept, inside = counting.alphabet(limit=min(1000, max(32, vocab_size // 4)))
    while True:
        vocab = _train_registered(batches(), vocab_size, lowercase, kept, inside)
        unforeseen = sorted({t[2:] for t in vocab if len(t) == 3 and t.startswith("##")} - set(inside))
        if not unforeseen:
            break
        logger.warning("tokenizer training: the trainer made %d continuation piece(s) the count did not foresee "
                       "(%s); training again with them registered", len(unforeseen), "".join(unforeseen[:20]))
        inside = sorted({*inside, *unforeseen})
    if len(vocab) > vocab_size:
        raise DataError(f"--vocab-size {vocab_size} is too small: the corpus's characters alone need {len(vocab)} "
                        "entries")
    # Renumber canonically (specials, characters, "##" characters, then the other pieces, each sorted;
    # [unusedN] padding last): the ids then say nothing about the trainer's internals, and WordPiece's
    # greedy longest match does not depend on them.
    pieces = [token for token in vocab if token not in SPECIAL_TOKENS]
    order = sorted(pieces, key=lambda t: (0 if len(t) == 1 else 1 if t.startswith("##") and len(t) == 3 else 2, t))
    canonical = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *order])}
    for number in range(vocab_size - len(canonical)):
        canonical[f"[unused{number}]"] = len(canonical)
    # A fresh tokenizer: the training one holds the registered "##c" as added special tokens.
    return build_tokenizer(canonical, lowercase)


def _train_registered(texts: Iterable[list[str]], vocab_size: int, lowercase: bool, alphabet: list[str],
                      continuations: list[str]) -> dict[str, int]:
    """One run of the trainer with a fixed alphabet and pre-registered ``##c`` pieces; its vocabulary."""
    from tokenizers import trainers

    tokenizer = build_tokenizer(None, lowercase)
    trainer = trainers.WordPieceTrainer(
        # Registered in the order the trainer itself numbers them (specials, the alphabet by code point,
        # then the "##c"), so that ties between merges are broken as it would break them, only always
        # the same way.
        vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, *alphabet, *(f"##{c}" for c in continuations)],
        continuing_subword_prefix="##",
        # BERT's recipe keeps the 1000 most frequent characters; rarer ones become [UNK]. A small
        # vocabulary keeps fewer, so that whole words still fit. (Chosen by the count: the initial
        # alphabet outranks every other character, so the trainer drops exactly the others.)
        initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.get_vocab()


def write_vocab_txt(tokenizer, path: Path) -> None:
    vocab = tokenizer.get_vocab()
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise RuntimeError("the tokenizer's ids are not contiguous")
    path.write_text("".join(token + "\n" for token, _ in by_id), encoding="utf-8")
