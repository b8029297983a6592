"""The data modules: prepare (tokenizer, packing, manifest, errors, reuse) and the training loader.

Tiny corpora and vocabularies keep this file under a minute on a 2-core CPU; one test uses two
processes. Where a test does not need a trained vocabulary it writes a vocab.txt, which is faster
and makes every token id known in advance.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from electra_fast import corpus_reader, loader as loader_module
from electra_fast.loader import EpochPermutation, PretrainingLoader
from electra_fast.manifest import (FORMAT_VERSION, SPECIAL_TOKENS, DataError, check_seq_len, check_vocab,
                                   load_tokenizer, read_manifest)
from electra_fast.packing import ExampleBuilder
from electra_fast.prepare import add_prepare_arguments, prepare, run_prepare

WORDS = ("the quick brown fox jumps over lazy dog and cat runs to house with a big red ball under tree near river "
         "while birds sing songs about summer rain").split()


def _write_corpus(folder: Path, files: int = 2, documents: int = 30, seed: int = 0) -> Path:
    """Random English-like documents of 1..25 sentences, a blank line between documents."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        with open(folder / f"part{index}.txt", "w", encoding="utf-8") as handle:
            for _ in range(documents):
                for _ in range(rng.randint(1, 25)):
                    handle.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))).capitalize() + ".\n")
                handle.write("\n")
    return folder


