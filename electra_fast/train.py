"""Pretraining entry point: ELECTRA generator + discriminator on DeepSpeed's engine.

Launch (every config key can be changed with ``--set section.key=value``; ``--run-dir`` holds the
checkpoints, metrics and the Hugging Face export):

    # one process: the CPU (fp32) or one GPU (bf16)
    python -m electra_fast.train --config configs/electra-small.yaml --set data.path=data/default --run-dir runs/small

    # eight GPUs on one node (DeepSpeed's launcher spells `python -m` as --module)
    deepspeed --num_gpus 8 --module electra_fast.train --config configs/electra-small.yaml \
        --set data.path=data/owt --run-dir runs/small

    # many nodes (hostfile lines look like "node1 slots=8"; the run dir must be on a shared filesystem)
    deepspeed --hostfile hostfile --num_nodes 4 --num_gpus 8 --module electra_fast.train \
        --config configs/electra-base.yaml --set data.path=/data/owt --run-dir /shared/runs/base

    # torchrun works as well (it sets LOCAL_RANK instead of passing --local_rank)
    torchrun --nproc_per_node 8 -m electra_fast.train --config configs/electra-small.yaml --run-dir runs/small

    # continue after a crash, a kill or a preemption: the same command with --resume
    deepspeed --num_gpus 8 --module electra_fast.train --run-dir runs/small --resume

    # ZeRO-3, a bigger batch, 10k steps: any key, from the command line
    deepspeed --num_gpus 8 --module electra_fast.train --config configs/electra-base.yaml --run-dir runs/base \
        --set train.deepspeed_config=configs/deepspeed/zero3.json train.global_batch_size=2048 train.max_steps=10000

    # the same through the CLI, and the export of any checkpoint to Hugging Face folders
    electra-fast pretrain --config configs/electra-small.yaml --run-dir runs/small --set train.max_steps=10000
    electra-fast export --checkpoint runs/small --out runs/small/export

A run directory::

    config.yaml           the resolved config (sizes, special ids and vocabulary from the data)
    deepspeed.json        the DeepSpeed config given to deepspeed.initialize (JSON + derived values)
    env.json              versions, git commit, devices, world size, command line
    metrics.jsonl         one record per log step (and one per skipped update)
    tensorboard/          the same as TensorBoard events
    checkpoints/          step-00001000/ ... (DeepSpeed's format) and `latest`
    export/               discriminator/ and generator/ in Hugging Face format, written at the end
    curves.png            loss and accuracy curves, drawn at the end

How the pieces fit (DESIGN.md): the YAML names a DeepSpeed JSON (``train.deepspeed_config``), which is
read, has the values both need filled in from the YAML in one place (:func:`build_deepspeed_config`:
batch sizes, clipping, precision, optimizer, LR schedule; "auto" is filled, a contradiction is an error)
and goes to ``deepspeed.initialize`` with the model and its weight-decay parameter groups. DeepSpeed
builds the optimizer (torch AdamW, DeepSpeed's CPU Adam under ZeRO-Offload, or its fused LAMB), the
WarmupDecayLR schedule, ZeRO partitioning, mixed precision, gradient clipping and the skipping of
updates whose gradient norm is not finite. The whole ELECTRA step (masking, generator, sampling,
discriminator) is the model's forward, so ZeRO-3 gathers every parameter where it is used.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import yaml

from .atomic import write_text_atomic
from .config import Config, ConfigError, build_config, config_from_dict, load_config
from .provenance import git_commit

logger = logging.getLogger("electra_fast.train")

# Parameters the reference implementation keeps out of weight decay (google-research/electra
# optimization.py: exclude_from_weight_decay=["LayerNorm", "layer_norm", "bias"]). Embeddings decay.
NO_WEIGHT_DECAY = ("LayerNorm", "layer_norm", "bias")

# Names of the per-step statistics accumulated on the device between log steps.
STAT_NAMES = ("loss", "mlm_loss", "disc_loss", "gen_accuracy", "disc_accuracy", "disc_precision", "disc_recall",
              "replaced_fraction")

CHECKPOINT_DIR = "checkpoints"
TAG_PATTERN = re.compile(r"^step-(\d{8,})$")
TMP_SUFFIX = ".tmp"
LATEST = "latest"
RANK_STATE = "trainer_state_rank{rank:05d}.pt"
CONFIG_SIDECAR = "electra_fast_config.json"

# Test-only fault injection: "KIND@STEP" or "KIND@STEP:RANK", KIND = sigkill | raise, applied after
# optimizer step STEP finished (and its checkpoint, if any, was written). Used by tests/test_train*.py to
# kill a run the way `kill -9` does and to make one rank die.
FAULT_ENV = "ELECTRA_FAST_TEST_FAULT"


class TrainingAborted(RuntimeError):
    """The run stopped on purpose (e.g. too many non-finite steps); the message says why and what to do."""


# ==================================================================================================
# The DeepSpeed config: JSON from configs/deepspeed/ + values derived from our YAML, in one place
# ==================================================================================================
def find_deepspeed_config(path: str) -> Path:
    """``train.deepspeed_config`` relative to the working directory, or else to the repository."""
    candidates = [Path(path)]
    if not Path(path).is_absolute():
        candidates.append(Path(__file__).resolve().parents[1] / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"train.deepspeed_config: file not found: {path} (looked in: "
                      f"{', '.join(str(c) for c in candidates)})")


def read_deepspeed_json(path: str) -> tuple[dict, Path]:
    found = find_deepspeed_config(path)
    try:
        values = json.loads(found.read_text())
    except ValueError as exc:
        raise ConfigError(f"{found}: not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{found}: the top level must be an object")
    return values, found


def resolve_precision(precision: str, device_type: str, bf16_supported: bool = True,
                      fp16_supported: bool = True) -> str:
    """"auto" -> bf16 on a GPU that has it (fp16 on older GPUs), fp32 on the CPU."""
    if precision == "auto":
        if device_type == "cpu":
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if precision == "bf16" and not bf16_supported:
        raise ConfigError(f"train.precision=bf16 but this {device_type} device has no bf16 support; use fp16 or fp32")
    if precision == "fp16" and not fp16_supported:
        raise ConfigError(f"train.precision=fp16 is not supported on this {device_type} device; use bf16 or fp32")
    return precision


def _get(tree: dict, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None or child == "auto":
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: '{'.'.join(parts[:i + 1])}' must be an object, got {child!r}")
        node = child
    node[parts[-1]] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b if isinstance(a, bool) and isinstance(b, bool) else False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b


def _find_auto(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if tree == "auto" else []


def build_deepspeed_config(cfg: Config, user: dict, *, world_size: int, device_type: str,
                           source: str = "the DeepSpeed config", bf16_supported: bool = True,
                           fp16_supported: bool = True) -> dict:
    """The config given to ``deepspeed.initialize``: ``user`` (the JSON) plus what our YAML decides.

    Every value both need is derived here from ``cfg`` and written where the JSON leaves it out or says
    "auto". An explicit JSON value equal to the derived one is fine; a different one is a ConfigError
    naming both keys, so the two files can never silently disagree. Global batch = micro batch x
    accumulation x world size (an explicit JSON micro batch or accumulation is used when the YAML
    derives it). Values with no YAML counterpart (ZeRO settings, loss-scale window, ...) pass through.
    """
    tc = cfg.train
    out = copy.deepcopy(user)

    # Batch layout: the YAML decides; an explicit JSON micro batch / accumulation fills a YAML zero.
    layout_cfg = copy.copy(tc)
    for json_key, yaml_key in (("train_micro_batch_size_per_gpu", "micro_batch_size"),
                               ("gradient_accumulation_steps", "gradient_accumulation_steps")):
        value = out.get(json_key)
        if value not in (None, "auto") and getattr(tc, yaml_key) == 0:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{source}: '{json_key}' must be a positive integer or \"auto\", got {value!r}")
            setattr(layout_cfg, yaml_key, value)
    micro, accumulation = layout_cfg.batch_layout(world_size)

    precision = resolve_precision(tc.precision, device_type, bf16_supported, fp16_supported)
    offload = _get(out, "zero_optimization.offload_optimizer.device") not in (None, "none")
    optimizer = {"adamw": "AdamW", "lamb": "Lamb"}[tc.optimizer]
    if optimizer == "Lamb" and device_type != "cuda":
        raise ConfigError("train.optimizer=lamb uses DeepSpeed's FusedLamb, a CUDA kernel; use adamw on "
                          f"{device_type}")

    # (key in the DeepSpeed config, value, the YAML key it comes from)
    derived: list[tuple[str, Any, str]] = [
        ("train_batch_size", tc.global_batch_size, "train.global_batch_size"),
        ("train_micro_batch_size_per_gpu", micro, f"train.micro_batch_size (derived: {micro})"),
        ("gradient_accumulation_steps", accumulation, f"train.gradient_accumulation_steps (derived: {accumulation})"),
        ("gradient_clipping", tc.grad_clip, "train.grad_clip"),
        ("bf16.enabled", precision == "bf16", f"train.precision ({precision})"),
        ("fp16.enabled", precision == "fp16", f"train.precision ({precision})"),
        ("optimizer.type", optimizer, "train.optimizer"),
        ("optimizer.params.lr", tc.lr, "train.lr"),
        ("optimizer.params.betas", [tc.adam_beta1, tc.adam_beta2], "train.adam_beta1/adam_beta2"),
        ("optimizer.params.eps", tc.adam_eps, "train.adam_eps"),
        ("optimizer.params.weight_decay", tc.weight_decay, "train.weight_decay"),
    ]
    scheduler_type = _get(out, "scheduler.type")
    if scheduler_type in (None, "auto") or str(scheduler_type).lower() == "warmupdecaylr":
        # The paper's schedule: linear warmup from 0, then linear decay to 0 at the last step.
        derived += [
            ("scheduler.type", "WarmupDecayLR", "the paper's schedule"),
            ("scheduler.params.warmup_min_lr", 0.0, "the paper's schedule (warmup from 0)"),
            ("scheduler.params.warmup_max_lr", tc.lr, "train.lr"),
            ("scheduler.params.warmup_num_steps", tc.warmup_steps, "train.warmup_steps"),
            ("scheduler.params.total_num_steps", tc.max_steps, "train.max_steps"),
            ("scheduler.params.warmup_type", "linear", "the paper's schedule (linear warmup)"),
        ]
    for key, value, origin in derived:
        current = _get(out, key)
        if current is None or current == "auto":
            _set(out, key, value, source)
        elif not _same(current, value):
            raise ConfigError(f"{source}: '{key}' is {current!r} but the YAML gives {value!r} (from {origin}); "
                              f"set '{key}' to \"auto\" in the JSON or change the YAML")

    # Values with no YAML counterpart, filled only where the JSON leaves them to us.
    params = out["optimizer"].setdefault("params", {})
    if optimizer == "AdamW":
        # torch's AdamW (fused kernel on CUDA) needs no JIT-built DeepSpeed op; under ZeRO-Offload the
        # optimizer runs on the CPU, where DeepSpeed's vectorised CPU Adam is the fast one.
        if params.get("torch_adam", "auto") == "auto":
            params["torch_adam"] = not offload
        if params["torch_adam"] and device_type == "cuda" and params.get("fused", "auto") == "auto":
            params["fused"] = True
        if params.get("fused") == "auto":
            params.pop("fused")
    else:
        for key in ("torch_adam", "fused"):
            if params.get(key, "auto") != "auto":
                raise ConfigError(f"{source}: 'optimizer.params.{key}' applies to AdamW, not train.optimizer=lamb")
            params.pop(key, None)

    left = _find_auto(out)
    if left:
        raise ConfigError(f"{source}: no value for \"auto\" at {', '.join(left)} (only keys the YAML decides can "
                          "be \"auto\")")
    return out


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: weight decay except for LayerNorm parameters and biases (as the reference)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if any(part in name for part in NO_WEIGHT_DECAY) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ==================================================================================================
# Data and model set-up
# ==================================================================================================
def apply_data_manifest(cfg: Config) -> dict:
    """Read the prepared data's manifest and make the model's vocabulary and special ids match it."""
    from .data import DataError, check_vocab, read_manifest

    if not cfg.data.path:
        raise ConfigError("data.path is not set: point it at a folder written by `electra-fast prepare` "
                          "(e.g. --set data.path=data/default)")
    if not Path(cfg.data.path).expanduser().is_dir():
        raise DataError(f"data.path: no such directory: {cfg.data.path} (run `electra-fast prepare` first)")
    manifest = read_manifest(cfg.data.path)
    if int(manifest["seq_len"]) != cfg.data.seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} but the data at {cfg.data.path} was prepared with "
                          f"seq_len={manifest['seq_len']}; set data.seq_len={manifest['seq_len']} or prepare again")
    # The size presets carry a vocabulary size only as a placeholder: a config that leaves it there
    # takes the data's; one that names another size must match the data exactly.
    if cfg.model.vocab_size == build_config(cfg.size).model.vocab_size:
        cfg.model.vocab_size = int(manifest["vocab_size"])
    check_vocab(manifest, cfg.model.vocab_size)
    special = manifest["special_token_ids"]
    for name in ("pad", "unk", "cls", "sep", "mask"):
        setattr(cfg.model, f"{name}_token_id", int(special[name]))
    cfg.validate()
    return manifest


def _world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the launcher's environment, before or after init."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", 1))))
    rank = int(env.get("RANK", env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", 0))))
    local = int(env.get("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    return rank, local, world


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(local_rank: int) -> tuple[int, int, torch.device]:
    """Join the process group the launcher set up (or make a one-process group): (rank, world, device)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launched = any(k in os.environ for k in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"))
    if not launched:  # `python -m electra_fast.train`: a group of one, on a free local port
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    if local_rank < 0:
        local_rank = _world()[1]
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu")
    return rank, world, device


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ==================================================================================================
# Checkpoints: DeepSpeed's format, written to a temporary tag and renamed; `latest` updated last
# ==================================================================================================
def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def read_latest(root: Path) -> str | None:
    """The tag `latest` names, if it names a complete checkpoint folder."""
    latest = Path(root) / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if tag and (Path(root) / tag).is_dir() else None


def _rng_state(model) -> dict:
    """This rank's random streams, as plain Python values and tensors (loadable with weights_only)."""
    from deepspeed.accelerator import get_accelerator

    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "objective": model.rng.state_dict(),
    }
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["device"] = accelerator.get_rng_state()
    return state


