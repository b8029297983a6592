"""Fine-tuning: task readers, official metrics, the paper's optimiser recipe, end-to-end runs on tiny
synthetic tasks, the Hugging Face round trip and every bad-input error.

The "pretrained" model is a random-init tiny ElectraPretrainingModel exported with ``to_hf`` next to a
WordPiece vocabulary written here; its initializer range is raised so that a few dozen steps learn the
synthetic tasks (label = whether the word "good" occurs; tag = a word's entity type).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from electra_fast.config import ConfigError, ModelConfig, build_config
from electra_fast.manifest import load_tokenizer
from electra_fast.finetune import (
    add_finetune_arguments,
    finetune,
    finetune_classifier,
    layerwise_param_groups,
    make_optimizer,
    run_finetune,
)
from electra_fast.finetune_config import FinetuneConfig, ModelOptions, TrainOptions
from electra_fast.hf import to_hf
from electra_fast.model import ElectraPretrainingModel
from electra_fast.optim import lr_multiplier
from electra_fast.task_features import collate, encode_sequences, encode_words, special_ids
from electra_fast.task_models import ElectraForSequenceClassification, ElectraForTokenClassification, load_encoder
from electra_fast.tasks import (
    FinetuneError,
    TaskOptions,
    accuracy,
    binary_f1,
    entity_scores,
    entity_spans,
    load_task,
    matthews_corrcoef,
    pearson,
    spearman,
)

WORDS = ["good", "bad", "movie", "film", "plot", "actor", "scene", "story", "music", "ending", "the", "a",
         "was", "is", "very", "quite", "john", "smith", "mary", "paris", "london", "in", "met", "visited"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ly", ",", "."]
FILLER = [w for w in WORDS[:16] if w != "good"]


@pytest.fixture(autouse=True)
def _one_thread():
    """The CI machine is small and shared: one intra-op thread is several times faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model(**model_overrides) -> ElectraPretrainingModel:
    overrides = {"vocab_size": 64, "embedding_size": 16, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
                 "num_layers": 2, "max_position_embeddings": 64, "generator_fraction": 0.5,
                 "initializer_range": 0.2, "attention_impl": "torch", "mlm_head_impl": "torch",
                 "disc_head_impl": "torch", **model_overrides}
    cfg = build_config("tiny", overrides=[f"model.{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    return ElectraPretrainingModel(cfg)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A pretraining "run" folder: run/export/{discriminator,generator} with vocab.txt in each."""
    root = tmp_path_factory.mktemp("run")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    to_hf(_tiny_model(), root / "export", tokenizer_dir=root / "tokenizer")
    return root


def _sentence(rng: random.Random) -> tuple[str, int]:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
    label = int(rng.random() < 0.5)
    if label:
        words[rng.randrange(len(words))] = "good"
    return " ".join(words), label


def _quick(*extra: str) -> FinetuneConfig:
    return FinetuneConfig.from_overrides(["train.lr=5e-3", "train.epochs=5", "train.batch_size=16",
                                          "train.progress=false", *extra])


# --------------------------------------------------------------------------------------------
# Optimiser recipe
# --------------------------------------------------------------------------------------------
def test_layerwise_lrs_match_reference_formula():
    model = _tiny_model(num_layers=3)
    encoder, _ = load_encoder(model)
    classifier = ElectraForSequenceClassification(encoder.config, 2)
    lr, decay, num_layers = 1e-3, 0.8, 3
    groups = layerwise_param_groups(classifier, lr, decay, weight_decay=0.01)
    seen = {}
    for group in groups:
        for name, param in zip(group["names"], group["params"]):
            seen[name] = (group["lr"], group["weight_decay"])
    assert set(seen) == {name for name, _ in classifier.named_parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(classifier.parameters()))
    # google-research/electra _get_layer_lrs: lr * decay^(L + 2 - depth), embeddings depth 0,
    # layer i depth i + 1, task head depth L + 2.
    expected_depth = {"electra.embeddings.": 0, "electra.embeddings_project.": 0, "classifier.": num_layers + 2}
    expected_depth.update({f"electra.encoder.layer.{i}.": i + 1 for i in range(num_layers)})
    assert "electra.embeddings_project.weight" in seen  # embedding_size != hidden_size here
    for name, (group_lr, group_wd) in seen.items():
        depth = next(d for prefix, d in expected_depth.items() if name.startswith(prefix))
        assert group_lr == pytest.approx(lr * decay ** (num_layers + 2 - depth)), name
        excluded = "LayerNorm" in name or name.endswith("bias")
        assert group_wd == (0.0 if excluded else 0.01), name
    assert seen["classifier.out_proj.weight"][0] == pytest.approx(lr)
    assert seen["electra.encoder.layer.2.output.dense.weight"][0] == pytest.approx(lr * decay ** 2)
    assert seen["electra.embeddings.word_embeddings.weight"][0] == pytest.approx(lr * decay ** 5)


def test_lr_schedule_warmup_then_linear_decay():
    total, warmup = 100, 10
    factors = [lr_multiplier(t, total, warmup) for t in range(total)]
    assert factors[0] == pytest.approx(0.1 * 1.0)
    assert factors[9] == pytest.approx(1.0 * (1 - 9 / 100))
    assert factors[50] == pytest.approx(0.5)
    assert all(a < b for a, b in zip(factors[:9], factors[1:10]))  # warm-up rises
    assert all(a > b for a, b in zip(factors[10:], factors[11:]))  # then decays linearly to ~0
    assert 0 < factors[-1] <= 1 / total + 1e-12
    assert lr_multiplier(0, 10, 0) == 1.0

    # The optimiser applies both: group lr at update t = lr · decay^(L+2−depth) · multiplier(t).
    encoder, _ = load_encoder(_tiny_model())
    classifier = ElectraForSequenceClassification(encoder.config, 2)
    optimizer, scheduler = make_optimizer(classifier, 1e-3, 0.8, 20, 4, TrainOptions(), torch.device("cpu"))
    for t in range(20):
        for group in optimizer.param_groups:
            expected = 1e-3 * 0.8 ** (2 + 2 - group["depth"]) * lr_multiplier(t, 20, 4)
            assert group["lr"] == pytest.approx(expected), (t, group["depth"])
        optimizer.step()
        scheduler.step()
    assert {g["depth"] for g in optimizer.param_groups} == {0, 1, 2, 4}


# --------------------------------------------------------------------------------------------
# Metrics against scikit-learn / scipy
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("classes", [2, 3])
def test_classification_metrics_match_sklearn(seed, classes):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, 97)
    predictions = np.where(rng.random(97) < 0.7, labels, rng.integers(0, classes, 97))
    assert accuracy(predictions, labels) == pytest.approx(sklearn_metrics.accuracy_score(labels, predictions))
    assert matthews_corrcoef(predictions, labels) == pytest.approx(
        sklearn_metrics.matthews_corrcoef(labels, predictions), abs=1e-12)
    if classes == 2:
        assert binary_f1(predictions, labels) == pytest.approx(sklearn_metrics.f1_score(labels, predictions))


def test_degenerate_classification_metrics():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    labels, constant = [0, 1, 1, 0, 1], [1, 1, 1, 1, 1]
    assert matthews_corrcoef(constant, labels) == sklearn_metrics.matthews_corrcoef(labels, constant) == 0.0
    assert binary_f1([0, 0, 0], [0, 0, 0]) == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_correlations_match_scipy(seed):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    gold = np.round(rng.uniform(0, 5, 83), 1)  # rounded: many ties, as STS-B scores have
    predicted = np.round(gold + rng.normal(0, 1.0, 83), 0)
    assert pearson(predicted, gold) == pytest.approx(stats.pearsonr(predicted, gold)[0], abs=1e-12)
    assert spearman(predicted, gold) == pytest.approx(stats.spearmanr(predicted, gold)[0], abs=1e-12)


# --------------------------------------------------------------------------------------------
# Entity-level F1 on hand-computed cases
# --------------------------------------------------------------------------------------------
def test_entity_spans_bio_rules():
    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 2), ("LOC", 3, 4)]
    assert entity_spans(["I-PER", "I-PER", "O"]) == [("PER", 0, 2)]  # I- after O starts an entity
    assert entity_spans(["B-PER", "I-LOC"]) == [("PER", 0, 1), ("LOC", 1, 2)]  # type change
    assert entity_spans(["B-PER", "B-PER"]) == [("PER", 0, 1), ("PER", 1, 2)]
    assert entity_spans(["O", "O"]) == []
    assert entity_spans(["B-MISC"]) == [("MISC", 0, 1)]


