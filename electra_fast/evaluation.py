"""Held-out evaluation of ELECTRA pretraining: threshold-free metrics that show replaced-token detection
being learned while the discriminator's accuracy still sits at the "nothing was replaced" prior.

    batches = [held_out[i:i + 32] for i in range(0, 256, 32)]   # dicts of input_ids/attention_mask/token_type_ids
    result = evaluate_pretraining(model, batches, seed=1234)
    result.disc_auc, result.disc_loss, result.disc_prior_loss, result.gen_accuracy, result.unigram_accuracy

At small scale the discriminator's accuracy equals 1 - replaced fraction for hundreds of steps: a
threshold at 0.5 hides whether replaced tokens already score higher than original ones. ROC-AUC (0.5 for
a constant prediction) and average precision (the replaced fraction for a constant prediction) see that
ranking directly, and the loss is judged against the entropy of the replaced fraction, which is what a
constant prediction of that fraction scores.

Pure torch + numpy: the trainer, the demo and experiment scripts all call this.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .objective import ObjectiveRNG

BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids")


# --------------------------------------------------------------------------------------------
# Threshold-free metrics (exact, ties as scikit-learn)
# --------------------------------------------------------------------------------------------
def _as_scores_and_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flat float64 scores and bool labels; one clear error for anything that is not a binary task."""

    def to_numpy(values: Any) -> np.ndarray:
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu()
            values = values.double() if values.is_floating_point() else values
            return values.numpy()
        return np.asarray(values)

    scores, labels = to_numpy(scores), to_numpy(labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same shape, got {scores.shape} and {labels.shape}")
    if scores.size == 0:
        raise ValueError("scores and labels are empty")
    scores, labels = scores.reshape(-1).astype(np.float64), labels.reshape(-1)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    if labels.dtype != np.bool_:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"labels must be 0/1 or bool, got values {np.unique(labels)[:5].tolist()}")
        labels = labels.astype(np.bool_)
    positives = int(labels.sum())
    if positives == 0 or positives == labels.size:
        raise ValueError(f"labels hold only one class ({positives} positives of {labels.size}); "
                         "the metric needs both")
    return scores, labels