def _set_rng_state(model, state: dict) -> None:
    from deepspeed.accelerator import get_accelerator

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    model.rng.load_state_dict(state["objective"])
    if "device" in state and get_accelerator().device_name() != "cpu":
        get_accelerator().set_rng_state(state["device"])


class Checkpoints:
    """Save/prune/resume for one run directory (every rank calls save and load; rank 0 renames)."""

    def __init__(self, run_dir: Path, rank: int, local_rank: int, keep_last: int):
        self.root = checkpoint_root(run_dir)
        self.rank, self.local_rank, self.keep_last = rank, local_rank, keep_last

    def tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = [p.name for p in self.root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)]
        return sorted(found, key=lambda t: int(TAG_PATTERN.match(t).group(1)))

    def clean_partial(self) -> None:
        """Remove folders of saves that never finished (a crash between writing and renaming)."""
        if self.rank == 0 and self.root.is_dir():
            for path in self.root.iterdir():
                if path.is_dir() and path.name.endswith(TMP_SUFFIX):
                    shutil.rmtree(path, ignore_errors=True)
        _barrier()

    def save(self, engine, step: int, client_state: dict, rank_state: dict, config: Config) -> str:
        tag = tag_for(step)
        tmp_tag = tag + TMP_SUFFIX
        self.root.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False)
        # DeepSpeed keeps client state only in rank 0's file; the random streams differ per rank.
        torch.save(rank_state, self.root / tmp_tag / RANK_STATE.format(rank=self.rank))
        if self.rank == 0:
            (self.root / tmp_tag / CONFIG_SIDECAR).write_text(json.dumps(config.to_dict(), indent=2))
        _barrier()  # every rank's files are complete
        if self.rank == 0:
            final = self.root / tag
            if final.exists():  # a save of the same step by an earlier, interrupted attempt
                shutil.rmtree(final)
            os.replace(self.root / tmp_tag, final)
            write_text_atomic(self.root / LATEST, tag, durable=True)
            self._prune(tag)
        _barrier()
        # Node-local checkpoint storage: each node's first rank renames its own copy.
        if self.local_rank == 0 and (self.root / tmp_tag).is_dir() and not (self.root / tag).exists():
            os.replace(self.root / tmp_tag, self.root / tag)
            write_text_atomic(self.root / LATEST, tag, durable=True)
        return tag

    def _prune(self, keep: str) -> None:
        tags = self.tags()
        for old in tags[:-self.keep_last]:
            if old != keep:
                shutil.rmtree(self.root / old, ignore_errors=True)

    def load(self, engine, world_size: int) -> tuple[str, dict, dict | None]:
        tag = read_latest(self.root)
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.root} ('{LATEST}' is missing or names a "
                                    "missing folder)")
        path, client_state = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        rank_file = self.root / tag / RANK_STATE.format(rank=self.rank)
        rank_state = None
        if client_state.get("world_size") == world_size and rank_file.is_file():
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        return tag, client_state, rank_state


