"""prepare keeps every token, is byte-reproducible, and fails cleanly on a full disk or a damaged Arrow file.

Small corpora and vocabularies keep this file near half a minute on a 2-core CPU; one preparation runs
in a subprocess, where the tokenizer trainer's hash maps are seeded differently.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from electra_fast import packing, tokenizer_training
from electra_fast.loader import PretrainingLoader
from electra_fast.manifest import SPECIAL_TOKENS, DataError, read_manifest
from electra_fast.packing import MIN_CARRIED, ExampleBuilder
from electra_fast.prepare import add_prepare_arguments, prepare, run_prepare

# No one-letter word: the sentence splitter reads "x." before a capital as an initial, not a sentence end.
WORDS = ("the quick brown fox jumps over lazy dog and cat runs to house with big red ball under tree near river "
         "while birds sing songs about summer rain zebra quietly walks beyond yellow hills").split()


def _documents(count: int, seed: int) -> list[list[str]]:
    """Documents of sentences (capitalised, ending in a full stop, so the sentence splitter finds them),
    one of them a run-on sentence far longer than an example."""
    rng = random.Random(seed)
    documents = [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + "."
                  for _ in range(rng.randint(1, 20))] for _ in range(count)]
    documents[count // 2].insert(1, " ".join(rng.choice(WORDS) for _ in range(150)).capitalize() + ".")
    return documents


def _write_lines(path: Path, documents: list[list[str]]) -> Path:
    path.write_text("\n\n".join("\n".join(sentences) for sentences in documents) + "\n", encoding="utf-8")
    return path


def _write_records(path: Path, documents: list[list[str]]) -> Path:
    path.write_text("".join(json.dumps({"text": " ".join(sentences)}) + "\n" for sentences in documents),
                    encoding="utf-8")
    return path


def _vocab(path: Path) -> Path:
    path.write_text("\n".join([*SPECIAL_TOKENS, ".", *sorted(set(WORDS))]) + "\n", encoding="utf-8")
    return path


def _arrays(out: Path) -> dict[str, np.ndarray]:
    from datasets import load_from_disk

    dataset = load_from_disk(str(out / "dataset")).with_format("numpy")
    return {name: np.asarray(dataset[name]) for name in ("input_ids", "token_type_ids", "attention_mask")}


def _text_tokens(out: Path) -> np.ndarray:
    """Every text token of every example (specials and padding removed), sorted."""
    ids = _arrays(out)["input_ids"]
    return np.sort(ids[~np.isin(ids, [0, 2, 3])])


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# Every token is kept
# --------------------------------------------------------------------------------------------------


def test_lossless_builder_keeps_every_token_once_in_order_within_examples():
    """Sentences of 1..60 tokens (some longer than half an example) at seq_len 32: each token lands in
    exactly one example, no example is over-long, and the random draws are the reference's."""
    rng, seq_len = random.Random(4), 32
    builder = ExampleBuilder(seq_len, random.Random(9))
    next_token, added, examples = 0, [], []
    for _ in range(3000):
        length = rng.choice([1, 2, 3, 5, 8, 13, 21, 30, 60]) if rng.random() < 0.3 else rng.randint(3, 12)
        sentence = list(range(next_token, next_token + length))
        next_token += length
        added += sentence
        examples += builder.add(sentence)
        if rng.random() < 0.02:  # a document ends
            examples += builder.finish()
    examples += builder.finish()
    assert builder.length == 0 and builder.sentences == []
    flat = [token for first, second in examples for token in first + second]
    assert sorted(flat) == added  # nothing lost, nothing repeated
    for first, second in examples:
        assert first and 2 + len(first) + (len(second) + 1 if second else 0) <= seq_len
    full = sum(len(first) + len(second) + 2 + bool(second) == seq_len for first, second in examples)
    assert full / len(examples) > 0.6  # packed, not one sentence per example