def test_entity_f1_hand_cases():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert entity_scores(gold, gold)["f1"] == 1.0
    # PER truncated (wrong), LOC right: P = 1/2, R = 1/2.
    scores = entity_scores(gold, [["B-PER", "O", "O", "B-LOC"]])
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.5, 0.5, 0.5)
    # I-PER I-PER is the same PER span; nothing predicted for LOC: P = 1, R = 1/2, F1 = 2/3.
    scores = entity_scores(gold, [["I-PER", "I-PER", "O", "O"]])
    assert scores["precision"] == 1.0 and scores["recall"] == 0.5 and scores["f1"] == pytest.approx(2 / 3)
    assert scores["per_type"]["LOC"]["recall"] == 0.0 and scores["per_type"]["PER"]["f1"] == 1.0
    # Micro average over sentences: gold 3 entities, predicted 4, correct 2.
    gold = [["B-ORG", "O"], ["B-PER", "I-PER", "B-LOC"]]
    predicted = [["B-ORG", "B-ORG"], ["B-PER", "I-PER", "B-PER"]]
    scores = entity_scores(gold, predicted)
    precision, recall = 2 / 4, 2 / 3
    assert scores["precision"] == pytest.approx(precision) and scores["recall"] == pytest.approx(recall)
    assert scores["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    # No entities at all: 0, not a division by zero.
    assert entity_scores([["O"]], [["O"]])["f1"] == 0.0
    with pytest.raises(ValueError):
        entity_scores([["O", "O"]], [["O"]])


# --------------------------------------------------------------------------------------------
# Task readers (the published GLUE layouts, generic tables, CoNLL)
# --------------------------------------------------------------------------------------------
def _write(path: Path, lines: list[str], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


GLUE_FILES = {
    "cola": (["gj04\t1\t\tThe good movie was good .", "gj04\t0\t*\tMovie the good was ."], None),
    "sst-2": (["sentence\tlabel", "a good film \t1", "a bad \"film\"\t0"], None),
    "mrpc": (["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t1\t2\tthe plot was good\tgood plot",
              "0\t3\t4\tthe actor\tthe music"], None),
    "sts-b": (["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
               "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA man plays.\tA man is playing.\t5.000",
               "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA dog.\tA cat.\t0.500"], None),
    "qqp": (["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "1\t1\t2\tis it good?\tis it bad?\t0",
             "2\t3\t4\twhat is a plot?\twhat's a plot?\t1"], None),
    "mnli": (["index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
              "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
              "0\t1\t1n\tgov\t( x )\t( y )\t(ROOT x)\t(ROOT y)\tthe film was good\tit was bad\t"
              "contradiction\tcontradiction",
              "1\t2\t2e\tgov\t( x )\t( y )\t(ROOT x)\t(ROOT y)\ta plot\tthe plot\tentailment\tentailment"], None),
    "qnli": (["index\tquestion\tsentence\tlabel", "0\twho acted?\tthe actor acted.\tentailment",
              "1\twhat music?\tthe plot was good.\tnot_entailment"], None),
    "rte": (["index\tsentence1\tsentence2\tlabel", "0\tthe film was good.\tthe film was fine.\tentailment",
             "1\tthe plot was bad.\tthe music was good.\tnot_entailment"], None),
}
GLUE_DEV_NAME = {"mnli": "dev_matched.tsv"}


def _glue_dir(root: Path, task: str) -> Path:
    lines, _ = GLUE_FILES[task]
    folder = root / task
    _write(folder / "train.tsv", lines, bom=task == "mrpc")
    _write(folder / GLUE_DEV_NAME.get(task, "dev.tsv"), lines)
    return folder


@pytest.mark.parametrize("task", list(GLUE_FILES))
def test_glue_readers_published_layouts(tmp_path, task):
    data = load_task(task, _glue_dir(tmp_path, task))
    dev = data.dev["dev"]
    assert len(dev) == 2
    expected = {
        "cola": [("The good movie was good .", None, 1), ("Movie the good was .", None, 0)],
        "sst-2": [("a good film ", None, 1), ('a bad "film"', None, 0)],
        "mrpc": [("the plot was good", "good plot", 1), ("the actor", "the music", 0)],
        "sts-b": [("A man plays.", "A man is playing.", 5.0), ("A dog.", "A cat.", 0.5)],
        "qqp": [("is it good?", "is it bad?", 0), ("what is a plot?", "what's a plot?", 1)],
        "mnli": [("the film was good", "it was bad", 0), ("a plot", "the plot", 1)],
        "qnli": [("who acted?", "the actor acted.", 0), ("what music?", "the plot was good.", 1)],
        "rte": [("the film was good.", "the film was fine.", 0), ("the plot was bad.", "the music was good.", 1)],
    }[task]
    assert [(e.text_a, e.text_b, e.label) for e in dev] == expected
    # The reference trains MRPC and STS-B on both sentence orders.
    doubled = task in ("mrpc", "sts-b")
    assert len(data.train) == (4 if doubled else 2)
    if doubled:
        assert (data.train[2].text_a, data.train[2].text_b) == (dev[0].text_b, dev[0].text_a)
    assert data.spec.epochs == (10.0 if task in ("rte", "sts-b") else 3.0)
    assert data.selecting_metric == {"cola": "mcc", "sts-b": "spearman"}.get(task, "accuracy")


def test_glue_extras(tmp_path):
    # MNLI: dev_mismatched.tsv is read too; the GLUE root folder is accepted.
    root = tmp_path / "glue"
    lines, _ = GLUE_FILES["mnli"]
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        _write(root / "MNLI" / name, lines)
    data = load_task("MNLI", root)
    assert set(data.dev) == {"dev", "mismatched"}
    # double_unordered can be switched off; QQP rows with missing fields are skipped with a warning.
    data = load_task("mrpc", _glue_dir(tmp_path, "mrpc"), TaskOptions(double_unordered=False))
    assert len(data.train) == 2
    qqp = _glue_dir(tmp_path, "qqp")
    _write(qqp / "train.tsv", GLUE_FILES["qqp"][0] + ["3\t5\t6\tbroken row"])
    with pytest.warns(UserWarning, match="skipped 1 row"):
        assert len(load_task("qqp", qqp).train) == 2
    data = load_task("mrpc", _glue_dir(tmp_path, "mrpc"), TaskOptions(metric="f1"))
    assert data.selecting_metric == "f1"


def test_generic_table_readers(tmp_path):
    _write(tmp_path / "cls" / "train.csv", ["review,stars,extra", '"good, really",pos,1', "bad,neg,2", "plot,neu,3"])
    _write(tmp_path / "cls" / "validation.csv", ["review,stars,extra", "good,pos,1"])
    cfg = FinetuneConfig.from_overrides(["task.text_column=review", "task.label_column=stars"])
    data = load_task("classification", tmp_path / "cls", cfg.task)
    assert data.spec.labels == ["neg", "neu", "pos"]
    assert [(e.text_a, e.label) for e in data.train] == [("good, really", 2), ("bad", 0), ("plot", 1)]
    # Declared labels fix the order; integer labels sort numerically; JSON lines with a pair column.
    rows = [{"q": "a", "p": "b", "y": 10}, {"q": "c", "p": "d", "y": 2}, {"q": "e", "p": "f", "y": 1}]
    _write(tmp_path / "js" / "train.jsonl", [json.dumps(r) for r in rows])
    _write(tmp_path / "js" / "dev.jsonl", [json.dumps(rows[0])])
    options = TaskOptions(text_column="q", text_pair_column="p", label_column="y")
    assert load_task("classification", tmp_path / "js", options).spec.labels == ["1", "2", "10"]
    options.labels = "10,2,1"
    data = load_task("classification", tmp_path / "js", options)
    assert data.spec.labels == ["10", "2", "1"] and (data.train[0].text_b, data.train[0].label) == ("b", 0)
    data = load_task("regression", tmp_path / "js", options)
    assert [e.label for e in data.train] == [10.0, 2.0, 1.0] and data.selecting_metric == "spearman"


def test_conll_reader_and_first_subword_labels(tmp_path, run_dir):
    _write(tmp_path / "train.txt", ["-DOCSTART- -X- -X- O", "", "John NNP B-NP B-PER", "smith NNP I-NP I-PER",
                                    "visited VBD B-VP O", "Paris NNP B-NP B-LOC", "", "", "goods\tO", "london\tI-LOC"])
    _write(tmp_path / "dev.conll", ["mary B-PER"])
    data = load_task("ner", tmp_path)
    assert data.spec.labels == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]  # completed: I-X for every B-X
    first = data.train[0]
    assert first.words == ["John", "smith", "visited", "Paris"]
    assert [data.spec.labels[t] for t in first.tags] == ["B-PER", "I-PER", "O", "B-LOC"]
    tokenizer = load_tokenizer(run_dir / "export" / "discriminator")
    encoder, _ = load_encoder(run_dir)
    features = encode_words(tokenizer, data.train, 64, special_ids(tokenizer, encoder.config))
    # "goods" -> good ##s: the word's label sits on its first piece, after [CLS].
    assert features.input_ids[1] == [2, VOCAB.index("good"), VOCAB.index("##s"), VOCAB.index("london"), 3]
    assert features.word_positions[1] == [1, 3]
    # Truncation: words without a piece keep no position (scored as predicted O).
    short = encode_words(tokenizer, data.train[:1], 4, special_ids(tokenizer, encoder.config))
    assert short.word_positions[0] == [1, 2, -1, -1]


def test_sequence_features_layout_and_pair_truncation(run_dir):
    """[CLS] a [SEP] b [SEP] with token types 0/1; the reference's truncation pops the longer side."""
    from electra_fast.tasks import Example

    tokenizer = load_tokenizer(run_dir / "export" / "discriminator")
    tokenizer.enable_padding(length=16)  # a caller's tokenizer set up to pad / truncate still works
    tokenizer.enable_truncation(3)
    tokenizer = load_tokenizer(tokenizer)
    specials = special_ids(tokenizer, load_encoder(run_dir)[0].config)
    v = VOCAB.index
    examples = [Example("good movies", "bad film", 0), Example("the the the the the", "a plot", 1),
                Example("the plot", "", 0), Example("a " * 20, None, 1)]
    features = encode_sequences(tokenizer, examples, 8, specials)
    assert features.input_ids[0] == [2, v("good"), v("movie"), v("##s"), 3, v("bad"), v("film"), 3]
    assert features.token_type_ids[0] == [0, 0, 0, 0, 0, 1, 1, 1]
    assert features.input_ids[1] == [2, v("the"), v("the"), v("the"), 3, v("a"), v("plot"), 3]  # a: 5 -> 3
    assert features.input_ids[2] == [2, v("the"), v("plot"), 3]  # empty second text: single sentence
    assert features.input_ids[3] == [2, *[v("a")] * 6, 3] and features.token_type_ids[3] == [0] * 8
    assert features.labels == [0, 1, 0, 1]


# --------------------------------------------------------------------------------------------
# End to end: learn, save the best checkpoint, load it in transformers
# --------------------------------------------------------------------------------------------
def _hf_inputs(tokenizer, pairs):
    """Padded (input_ids, attention_mask, token_type_ids) exactly as fine-tuning builds them."""
    from electra_fast.tasks import Example

    features = encode_sequences(tokenizer, [Example(a, b, 0) for a, b in pairs], 64,
                                 special_ids(tokenizer, ModelConfig(vocab_size=len(VOCAB))))
    return collate(features, list(range(len(pairs))), 0, torch.device("cpu"), "classification")


def test_cli_finetunes_glue_task_and_saves_hf_model(tmp_path, run_dir, capsys):
    transformers = pytest.importorskip("transformers")
    rng = random.Random(0)
    data_dir = tmp_path / "SST-2"
    for split, count in (("train", 256), ("dev", 64)):
        rows = ["\t".join(map(str, _sentence(rng))) for _ in range(count)]
        _write(data_dir / f"{split}.tsv", ["sentence\tlabel", *rows])
    parser = argparse.ArgumentParser()
    add_finetune_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(["--model", str(run_dir), "--task", "sst-2", "--data-dir", str(data_dir),
                              "--out", str(out), "--seeds", "1,2", "--set", "train.lr=5e-3", "--set", "train.epochs=5",
                              "--set", "train.batch_size=16", "--set", "train.progress=false"])
    assert run_finetune(args) == 0
    assert "median" in capsys.readouterr().out

    result = json.loads((out / "metrics.json").read_text())
    finals = [result["per_seed"][s]["final"]["accuracy"] for s in ("1", "2")]
    assert result["median"]["accuracy"] == pytest.approx(statistics.median(finals))
    assert min(finals) >= 0.8, finals  # chance is 0.5
    assert result["recipe"]["layerwise_lr_decay"] == 0.8 and result["recipe"]["warmup_steps"] == 8
    best = result["best_checkpoint"]
    assert best["path"] == str(out / "model")
    assert best["metrics"]["accuracy"] == max(h["metrics"]["accuracy"] for s in ("1", "2")
                                              for h in result["per_seed"][s]["history"])

    # The saved folder is a transformers ElectraForSequenceClassification ...
    saved = out / "model"
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["ElectraForSequenceClassification"]
    assert config["num_labels"] == 2 and config["id2label"] == {"0": "0", "1": "1"}
    assert config["problem_type"] == "single_label_classification"
    assert (saved / "vocab.txt").is_file() and not list(tmp_path.glob("out/.model*"))
    hf_model = transformers.ElectraForSequenceClassification.from_pretrained(saved).eval()

    # ... whose logits are ours (same weights through our encoder) ...
    from safetensors.torch import load_file

    ours = ElectraForSequenceClassification(load_encoder(run_dir)[0].config, 2)
    ours.load_state_dict(load_file(str(saved / "model.safetensors")))
    ours.eval()
    tokenizer = load_tokenizer(saved)
    batch = _hf_inputs(tokenizer, [("good film", None), ("the plot was bad , very", "a good movie"), ("a", None)])
    with torch.no_grad():
        ours_logits = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        hf_logits = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(),
                             token_type_ids=batch["token_type_ids"]).logits
    torch.testing.assert_close(ours_logits, hf_logits, rtol=1e-5, atol=1e-5)

    # ... and which scores on dev exactly what metrics.json says the best checkpoint scored.
    lines = (data_dir / "dev.tsv").read_text().splitlines()[1:]
    texts, labels = zip(*[(line.split("\t")[0], int(line.split("\t")[1])) for line in lines])
    batch = _hf_inputs(tokenizer, [(t, None) for t in texts])
    with torch.no_grad():
        predicted = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(),
                             token_type_ids=batch["token_type_ids"]).logits.argmax(-1)
    assert accuracy(predicted.numpy(), labels) == pytest.approx(best["metrics"]["accuracy"])