# ==================================================================================================
# Metrics: device-side accumulation, one sync per log step; tqdm, JSONL, TensorBoard, a PNG at the end
# ==================================================================================================
class StepStats:
    """Sums of the per-micro-step statistics, kept on the device (no host sync until they are read)."""

    def __init__(self, device: torch.device):
        # STAT_NAMES summed over finite micro-steps, then the finite and the non-finite counts.
        self.sums = torch.zeros(len(STAT_NAMES) + 2, dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)  # real (non-pad) tokens
        self.step_nonfinite = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, out, attention_mask: torch.Tensor) -> None:
        values = torch.stack([loss.detach().float(), out.mlm_loss.float(), out.disc_loss.float()]
                             + [out.metrics[name].float() for name in STAT_NAMES[3:]]).double()
        finite = torch.isfinite(values).all()
        self.sums[:len(STAT_NAMES)] += torch.where(finite, values, torch.zeros_like(values))
        self.sums[len(STAT_NAMES)] += finite.double()
        self.sums[len(STAT_NAMES) + 1] += (~finite).double()
        self.tokens += attention_mask.sum()
        self.step_nonfinite += (~finite).double()

    def any_nonfinite_this_step(self) -> bool:
        """Whether any rank saw a non-finite loss in the step just taken (a collective: all ranks call it)."""
        return _all_reduce_sum(self.step_nonfinite.clone()).item() > 0

    def end_step(self) -> None:
        self.step_nonfinite.zero_()

    def take_tokens(self) -> int:
        """Real tokens of all ranks since the last call (a collective)."""
        tokens = int(_all_reduce_sum(self.tokens.clone()).item())
        self.tokens.zero_()
        return tokens

    def take(self) -> dict[str, float]:
        """Means over ranks and finite micro-steps since the last call, and the non-finite count (a collective)."""
        values = _all_reduce_sum(self.sums.clone()).tolist()
        self.sums.zero_()
        finite, nonfinite = values[len(STAT_NAMES):]
        means = {name: (values[i] / finite if finite else float("nan")) for i, name in enumerate(STAT_NAMES)}
        means["nonfinite_micro_steps"] = int(nonfinite)
        return means


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


