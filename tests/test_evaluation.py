"""Held-out evaluation: ranking metrics against scikit-learn, and evaluate_pretraining against the
training forward it taps."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from electra_fast.evaluation import average_precision, binary_entropy, evaluate_pretraining, roc_auc
from electra_fast.model import ElectraPretrainingModel
from electra_fast.objective import ObjectiveRNG
from tests.helpers import random_batch, tiny_config


# ---------------------------------------------------------------- metrics
@pytest.mark.parametrize("size, levels", [(50, 0), (400, 7), (1000, 3), (37, 2)])
def test_metrics_match_sklearn_with_and_without_ties(size, levels):
    rng = np.random.default_rng(size + levels)
    labels = rng.random(size) < 0.3
    labels[:2] = [True, False]
    scores = rng.normal(size=size) + labels  # informative, not perfect
    if levels:  # few distinct values: many ties, some across the two classes
        scores = np.round(scores * levels / 4) / levels
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_metrics_take_torch_tensors_and_int_labels():
    scores = torch.tensor([0.1, 0.9, 0.4, 0.4, 0.8], dtype=torch.float32)
    labels = torch.tensor([0, 1, 1, 0, 0])
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()))
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels.numpy(), scores.numpy()))


def test_metrics_reference_points():
    labels = np.array([1, 0, 1, 0, 0, 0])
    assert roc_auc([6, 5, 4, 3, 2, 1], labels) == pytest.approx(7 / 8)  # 7 of 8 (replaced, original) pairs in order
    assert roc_auc([9, 1, 8, 2, 3, 4], labels) == 1.0
    assert roc_auc([1, 9, 2, 8, 7, 6], labels) == 0.0
    assert roc_auc(np.zeros(6), labels) == 0.5  # a constant prediction
    assert average_precision(np.zeros(6), labels) == pytest.approx(2 / 6)  # the positive fraction
    assert average_precision([9, 1, 8, 2, 3, 4], labels) == 1.0


@pytest.mark.parametrize("scores, labels, message", [
    ([0.1, 0.2], [1, 1], "only one class"),
    ([0.1, 0.2], [0, 0], "only one class"),
    ([0.1, 0.2, 0.3], [0, 1], "same shape"),
    ([], [], "empty"),
    ([0.1, float("nan")], [0, 1], "NaN"),
    ([0.1, 0.2], [0, 2], "0/1"),
])
def test_metrics_reject_bad_input(scores, labels, message):
    for metric in (roc_auc, average_precision):
        with pytest.raises(ValueError, match=message):
            metric(np.asarray(scores, dtype=float), np.asarray(labels))


def test_binary_entropy():
    assert binary_entropy(0.5) == pytest.approx(math.log(2))
    assert binary_entropy(0.0) == binary_entropy(1.0) == 0.0
    assert binary_entropy(0.15) == pytest.approx(binary_entropy(0.85))
    with pytest.raises(ValueError, match="probability"):
        binary_entropy(1.5)


# ---------------------------------------------------------------- evaluate_pretraining
def _model_and_batches(num_batches=2):
    cfg = tiny_config("model.vocab_size=64")
    model = ElectraPretrainingModel(cfg)
    batches = []
    for i in range(num_batches):
        ids, mask, types = random_batch(cfg, batch=4, seq_len=32, seed=i)
        batches.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return model, batches


def test_evaluation_agrees_with_the_training_forward():
    """One batch: the tapped per-token labels and scores reproduce the forward's own disc loss and
    replaced fraction, so the tap reads the discriminator's real input and output."""
    model, batches = _model_and_batches(1)
    result = evaluate_pretraining(model, batches, seed=7)

    model.eval()
    model.rng = ObjectiveRNG(7)
    with torch.no_grad():
        out = model(*(batches[0][key] for key in ("input_ids", "attention_mask", "token_type_ids")))
    assert result.disc_loss == pytest.approx(float(out.disc_loss), rel=1e-5)
    assert result.replaced_fraction == pytest.approx(float(out.metrics["replaced_fraction"]), rel=1e-6)
    assert result.gen_loss == pytest.approx(float(out.mlm_loss), rel=1e-6)
    assert result.gen_accuracy == pytest.approx(float(out.metrics["gen_accuracy"]), abs=1e-6)
    assert result.num_predictions == int(out.metrics["num_predictions"])
    assert result.num_tokens == int(batches[0]["attention_mask"].sum())
    assert result.disc_prior_loss == pytest.approx(binary_entropy(result.replaced_fraction))
    assert 0.0 <= result.disc_auc <= 1.0 and 0.0 < result.disc_ap <= 1.0
    assert 0.0 < result.unigram_accuracy < 1.0