def _tagged(rng: random.Random) -> list[str]:
    lines = []
    for _ in range(rng.randint(3, 6)):
        choice = rng.random()
        if choice < 0.3:
            lines += ["john B-PER", "smith I-PER"]
        elif choice < 0.45:
            lines.append("mary B-PER")
        elif choice < 0.7:
            lines.append(f"{rng.choice(['paris', 'london'])} B-LOC")
        else:
            lines.append(f"{rng.choice(FILLER)} O")
    return lines + [""]


def test_token_classification_end_to_end(tmp_path, run_dir):
    transformers = pytest.importorskip("transformers")
    rng = random.Random(1)
    for split, count in (("train", 160), ("dev", 40)):
        _write(tmp_path / "data" / f"{split}.txt", [line for _ in range(count) for line in _tagged(rng)])
    result = finetune(run_dir / "export", "token-classification", tmp_path / "data", tmp_path / "out",
                      _quick("train.epochs=8"), seeds=(3,))
    assert result["median"]["f1"] >= 0.8, result["median"]
    saved = tmp_path / "out" / "model"
    config = json.loads((saved / "config.json").read_text())
    assert config["architectures"] == ["ElectraForTokenClassification"]
    assert config["id2label"] == {"0": "O", "1": "B-LOC", "2": "I-LOC", "3": "B-PER", "4": "I-PER"}
    hf_model = transformers.ElectraForTokenClassification.from_pretrained(saved).eval()

    from safetensors.torch import load_file

    ours = ElectraForTokenClassification(load_encoder(run_dir)[0].config, 5)
    ours.load_state_dict(load_file(str(saved / "model.safetensors")))
    ours.eval()
    ids = torch.tensor([[2, 21, 22, 27, 3, 0], [2, 24, 3, 0, 0, 0]])
    mask = ids != 0
    with torch.no_grad():
        hf_logits = hf_model(input_ids=ids, attention_mask=mask.long()).logits
        torch.testing.assert_close(ours(ids, mask)[mask], hf_logits[mask], rtol=1e-5, atol=1e-5)
        flat = mask.flatten().nonzero().flatten()
        torch.testing.assert_close(ours(ids, mask, positions=flat), hf_logits[mask], rtol=1e-5, atol=1e-5)