def test_lossless_builder_carries_at_least_min_carried_tokens_of_a_cut_sentence():
    # seq_len 16; random() = 0.5: two segments, A's target 6. A = 5 + 5 tokens (second joins on 0.3),
    # B gets 3 of room; the reference cuts sentence 3 after 3 tokens and drops 7. Here the cut sentence
    # keeps >= MIN_CARRIED tokens for the next example, and sentence 4 follows it.
    sentences = [list(range(start, start + 5)) for start in (10, 20, 30)] + [list(range(40, 45))]
    reference, lossless = ExampleBuilder(16, _stub([0.5, 0.3, 0.9])), ExampleBuilder(16, _stub([0.5, 0.3, 0.9]))
    for sentence in sentences[:3]:
        assert reference.add_sentence(sentence) is None and lossless.add(sentence) == []
    assert reference.add_sentence(sentences[3]) == (sentences[0] + sentences[1], [30, 31, 32])
    (first, second), = lossless.add(sentences[3])
    assert first == sentences[0] + sentences[1] and second == [30, 31, 32][:5 - MIN_CARRIED]
    carried = [token for sentence in lossless.sentences for token in sentence]
    assert carried == [30, 31, 32, 33, 34][5 - MIN_CARRIED:] + sentences[3]
    assert lossless.finish() and lossless.length == 0


def _stub(values):
    class Stub:
        def __init__(self):
            self.values = list(values)

        def random(self):
            return self.values.pop(0) if self.values else 0.99

        def randint(self, low, high):
            return low

    return Stub()


def test_jsonl_records_keep_the_same_tokens_as_one_sentence_per_line(tmp_path, capsys):
    """The issue's case: the same text as one record per document (no line breaks) and as one sentence
    a line. Both keep every token; the examples hold the same multiset of text tokens."""
    documents = _documents(40, seed=1)
    lines = _write_lines(tmp_path / "lines.txt", documents)
    records = _write_records(tmp_path / "records.jsonl", documents)
    common = dict(vocab_size=120, seq_len=32, num_proc=1, verbose=False)
    by_line = read_manifest(str(prepare([str(lines)], str(tmp_path / "by_line"), **common)))
    by_record = read_manifest(str(prepare([str(records)], str(tmp_path / "by_record"), **common)))

    for manifest in (by_line, by_record):
        assert manifest["num_tokens_read"] == manifest["num_tokens_kept"] == manifest["num_text_tokens"] > 0
        assert manifest["num_tokens_dropped"] == 0 and manifest["tokens_dropped_by_reason"] == {}
    assert by_record["num_tokens_kept"] == by_line["num_tokens_kept"]
    # only the [CLS]/[SEP] overhead differs: 2 or 3 per example
    for manifest in (by_line, by_record):
        overhead = manifest["num_tokens"] - manifest["num_tokens_kept"]
        assert 2 * manifest["num_examples"] <= overhead <= 3 * manifest["num_examples"]
    # the same words, hence the same trained vocabulary, and the same tokens in the examples
    assert (tmp_path / "by_line" / "vocab.txt").read_bytes() == (tmp_path / "by_record" / "vocab.txt").read_bytes()
    np.testing.assert_array_equal(_text_tokens(tmp_path / "by_record"), _text_tokens(tmp_path / "by_line"))
    # what packing did: the records longer than an example were split into sentences; the sentences
    # still too long (the run-on one, and some of 14 words in a 120-token vocabulary) were cut, the same
    # ones in both layouts
    assert by_record["num_lines_split"] >= 30 and by_record["num_sentences_chunked"] >= 1
    assert by_line["num_lines_split"] == by_line["num_sentences_chunked"] == by_record["num_sentences_chunked"]
    assert by_record["num_documents"] == by_line["num_documents"] == 40

    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    assert run_prepare(parser.parse_args(["--input", str(records), "--out", str(tmp_path / "by_record"),
                                          "--vocab-size", "120", "--seq-len", "32", "--num-proc", "1"])) == 0
    printed = capsys.readouterr().out
    assert (f"tokens: {by_record['num_tokens_read']} read, {by_record['num_tokens_kept']} kept, 0 dropped"
            in printed) and "split into sentences" in printed