def test_evaluation_is_fixed_and_leaves_training_untouched():
    model, batches = _model_and_batches()
    model.train()
    inputs = [batches[0][key] for key in ("input_ids", "attention_mask", "token_type_ids")]
    model(*inputs)  # a training run in progress: its masking and sampling streams have moved
    before = model.rng.state_dict()

    first = evaluate_pretraining(model, batches, seed=3)
    assert evaluate_pretraining(model, batches, seed=3) == first  # fixed masks and samples
    assert evaluate_pretraining(model, batches, seed=4) != first
    assert model.training
    after = model.rng.state_dict()
    assert after["seed"] == before["seed"] and torch.equal(after["seeds"], before["seeds"])
    assert torch.equal(after["masking"], before["masking"])

    # The next training step draws what it would have drawn without the evaluations.
    reference, _ = _model_and_batches()
    reference.load_state_dict(model.state_dict())
    reference.rng.load_state_dict(before)
    torch.manual_seed(11)
    expected = reference(*inputs).loss
    torch.manual_seed(11)
    assert torch.equal(model(*inputs).loss, expected)


def test_evaluation_counts_the_unigram_baseline_over_maskable_tokens():
    model, batches = _model_and_batches(1)
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"].bool()
    cfg = model.config
    maskable = mask & (ids != cfg.cls_token_id) & (ids != cfg.sep_token_id) & (ids != cfg.pad_token_id)
    expected = torch.bincount(ids[maskable]).max().item() / maskable.sum().item()
    assert evaluate_pretraining(model, batches, seed=0).unigram_accuracy == pytest.approx(expected)


def test_evaluation_rejects_bad_input():
    model, batches = _model_and_batches(1)
    with pytest.raises(ValueError, match="no held-out batches"):
        evaluate_pretraining(model, [], seed=0)
    with pytest.raises(ValueError, match="lacks token_type_ids"):
        evaluate_pretraining(model, [{"input_ids": batches[0]["input_ids"],
                                      "attention_mask": batches[0]["attention_mask"]}], seed=0)
    with pytest.raises(TypeError, match="ElectraPretrainingModel"):
        evaluate_pretraining(torch.nn.Linear(2, 2), batches, seed=0)


def test_labels_follow_the_forwards_token_layout():
    """Padded rows (every position), packed rows (real tokens only) and bucketed packed rows (real tokens,
    then inert rows) give the same labels."""
    from electra_fast.evaluation import _real_token_labels
    from electra_fast.model import TokenLayout

    input_ids = torch.tensor([[2, 7, 8, 3], [2, 9, 3, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    disc_padded = torch.tensor([2, 7, 5, 3, 2, 9, 3, 0])
    disc_packed = torch.tensor([2, 7, 5, 3, 2, 9, 3])
    padded = TokenLayout.build(attention_mask, packed=False)
    packed = TokenLayout.build(attention_mask, packed=True, max_seqlen=4, total_tokens=7)
    bucketed = TokenLayout.build(attention_mask, packed=True, max_seqlen=4, total_tokens=7, buckets=4)
    assert bucketed.indices.numel() == 8  # 7 real tokens rounded up to the bucket of 8 (one inert row)
    disc_bucketed = torch.cat([disc_packed, torch.tensor([3])])  # an inert row: never a label
    for layout, disc_ids in ((padded, disc_padded), (packed, disc_packed), (bucketed, disc_bucketed)):
        originals, seen, real_rows = _real_token_labels(input_ids, layout, disc_ids)
        assert (seen != originals).tolist() == [False, False, True, False, False, False, False]
        assert int(real_rows.sum()) == 7 and real_rows.numel() == disc_ids.numel()
    with pytest.raises(RuntimeError, match="its layout has 7"):
        _real_token_labels(input_ids, packed, disc_packed[:5])