def test_python_api_in_memory_regression_and_classification(tmp_path):
    transformers = pytest.importorskip("transformers")
    rng = random.Random(2)
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = load_tokenizer(tmp_path / "vocab.txt")

    def scored():  # an STS-like 0..5 score: 4 with "good", plus 1 with "bad"
        text, has_good = _sentence(rng)
        return text, None, 4.0 * has_good + float("bad" in text.split())

    train, dev = [scored() for _ in range(192)], [scored() for _ in range(48)]
    result = finetune_classifier(model, train, dev, num_labels=1, tokenizer=tokenizer, config=_quick(),
                                 out_dir=tmp_path / "reg")
    assert result["kind"] == "regression" and result["median"]["spearman"] > 0.6, result["median"]
    config = json.loads((tmp_path / "reg" / "model" / "config.json").read_text())
    assert config["problem_type"] == "regression" and config["num_labels"] == 1
    assert (tmp_path / "reg" / "model" / "tokenizer.json").is_file()
    hf_model = transformers.ElectraForSequenceClassification.from_pretrained(tmp_path / "reg" / "model")
    assert hf_model.config.problem_type == "regression" and hf_model.num_labels == 1
    for name, tensor in model.state_dict().items():  # the caller's model is not changed
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)

    pairs = [(t, "a film", y) for t, y in (_sentence(rng) for _ in range(96))]
    result = finetune_classifier(model, pairs, pairs[:32], num_labels=2, tokenizer=tokenizer,
                                 config=_quick("train.epochs=1", "task.metric=mcc"), seeds=[4, 5, 6],
                                 label_names=["neg", "pos"])
    assert set(result["per_seed"]) == {"4", "5", "6"} and result["selecting_metric"] == "mcc"
    for name in ("accuracy", "f1", "mcc"):
        values = [result["per_seed"][s]["final"][name] for s in ("4", "5", "6")]
        assert result["median"][name] == pytest.approx(statistics.median(values))