def _arrays(out: Path) -> dict[str, np.ndarray]:
    from datasets import load_from_disk

    dataset = load_from_disk(str(out / "dataset")).with_format("numpy")
    return {name: np.asarray(dataset[name]) for name in ("input_ids", "token_type_ids", "attention_mask")}


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A corpus prepared once with a trained 300-token vocabulary, seq_len 32."""
    root = tmp_path_factory.mktemp("prepared")
    corpus = _write_corpus(root / "corpus")
    return prepare([str(corpus)], str(root / "out"), vocab_size=300, seq_len=32, num_proc=1, verbose=False)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def test_trained_tokenizer_specials_vocab_and_reload(prepared):
    manifest = read_manifest(str(prepared))
    assert manifest["special_token_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert manifest["vocab_size"] == 300  # padded with [unusedN] up to exactly what was asked for
    vocab_lines = (prepared / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab_lines[:5] == list(SPECIAL_TOKENS) and len(vocab_lines) == 300 == len(set(vocab_lines))

    tokenizer = load_tokenizer(str(prepared))
    assert tokenizer.get_vocab_size() == 300
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    encoding = tokenizer.encode("The QUICK brown Fox.", "Birds sing.")
    assert encoding.tokens[0] == "[CLS]" and encoding.tokens.count("[SEP]") == 2
    assert "the" in encoding.tokens and "quick" in encoding.tokens  # lower-cased
    assert encoding.type_ids == [0] * (encoding.tokens.index("[SEP]") + 1) + [1] * (
        len(encoding.tokens) - encoding.tokens.index("[SEP]") - 1)
    assert tokenizer.encode("[MASK]", add_special_tokens=False).ids == [4]
    assert tokenizer.decode(tokenizer.encode("the fox jumps").ids) == "the fox jumps"


def test_given_vocab_reproduces_the_trained_dataset(prepared, tmp_path):
    """Loading the saved vocab.txt gives the same tokenizer, hence the same examples, as training it."""
    manifest = read_manifest(str(prepared))
    corpus = Path(manifest["inputs"][0]["path"]).parent
    out = prepare([str(corpus)], str(tmp_path / "again"), vocab=str(prepared / "vocab.txt"), seq_len=32,
                  num_proc=1, verbose=False)
    again = read_manifest(str(out))
    assert again["tokenizer"]["trained"] is False and again["vocab_size"] == 300
    for name, values in _arrays(prepared).items():
        np.testing.assert_array_equal(_arrays(out)[name], values, err_msg=name)


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def test_examples_layout(prepared):
    manifest = read_manifest(str(prepared))
    arrays = _arrays(prepared)
    ids, types, mask = arrays["input_ids"], arrays["token_type_ids"], arrays["attention_mask"]
    seq_len = manifest["seq_len"]
    assert ids.shape == types.shape == mask.shape == (manifest["num_examples"], seq_len)
    assert manifest["num_tokens"] == int(mask.sum())
    assert manifest["padding_fraction"] == pytest.approx(1 - mask.mean(), abs=1e-5)
    for row in range(len(ids)):
        length = int(mask[row].sum())
        assert 4 <= length <= seq_len
        assert (mask[row, :length] == 1).all() and (mask[row, length:] == 0).all()
        assert (ids[row, length:] == 0).all() and (types[row, length:] == 0).all()  # [PAD] = 0, type 0
        assert ids[row, 0] == 2 and ids[row, length - 1] == 3  # [CLS] ... [SEP]
        separators = np.flatnonzero(ids[row, :length] == 3)
        assert len(separators) in (1, 2) and separators[-1] == length - 1
        assert not np.isin(ids[row, 1:length], [0, 2, 4]).any()  # no [PAD]/[CLS]/[MASK] inside
        first_end = separators[0] + 1  # [CLS] A [SEP] is segment 0, B [SEP] segment 1
        assert (types[row, :first_end] == 0).all() and (types[row, first_end:length] == 1).all()
        assert (len(separators) == 2) == (first_end < length) and first_end > 2


def _stub_rng(values):
    class Stub:
        def __init__(self):
            self.values = list(values)

        def random(self):
            return self.values.pop(0)

        def randint(self, low, high):
            return low

    return Stub()


def test_builder_matches_the_reference_by_hand():
    # seq_len 16, four 5-token sentences: the example is made when 20 >= 16 tokens are pending.
    # random() = 0.5: two segments, A's target (16 - 3) // 2 = 6; sentence 1 goes to A (A empty);
    # sentence 2 would push A past 6, B is empty and random() = 0.3 < 0.5, so it joins A too;
    # sentences 3 and 4 go to B, which is cut to 16 - 10 - 3 = 3 tokens; random() = 0.9: next target 16.
    builder = ExampleBuilder(16, _stub_rng([0.5, 0.3, 0.9]))
    sentences = [list(range(start, start + 5)) for start in (10, 20, 30, 40)]
    assert [builder.add_sentence(s) for s in sentences[:3]] == [None, None, None]
    first, second = builder.add_sentence(sentences[3])
    assert first == sentences[0] + sentences[1] and second == [30, 31, 32]
    assert builder.target_length == 16 and builder.sentences == [] and builder.end_document() is None

    # random() = 0.05 < 0.1: single segment, cut to 16 - 2; then 0.01 < 0.05: a random target length.
    builder = ExampleBuilder(16, _stub_rng([0.05, 0.01]))
    for s in sentences[:3]:
        builder.add_sentence(s)
    first, second = builder.add_sentence(sentences[3])
    assert first == (sentences[0] + sentences[1] + sentences[2])[:14] and second == []
    assert builder.target_length == 5


def test_builder_rules_statistics():
    """10% single-segment and 5% random-length examples; segments are consecutive runs of the document."""
    seq_len, rng = 64, random.Random(7)
    builder = ExampleBuilder(seq_len, random.Random(11))
    next_token, examples = 0, []
    while len(examples) < 4000:
        length = rng.randint(2, 9)
        example = builder.add_sentence(list(range(next_token, next_token + length)))
        next_token += length
        if example is not None:
            examples.append(example)
    single = short = 0
    for (first, second), (following, _) in zip(examples, examples[1:]):
        # Each example starts with the first sentence it was given (always in A) and holds only tokens
        # of its own sentences, each segment in document order. (A later short sentence may still join A
        # after B has begun: the reference's rule, kept.)
        tokens = first + second
        assert first == sorted(first) and second == sorted(second) and len(set(tokens)) == len(tokens)
        assert min(tokens) == first[0] and max(tokens) < following[0]
        assert len(tokens) + 2 + bool(second) <= seq_len
        single += not second
        short += len(tokens) + 2 + bool(second) < seq_len
    # With 2..9-token sentences, a two-segment split always leaves B non-empty, so single segments
    # are the 10% rule; full-target examples are always cut to exactly seq_len, so short ones are the
    # 5% rule. Binomial(4000, p) standard deviations are 19 and 14 examples.
    assert 0.08 < single / len(examples) < 0.12
    assert 0.035 < short / len(examples) < 0.065


def _marker_vocab(path: Path, markers: list[str]) -> Path:
    path.write_text("\n".join([*SPECIAL_TOKENS, ".", *markers]) + "\n", encoding="utf-8")
    return path


def test_document_boundaries_are_respected(tmp_path):
    """Every document repeats its own marker word: no example may mix two markers."""
    markers = [f"doc{chr(97 + i)}" for i in range(12)]
    rng = random.Random(3)
    corpus = tmp_path / "docs.txt"
    with open(corpus, "w", encoding="utf-8") as handle:
        for marker in markers:
            for _ in range(rng.randint(1, 12)):
                handle.write(" ".join([marker] * rng.randint(2, 9)) + ".\n")
            handle.write("\n")
    records = tmp_path / "records.jsonl"  # jsonl: a record is a document, blank lines inside cut it too
    records.write_text(json.dumps({"text": "doca doca.\ndoca.\n\ndocb docb docb."}) + "\n\n" +
                       json.dumps({"text": "docc.", "id": 3}) + "\n", encoding="utf-8")
    vocab = _marker_vocab(tmp_path / "vocab.txt", markers)
    out = prepare([str(corpus), str(records)], str(tmp_path / "out"), vocab=str(vocab), seq_len=16, num_proc=1,
                  verbose=False)
    arrays = _arrays(out)
    marker_ids = set(range(6, 6 + len(markers)))
    seen = set()
    for ids, mask in zip(arrays["input_ids"], arrays["attention_mask"]):
        present = set(ids[: mask.sum()].tolist()) & marker_ids
        assert len(present) == 1, f"example mixes documents: {ids}"
        seen |= present
    assert seen == marker_ids
    assert [entry["kind"] for entry in read_manifest(str(out))["inputs"]] == ["text", "jsonl"]


def test_num_proc_and_streaming_give_identical_data(tmp_path, monkeypatch):
    """The result depends on the inputs and seed only, not on processes or the streaming path."""
    corpus = _write_corpus(tmp_path / "corpus", files=3, documents=40, seed=5)
    with open(corpus / "part0.txt", "a", encoding="utf-8") as handle:  # a long document with no blank line
        handle.write("".join(f"Sentence number {i} of the long tail.\n" for i in range(600)))
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL_TOKENS, ".", *sorted(set(WORDS)), "sentence", "number", "of", "long",
                                "tail", *map(str, range(10))]) + "\n", encoding="utf-8")
    # Several byte ranges per file (cut at blank lines, and once inside the long document), so that two
    # processes really split files.
    monkeypatch.setattr(corpus_reader, "SHARD_BYTES", 4096)
    assert len(corpus_reader.shards_of(corpus_reader.discover_inputs([str(corpus / "part0.txt")])[0])) > 3
    common = dict(vocab=str(vocab), seq_len=24, verbose=False)
    reference = _arrays(prepare([str(corpus)], str(tmp_path / "one"), num_proc=1, streaming=False, **common))
    parallel = _arrays(prepare([str(corpus)], str(tmp_path / "two"), num_proc=2, streaming=False, **common))
    streamed = _arrays(prepare([str(corpus)], str(tmp_path / "stream"), num_proc=1, streaming=True, **common))
    for name in reference:
        np.testing.assert_array_equal(parallel[name], reference[name], err_msg=f"num_proc=2 {name}")
        np.testing.assert_array_equal(streamed[name], reference[name], err_msg=f"streaming {name}")


def test_input_kinds_folder_jsonl_gzip_and_saved_dataset(tmp_path):
    from datasets import Dataset

    folder = _write_corpus(tmp_path / "folder", files=1, documents=5)
    (folder / ".hidden").write_bytes(b"\0\0binary")  # hidden files are skipped
    with gzip.open(tmp_path / "more.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("The fox jumps over the dog.\nThe cat runs.\n\nBirds sing songs.\n")
    (tmp_path / "records.jsonl").write_text(json.dumps({"text": "A red ball under the tree."}) + "\n", encoding="utf-8")
    saved = tmp_path / "saved"
    Dataset.from_dict({"text": ["The river runs near the house.\nRain.", "Summer rain."], "id": [1, 2]}).save_to_disk(
        str(saved))
    out = prepare([str(folder), str(tmp_path / "more.txt.gz"), str(tmp_path / "records.jsonl"), str(saved)],
                  str(tmp_path / "out"), vocab_size=200, seq_len=16, num_proc=1, verbose=False)
    manifest = read_manifest(str(out))
    assert [entry["kind"] for entry in manifest["inputs"]] == ["text", "text", "jsonl", "arrow"]
    assert all(len(entry["sha256"]) == 64 for entry in manifest["inputs"])
    assert manifest["num_examples"] > 5 and manifest["versions"]["datasets"] and manifest["versions"]["tokenizers"]
    tokenizer = load_tokenizer(str(out))
    decoded = [tokenizer.decode(row.tolist()) for row in _arrays(out)["input_ids"]]
    assert any("summer rain" in text for text in decoded) and any("red ball" in text for text in decoded)


# --------------------------------------------------------------------------------------------------
# Reuse, errors, clean output
# --------------------------------------------------------------------------------------------------


def test_rerun_reuses_and_force_or_new_settings_rebuild(tmp_path, capsys):
    corpus = _write_corpus(tmp_path / "corpus", files=1, documents=6)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL_TOKENS, ".", *sorted(set(WORDS))]) + "\n", encoding="utf-8")
    common = dict(vocab=str(vocab), seq_len=16, num_proc=1)
    out = prepare([str(corpus)], str(tmp_path / "out"), **common)
    created = read_manifest(str(out))["created"]
    stamp = (out / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()

    prepare([str(corpus)], str(out), **common)
    assert "reusing" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp

    prepare([str(corpus)], str(out), force=True, **common)
    assert "reusing" not in capsys.readouterr().out and (out / "manifest.json").stat().st_mtime_ns != stamp

    prepare([str(corpus)], str(out), seed=99, **common)
    assert "reusing" not in capsys.readouterr().out and read_manifest(str(out))["seed"] == 99
    assert created  # and no leftovers beside the output
    assert _listing(tmp_path) == ["corpus", "out", "vocab.txt"]


def _bad_input(tmp_path: Path, case: str) -> tuple[list[str], dict, str]:
    """(inputs, extra prepare() arguments, regex the error must match)."""
    good = "The fox jumps over the dog.\nBirds sing.\n"
    if case == "missing":
        return [str(tmp_path / "nope.txt")], {}, r"input not found: .*nope\.txt"
    if case == "empty":
        (tmp_path / "empty.txt").write_text("\n   \n\n", encoding="utf-8")
        return [str(tmp_path / "empty.txt")], {}, r"empty corpus: no text in .*empty\.txt"
    if case == "binary":
        (tmp_path / "blob.bin").write_bytes(good.encode() + b"\x7fELF\x00\x01\x02\n")
        return [str(tmp_path / "blob.bin")], {}, r"blob\.bin:3: contains a NUL byte"
    if case == "latin1":
        (tmp_path / "latin.txt").write_bytes(good.encode() + "Caf\u00e9 cr\u00e8me.\n".encode("latin-1"))
        return [str(tmp_path / "latin.txt")], {}, r"latin\.txt:3: not UTF-8"
    if case == "long_line":
        (tmp_path / "long.txt").write_bytes(good.encode() + b"a" * (corpus_reader.MAX_LINE_BYTES + 10) + b"\n")
        return [str(tmp_path / "long.txt")], {}, r"long\.txt:3: a line longer than"
    if case == "bad_json":
        (tmp_path / "bad.jsonl").write_text('{"text": "fine."}\n{"text": "broken\n', encoding="utf-8")
        return [str(tmp_path / "bad.jsonl")], {}, r"bad\.jsonl:2: not valid JSON"
    if case == "json_without_text":
        (tmp_path / "notext.jsonl").write_text('{"text": "fine."}\n\n{"body": "x"}\n', encoding="utf-8")
        return [str(tmp_path / "notext.jsonl")], {}, r"notext\.jsonl:3: .*string \"text\" field"
    if case == "vocab_without_specials":
        (tmp_path / "ok.txt").write_text(good, encoding="utf-8")
        (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\nthe\n", encoding="utf-8")
        return [str(tmp_path / "ok.txt")], {"vocab": str(tmp_path / "vocab.txt")}, \
            r"vocab\.txt: the vocabulary lacks the special token\(s\) \[SEP\], \[MASK\]"
    raise AssertionError(case)


BAD_CASES = ["missing", "empty", "binary", "latin1", "long_line", "bad_json", "json_without_text",
             "vocab_without_specials"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, case):
    inputs, extra, pattern = _bad_input(tmp_path, case)
    before = _listing(tmp_path)
    with pytest.raises(DataError, match=pattern):
        prepare(inputs, str(tmp_path / "out"), vocab_size=100, seq_len=16, num_proc=1, verbose=False, **extra)
    assert _listing(tmp_path) == before  # no --out, no staging folder left beside it


def test_bad_input_keeps_an_existing_result_and_cli_exits_2(prepared, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (tmp_path / "blob.txt").write_bytes(b"ok\n\x00\n")
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    args = parser.parse_args(["--input", str(tmp_path / "blob.txt"), "--out", str(out), "--force",
                              "--vocab-size", "100", "--num-proc", "1"])
    assert run_prepare(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("electra-fast prepare: error: ") and "blob.txt:2: contains a NUL byte" in err
    assert "Traceback" not in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _listing(tmp_path) == ["blob.txt", "out"]


def test_out_dir_that_is_not_a_prepared_dataset_is_refused(tmp_path):
    (tmp_path / "ok.txt").write_text("The fox jumps.\n", encoding="utf-8")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(DataError, match="not a prepared dataset"):
        prepare([str(tmp_path / "ok.txt")], str(tmp_path / "mine"), force=True, verbose=False)
    assert _listing(tmp_path / "mine") == ["notes.txt"]


def test_worker_errors_keep_their_message_with_two_processes(tmp_path):
    """datasets re-raises a worker's exception as a generic error; the DataError message survives."""
    for index in range(3):
        (tmp_path / f"f{index}.txt").write_text("The fox jumps.\n" * 5, encoding="utf-8")
    (tmp_path / "f2.txt").write_bytes(b"Fine.\n" + "\u00e9t\u00e9\n".encode("latin-1"))
    vocab = _marker_vocab(tmp_path / "vocab.txt", ["the", "fox", "jumps"])
    with pytest.raises(DataError, match=r"f2\.txt:2: not UTF-8"):
        prepare([str(tmp_path / f"f{i}.txt") for i in range(3)], str(tmp_path / "out"), vocab=str(vocab),
                num_proc=2, streaming=False, verbose=False)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Manifest helpers
