"""Fine-tune an ELECTRA discriminator on a downstream task (GLUE, classification, regression, tagging).

    electra-fast finetune --model runs/small --task sst-2 --data-dir glue_data/SST-2 --out runs/small/sst2
    electra-fast finetune --model runs/small/export/discriminator --task rte --data-dir glue_data/RTE \\
        --out runs/small/rte --seeds 1,2,3,4,5
    electra-fast finetune --model google/electra-small-discriminator-folder --task classification \\
        --data-dir my_data --out out/cls --set task.text_column=review --set task.label_column=stars
    electra-fast finetune --model runs/small --task token-classification --data-dir conll2003 --out out/ner

``--model`` is a pretraining run folder (its ``export/discriminator`` is used), an export folder (its
``discriminator``), or any ``ElectraForPreTraining``-style folder: ``config.json`` +
``model.safetensors`` / ``pytorch_model.bin`` with ``tokenizer.json`` or ``vocab.txt`` beside them.
Task names and file layouts: see :mod:`electra_fast.tasks`.

The recipe defaults are the paper's (Clark et al. 2020, Appendix; google-research/electra
``configure_finetuning.py`` and ``model/optimization.py``):

* AdamW (β=0.9/0.999, ε=1e-6), weight decay 0.01 (the reference code's value) except on LayerNorm
  and bias parameters (:func:`electra_fast.optim.no_weight_decay`), gradient clipping at global norm 1.0;
* lr 3e-4 (small) / 1e-4 (base) / 5e-5 (large), size read from the hidden width;
* layer-wise lr decay 0.8 (0.9 for large) exactly as ``_get_layer_lrs``: embeddings (and
  ``embeddings_project``) have depth 0, encoder layer i depth i+1, the task head depth L+2, and each
  gets ``lr · decay^(L+2−depth)``;
* lr schedule ``lr · min(1, (t+1)/warmup) · (1 − t/T)`` (:func:`electra_fast.optim.lr_multiplier`):
  linear warm-up over 10% of the T steps and linear decay to 0 (the reference's polynomial decay of
  power 1 times its warm-up factor);
* batch 32, max length 128 (256 for tagging), 3 epochs (10 for RTE and STS-B);
* several seeds with the median reported (``--seeds 1,2,3``; the paper takes the median of 10 runs).

This module is the training / evaluation loop and the CLI. The models (heads as Hugging Face's, so
the result loads in transformers) are in :mod:`electra_fast.task_models`, the featurisation in
:mod:`electra_fast.task_features`, the ``--set`` options in :mod:`electra_fast.finetune_config`, the
task files and metrics in :mod:`electra_fast.tasks`.

Differences from the TF reference, on purpose: PyTorch's AdamW applies Adam's bias correction (BERT's
AdamWeightDecayOptimizer does not, which scales update t by (1−β1^t)/sqrt(1−β2^t): about 3 in the first
steps, back to 1 over a few thousand; the warm-up keeps those steps small in both), and STS-B is trained
on the raw 0..5 score as in HF (the reference divides it by 5; the correlation metrics do not change).

The encoder is built from the pretraining blocks in :mod:`electra_fast.model` (``ElectraEmbeddings`` +
``ElectraBody``), so ``model.attention_impl=auto`` runs the electra_kernels Triton attention on
CUDA (on packed real tokens, with ``model.unpad``) and PyTorch SDPA on the CPU, and
``model.elementwise_impl=auto`` the fused dropout-add-LayerNorm and bias-GELU kernels on CUDA; on CUDA
the forward runs under bf16 autocast. Plain PyTorch, one device: no DeepSpeed.

Outputs in ``--out``:

* ``metrics.json``, rewritten after every seed: per seed the final dev metrics, the best evaluation and
  the evaluation history; ``median`` (of the final metrics over seeds: what the paper reports) and
  ``median_best``; extra dev sets are prefixed (MNLI's ``mismatched_accuracy``); the recipe used.
* ``model/``: the best checkpoint by the selecting dev metric over all seeds and evaluations, as an
  ``ElectraForSequenceClassification`` / ``ElectraForTokenClassification`` folder (config.json with
  num_labels, id2label, label2id, problem_type; model.safetensors; tokenizer files), written to a
  temporary folder and renamed into place.

Python API (what ``electra-fast finetune`` and ``benchmarks/equal_compute.py`` call)::

    from electra_fast.manifest import load_tokenizer
    from electra_fast.finetune import FinetuneConfig, finetune, finetune_classifier

    # a task from files, as the CLI does
    result = finetune("runs/small", "mrpc", "glue_data/MRPC", "runs/small/mrpc",
                      FinetuneConfig.from_overrides(["train.lr=1e-4"]), seeds=(1, 2, 3))
    result["median"]["accuracy"]

    # in-memory examples: (text_a, text_b or None, label id) -- label a float when num_labels == 1
    config = FinetuneConfig.from_overrides(["train.epochs=2", "train.progress=false"])
    result = finetune_classifier(pretraining_model, train, dev, num_labels=2,
                                 tokenizer=load_tokenizer("data/default"), config=config)
    result["median"]["accuracy"], result["per_seed"]["1"]["final"]

``finetune_classifier`` takes the encoder as an ``ElectraPretrainingModel`` (its shared embeddings and
discriminator are copied; the model itself is not changed), a model folder (as ``--model``), or an
:class:`~electra_fast.task_models.ElectraModel`; the tokenizer as a ``tokenizers.Tokenizer`` or a
folder / ``tokenizer.json`` / ``vocab.txt`` path (read by :func:`electra_fast.manifest.load_tokenizer`).
It returns the same dictionary ``metrics.json`` holds; with ``out_dir`` it writes the files too. Bad inputs raise :class:`FinetuneError` (a ``ValueError``) naming the file / line.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import write_text_atomic
from .config import ConfigError, ModelConfig
from .manifest import DataError, load_tokenizer
from .finetune_config import PAPER_RECIPE, FinetuneConfig, TrainOptions
from .model import resolve_impl
from .optim import lr_multiplier, no_weight_decay
from .task_features import Features, collate, featurize, special_ids
from .task_models import build_task_model, check_model_folder, load_encoder, resolve_model_dir, save_hf_model
from .tasks import Example, FinetuneError, TaskData, TaskSpec, load_task, score

__all__ = [
    "FinetuneConfig",
    "FinetuneError",
    "add_finetune_arguments",
    "finetune",
    "finetune_classifier",
    "finetune_task",
    "layerwise_param_groups",
    "make_optimizer",
    "parameter_depth",
    "predict",
    "run_finetune",
]


# --------------------------------------------------------------------------------------------
# Optimiser: layer-wise learning rates and the reference schedule
# --------------------------------------------------------------------------------------------
def parameter_depth(name: str, num_layers: int) -> int:
    """google-research/electra ``_get_layer_lrs``: embeddings (and their projection) 0, encoder layer i
    i+1, anything else (the task head) num_layers + 2."""
    if name.startswith(("electra.embeddings.", "electra.embeddings_project.")):
        return 0
    for prefix in ("electra.encoder.layer.", "electra.layers."):  # ELECTRA's layers, the modern backbone's
        if name.startswith(prefix):
            return int(name[len(prefix):].split(".", 1)[0]) + 1
    if name.startswith("electra.final_norm."):  # the modern backbone's norm after its last layer
        return num_layers
    return num_layers + 2


def layerwise_param_groups(model: nn.Module, lr: float, decay: float, weight_decay: float) -> list[dict]:
    """AdamW groups: lr · decay^(L+2−depth) per depth, weight decay off for LayerNorm and biases."""
    num_layers = model.electra.num_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth = parameter_depth(name, num_layers)
        no_decay = no_weight_decay(name)
        group = groups.setdefault((depth, no_decay), {
            "params": [], "names": [], "depth": depth,
            "lr": lr * decay ** (num_layers + 2 - depth),
            "weight_decay": 0.0 if no_decay else weight_decay,
        })
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


# --------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError(f"train.device={name} but CUDA is not available")
    return device


def _size_of(cfg: ModelConfig, requested: str) -> str:
    if requested != "auto":
        return requested
    return "small" if cfg.hidden_size <= 256 else "base" if cfg.hidden_size <= 768 else "large"


def _higher_is_better(metric: str) -> bool:
    return metric != "mse"


def _amp_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 autocast on CUDA by default (fp32 master weights and optimizer state), none on the CPU."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, precision: str):
    dtype = _amp_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def _forward_loss(model: nn.Module, batch: dict, kind: str) -> torch.Tensor:
    if kind == "token-classification":
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["positions"])
        if logits.shape[0] == 0:  # every word truncated away: a zero loss keeps the step count honest
            return logits.sum() * 0.0
        return F.cross_entropy(logits, batch["labels"])
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    if kind == "regression":
        return F.mse_loss(logits.squeeze(-1), batch["labels"])
    return F.cross_entropy(logits, batch["labels"])


@torch.no_grad()
def predict(model: nn.Module, features: Features, spec: TaskSpec, batch_size: int, device: torch.device,
            precision: str = "auto", pad_id: int = 0) -> list:
    """Predicted class ids / scores per example, or tag ids per word (tagging)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(features.input_ids)), key=lambda i: len(features.input_ids[i]))  # less padding
    predictions: list = [None] * len(order)
    outside = spec.labels.index("O") if spec.kind == "token-classification" else 0
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batch = collate(features, indices, pad_id, device, spec.kind)
        with _autocast(device, precision):
            if spec.kind == "token-classification":
                tags = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                             batch["positions"]).argmax(-1).tolist()
            else:
                logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        if spec.kind == "token-classification":
            cursor = 0
            for i in indices:
                sentence = []
                for position in features.word_positions[i]:
                    if position >= 0:
                        sentence.append(tags[cursor])
                        cursor += 1
                    else:
                        sentence.append(outside)
                predictions[i] = sentence
        else:
            values = logits[:, 0].tolist() if spec.kind == "regression" else logits.argmax(-1).tolist()
            for i, value in zip(indices, values):
                predictions[i] = value
    model.train(was_training)
    return predictions