class MetricsLog:
    """Rank 0's outputs: the progress bar, metrics.jsonl and TensorBoard (each optional)."""

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, max_steps: int, resumed: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = self.tensorboard = self.jsonl = None
        if not enabled:
            return
        if resumed and self.path.is_file():
            # Records past the checkpoint belong to steps that are about to be run again (a kill can also
            # leave a half-written last line).
            kept = [record for record in read_metrics(run_dir) if record.get("step", 0) <= start_step]
            self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        elif self.path.exists():
            self.path.unlink()
        self.jsonl = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                             purge_step=start_step + 1 if resumed else None)
        except ImportError:
            logger.warning("tensorboard is not installed: no TensorBoard events (metrics.jsonl is still written)")
        from tqdm.auto import tqdm

        self.bar = tqdm(total=max_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True,
                        mininterval=1.0, smoothing=0.1)

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def record(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None and "loss" in record:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"])
        if self.bar is not None and "loss" in record:
            postfix = {"loss": f"{record['loss']:.4f}", "gen_acc": f"{record['gen_accuracy']:.3f}",
                       "disc_acc": f"{record['disc_accuracy']:.3f}", "seq/s": f"{record['seq_per_s']:.1f}",
                       "tok/s": f"{record['tokens_per_s']:.0f}", "TFLOP/s": f"{record['tflops']:.2f}",
                       "lr": f"{record['lr']:.2e}"}
            if record.get("mfu") is not None:
                postfix["MFU"] = f"{100 * record['mfu']:.1f}%"
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.jsonl is not None:
            self.jsonl.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl (a line cut short by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def plot_curves(run_dir: str | Path) -> Path | None:
    """Loss and accuracy curves from metrics.jsonl into run_dir/curves.png (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no curves.png")
        return None
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("mlm_loss", "generator MLM loss"), ("disc_loss", "discriminator BCE loss")):
        ax_loss.plot(steps, [r[key] for r in records], label=label)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("losses")
    ax_loss.legend()
    for key, label in (("gen_accuracy", "generator accuracy (masked tokens)"),
                       ("disc_accuracy", "discriminator accuracy (all tokens)"),
                       ("disc_recall", "discriminator recall (replaced)")):
        ax_acc.plot(steps, [r[key] for r in records], label=label)
    ax_acc.set_ylim(0, 1)
    ax_acc.set_xlabel("step")
    ax_acc.set_title("accuracy")
    ax_acc.legend()
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _model_flops_per_step(cfg: Config) -> tuple[float, str]:
    """Analytic training FLOPs of one optimizer step (all ranks) for the MFU figure."""
    try:
        from .flops import training_flops_per_step

        return float(training_flops_per_step(cfg)), "electra_fast.flops (modern convention)"
    except ImportError:  # keeps the trainer usable without the FLOPs module
        from .model import ElectraPretrainingModel

        params = sum(p.numel() for p in ElectraPretrainingModel(cfg).parameters())
        return 6.0 * params * cfg.train.global_batch_size * cfg.data.seq_len, "estimate 6*params*tokens"


def _peak_tflops(cfg: Config, device: torch.device, precision: str) -> float | None:
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None  # the table holds dense bf16/fp16 tensor-core peaks only
    from .flops import peak_tflops_for_device

    return peak_tflops_for_device(torch.cuda.get_device_name(device))


# ==================================================================================================
# The run directory's descriptive files
# ==================================================================================================
def _environment(world_size: int, device: torch.device, precision: str, resumed_from: str | None) -> dict:
    import deepspeed

    from . import __version__

    versions = {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                "electra_fast": __version__, "numpy": np.__version__}
    for name in ("triton", "datasets", "tokenizers", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    devices = None
    if device.type == "cuda":
        devices = torch.cuda.get_device_name(device)
    return {
        "versions": versions, "git_commit": git_commit(), "world_size": world_size, "device": device.type,
        "device_name": devices or platform.processor() or platform.machine(), "precision": precision,
        "host": socket.gethostname(), "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from": resumed_from,
    }


def _parse_fault() -> tuple[str, int, int | None] | None:
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return None
    match = re.fullmatch(r"(sigkill|raise)@(\d+)(?::(\d+))?", spec)
    if not match:
        raise ConfigError(f"{FAULT_ENV}={spec!r} must look like sigkill@STEP or raise@STEP:RANK")
    return match.group(1), int(match.group(2)), None if match.group(3) is None else int(match.group(3))


# ==================================================================================================
# Training
# ==================================================================================================
def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, local_rank: int = -1) -> dict:
    """Pretrain under DeepSpeed; returns a summary (steps, final metrics, paths). See the module docstring."""
    run_dir = Path(run_dir)
    # Everything that can be checked without DeepSpeed is checked first, so a bad config fails in seconds.
    fault = _parse_fault()
    manifest = apply_data_manifest(cfg)
    cfg.train.batch_layout(_world()[2])
    ds_user, ds_path = read_deepspeed_json(cfg.train.deepspeed_config)
    if not resume and read_latest(checkpoint_root(run_dir)) is not None:
        raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose "
                          "another --run-dir")
    trainer = Trainer(cfg, run_dir, ds_user, ds_path, manifest, local_rank=local_rank, fault=fault)
    return trainer.run(resume=resume)


class Trainer:
    """One pretraining run on a DeepSpeed engine: set-up, resume, the step loop, checkpoints, logs."""

    def __init__(self, cfg: Config, run_dir: Path, ds_user: dict, ds_path: Path, manifest: dict, *,
                 local_rank: int, fault: tuple | None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from .data import PretrainingLoader
        from .model import ElectraPretrainingModel
        from .objective import ObjectiveRNG

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines would bury the progress bar
        self.cfg, self.run_dir, self.manifest, self.fault = cfg, run_dir, manifest, fault
        self.rank, self.world_size, self.device = init_distributed(local_rank)
        self.local_rank = local_rank if local_rank >= 0 else _world()[1]
        self.is_main = self.rank == 0
        accelerator = get_accelerator()
        self.ds_config = build_deepspeed_config(cfg, ds_user, world_size=self.world_size,
                                                device_type=self.device.type, source=str(ds_path),
                                                bf16_supported=accelerator.is_bf16_supported(),
                                                fp16_supported=accelerator.is_fp16_supported())
        ds = self.ds_config
        self.precision = "bf16" if ds["bf16"]["enabled"] else "fp16" if ds["fp16"]["enabled"] else "fp32"
        self.micro, self.accumulation = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
        self.zero_stage = int(_get(ds, "zero_optimization.stage") or 0)
        if cfg.train.warmup_steps > cfg.train.max_steps and self.is_main:
            logger.warning("train.warmup_steps=%d > train.max_steps=%d: the learning rate never reaches train.lr",
                           cfg.train.warmup_steps, cfg.train.max_steps)

        # Identical initial weights on every rank (DeepSpeed also broadcasts rank 0's for ZeRO 0-2).
        torch.manual_seed(cfg.train.seed)
        model = ElectraPretrainingModel(cfg)
        self.num_parameters = model.num_parameters()
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=weight_decay_groups(model, cfg.train.weight_decay), config=ds)
        self.module = self.engine.module
        if self.zero_stage == 3:
            # The top-level forward uses parameters of its submodules directly, outside their forward:
            # the tied word-embedding matrix (the MLM head's output projection, owned by `embeddings`) and
            # the discriminator's output layer (handed to the fused BCE head as tensors). ZeRO-3 gathers a
            # parameter only around its owner's forward unless it is registered with the module using it.
            head = self.module.discriminator_predictions.dense_prediction
            for parameter in (self.module.embeddings.word_embeddings.weight, head.weight, head.bias):
                deepspeed.zero.register_external_parameter(self.module, parameter)
        # Each rank draws its own masks, samples and dropout: seeded by (seed, rank), restored on resume.
        seed = cfg.train.seed + self.rank
        self.module.rng = ObjectiveRNG(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        accelerator.manual_seed(seed)
        # A plain torch optimizer (ZeRO-0, fp32) has no overflow check of its own: see _guard_plain_optimizer.
        self.plain_optimizer = not hasattr(self.engine.optimizer, "overflow")
        self.plain_grad_norm: torch.Tensor | None = None

        self.loader = PretrainingLoader(cfg.data.path, micro_batch_size=self.micro, rank=self.rank,
                                        world_size=self.world_size, seed=cfg.train.seed,
                                        num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor,
                                        pin_memory=cfg.data.pin_memory)
        self.checkpoints = Checkpoints(run_dir, self.rank, self.local_rank, cfg.train.keep_last)
        self.stats = StepStats(self.device)
        self.step = self.tokens_seen = 0
        self.resumed_from: str | None = None
        self.last_saved: int | None = None
        self.nonfinite_streak = 0
        self.log: MetricsLog | None = None

    # ---------------------------------------------------------------------------------------- resume
    def resume(self) -> None:
        from .objective import ObjectiveRNG

        root = self.checkpoints.root
        if read_latest(root) is None:
            if self.is_main:
                logger.warning("--resume: no checkpoint in %s yet, starting from step 0", root)
            return
        self.resumed_from, client, rank_state = self.checkpoints.load(self.engine, self.world_size)
        self.step = self.last_saved = int(client["step"])
        self.tokens_seen = int(client["tokens_seen"])
        if rank_state is not None:
            _set_rng_state(self.module, rank_state["rng"])
            self.loader.load_state_dict(rank_state["loader"])
        else:
            # Another world size: the data position is global and carries over; the random streams are
            # per rank and are reseeded (the run continues, but not bit for bit).
            self.loader.load_state_dict(client["loader"])
            self.module.rng = ObjectiveRNG(self.cfg.train.seed + self.rank + 1_000_003 * self.step)
            if self.is_main:
                logger.warning("checkpoint %s was written by %s ranks, resuming on %d: random streams reseeded",
                               self.resumed_from, client.get("world_size"), self.world_size)

    # ---------------------------------------------------------------------------------------- the loop
    def run(self, resume: bool = False) -> dict:
        cfg, run_dir = self.cfg, self.run_dir
        self.checkpoints.clean_partial()
        if resume:
            self.resume()
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            (run_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
            environment = _environment(self.world_size, self.device, self.precision, self.resumed_from)
            (run_dir / "env.json").write_text(json.dumps(environment, indent=2) + "\n")
        self.log = MetricsLog(run_dir, self.is_main, self.step, cfg.train.max_steps,
                              resumed=self.resumed_from is not None)
        self.flops_per_step, flops_source = _model_flops_per_step(cfg)
        self.peak_tflops = _peak_tflops(cfg, self.device, self.precision)
        self.log.say(
            f"[electra-fast] {self.world_size} rank(s) on {self.device.type}, {self.precision}, ZeRO-{self.zero_stage};"
            f" global batch {cfg.train.global_batch_size} = {self.micro} x {self.accumulation} accumulation x "
            f"{self.world_size}; {self.num_parameters / 1e6:.2f}M parameters; data {cfg.data.path} "
            f"({self.manifest['num_examples']} examples of {self.manifest['seq_len']} tokens); FLOPs/step "
            f"{self.flops_per_step:.3g} ({flops_source})"
            + (f"; resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else ""))

        batches: Iterator[dict] = iter(self.loader)
        inject = set(cfg.train.inject_nonfinite_at)
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.run_start = time.perf_counter()
        last: dict = {}
        self.engine.train()
        try:
            while self.step < cfg.train.max_steps:
                poison = (self.step + 1) in inject and self.rank == 0
                for _ in range(self.accumulation):
                    self._micro_step(batches, poison)
                self.step += 1
                self._check_update_applied()
                self.window_steps += 1
                self.log.advance()
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    last = self._log_window()
                if self.step % cfg.train.save_every == 0 or self.step == cfg.train.max_steps:
                    self._save()
                self._maybe_inject_fault()
        finally:
            self.log.close()

        export_dir = None
        if self.is_main:
            if cfg.train.export_at_end:
                export_dir = export_checkpoint(self.checkpoints.root, run_dir / "export", data_dir=cfg.data.path)
                logger.info("exported %s", export_dir)
            plot_curves(run_dir)
        _barrier()
        return {"step": self.step, "tokens_seen": self.tokens_seen, "last": last, "run_dir": str(run_dir),
                "export": None if export_dir is None else str(export_dir)}

    def _micro_step(self, batches: Iterator[dict], poison: bool) -> None:
        batch = next(batches)
        input_ids, attention_mask, token_type_ids = (
            batch[key].to(self.device, non_blocking=True) for key in ("input_ids", "attention_mask", "token_type_ids"))
        out = self.engine(input_ids, attention_mask, token_type_ids)
        loss = out.loss * float("nan") if poison else out.loss
        # A non-finite loss must give non-finite gradients, so that the check of the global gradient
        # norm skips the update on every rank (an inf or NaN loss can otherwise back-propagate finite
        # gradients, e.g. through a sum). A device-side select: no host sync.
        loss = loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
        self.stats.add(loss, out, attention_mask)
        self.engine.backward(loss)
        if self.plain_optimizer and self.engine.is_gradient_accumulation_boundary():
            self.plain_grad_norm = _guard_plain_optimizer(self.engine)
        self.engine.step()

    def _check_update_applied(self) -> None:
        """Count updates skipped for a non-finite loss or gradient; stop after too many in a row."""
        limit = self.cfg.train.max_nonfinite_steps
        if self.engine.was_step_applied():
            self.nonfinite_streak = 0
        else:
            # DeepSpeed skipped the update: a non-finite gradient norm, or an fp16 loss-scale overflow,
            # which is the loss scaler's normal business unless the loss itself was not finite.
            loss_was_nonfinite = self.stats.any_nonfinite_this_step()
            if self.precision != "fp16" or loss_was_nonfinite:
                self.nonfinite_streak += 1
                cause = "loss" if loss_was_nonfinite else "gradient"
                self.log.say(f"[electra-fast] step {self.step}: non-finite {cause}, update skipped "
                             f"({self.nonfinite_streak}/{limit} in a row)")
                self.log.record({"step": self.step, "event": "nonfinite_skipped", "cause": cause,
                                 "streak": self.nonfinite_streak, "time": time.time()})
                if self.nonfinite_streak >= limit:
                    kept = (f"checkpoint {self.checkpoints.root / tag_for(self.last_saved)}"
                            if self.last_saved is not None else "no checkpoint")
                    raise TrainingAborted(
                        f"stopping at step {self.step}: {self.nonfinite_streak} optimizer steps in a row had a "
                        f"non-finite loss or gradient (train.max_nonfinite_steps={limit}); {kept} is untouched. "
                        "Try a lower train.lr, more train.warmup_steps, bf16 instead of fp16, or check the data.")
        self.stats.end_step()

    def _log_window(self) -> dict:
        """Read the statistics of the steps since the last log step (the host syncs of the interval)."""
        cfg = self.cfg
        values = self.stats.take()
        tokens = self.stats.take_tokens()
        self.tokens_seen += tokens
        now = time.perf_counter()
        seconds = max(now - self.window_start, 1e-9)
        step_seconds = seconds / self.window_steps
        tflops = self.flops_per_step / step_seconds / self.world_size / 1e12  # per device
        grad_norm = self.plain_grad_norm if self.plain_optimizer else self.engine.get_global_grad_norm()
        record = {
            "step": self.step, **values, "lr": float(self.engine.get_lr()[0]),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "skipped_steps": int(self.engine.skipped_steps),
            "seq_per_s": cfg.train.global_batch_size * self.window_steps / seconds,
            "tokens_per_s": tokens / seconds, "tflops": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None, "tokens_seen": self.tokens_seen,
            "eta_s": step_seconds * (cfg.train.max_steps - self.step),
            "elapsed_s": now - self.run_start, "time": time.time(),
        }
        self.log.record(record)
        self.window_start, self.window_steps = now, 0
        return record

    def _save(self) -> None:
        started = time.perf_counter()
        self.tokens_seen += self.stats.take_tokens()  # exact in every checkpoint
        client = {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world_size,
                  "loader": self.loader.state_dict(), "format": 1}
        rank_state = {"rng": _rng_state(self.module), "loader": self.loader.state_dict()}
        tag = self.checkpoints.save(self.engine, self.step, client, rank_state, self.cfg)
        self.last_saved = self.step
        self.log.say(f"[electra-fast] step {self.step}: saved checkpoint {self.checkpoints.root / tag}")
        self.window_start += time.perf_counter() - started  # throughput excludes checkpointing

    def _maybe_inject_fault(self) -> None:
        if self.fault is not None and self.fault[1] == self.step and self.fault[2] in (None, self.rank):
            if self.fault[0] == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"{FAULT_ENV}: injected failure on rank {self.rank} after step {self.step}")


def _guard_plain_optimizer(engine) -> torch.Tensor:
    """Skip a non-finite update the way DeepSpeed's own optimizer wrappers do; returns the gradient norm.

    ZeRO-0 with fp32 hands the gradients to a plain torch optimizer, which has no overflow check. The
    engine reads an ``overflow`` attribute after ``optimizer.step()`` and, when it is set, counts a
    skipped step and leaves the LR schedule alone; the one ``step()`` call of this update is made a
    no-op (the engine clears the gradients afterwards). The gradients are already all-reduced, so every
    rank reaches the same decision. This is the one configuration with a host sync per optimizer step
    (it is mostly the CPU path, where that costs nothing).
    """
    optimizer = engine.optimizer
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        optimizer.overflow = False
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    optimizer.overflow = not bool(torch.isfinite(norm))
    if optimizer.overflow:
        def skip_this_step(*args, **kwargs):
            del optimizer.step  # the class's step() again from the next update on

        optimizer.step = skip_this_step
    return norm


# ==================================================================================================
# Export: consolidate a checkpoint (any ZeRO stage) and write Hugging Face folders
# ==================================================================================================
def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, its checkpoints/ folder, or one tag folder -> the tag folder to export."""
    path = Path(path)
    for root in (path / CHECKPOINT_DIR, path):
        tag = read_latest(root)
        if tag is not None:
            return root / tag
    if (path / "mp_rank_00_model_states.pt").is_file():
        return path
    raise FileNotFoundError(f"{path}: no checkpoint here (expected a run dir, its checkpoints/ folder with a "
                            f"'{LATEST}' file, or a checkpoint folder holding mp_rank_00_model_states.pt)")


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint folder, whatever its ZeRO stage and world size."""
    tag_dir = Path(tag_dir)
    if list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        # ZeRO 1-3 (and bf16 master weights): the fp32 partitions, merged by DeepSpeed's own tool.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # it prints progress
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    # ZeRO-0 keeps the whole module in rank 0's model-states file, among DeepSpeed's own objects; only
    # tensors and plain containers are needed, so it is read without unpickling code.
    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    weights = {name: tensor.float() for name, tensor in state["module"].items()}
    # With bf16/fp16 the module holds rounded weights; the optimizer wrapper keeps the fp32 masters,
    # one list per parameter group, in the order of weight_decay_groups().
    optimizer = state.get("optimizer")
    masters = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if masters and (tag_dir / CONFIG_SIDECAR).is_file():
        from .model import ElectraPretrainingModel

        with torch.device("meta"):  # names and group order only; no memory, no initialisation
            model = ElectraPretrainingModel(config_from_dict(json.loads((tag_dir / CONFIG_SIDECAR).read_text())))
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [g["params"] for g in weight_decay_groups(model, 0.0) if g["params"]]
        if [len(g) for g in groups] != [len(m) for m in masters]:
            raise ValueError(f"{tag_dir}: the optimizer's fp32 master weights do not match the model's parameter "
                             "groups")
        for params, tensors in zip(groups, masters):
            for parameter, master in zip(params, tensors):
                name = names[id(parameter)]
                weights[name] = master.float().reshape(weights[name].shape)
    return weights


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, data_dir: str | None = None) -> Path:
    """Consolidate a checkpoint and write out_dir/discriminator and out_dir/generator (Hugging Face)."""
    from .hf import to_hf
    from .model import ElectraPretrainingModel

    tag_dir = resolve_checkpoint(checkpoint)
    sidecar = tag_dir / CONFIG_SIDECAR
    if not sidecar.is_file():
        raise FileNotFoundError(f"{tag_dir}: no {CONFIG_SIDECAR} (not written by electra_fast.train)")
    cfg = config_from_dict(json.loads(sidecar.read_text()))
    model = ElectraPretrainingModel(cfg)
    state = consolidated_state_dict(tag_dir)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{tag_dir}: the checkpoint does not match its config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    tokenizer_dir = data_dir or cfg.data.path
    if not tokenizer_dir or not (Path(tokenizer_dir).expanduser() / "vocab.txt").is_file():
        tokenizer_dir = None
    return to_hf(model, out_dir, tokenizer_dir=tokenizer_dir, config=cfg)


# ==================================================================================================
# Command line
# ==================================================================================================
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `python -m electra_fast.train`, `deepspeed -m electra_fast.train` and `electra-fast pretrain`."""
    parser.add_argument("--config", help="YAML config (configs/electra-*.yaml); with --resume, default: "
                                         "the run dir's config.yaml")
    parser.add_argument("--size", help="a named size instead of / over the YAML's (tiny, small, base, large)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="SECTION.KEY=VALUE", help="override config values, e.g. --set train.max_steps=1000")
    parser.add_argument("--run-dir", required=True, help="folder for checkpoints, metrics and the export")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run dir's latest checkpoint (starts fresh if there is none)")
    # The deepspeed launcher passes --local_rank=N (torch's launchers: --local-rank or $LOCAL_RANK).
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                        help=argparse.SUPPRESS)


def _load_train_config(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None:
        saved = Path(args.run_dir) / "config.yaml"
        if not (args.resume and saved.is_file()):
            raise ConfigError("--config is required (or --resume with a run dir that holds config.yaml)")
        path = saved
    return load_config(path, args.overrides, size=getattr(args, "size", None))


def run_train(args: argparse.Namespace) -> int:
    """Run training from parsed arguments; 1 if the run aborted itself (the message says why)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[electra-fast] %(levelname)s: %(message)s")
    cfg = _load_train_config(args)
    try:
        train(cfg, args.run_dir, resume=args.resume, local_rank=args.local_rank)
    except TrainingAborted as exc:
        print(f"electra-fast pretrain: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a run dir, its checkpoints/ folder, or one checkpoint folder (step-XXXXXXXX)")
    parser.add_argument("--out", required=True, help="output folder: OUT/discriminator and OUT/generator")
    parser.add_argument("--data", default=None, help="prepared data folder whose vocab.txt to ship "
                                                     "(default: the run's data.path)")


def run_export(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out, data_dir=args.data)
    print(f"wrote {out}/discriminator and {out}/generator")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m electra_fast.train",
                                     description="Pretrain ELECTRA on DeepSpeed (see the module docstring).")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    from .data import DataError

    try:
        return run_train(args)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"electra_fast.train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