# --------------------------------------------------------------------------------------------------


def test_read_manifest_and_check_vocab(prepared, tmp_path):
    manifest = read_manifest(str(prepared))
    check_vocab(manifest, 300)
    with pytest.raises(DataError, match=r"300 tokens.*vocab_size=30522"):
        check_vocab(manifest, 30522)
    check_seq_len(manifest, 32)
    with pytest.raises(DataError, match=r"32 tokens.*seq_len=128"):
        check_seq_len(manifest, 128)
    with pytest.raises(DataError, match="not a prepared dataset"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match="prepare the data again"):
        read_manifest(str(tmp_path))


# --------------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 1000, 4097])
def test_epoch_permutation_is_a_seeded_permutation(n):
    positions = np.arange(n)
    order = EpochPermutation(n, seed=5, epoch=0)(positions)
    assert sorted(order.tolist()) == list(range(n))
    np.testing.assert_array_equal(EpochPermutation(n, seed=5, epoch=0)(positions), order)
    if n >= 100:
        assert not np.array_equal(EpochPermutation(n, seed=5, epoch=1)(positions), order)
        assert not np.array_equal(EpochPermutation(n, seed=6, epoch=0)(positions), order)
        assert abs(np.corrcoef(positions, order)[0, 1]) < 0.2  # shuffled, not shifted