def test_a_single_line_longer_than_an_example_is_packed_whole(tmp_path):
    """One 2000-word line with no sentence end at seq_len 16: cut into pieces, every token kept."""
    rng = random.Random(2)
    (tmp_path / "one.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(2000)) + "\n", encoding="utf-8")
    out = prepare([str(tmp_path / "one.txt")], str(tmp_path / "out"), vocab=str(_vocab(tmp_path / "vocab.txt")),
                  seq_len=16, num_proc=1, verbose=False)
    manifest = read_manifest(str(out))
    assert manifest["num_tokens_read"] == manifest["num_tokens_kept"] == 2000
    assert manifest["num_lines_split"] == manifest["num_sentences_chunked"] == 1
    assert manifest["num_examples"] >= 2000 // 13 and manifest["num_unk_tokens"] == 0
    lengths = _arrays(out)["attention_mask"].sum(axis=1)
    assert lengths.mean() > 14 and lengths.min() >= 2 + MIN_CARRIED  # packed; no scrap of a piece alone


def test_unknown_characters_are_counted(tmp_path):
    (tmp_path / "text.txt").write_text("The fox jumps over the dog.\nThe \u00e6on runs.\n", encoding="utf-8")
    out = prepare([str(tmp_path / "text.txt")], str(tmp_path / "out"), vocab=str(_vocab(tmp_path / "vocab.txt")),
                  seq_len=16, num_proc=1, verbose=False)
    manifest = read_manifest(str(out))
    assert manifest["num_unk_tokens"] == 1 and manifest["num_tokens_kept"] == 11


# --------------------------------------------------------------------------------------------------
# Reproducible
# --------------------------------------------------------------------------------------------------


def test_prepare_twice_gives_byte_identical_vocabulary_and_dataset(tmp_path):
    """Trained vocabulary, two processes (the trainer's hash maps differ per process): every file of the
    two results is identical but the manifest's creation time, and the fingerprints agree."""
    corpus = _write_lines(tmp_path / "corpus.txt", _documents(60, seed=3))
    args = dict(vocab_size=300, seq_len=32, num_proc=1, verbose=False)
    first = prepare([str(corpus)], str(tmp_path / "first"), **args)
    script = ("import sys; from electra_fast.prepare import prepare; "
              "prepare([sys.argv[1]], sys.argv[2], vocab_size=300, seq_len=32, num_proc=1, verbose=False)")
    subprocess.run([sys.executable, "-c", script, str(corpus), str(tmp_path / "second")], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "random"})
    second = tmp_path / "second"

    one, two = _file_bytes(first), _file_bytes(second)
    assert sorted(one) == sorted(two)
    assert {"vocab.txt", "tokenizer.json", "dataset/state.json", "dataset/dataset_info.json"} <= set(one)
    assert any(name.endswith(".arrow") for name in one)
    for name in one:
        if name != "manifest.json":
            assert one[name] == two[name], f"{name} differs between two preparations"
    manifests = read_manifest(str(first)), read_manifest(str(second))
    for key in ("fingerprint", "inputs_fingerprint", "vocab_sha256", "tokenizer_sha256", "dataset_files"):
        assert manifests[0][key] == manifests[1][key], key


MIXED_TEXT = ["Caf\u00e9 na\u00efve \u00c9COLE \u0130stanbul stra\u00dfe",
              "\u4e2d\u6587\u5b57 and \ud55c\uad6d\uc5b4 text",
              "zero\u200bwidth joins, soft\u00adhyphen; tab\there (paren) \"quote\" don\u2019t",
              "\u00a9 2024 \u2192 x\u00b2 \u00bd caf\u00e9s 3.14 a_b e-mail #tag @user",
              "\u2e4f odd\u2e4fpunct emoji\U0001f600ok"]