def _evaluate(model, dev_features: dict[str, Features], spec, options: TrainOptions, device, pad_id) -> dict:
    metrics = {}
    for split, features in dev_features.items():
        predictions = predict(model, features, spec, options.eval_batch_size, device, options.precision, pad_id)
        for name, value in score(spec, predictions, features.labels).items():
            metrics[name if split == "dev" else f"{split}_{name}"] = value
    return metrics


@dataclass
class _Recipe:
    size: str
    lr: float
    layerwise_lr_decay: float
    epochs: float
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int
    max_seq_length: int


def _recipe(spec: TaskSpec, cfg: ModelConfig, config: FinetuneConfig, num_train: int) -> _Recipe:
    train = config.train
    size = _size_of(cfg, train.size)
    lr = train.lr or PAPER_RECIPE[size]["lr"]
    decay = train.layerwise_lr_decay or PAPER_RECIPE[size]["layerwise_lr_decay"]
    epochs = train.epochs or spec.epochs
    max_len = config.task.max_seq_length or min(spec.default_max_seq_length, cfg.max_position_embeddings)
    if max_len > cfg.max_position_embeddings:
        raise FinetuneError(f"task.max_seq_length={max_len} exceeds the model's max_position_embeddings "
                            f"({cfg.max_position_embeddings})")
    steps_per_epoch = math.ceil(num_train / train.batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    return _Recipe(size, lr, decay, epochs, train.batch_size, steps_per_epoch, total,
                   int(round(train.warmup_fraction * total)), max(1, steps_per_epoch // train.evals_per_epoch),
                   max_len)


def _epoch_order(num_examples: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    order = torch.randperm(num_examples, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, num_examples, batch_size)]


def make_optimizer(model: nn.Module, lr: float, decay: float, total_steps: int, warmup_steps: int,
                   options: TrainOptions, device: torch.device):
    """AdamW over :func:`layerwise_param_groups` and a LambdaLR applying :func:`lr_multiplier`, so
    group g's lr at update t is lr · decay^(L+2−depth_g) · min(1, (t+1)/W) · (1 − t/T)."""
    optimizer = torch.optim.AdamW(
        layerwise_param_groups(model, lr, decay, options.weight_decay),
        lr=lr, betas=(options.adam_beta1, options.adam_beta2), eps=options.adam_eps,
        **({"fused": True} if device.type == "cuda" else {}),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup_steps))
    return optimizer, scheduler


# The loss is read back (a device sync) only every this many steps, and at evaluations.
_SYNC_EVERY = 10


def _train_seed(model: nn.Module, encoder_state: dict, spec: TaskSpec, train_features: Features,
                dev_features: dict[str, Features], recipe: _Recipe, config: FinetuneConfig, seed: int,
                device: torch.device, pad_id: int, selecting: str, on_eval) -> dict:
    options = config.train
    torch.manual_seed(seed)  # head init and dropout
    model.electra.load_state_dict(encoder_state)
    model.reset_head()
    model.train()
    optimizer, scheduler = make_optimizer(model, recipe.lr, recipe.layerwise_lr_decay, recipe.total_steps,
                                          recipe.warmup_steps, options, device)
    generator = torch.Generator().manual_seed(seed)  # data order
    parameters = [p for p in model.parameters() if p.requires_grad]
    sign = 1.0 if _higher_is_better(selecting) else -1.0

    from tqdm.auto import tqdm

    bar = tqdm(total=recipe.total_steps, desc=f"{spec.name} seed {seed}", unit="step", dynamic_ncols=True,
               disable=not options.progress, file=sys.stderr)
    history, best, smoothed_loss, step = [], None, None, 0
    loss_sum, loss_count = torch.zeros((), device=device), 0
    postfix: dict[str, str] = {}
    started = time.perf_counter()
    try:
        while step < recipe.total_steps:
            for indices in _epoch_order(len(train_features.input_ids), recipe.batch_size, generator):
                batch = collate(train_features, indices, pad_id, device, spec.kind)
                with _autocast(device, options.precision):
                    loss = _forward_loss(model, batch, spec.kind)
                loss.backward()
                if options.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(parameters, options.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_sum += loss.detach()
                loss_count += 1
                bar.update(1)
                evaluate_now = step % recipe.eval_every == 0 or step == recipe.total_steps
                if loss_count == _SYNC_EVERY or evaluate_now:
                    mean_loss = loss_sum.item() / loss_count
                    if not math.isfinite(mean_loss):
                        raise FinetuneError(f"seed {seed}: the training loss became {mean_loss} by step {step} "
                                            f"(lr {recipe.lr:g}; try a lower train.lr)")
                    smoothed_loss = mean_loss if smoothed_loss is None else 0.7 * smoothed_loss + 0.3 * mean_loss
                    loss_sum.zero_()
                    loss_count = 0
                    postfix["loss"] = f"{smoothed_loss:.4f}"
                if evaluate_now:
                    metrics = _evaluate(model, dev_features, spec, options, device, pad_id)
                    entry = {"step": step, "epoch": round(step / recipe.steps_per_epoch, 3),
                             "train_loss": smoothed_loss, "metrics": metrics}
                    history.append(entry)
                    if best is None or sign * metrics[selecting] > sign * best["metrics"][selecting]:
                        best = entry
                    on_eval(seed, entry)
                    postfix[f"dev_{selecting}"] = f"{metrics[selecting]:.4f}"
                bar.set_postfix(postfix, refresh=False)
                if step >= recipe.total_steps:
                    break
    finally:
        bar.close()
    return {"final": history[-1]["metrics"], "best": best["metrics"], "best_step": best["step"],
            "best_epoch": best["epoch"], "history": history, "train_seconds": round(time.perf_counter() - started, 2)}



# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
def _write_json(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2))


def _median(per_seed: dict, key: str) -> dict[str, float]:
    names = next(iter(per_seed.values()))[key].keys()
    return {name: statistics.median(run[key][name] for run in per_seed.values()) for name in names}


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def finetune_task(encoder_source, tokenizer, data: TaskData, config: FinetuneConfig | None = None,
                  seeds: Sequence[int] = (1,), out_dir: str | os.PathLike | None = None,
                  model_name: str = "") -> dict:
    """Fine-tune on already-read task data, once per seed. Returns the metrics dictionary (and writes
    ``out_dir/metrics.json`` + ``out_dir/model`` when ``out_dir`` is given)."""
    config = (config or FinetuneConfig()).validate()
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise FinetuneError(f"seeds must be distinct integers, got {seeds}")
    if not data.train:
        raise FinetuneError("no training examples")
    if not data.dev or not data.dev.get("dev"):
        raise FinetuneError("no dev examples")
    spec = data.spec
    tokenizer_dir = None  # where the saved model's tokenizer files are copied from
    if isinstance(encoder_source, (str, os.PathLike)):
        folder = resolve_model_dir(encoder_source)
        if tokenizer is None:
            tokenizer = tokenizer_dir = folder
        model_name = model_name or str(folder)
    if tokenizer is None:
        raise FinetuneError("a tokenizer is required when the encoder is not a model folder")
    try:
        tokenizer = load_tokenizer(tokenizer)
    except DataError as exc:  # names the path; fine-tuning's callers handle FinetuneError
        raise FinetuneError(str(exc)) from None
    encoder, base_config = load_encoder(encoder_source, config.model)
    cfg = encoder.config
    specials = special_ids(tokenizer, cfg)
    device = _resolve_device(config.train.device)
    recipe = _recipe(spec, cfg, config, len(data.train))

    train_features = featurize(tokenizer, spec, data.train, recipe.max_seq_length, specials)
    dev_features = {split: featurize(tokenizer, spec, examples, recipe.max_seq_length, specials)
                    for split, examples in data.dev.items()}
    selecting = data.selecting_metric
    model = build_task_model(spec, encoder).to(device)
    encoder_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    del encoder

    if config.train.progress:
        packed = cfg.unpad and resolve_impl(cfg.attention_impl, device) == "triton"
        print(f"{spec.name}: {len(data.train)} train / {len(data.dev['dev'])} dev examples; {recipe.size} recipe: "
              f"lr {recipe.lr:g}, layer decay {recipe.layerwise_lr_decay:g}, {recipe.epochs:g} epochs = "
              f"{recipe.total_steps} steps (warm-up {recipe.warmup_steps}), batch {recipe.batch_size}, max length "
              f"{recipe.max_seq_length}; {device}, {'bf16' if _amp_dtype(device, config.train.precision) else 'fp32'}, "
              f"{resolve_impl(cfg.attention_impl, device)} attention{' on packed tokens' if packed else ''}",
              file=sys.stderr)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    sign = 1.0 if _higher_is_better(selecting) else -1.0
    best = {"value": None, "seed": None, "step": None, "metrics": None, "state": None}

    def on_eval(seed: int, entry: dict) -> None:
        value = entry["metrics"][selecting]
        if best["value"] is None or sign * value > sign * best["value"]:
            best.update(value=value, seed=seed, step=entry["step"], metrics=entry["metrics"])
            if out is not None and config.train.save_model:
                best["state"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    result = {
        "task": spec.name, "kind": spec.kind, "labels": spec.labels, "model": model_name,
        "selecting_metric": selecting, "higher_is_better": _higher_is_better(selecting),
        "seeds": seeds, "per_seed": {},
        "recipe": {**dataclasses.asdict(recipe), "device": str(device),
                   "precision": "bf16" if _amp_dtype(device, config.train.precision) else "fp32",
                   "attention": resolve_impl(cfg.attention_impl, device),
                   "packed": bool(cfg.unpad and resolve_impl(cfg.attention_impl, device) == "triton")},
        "num_examples": {"train": len(data.train), **{s: len(e) for s, e in data.dev.items()}},
        "majority_baseline": _majority_baseline(spec, data.dev.get("dev")),
        "files": data.files, "config": config.to_dict(),
        "versions": {"torch": torch.__version__, "electra_fast": _package_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for seed in seeds:
        run = _train_seed(model, encoder_state, spec, train_features, dev_features, recipe, config, seed,
                          device, specials.pad, selecting, on_eval)
        result["per_seed"][str(seed)] = run
        result["median"] = _median(result["per_seed"], "final")
        result["median_best"] = _median(result["per_seed"], "best")
        if out is not None and best["state"] is not None:
            save_hf_model(best["state"], out / "model", spec, base_config, tokenizer, tokenizer_dir)
            best["state"] = None  # written; the next improvement makes a new copy
            best["path"] = str(out / "model")
        result["best_checkpoint"] = {k: best.get(k) for k in ("seed", "step", "metrics", "path")}
        if out is not None:
            _write_json(out / "metrics.json", result)
    return result


def _majority_baseline(spec, dev: list | None) -> dict | None:
    """Dev accuracy of always predicting the most frequent dev label (classification only): a run that
    ends there has learned nothing yet, which the summary says."""
    if spec.kind != "classification" or not dev:
        return None
    label, count = collections.Counter(example.label for example in dev).most_common(1)[0]
    name = spec.labels[label] if spec.labels and isinstance(label, int) and label < len(spec.labels) else label
    return {"label": str(name), "accuracy": count / len(dev)}


def _package_version() -> str:
    from . import __version__

    return __version__


def finetune(model: str | os.PathLike, task: str, data_dir: str | os.PathLike, out_dir: str | os.PathLike | None,
             config: FinetuneConfig | None = None, seeds: Sequence[int] = (1,)) -> dict:
    """Read ``task`` from ``data_dir`` and fine-tune ``model`` (a run / export / HF folder) on it."""
    config = (config or FinetuneConfig()).validate()
    folder = check_model_folder(model)  # fail on a wrong --model before reading large task files
    data = load_task(task, data_dir, config.task)
    return finetune_task(model, None, data, config, seeds, out_dir, model_name=str(folder))


def finetune_classifier(encoder, train_examples: Sequence, dev_examples: Sequence, *, num_labels: int,
                        tokenizer=None, config: FinetuneConfig | None = None, seeds: Sequence[int] = (1,),
                        out_dir: str | os.PathLike | None = None, label_names: Sequence[str] | None = None,
                        task_name: str = "classification") -> dict:
    """Fine-tune on in-memory (text_a, text_b or None, label) examples; see the module docstring.

    ``num_labels`` >= 2: labels are class ids 0..num_labels-1 (metrics accuracy, plus F1 and MCC for two
    classes); ``num_labels`` == 1: regression on float labels (Spearman, Pearson, MSE)."""
    if num_labels < 1:
        raise FinetuneError(f"num_labels must be >= 1, got {num_labels}")
    regression = num_labels == 1
    if label_names is not None and len(label_names) != num_labels:
        raise FinetuneError(f"label_names has {len(label_names)} names for num_labels={num_labels}")

    def convert(examples, split):
        out = []
        for i, example in enumerate(examples):
            where = f"{split}_examples[{i}]"
            if isinstance(example, Example):
                text_a, text_b, label = example.text_a, example.text_b, example.label
            else:
                try:
                    text_a, text_b, label = example
                except (TypeError, ValueError):
                    raise FinetuneError(f"{where}: expected (text_a, text_b or None, label), got {example!r}") from None
            if not isinstance(text_a, str) or not (text_b is None or isinstance(text_b, str)):
                raise FinetuneError(f"{where}: texts must be strings (text_b may be None)")
            if regression:
                if isinstance(label, bool) or not isinstance(label, (int, float)) or not math.isfinite(label):
                    raise FinetuneError(f"{where}: regression label must be a finite number, got {label!r}")
                label = float(label)
            elif isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
                raise FinetuneError(f"{where}: label {label!r} is not a class id in 0..{num_labels - 1}")
            out.append(Example(text_a, text_b, label, where))
        return out

    if regression:
        spec = TaskSpec(task_name, "regression", [], ("spearman", "pearson", "mse"))
    else:
        names = list(label_names) if label_names is not None else [str(i) for i in range(num_labels)]
        metrics = ("accuracy", "f1", "mcc") if num_labels == 2 else ("accuracy",)
        spec = TaskSpec(task_name, "classification", names, metrics)
    data = TaskData(spec, convert(train_examples, "train"), {"dev": convert(dev_examples, "dev")})
    if config is not None and config.task.metric:
        if config.task.metric not in spec.metrics:
            raise FinetuneError(f"task.metric={config.task.metric!r} is not one of {spec.metrics}")
        data.selecting_metric = config.task.metric
    return finetune_task(encoder, tokenizer, data, config, seeds, out_dir)


# --------------------------------------------------------------------------------------------
# CLI (wired by electra_fast/cli.py as `electra-fast finetune`)
# --------------------------------------------------------------------------------------------
FILE_LAYOUTS = """accepted task files (in --data-dir):
  GLUE (cola, sst-2, mrpc, sts-b, qqp, mnli, qnli, rte): the published TSV files as downloaded,
      train.tsv and dev.tsv (MNLI: dev_matched.tsv, and dev_mismatched.tsv when present)
  classification / regression: train.* and dev.* as .jsonl, .json, .csv or .tsv with a header; the
      columns are text, label (and optionally a second text): --set task.text_column=review
      task.label_column=stars task.text_pair_column=title
  token-classification: CoNLL style (.txt .conll .bio .iob .tsv), one token a line with its tag in the
      last column (BIO/IOB tags), a blank line between sentences
"""


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = FILE_LAYOUTS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", required=True,
                        help="pretraining run folder, export folder, or ElectraForPreTraining-style HF folder")
    parser.add_argument("--task", required=True,
                        help="cola, sst-2, mrpc, sts-b, qqp, mnli, qnli, rte, classification, regression, "
                             "token-classification")
    parser.add_argument("--data-dir", required=True, help="folder with the task's train and dev files")
    parser.add_argument("--out", required=True, help="output folder: metrics.json and model/ (best checkpoint)")
    parser.add_argument("--seeds", default="1", help="comma-separated seeds; the median is reported (default: 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a fine-tuning option, e.g. train.lr=1e-4, task.text_column=review "
                             "(sections: task, train, model; repeatable)")


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise FinetuneError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds:
        raise FinetuneError("--seeds is empty")
    return seeds


def _summary(result: dict) -> str:
    names = list(result["median"])
    lines = [f"{result['task']}: selecting metric {result['selecting_metric']} (final dev metrics per seed)"]
    lines.append("  " + "seed".ljust(8) + "".join(n[:18].rjust(20) for n in names))
    for seed, run in result["per_seed"].items():
        lines.append("  " + seed.ljust(8) + "".join(f"{run['final'][n]:20.4f}" for n in names))
    lines.append("  " + "median".ljust(8) + "".join(f"{result['median'][n]:20.4f}" for n in names))
    best = result["best_checkpoint"]
    lines.append(f"  best checkpoint: seed {best['seed']} step {best['step']} "
                 f"{result['selecting_metric']}={best['metrics'][result['selecting_metric']]:.4f}"
                 + (f" -> {best['path']}" if best.get("path") else ""))
    baseline, accuracy = result.get("majority_baseline"), result["median"].get("accuracy")
    if baseline and accuracy is not None and accuracy <= baseline["accuracy"] + 1e-9:
        lines.append(f"  accuracy {accuracy:.4f} is the majority-class baseline (always '{baseline['label']}': "
                     f"{baseline['accuracy']:.4f}): the classifier has not learned the task yet; try more epochs "
                     "(--set train.epochs=10) or another train.lr")
    return "\n".join(lines)


def run_finetune(args: argparse.Namespace) -> int:
    try:
        config = FinetuneConfig.from_overrides(args.overrides)
        result = finetune(args.model, args.task, args.data_dir, args.out, config, _parse_seeds(args.seeds))
    except (FinetuneError, ConfigError) as exc:
        print(f"electra-fast finetune: error: {exc}", file=sys.stderr)
        return 2
    print(_summary(result))
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    return 0