def test_rank_sharding_is_disjoint_complete_and_equal(prepared):
    num_examples = read_manifest(str(prepared))["num_examples"]
    world, micro = 3, 5
    shards = [loader_module._RankBatches(None, num_examples, 9, rank, world, micro, start=0) for rank in range(world)]
    steps = -(-2 * num_examples // (world * micro)) + 1
    stream = np.concatenate([shard.example_ids(k) for k in range(steps) for shard in shards])
    for epoch in range(2):
        assert sorted(stream[epoch * num_examples:(epoch + 1) * num_examples].tolist()) == list(range(num_examples))
    assert not np.array_equal(stream[:num_examples], stream[num_examples:2 * num_examples])
    # each rank's share of the first epoch: disjoint, equal within one micro-batch, together complete
    per_rank = [set(np.concatenate([shard.example_ids(k) for k in range(num_examples // (world * micro))]).tolist())
                for shard in shards]
    assert all(len(ids) == (num_examples // (world * micro)) * micro for ids in per_rank)
    assert not (per_rank[0] & per_rank[1]) and not (per_rank[1] & per_rank[2]) and not (per_rank[0] & per_rank[2])


def test_loader_batches_are_the_sharded_rows(prepared):
    arrays = _arrays(prepared)
    loader = PretrainingLoader(str(prepared), micro_batch_size=4, rank=1, world_size=2, seed=3, num_workers=0)
    shard = loader_module._RankBatches(None, loader.num_examples, 3, 1, 2, 4, start=0)
    assert (loader.seq_len, loader.vocab_size) == (32, 300)
    assert loader.batches_per_epoch == loader.num_examples // 8
    for k, batch in zip(range(3), loader):
        sizes = batch.pop("packed_sizes")  # the host-side sizes of the packed layout (model.packed_sizes)
        assert sizes == {"max_seqlen": int(batch["attention_mask"].sum(1).max()),
                         "total_tokens": int(batch["attention_mask"].sum())}
        assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}
        for name, tensor in batch.items():
            assert tensor.dtype == torch.int64 and tensor.shape == (4, 32)
            assert tensor.is_pinned() == (torch.cuda.is_available())
            np.testing.assert_array_equal(tensor.numpy(), arrays[name][shard.example_ids(k)])


def test_row_gather_across_shard_files_and_record_batches(prepared, tmp_path):
    from datasets import load_from_disk

    load_from_disk(str(prepared / "dataset")).save_to_disk(str(tmp_path / "sharded"), num_shards=3,
                                                           max_shard_size=None)
    dataset = load_from_disk(str(tmp_path / "sharded"))
    assert len(dataset.data.table.to_batches()) >= 3
    rows = np.random.default_rng(0).integers(0, len(dataset), 200)
    gathered = loader_module._RowGather(dataset, 32)(rows)
    expected = dataset.with_format("numpy")[rows.tolist()]
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        assert gathered[name].dtype == np.int64
        np.testing.assert_array_equal(gathered[name], expected[name])


def test_resume_yields_the_same_batches_across_epochs(prepared):
    micro = 16
    reference = PretrainingLoader(str(prepared), micro_batch_size=micro, seed=1, num_workers=2, prefetch_factor=2)
    per_epoch = reference.num_examples / micro
    stop, total = int(per_epoch) - 1, int(per_epoch) + 6  # the resumed part crosses an epoch boundary
    batches, state = [], None
    for step, batch in enumerate(reference, start=1):
        batches.append(batch["input_ids"].clone())
        if step == stop:
            state = reference.state_dict()
        if step == total:
            break
    assert state == {"epoch": 0, "position": stop * micro, "num_examples": reference.num_examples, "seed": 1,
                     "format_version": FORMAT_VERSION}
    assert reference.state_dict()["epoch"] == 1

    resumed = PretrainingLoader(str(prepared), micro_batch_size=micro, seed=1, num_workers=0)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    for expected, batch in zip(batches[stop:], resumed):
        torch.testing.assert_close(batch["input_ids"], expected, rtol=0, atol=0)
    assert resumed.state_dict() == reference.state_dict()

    with pytest.raises(DataError, match="seed"):
        PretrainingLoader(str(prepared), micro_batch_size=micro, seed=2, num_workers=0).load_state_dict(state)
    with pytest.raises(DataError, match="examples"):
        resumed.load_state_dict({**state, "num_examples": 3})