def test_character_count_foresees_the_trainers_alphabet_and_continuations():
    """The count (normaliser per character, pre-tokeniser per character) must find exactly the
    characters and ``##c`` pieces the trainer itself makes, on text with accents, CJK, Hangul,
    removed and expanding characters, punctuation by several Unicode versions and symbols."""
    from tokenizers import trainers

    count = tokenizer_training._AlphabetCount(lowercase=True)
    count.count([MIXED_TEXT])
    alphabet, inside = count.alphabet(limit=10_000)
    plain = tokenizer_training.build_tokenizer(None, True)
    plain.train_from_iterator([MIXED_TEXT], trainer=trainers.WordPieceTrainer(
        vocab_size=5_000, special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##", show_progress=False))
    vocab = plain.get_vocab()
    assert sorted(t for t in vocab if len(t) == 1) == alphabet
    assert sorted(t[2:] for t in vocab if len(t) == 3 and t.startswith("##")) == inside
    assert "\u2e4f" in inside and "\u4e2d" not in inside and "," not in inside  # word char, CJK, punctuation


def test_training_is_repeated_when_a_continuation_was_not_foreseen(monkeypatch, caplog):
    """The safety net: with the count's continuation list emptied, the trainer makes its own ``##c``,
    training runs again with them registered, and the vocabulary is the one the full count gives."""
    batches = lambda: iter([MIXED_TEXT * 3])  # noqa: E731
    expected = tokenizer_training.train_tokenizer(batches, 200, True).to_str()
    full = tokenizer_training._AlphabetCount.alphabet
    monkeypatch.setattr(tokenizer_training._AlphabetCount, "alphabet", lambda self, limit: (full(self, limit)[0], []))
    with caplog.at_level("WARNING"):
        again = tokenizer_training.train_tokenizer(batches, 200, True).to_str()
    assert "did not foresee" in caplog.text and again == expected


@pytest.mark.parametrize("edit", ["vocab_size", "special_id", "vocab_file", "fingerprint"])
def test_an_edited_manifest_or_vocabulary_is_refused(small_prepared, tmp_path, edit):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(small_prepared, out)
    manifest = json.loads((out / "manifest.json").read_text())
    if edit == "vocab_size":
        manifest["vocab_size"] += 1
        pattern = r"vocab_size is \d+ but .*vocab\.txt holds \d+ tokens"
    elif edit == "special_id":
        manifest["special_token_ids"]["mask"] = 7
        pattern = r"special_token_ids\.mask is 7 but \[MASK\] is id 4"
    elif edit == "fingerprint":
        manifest["fingerprint"] = "0" * 64
        pattern = "fingerprint does not match"
    else:  # two word pieces swap ids
        lines = (out / "vocab.txt").read_text().splitlines()
        lines[6], lines[7] = lines[7], lines[6]
        (out / "vocab.txt").write_text("\n".join(lines) + "\n")
        pattern = r"vocab\.txt: its sha256 is .* the file was changed after prepare"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=pattern):
        read_manifest(str(out))
    read_manifest(str(small_prepared))  # the original is fine


def test_fingerprint_covers_vocabulary_and_dataset_files(tmp_path):
    corpus = _write_lines(tmp_path / "corpus.txt", _documents(10, seed=5))
    out = prepare([str(corpus)], str(tmp_path / "out"), vocab=str(_vocab(tmp_path / "vocab.txt")), seq_len=32,
                  num_proc=1, verbose=False)
    manifest = read_manifest(str(out))
    assert manifest["vocab_sha256"] == hashlib.sha256((out / "vocab.txt").read_bytes()).hexdigest()
    assert manifest["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    for name, entry in manifest["dataset_files"].items():
        data = (out / "dataset" / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    identity = {key: manifest[key] for key in ("inputs_fingerprint", "vocab_sha256", "tokenizer_sha256",
                                               "dataset_files")}
    assert manifest["fingerprint"] == hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    # another vocabulary (one more word) gives another fingerprint
    (tmp_path / "vocab2.txt").write_text((tmp_path / "vocab.txt").read_text() + "extra\n", encoding="utf-8")
    other = read_manifest(str(prepare([str(corpus)], str(tmp_path / "other"), vocab=str(tmp_path / "vocab2.txt"),
                                      seq_len=32, num_proc=1, verbose=False)))
    assert other["vocab_sha256"] != manifest["vocab_sha256"] and other["fingerprint"] != manifest["fingerprint"]


# --------------------------------------------------------------------------------------------------
# Disk full, damaged Arrow files
# --------------------------------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _inject_in_save(monkeypatch):
    from datasets import Dataset

    monkeypatch.setattr(Dataset, "save_to_disk", _enospc)


def _inject_in_packing(monkeypatch):
    monkeypatch.setattr(packing.Packer, "map_documents", _enospc)


def _inject_in_pyarrow_style(monkeypatch):
    # pyarrow reports a full disk as an OSError with the text only, datasets wraps a worker's failure.
    def fail(*args, **kwargs):
        try:
            raise OSError("IOError: [Errno 28] No space left on device. Detail: [errno 28]")
        except OSError as exc:
            raise RuntimeError("An error occurred while generating the dataset") from exc

    monkeypatch.setattr(packing.Packer, "map_documents", fail)


@pytest.mark.parametrize("inject", [_inject_in_save, _inject_in_packing, _inject_in_pyarrow_style])
def test_disk_full_is_one_line_naming_the_output_and_free_space(tmp_path, monkeypatch, capsys, inject):
    corpus = _write_lines(tmp_path / "corpus.txt", _documents(10, seed=6))
    vocab = _vocab(tmp_path / "vocab.txt")
    inject(monkeypatch)
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(["--input", str(corpus), "--out", str(out), "--vocab", str(vocab), "--seq-len", "32",
                              "--num-proc", "1", "--no-streaming"])
    assert run_prepare(args) == 2
    err = capsys.readouterr().err  # the progress bars of datasets, then the one error line
    errors = [line for line in err.splitlines() if line.startswith("electra-fast prepare: error")]
    assert len(errors) == 1 and "Traceback" not in err and "Errno" not in err
    assert errors[0].startswith(f"electra-fast prepare: error: disk full while writing {out}: ")
    assert " free on its disk" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "vocab.txt"]  # no staging folder left


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    corpus = _write_lines(root / "corpus.txt", _documents(20, seed=7))
    return prepare([str(corpus)], str(root / "out"), vocab=str(_vocab(root / "vocab.txt")), seq_len=32, num_proc=1,
                   verbose=False)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_arrow_file_in_a_prepared_dataset_is_named(small_prepared, tmp_path, damage):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(small_prepared, out)
    arrow = next((out / "dataset").glob("*.arrow"))
    data = arrow.read_bytes()
    if damage == "truncate":
        arrow.write_bytes(data[: len(data) // 2])
    else:  # same size, the stream's first message overwritten
        arrow.write_bytes(b"\xff" * 64 + data[64:])
    with pytest.raises(DataError) as caught:
        PretrainingLoader(str(out), micro_batch_size=2, num_workers=0)
    message = str(caught.value)
    assert str(arrow) in message and "\n" not in message
    assert ("truncated" in message) if damage == "truncate" else ("not a readable Arrow file" in message)


def test_a_truncated_arrow_file_as_input_is_named(tmp_path):
    from datasets import Dataset

    saved = tmp_path / "saved"
    Dataset.from_dict({"text": [f"The fox jumps over the dog number {i}." for i in range(2000)]}).save_to_disk(
        str(saved))
    arrow = next(saved.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    with pytest.raises(DataError) as caught:
        prepare([str(saved)], str(tmp_path / "out"), vocab=str(_vocab(tmp_path / "vocab.txt")), seq_len=32,
                num_proc=1, verbose=False)
    assert str(arrow) in str(caught.value) and "truncated or damaged" in str(caught.value)
    assert not (tmp_path / "out").exists()
