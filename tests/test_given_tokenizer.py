"""prepare --tokenizer: any Hugging Face fast tokenizer (here a byte-level BPE trained in the test), its
special tokens mapped to ELECTRA's roles; long examples (seq_len up to 8,192) with packing."""

import json
from pathlib import Path

import numpy as np
import pytest

from electra_fast.manifest import DataError, read_manifest
from electra_fast.prepare import prepare

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs.",
             "Sphinx of black quartz, judge my vow.", "How vexingly quick daft zebras jump!"]


def _corpus(folder: Path, documents: int = 40, lines: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.txt", "w") as handle:
        for d in range(documents):
            for i in range(lines):
                handle.write(f"{SENTENCES[(d + i) % 4]} Document {d} line {i}.\n")
            handle.write("\n")
    return folder / "corpus.txt"


def _bpe(path: Path, specials: list[str]) -> Path:
    """A small byte-level BPE (RoBERTa's spellings of the special tokens unless told otherwise)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES * 20, trainer=trainer)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    tokenizer = _bpe(root / "tok", ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    out = prepare([str(_corpus(root / "corpus"))], str(root / "data"), tokenizer=str(tokenizer), seq_len=64,
                  num_proc=1, verbose=False, heldout=0)
    return tokenizer, out


def test_bpe_tokenizer_roles_and_examples(bpe_data):
    from datasets import load_from_disk
    from tokenizers import Tokenizer

    tokenizer_file, out = bpe_data
    manifest = read_manifest(str(out))
    tok = Tokenizer.from_file(str(tokenizer_file))
    expected = {"cls": "<s>", "sep": "</s>", "pad": "<pad>", "mask": "<mask>", "unk": "<unk>"}
    assert manifest["special_token_ids"] == {role: tok.token_to_id(t) for role, t in expected.items()}
    assert manifest["tokenizer"]["type"] == "BPE" and manifest["vocab_size"] == tok.get_vocab_size()
    assert not (out / "vocab.txt").exists()  # a BPE has no WordPiece vocab.txt; tokenizer.json is the tokenizer
    ids = np.asarray(load_from_disk(str(out / "dataset")).with_format("numpy")["input_ids"])
    assert (ids[:, 0] == tok.token_to_id("<s>")).all()
    text = tok.decode([i for i in ids[0].tolist() if i > 4])
    assert "Document" in text


def test_missing_role_is_one_clear_error(tmp_path):
    tokenizer = _bpe(tmp_path / "tok", ["<s>", "<pad>", "</s>", "<unk>"])  # no mask token
    with pytest.raises(DataError, match=r"no token for the mask role .*--special mask=TOKEN"):
        prepare([str(_corpus(tmp_path / "corpus", documents=2))], str(tmp_path / "data"), tokenizer=str(tokenizer),
                seq_len=32, num_proc=1, verbose=False)
    assert not (tmp_path / "data").exists()
    # named explicitly, an unusual spelling is accepted
    tokenizer = _bpe(tmp_path / "tok2", ["<s>", "<pad>", "</s>", "[HIDE]"])
    out = prepare([str(_corpus(tmp_path / "corpus", documents=2))], str(tmp_path / "data2"), tokenizer=str(tokenizer),
                  special_tokens={"mask": "[HIDE]"}, seq_len=32, num_proc=1, verbose=False, heldout=0)
    roles = read_manifest(str(out))["special_token_ids"]
    assert roles["mask"] == 3 and roles["unk"] == roles["pad"]  # no unk token: the pad id


def test_tokenizer_config_json_names_the_roles(tmp_path):
    from electra_fast.tokenizer_roles import load_given_tokenizer

    tokenizer = _bpe(tmp_path / "tok", ["[BOS]", "[EOS]", "[P]", "[M]"])
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(
        {"cls_token": "[BOS]", "sep_token": "[EOS]", "pad_token": "[P]", "mask_token": {"content": "[M]"}}))
    _, roles = load_given_tokenizer(str(tokenizer.parent))
    assert (roles["cls"], roles["sep"], roles["pad"], roles["mask"]) == (0, 1, 2, 3)


def test_long_examples_8192_tokens(tmp_path):
    """data.seq_len 8,192: documents longer than an example continue in the next (packing), the examples
    load, and the masked-LM bound follows the length."""
    from electra_fast.config import build_config, max_predictions
    from electra_fast.loader import PretrainingLoader, heldout_batches

    tokenizer = _bpe(tmp_path / "tok", ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    out = prepare([str(_corpus(tmp_path / "corpus", documents=6, lines=500))], str(tmp_path / "data"),
                  tokenizer=str(tokenizer), seq_len=8192, num_proc=1, verbose=False, heldout=1)
    manifest = read_manifest(str(out))
    assert manifest["seq_len"] == 8192 and manifest["num_examples"] >= 2 and manifest["num_heldout_examples"] == 1
    batch = next(iter(PretrainingLoader(str(out), micro_batch_size=2, num_workers=0)))
    assert batch["input_ids"].shape == (2, 8192)
    from datasets import load_from_disk

    lengths = np.asarray(load_from_disk(str(out / "dataset")).with_format("numpy")["attention_mask"]).sum(axis=1)
    assert (lengths == 8192).any()  # a document longer than an example fills it and continues in the next
    assert heldout_batches(str(out), batch_size=1, max_batches=1)[0]["input_ids"].shape == (1, 8192)
    cfg = build_config("modern-tiny", overrides=["data.seq_len=8192"])
    assert cfg.max_predictions_per_seq == max_predictions(0.15, 8192) == 1269