def _counts_at_thresholds(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives when predicting "positive" for scores >= each distinct score, highest
    threshold first. Tied scores share one threshold, which is how scikit-learn treats ties."""
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_pos = np.cumsum(labels, dtype=np.float64)[last_of_each_score]
    false_pos = (last_of_each_score + 1) - true_pos
    return true_pos, false_pos


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of ``scores`` for the positive ``labels`` (trapezoids, so a tie between a
    positive and a negative counts one half). 0.5 for a constant score, 1.0 for a perfect ranking."""
    scores, labels = _as_scores_and_labels(scores, labels)
    true_pos, false_pos = _counts_at_thresholds(scores, labels)
    tpr = np.r_[0.0, true_pos] / true_pos[-1]
    fpr = np.r_[0.0, false_pos] / false_pos[-1]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def average_precision(scores: Any, labels: Any) -> float:
    """Average precision: Σ (recall_k − recall_{k−1}) · precision_k over the distinct thresholds (no
    interpolation). Equals the positive fraction for a constant score."""
    scores, labels = _as_scores_and_labels(scores, labels)
    true_pos, false_pos = _counts_at_thresholds(scores, labels)
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / true_pos[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def binary_entropy(p: float) -> float:
    """Entropy in nats of a coin with P(1) = p: the BCE loss of always predicting p."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a probability must be in [0, 1], got {p}")
    if p in (0.0, 1.0):
        return 0.0
    return -(p * math.log(p) + (1.0 - p) * math.log(1.0 - p))


# --------------------------------------------------------------------------------------------
# The pretraining model on held-out batches
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainingEval:
    """Held-out numbers of one evaluation (losses in nats, token-weighted over all batches)."""

    gen_loss: float  # generator masked-LM cross-entropy at the chosen positions
    gen_accuracy: float  # generator arg-max accuracy at the chosen positions
    unigram_accuracy: float  # accuracy of always guessing the most frequent maskable token
    disc_loss: float  # discriminator BCE over real tokens (padding excluded, [CLS]/[SEP] included)
    disc_prior_loss: float  # entropy of the replaced fraction: the loss of a constant prediction
    disc_auc: float  # ROC-AUC, replaced vs original real tokens (nan when nothing was replaced)
    disc_ap: float  # average precision of the same ranking (replaced fraction for a constant score)
    replaced_fraction: float  # replaced share of the real tokens
    num_predictions: int  # chosen (masked) positions
    num_tokens: int  # real tokens scored by the discriminator

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class _DiscriminatorTap:
    """Captures, during one training forward, what the discriminator saw and produced.

    The forward reports only batch means, so the per-token scores a ranking metric needs are taken with
    forward hooks rather than by re-implementing the forward: the ids entering the shared embeddings
    just before the discriminator body runs are the discriminator's input, and the body's output rows
    are what its prediction head scores. Both are in the forward's own token layout (padded batch
    flattened, or only the real tokens when packed).
    """

    def __init__(self, model: torch.nn.Module):
        self._last_ids: torch.Tensor | None = None
        self.disc_ids: torch.Tensor | None = None
        self.disc_rows: torch.Tensor | None = None
        self.layout = None
        self._handles = [
            model.embeddings.register_forward_pre_hook(self._on_embeddings),
            model.discriminator.register_forward_pre_hook(self._on_discriminator_input),
            model.discriminator.register_forward_hook(self._on_discriminator_output),
        ]

    def _on_embeddings(self, module, args):
        self._last_ids = args[0]

    def _on_discriminator_input(self, module, args):
        self.disc_ids = self._last_ids
        self.layout = args[1]  # the body's (rows, layout): which rows are real tokens

    def _on_discriminator_output(self, module, args, output):
        self.disc_rows = output

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _check_batch(index: int, batch: Mapping[str, torch.Tensor]) -> None:
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise ValueError(f"held-out batch {index} lacks {', '.join(missing)} (needs {', '.join(BATCH_KEYS)})")


def _real_token_labels(input_ids: torch.Tensor, layout, disc_ids: torch.Tensor):
    """(original ids, discriminator ids, row is real) of the real tokens, from the forward's layout
    (padded: every position a row; packed: one row per real token, then any inert bucket rows)."""
    disc_ids = disc_ids.flatten()
    if disc_ids.numel() != layout.real_rows().numel():
        raise RuntimeError(f"the discriminator saw {disc_ids.numel()} token rows, but its layout has "
                           f"{layout.real_rows().numel()}")
    real = layout.real_rows()
    return layout.flatten(input_ids)[real], disc_ids[real], real


def _unigram_accuracy(token_counts: torch.Tensor) -> float:
    """Masked positions are drawn uniformly among the maskable tokens, so the expected accuracy of always
    guessing the most frequent one is its share of those tokens (chosen on the held-out tokens
    themselves: an upper bound on what a unigram guess can score, which makes it a strict baseline)."""
    total = int(token_counts.sum())
    return float(token_counts.max()) / total if total else float("nan")


@torch.no_grad()
def evaluate_pretraining(model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                         seed: int) -> PretrainingEval:
    """Run ``model`` (an ``ElectraPretrainingModel``) in eval mode on fixed held-out ``batches``.

    Masks and generator samples come from a fresh ``ObjectiveRNG(seed)``, so the same model on the
    same batches always scores the same; the model's own objective RNG is put back afterwards (training
    draws the masks and samples it would have drawn without the evaluation), and so is its train/eval
    mode. Batches are moved to the device of the model's parameters.
    """
    if not hasattr(model, "rng") or not hasattr(model, "discriminator"):
        raise TypeError(f"evaluate_pretraining needs an ElectraPretrainingModel, got {type(model).__name__} "
                        "(pass the engine's .module)")
    device = next(model.parameters()).device
    cfg = model.config
    specials = torch.tensor([cfg.pad_token_id, cfg.cls_token_id, cfg.sep_token_id], device=device)

    gen_loss_sum = gen_correct = num_predictions = 0.0
    scores, labels = [], []
    token_counts = torch.zeros(cfg.vocab_size, dtype=torch.long, device=device)
    training_rng, was_training = model.rng, model.training
    model.rng = ObjectiveRNG(seed)
    tap = _DiscriminatorTap(model)
    model.eval()
    try:
        for index, batch in enumerate(batches):
            _check_batch(index, batch)
            input_ids, attention_mask, token_type_ids = (batch[key].to(device) for key in BATCH_KEYS)
            out = model(input_ids, attention_mask, token_type_ids)
            predictions = float(out.metrics["num_predictions"])
            gen_loss_sum += float(out.mlm_loss) * predictions
            gen_correct += float(out.metrics["gen_accuracy"]) * predictions
            num_predictions += predictions

            originals, disc_ids, real_rows = _real_token_labels(input_ids, tap.layout, tap.disc_ids)
            logits = model.discriminator_predictions(tap.disc_rows)[real_rows]
            scores.append(logits.float().flatten().cpu())
            labels.append((disc_ids != originals).cpu())

            maskable = attention_mask.bool() & ~torch.isin(input_ids, specials)
            token_counts += torch.bincount(input_ids[maskable], minlength=cfg.vocab_size)
    finally:
        tap.close()
        model.rng = training_rng
        model.train(was_training)

    if not scores:
        raise ValueError("evaluate_pretraining got no held-out batches")
    scores_t, labels_t = torch.cat(scores), torch.cat(labels)
    disc_loss = float(F.binary_cross_entropy_with_logits(scores_t.double(), labels_t.double()))
    replaced_fraction = float(labels_t.double().mean())
    both_classes = 0 < int(labels_t.sum()) < labels_t.numel()
    return PretrainingEval(
        gen_loss=gen_loss_sum / max(num_predictions, 1.0),
        gen_accuracy=gen_correct / max(num_predictions, 1.0),
        unigram_accuracy=_unigram_accuracy(token_counts),
        disc_loss=disc_loss,
        disc_prior_loss=binary_entropy(replaced_fraction),
        disc_auc=roc_auc(scores_t, labels_t) if both_classes else float("nan"),
        disc_ap=average_precision(scores_t, labels_t) if both_classes else float("nan"),
        replaced_fraction=replaced_fraction,
        num_predictions=int(num_predictions),
        num_tokens=int(labels_t.numel()),
    )