def test_hf_discriminator_folder_and_triton_attention_path(tmp_path):
    """Any transformers ElectraForPreTraining folder loads (pytorch_model.bin too); our encoder matches
    HF's; the all-Triton path (packed varlen attention, fused LayerNorm / GELU; the interpreter on the
    CPU) gives the PyTorch path's logits."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.ElectraConfig(vocab_size=len(VOCAB), embedding_size=16, hidden_size=32,
                                           num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                           max_position_embeddings=32)
    torch.manual_seed(0)
    hf_model = transformers.ElectraForPreTraining(hf_config).eval()
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(hf_config.to_json_string())
    torch.save(hf_model.state_dict(), folder / "pytorch_model.bin")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    ids = torch.tensor([[2, 5, 6, 7, 3, 8, 9, 3], [2, 10, 11, 3, 0, 0, 0, 0], [2, 12, 3, 0, 0, 0, 0, 0]])
    mask = ids != 0
    types = torch.zeros_like(ids)
    types[0, 5:] = 1

    encoder, base_config = load_encoder(folder, ModelOptions(attention_impl="torch"))
    assert base_config["model_type"] == "electra"
    with torch.no_grad():
        rows, layout = encoder.eval()(ids, mask, types)
        expected = hf_model.electra(input_ids=ids, attention_mask=mask.long(), token_type_ids=types).last_hidden_state
    torch.testing.assert_close(layout.unflatten(rows)[mask], expected[mask], rtol=1e-5, atol=1e-5)

    packed, _ = load_encoder(folder, ModelOptions(attention_impl="triton", elementwise_impl="triton", unpad=True))
    for cls in (ElectraForSequenceClassification, ElectraForTokenClassification):
        reference = cls(encoder.config, 3).eval()
        reference.electra.load_state_dict(encoder.state_dict())
        kernel = cls(packed.config, 3).eval()
        kernel.load_state_dict(reference.state_dict())
        with torch.no_grad():
            assert kernel.electra.layout(mask).packed
            got, want = kernel(ids, mask, types), reference(ids, mask, types)
        if got.dim() == 3:
            got, want = got[mask], want[mask]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Bad inputs: one clear error naming the file / line
# --------------------------------------------------------------------------------------------
def _bad_glue(tmp_path, task, lines, name="train.tsv"):
    folder = _glue_dir(tmp_path, task)
    _write(folder / name, lines)
    return folder


@pytest.mark.parametrize("case", [
    "missing_dev", "wrong_layout", "cola_label", "mnli_label", "column_count", "test_file", "sts_range",
    "csv_column", "csv_unknown_label", "conll_tag", "conll_unseen_type", "conll_one_column", "bad_json",
    "unknown_task", "bad_metric",
])
def test_bad_task_files(tmp_path, case):
    if case == "missing_dev":
        folder = _glue_dir(tmp_path, "rte")
        (folder / "dev.tsv").unlink()
        call, match = lambda: load_task("rte", folder), r"dev\.tsv: missing"
    elif case == "wrong_layout":  # an SST-2 file where MRPC is expected
        folder = _bad_glue(tmp_path, "mrpc", GLUE_FILES["sst-2"][0])
        call, match = lambda: load_task("mrpc", folder), r"train\.tsv:1: not the mrpc layout: header lacks"
    elif case == "cola_label":
        folder = _bad_glue(tmp_path, "cola", ["gj04\t1\t\tok .", "gj04\t2\t\tbad label ."])
        call, match = lambda: load_task("cola", folder), r"train\.tsv:2: label '2' is not one of"
    elif case == "mnli_label":
        lines = list(GLUE_FILES["mnli"][0])
        lines[2] = lines[2].replace("\tentailment\tentailment", "\tentailment\t-")
        folder = _bad_glue(tmp_path, "mnli", lines)
        call, match = lambda: load_task("mnli", folder), r"train\.tsv:3: label '-' is not one of"
    elif case == "column_count":
        folder = _bad_glue(tmp_path, "rte", GLUE_FILES["rte"][0] + ["2\tonly two"])
        call, match = lambda: load_task("rte", folder), r"train\.tsv:4: expected 4 tab-separated columns, found 2"
    elif case == "test_file":  # CoLA's test.tsv has a header and no labels
        folder = _bad_glue(tmp_path, "cola", ["index\tsentence", "0\tthe film ."], name="dev.tsv")
        call, match = lambda: load_task("cola", folder), r"dev\.tsv:1: expected the CoLA layout"
    elif case == "sts_range":
        lines = list(GLUE_FILES["sts-b"][0])
        lines[1] = lines[1].replace("5.000", "7.5")
        folder = _bad_glue(tmp_path, "sts-b", lines)
        call, match = lambda: load_task("sts-b", folder), r"train\.tsv:2: score 7\.5 is outside \[0\.0, 5\.0\]"
    elif case == "csv_column":
        _write(tmp_path / "train.csv", ["sentence,label", "a,x"])
        _write(tmp_path / "dev.csv", ["sentence,label", "a,x"])
        call, match = lambda: load_task("classification", tmp_path), r"train\.csv:2: no column 'text'"
    elif case == "csv_unknown_label":
        _write(tmp_path / "train.csv", ["text,label", "a,x", "b,y"])
        _write(tmp_path / "dev.csv", ["text,label", "a,x", "c,z"])
        call, match = lambda: load_task("classification", tmp_path), r"dev\.csv:3: label 'z' is not one of"
    elif case == "conll_tag":
        _write(tmp_path / "train.txt", ["john B-PER", "paris X-LOC"])
        _write(tmp_path / "dev.txt", ["john B-PER"])
        call, match = lambda: load_task("token-classification", tmp_path), r"train\.txt:2: tag 'X-LOC' is not a BIO tag"
    elif case == "conll_unseen_type":
        _write(tmp_path / "train.txt", ["john B-PER"])
        _write(tmp_path / "dev.txt", ["john B-PER", "", "ibm O", "corp B-ORG"])
        call, match = lambda: load_task("token-classification", tmp_path), r"dev\.txt:4: tag 'B-ORG' is not one of"
    elif case == "conll_one_column":
        _write(tmp_path / "train.txt", ["john B-PER", "paris"])
        _write(tmp_path / "dev.txt", ["john B-PER"])
        call, match = lambda: load_task("token-classification", tmp_path), r"train\.txt:2: expected 'token \.\.\. tag'"
    elif case == "bad_json":
        _write(tmp_path / "train.jsonl", ['{"text": "a", "label": 1}', '{"text": "b", label: 0}'])
        _write(tmp_path / "dev.jsonl", ['{"text": "a", "label": 1}'])
        call, match = lambda: load_task("classification", tmp_path), r"train\.jsonl:2: not valid JSON"
    elif case == "unknown_task":
        call, match = lambda: load_task("squad", tmp_path), r"unknown task 'squad'"
    else:
        folder = _glue_dir(tmp_path, "rte")
        call, match = lambda: load_task("rte", folder, TaskOptions(metric="f1")), r"task\.metric='f1' is not reported"
    with pytest.raises(FinetuneError, match=match):
        call()


@pytest.mark.parametrize("case", ["no_config", "bad_config", "not_electra", "generator", "no_tokenizer",
                                  "missing_weights", "wrong_shape", "missing_path"])
def test_bad_model_folders(tmp_path, run_dir, case):
    data = _glue_dir(tmp_path, "rte")
    model = tmp_path / "model"
    if case != "missing_path":
        import shutil

        shutil.copytree(run_dir / "export" / ("generator" if case == "generator" else "discriminator"), model)
    if case == "no_config":
        (model / "config.json").unlink()
        match = "not an ELECTRA discriminator: no config.json"
    elif case == "bad_config":
        (model / "config.json").write_text("{not json")
        match = r"config\.json: cannot read it"
    elif case == "wrong_shape":  # config.json and the weights disagree
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(dict(config, intermediate_size=48)))
        match = "weights do not fit the model described by config.json"
    elif case == "not_electra":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(dict(config, model_type="bert")))
        match = "not an ELECTRA discriminator: .*model_type is 'bert'"
    elif case == "generator":
        match = "this is an ELECTRA generator"
    elif case == "no_tokenizer":
        (model / "vocab.txt").unlink()
        match = "no tokenizer.json or vocab.txt"
    elif case == "missing_weights":
        from safetensors.torch import load_file, save_file

        state = load_file(str(model / "model.safetensors"))
        state.pop("electra.encoder.layer.1.output.dense.weight")
        save_file(state, str(model / "model.safetensors"))
        match = r"weights do not match an ELECTRA encoder \(missing: \['encoder.layer.1.output.dense.weight'\]"
    else:
        match = "--model does not exist"
    with pytest.raises(FinetuneError, match=match):
        finetune(model, "rte", data, tmp_path / "out", _quick("train.epochs=1"))
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.parametrize("override, match", [
    ("train.learning_rate=1e-4", r"unknown config key 'train.learning_rate' \(known keys in 'train': adam_beta1, "),
    ("optim.lr=1e-4", r"unknown config section 'optim' in override 'optim.lr=1e-4' \(sections: task, train, model\)"),
    ("train.lr", r"must look like section.key=value"),
    ("train.epochs=many", "train.epochs expects a number"),
    ("train.progress=2", "train.progress expects true/false"),
    ("train.size=huge", r"train.size must be one of auto/small/base/large, got 'huge'"),
    ("train.precision=fp16", r"train.precision must be one of auto/bf16/fp32"),
    ("train.batch_size=0", "train.batch_size must be positive"),
    ("train.lr=-1e-4", "train.lr must be >= 0"),
    ("train.warmup_fraction=1", r"train.warmup_fraction must be in \[0, 1\)"),
    ("model.attention_impl=cuda", r"model.attention_impl must be one of auto/torch/triton"),
    ("task.max_seq_length=4", "task.max_seq_length must be 0 \\(auto\\) or at least 8"),
])
def test_bad_finetune_options_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig.from_overrides([override])


def test_recipe_defaults_are_the_papers_by_size():
    """lr / layer-wise decay 0 means the paper's value for the encoder's size; a set value wins."""
    from electra_fast.finetune import _recipe
    from electra_fast.tasks import TaskSpec

    spec = TaskSpec("sst-2", "classification", ["0", "1"], ("accuracy",))
    for hidden, (lr, decay) in {256: (3e-4, 0.8), 768: (1e-4, 0.8), 1024: (5e-5, 0.9)}.items():
        recipe = _recipe(spec, ModelConfig(hidden_size=hidden), FinetuneConfig(), 100)
        assert (recipe.lr, recipe.layerwise_lr_decay, recipe.epochs, recipe.batch_size) == (lr, decay, 3.0, 32)
        assert (recipe.total_steps, recipe.warmup_steps, recipe.max_seq_length) == (12, 1, 128)
    chosen = _recipe(spec, ModelConfig(hidden_size=1024), FinetuneConfig.from_overrides(
        ["train.lr=2e-5", "train.layerwise_lr_decay=1.0", "train.size=small"]), 100)
    assert (chosen.size, chosen.lr, chosen.layerwise_lr_decay) == ("small", 2e-5, 1.0)


def test_bad_api_inputs_and_cli_exit_code(tmp_path, run_dir, capsys):
    model = _tiny_model()
    tokenizer = load_tokenizer(run_dir / "export" / "discriminator")
    with pytest.raises(FinetuneError, match=r"train_examples\[1\]: label 2 is not a class id in 0\.\.1"):
        finetune_classifier(model, [("a", None, 0), ("b", None, 2)], [("a", None, 0)], num_labels=2,
                            tokenizer=tokenizer)
    with pytest.raises(FinetuneError, match=r"dev_examples\[0\]: regression label must be a finite number"):
        finetune_classifier(model, [("a", None, 0.5)], [("a", None, float("nan"))], num_labels=1, tokenizer=tokenizer)
    with pytest.raises(FinetuneError, match=r"train_examples\[0\]: expected \(text_a, text_b or None, label\)"):
        finetune_classifier(model, [("a", 0)], [("a", None, 0)], num_labels=2, tokenizer=tokenizer)
    with pytest.raises(FinetuneError, match="a tokenizer is required"):
        finetune_classifier(model, [("a", None, 0)], [("a", None, 0)], num_labels=2)
    with pytest.raises(ConfigError, match="unknown config key 'train.learning_rate'"):
        FinetuneConfig.from_overrides(["train.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="train.lr expects a number"):
        FinetuneConfig.from_overrides(["train.lr=fast"])
    assert FinetuneConfig.from_overrides(["task.labels=0,1", "task.text_column=2017"]).task.labels == "0,1"
    assert FinetuneConfig.from_overrides(["task.text_column=2017"]).task.text_column == "2017"

    parser = argparse.ArgumentParser()
    add_finetune_arguments(parser)
    folder = _glue_dir(tmp_path, "cola")
    (folder / "dev.tsv").write_text("gj04\t7\t\tbad .\n")
    args = parser.parse_args(["--model", str(run_dir), "--task", "cola", "--data-dir", str(folder),
                              "--out", str(tmp_path / "out")])
    assert run_finetune(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("electra-fast finetune: error: ") and "dev.tsv:1: label '7'" in err
    args.overrides = ["train.nope=1"]
    assert run_finetune(args) == 2
    assert "unknown config key 'train.nope'" in capsys.readouterr().err
    args.overrides, args.seeds = [], "1,x"
    assert run_finetune(args) == 2
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err


def test_summary_says_when_accuracy_is_the_majority_baseline():
    """A run that ends at the majority-class accuracy has learned nothing; the summary says so."""
    from electra_fast.finetune import _majority_baseline, _summary
    from electra_fast.tasks import Example, TaskSpec

    spec = TaskSpec("sst-2", "classification", ["0", "1"], ("accuracy",))
    dev = [Example("a", None, 1, "d1"), Example("b", None, 1, "d2"), Example("c", None, 0, "d3"),
           Example("d", None, 1, "d4")]
    baseline = _majority_baseline(spec, dev)
    assert baseline == {"label": "1", "accuracy": 0.75}
    assert _majority_baseline(TaskSpec("sts-b", "regression", [], ("spearman",)), dev) is None
    run = {"final": {"accuracy": 0.75}}
    result = {"task": "sst-2", "selecting_metric": "accuracy", "median": {"accuracy": 0.75}, "per_seed": {"1": run},
              "best_checkpoint": {"seed": 1, "step": 10, "metrics": {"accuracy": 0.75}}, "majority_baseline": baseline}
    assert "majority-class baseline (always '1': 0.7500)" in _summary(result) and "more epochs" in _summary(result)
    result["median"]["accuracy"] = 0.9
    assert "majority-class" not in _summary(result)
