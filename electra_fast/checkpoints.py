"""Checkpoints of a run directory, and their consolidation and export.

Saving: DeepSpeed's format, written to a temporary tag folder, renamed when every rank has written
its files, then ``latest`` is updated (atomically) and old tags are pruned, so a kill at any moment
leaves the previous checkpoint usable. Each rank adds its own random streams (``RANK_STATE``) and
rank 0 the resolved config (``CONFIG_SIDECAR``). Every file is read back without unpickling code.

Export: :func:`consolidated_state_dict` merges the fp32 weights of any ZeRO stage and world size;
:func:`export_checkpoint` writes them as Hugging Face folders (``electra-fast export``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from .atomic import write_text_atomic
from .config import Config, config_from_dict
from .distributed import barrier
from .optim import weight_decay_groups

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
TAG_PATTERN = re.compile(r"^step-(\d{8,})$")
TMP_SUFFIX = ".tmp"
LATEST = "latest"
RANK_STATE = "trainer_state_rank{rank:05d}.pt"
CONFIG_SIDECAR = "electra_fast_config.json"


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


def rng_state(model) -> dict:
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


def set_rng_state(model, state: dict) -> None:
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
        barrier()

    def save(self, engine, step: int, client_state: dict, rank_state: dict, config: Config) -> str:
        tag = tag_for(step)
        tmp_tag = tag + TMP_SUFFIX
        self.root.mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False)
        # DeepSpeed keeps client state only in rank 0's file; the random streams differ per rank.
        torch.save(rank_state, self.root / tmp_tag / RANK_STATE.format(rank=self.rank))
        if self.rank == 0:
            (self.root / tmp_tag / CONFIG_SIDECAR).write_text(json.dumps(config.to_dict(), indent=2))
        barrier()  # every rank's files are complete
        if self.rank == 0:
            final = self.root / tag
            if final.exists():  # a save of the same step by an earlier, interrupted attempt
                shutil.rmtree(final)
            os.replace(self.root / tmp_tag, final)
            write_text_atomic(self.root / LATEST, tag, durable=True)
            self._prune(tag)
        barrier()
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
        # A checkpoint from before QKV fusion: its weights load through the model's fusing hook, but its
        # optimizer state is laid out per old query/key/value parameter (and ZeRO's flat partitions in
        # their order), so it is left out; the step, schedule and data position still resume.
        unfused = checkpoint_has_unfused_qkv(self.root / tag)
        path, client_state = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=not unfused,
                                                    load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        if unfused:
            refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
            if refresh is not None:  # fp32 masters (bf16/fp16, ZeRO): re-derived from the loaded weights
                refresh()
            if self.rank == 0:
                logger.warning("%s predates fused QKV (separate query/key/value weights): resuming its weights, step "
                               "and LR schedule, but not its optimizer state (Adam's moments start from zero)",
                               self.root / tag)
        rank_file = self.root / tag / RANK_STATE.format(rank=self.rank)
        rank_state = None
        if client_state.get("world_size") == world_size and rank_file.is_file():
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        return tag, client_state, rank_state


def checkpoint_has_unfused_qkv(tag_dir: Path) -> bool:
    """Whether a checkpoint folder holds separate query/key/value weights (written before QKV fusion).
    Reads the parameter names of rank 0's model-states file without unpickling code (memory-mapped)."""
    from .model import has_unfused_qkv

    path = Path(tag_dir) / "mp_rank_00_model_states.pt"
    if not path.is_file():  # ZeRO-3 names rank 0's file after its partition
        path = Path(tag_dir) / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    names = list(state.get("module") or {})
    names += [name for shapes in state.get("param_shapes") or [] for name in shapes]  # ZeRO-3 keeps them here too
    return has_unfused_qkv(names)


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
    # one list per parameter group, in the order of optim.weight_decay_groups() (decayed first).
    optimizer = state.get("optimizer")
    masters = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if masters and (tag_dir / CONFIG_SIDECAR).is_file():
        from .model import ElectraPretrainingModel

        with torch.device("meta"):  # names and group order only; no memory, no initialisation
            model = ElectraPretrainingModel(config_from_dict(json.loads((tag_dir / CONFIG_SIDECAR).read_text())))
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [g["params"] for g in weight_decay_groups(model.named_parameters(), 0.0) if g["params"]]
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


