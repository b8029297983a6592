"""Checkpoints of a run directory: saved verified, resumed safely, consolidated and exported.

Saving: DeepSpeed's format, written to a temporary tag folder. Each rank adds its own random streams
(``RANK_STATE``) and rank 0 the resolved config (``CONFIG_SIDECAR``). When every rank has written its
files, rank 0 reads them all back (sha256, and a weights-only load of every ``.pt``) and writes the
manifest ``checkpoint.json`` last and atomically: files, sizes, hashes, step, world size, ZeRO stage.
Only then is the folder renamed to ``step-XXXXXXXX``, ``latest`` updated (atomically) and older tags
pruned, so a kill, a full disk or a failed write at any moment leaves the previous checkpoint usable.
Weights that are not finite are never saved.

Resuming (:func:`find_resume_checkpoint`): the newest checkpoint that verifies against its manifest
is used, whatever ``latest`` says (a missing, garbled or escaping ``latest`` gets a message); one that
fails is skipped with a message naming the file and the cause. Nothing is unpickled before the
verification, and DeepSpeed's own loads run weights-only (:mod:`electra_fast.safe_load`). A run whose
world size or ZeRO stage differs from the checkpoint's is restored per parameter (:meth:`Checkpoints.load`
and :mod:`electra_fast.optimizer_state`): the fp32 weights, Adam's moments and step counts, the LR schedule
and the data position, exactly.

Export: :func:`consolidated_state_dict` merges the fp32 weights of any ZeRO stage and world size;
:func:`export_checkpoint` writes them as Hugging Face folders (``electra-fast export``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import write_text_atomic
from .config import Config, config_from_dict
from .distributed import all_reduce_min, all_reduce_sum, barrier
from .hashing import sha256_file
from .safe_load import CheckpointError, check_loadable, deepspeed_loads_safely, safe_torch_load

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
TAG_PATTERN = re.compile(r"^step-(\d{8,})$")
TMP_SUFFIX = ".tmp"
REJECTED_SUFFIX = ".rejected"
LATEST = "latest"
MANIFEST = "checkpoint.json"
MANIFEST_FORMAT = 1
RANK_STATE = "trainer_state_rank{rank:05d}.pt"
RANK_STATE_PATTERN = re.compile(r"^trainer_state_rank(\d{5,})\.pt$")
CONFIG_SIDECAR = "electra_fast_config.json"
METRICS = "metrics.jsonl"

__all__ = ["CheckpointError", "Checkpoints", "find_resume_checkpoint", "verify_checkpoint", "write_manifest",
           "consolidated_state_dict", "export_checkpoint", "resolve_checkpoint"]


def checkpoint_root(run_dir: Path, checkpoint_dir: str | None = None) -> Path:
    """The folder of a run's step folders: ``train.checkpoint_dir`` (``checkpoint_dir``, or when None the
    value in the run dir's config.yaml), with $VARIABLES expanded here (each node expands its own) and
    a relative path taken from the run dir; ``RUN_DIR/checkpoints`` when it is empty."""
    if checkpoint_dir is None:
        checkpoint_dir = _recorded_checkpoint_dir(Path(run_dir))
    if not checkpoint_dir:
        return Path(run_dir) / CHECKPOINT_DIR
    return Path(run_dir) / os.path.expanduser(os.path.expandvars(checkpoint_dir))


def _recorded_checkpoint_dir(run_dir: Path) -> str:
    """train.checkpoint_dir as the run dir's config.yaml records it ("" when there is none)."""
    import yaml

    try:
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
        return str(((recorded or {}).get("train") or {}).get("checkpoint_dir") or "")
    except (OSError, yaml.YAMLError, AttributeError):
        return ""


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(tag: str) -> int:
    return int(TAG_PATTERN.match(tag).group(1))


def _is_tag_folder(root: Path, name: str) -> bool:
    """``name`` is a step folder directly inside ``root`` (a symlink never is: it may point anywhere)."""
    path = Path(root) / name
    return bool(TAG_PATTERN.match(name)) and path.is_dir() and not path.is_symlink()


def list_tags(root: Path) -> list[str]:
    """The step folders in ``root``, oldest first."""
    if not Path(root).is_dir():
        return []
    return sorted((p.name for p in Path(root).iterdir() if _is_tag_folder(root, p.name)), key=_step_of)


def _latest_problem(root: Path) -> tuple[str | None, str | None]:
    """(the tag `latest` names, None) if it names a step folder inside ``root``; else (None, why not)."""
    latest = Path(root) / LATEST
    if not latest.is_file():
        return None, f"'{latest}' is missing"
    try:
        tag = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"'{latest}' cannot be read ({exc})"
    if not TAG_PATTERN.match(tag):  # also refuses ../.., absolute paths and anything with a separator
        return None, f"'{latest}' does not name a step-XXXXXXXX folder (it holds {tag[:80]!r})"
    if not _is_tag_folder(root, tag):
        return None, f"'{latest}' names {tag}, which is not a folder in {root}"
    return tag, None


def read_latest(root: Path) -> str | None:
    """The tag `latest` names, if it names a step folder directly inside ``root`` (not verified)."""
    return _latest_problem(root)[0]


# ==================================================================================================
# The manifest: written last at save, checked before anything is unpickled at load
# ==================================================================================================
def _listed_files(tag_dir: Path) -> list[Path]:
    return sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(tag_dir: Path, *, step: int, world_size: int, zero_stage: int, node_local: bool = False) -> dict:
    """Hash every file of ``tag_dir`` (read back from disk) and write ``checkpoint.json`` atomically.
    ``node_local``: the folder holds one node's part of the checkpoint (the manifest says which ranks')."""
    tag_dir = Path(tag_dir)
    files = {p.relative_to(tag_dir).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _listed_files(tag_dir)}
    manifest = {"format": MANIFEST_FORMAT, "step": int(step), "world_size": int(world_size),
                "zero_stage": int(zero_stage), "files": files}
    if node_local:
        manifest["node_local"] = True
        manifest["ranks"] = sorted(int(m.group(1)) for m in map(RANK_STATE_PATTERN.match, files) if m)
    write_text_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n", durable=True)
    return manifest


def read_manifest(tag_dir: Path) -> dict | None:
    """The manifest of ``tag_dir``; None when it has none (a checkpoint of an earlier version)."""
    path = Path(tag_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"unknown format {manifest.get('format')!r}")
        for key in ("step", "world_size", "zero_stage"):
            int(manifest[key])
        for name, entry in files.items():
            int(entry["size"]), str(entry["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError, OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: garbled manifest ({type(exc).__name__}: {exc})") from exc
    return manifest


def verify_checkpoint(tag_dir: Path, *, check_hashes: bool = True, only=None) -> dict | None:
    """Check a checkpoint folder before anything in it is unpickled; raise CheckpointError naming the
    first file that fails. Returns its manifest, or None for a checkpoint of an earlier version without
    one (accepted only if every ``.pt`` passes the weights-only load). ``check_hashes=False`` is for the
    save, whose manifest was hashed from the files read back a moment before. ``only``: a predicate on
    file names; the listed files it accepts are checked (one rank's part of a node-local checkpoint),
    and then a manifest is required."""
    tag_dir = Path(tag_dir)
    manifest = read_manifest(tag_dir)
    if manifest is None and only is not None:
        raise CheckpointError(f"{tag_dir}: no {MANIFEST} (a node-local checkpoint is verified against its manifest)")
    if manifest is None:
        if not list(tag_dir.glob("*model_states.pt")):
            raise CheckpointError(f"{tag_dir}: no {MANIFEST} and no model-states file (mp_rank_00_model_states.pt "
                                  "is missing)")
        check_loadable(sorted(tag_dir.glob("*.pt")))
        return None
    root = tag_dir.resolve()
    names = [name for name in manifest["files"] if only is None or only(name)]
    for name in names:
        entry = manifest["files"][name]
        path = tag_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts or root not in path.resolve().parents:
            raise CheckpointError(f"{tag_dir / MANIFEST}: lists {name!r}, which is not a file of this checkpoint")
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != int(entry["size"]):
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {entry['size']} (truncated or replaced)")
        if check_hashes and sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from the manifest's (the file was modified or damaged)")
    unlisted = [p for p in _listed_files(tag_dir) if p.relative_to(tag_dir).as_posix() not in manifest["files"]]
    unlisted = [p for p in unlisted if only is None or only(p.relative_to(tag_dir).as_posix())]
    if any(p.suffix == ".pt" for p in unlisted):
        raise CheckpointError(f"{unlisted[0]}: not listed in {MANIFEST} (not written by this checkpoint's save)")
    check_loadable(tag_dir / name for name in names if name.endswith(".pt"))
    return manifest


def newest_verified_tag(root: Path) -> str | None:
    """The newest step folder of a checkpoints/ folder that verifies (None when there is none at all).

    Checkpoints that fail are skipped with one warning each (file and cause); a missing, garbled or
    escaping ``latest`` is reported and ignored. Raises CheckpointError when step folders exist but none
    verifies."""
    root = Path(root)
    latest, problem = _latest_problem(root)
    failures = []
    for tag in reversed(list_tags(root)):
        try:
            manifest = verify_checkpoint(root / tag)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint %s: %s", tag, exc)
            failures.append(str(exc))
            continue
        if manifest is None:
            logger.warning("checkpoint %s has no %s (written by an earlier version): its files passed the "
                           "weights-only load but cannot be checked for damage", root / tag, MANIFEST)
        if tag != latest:
            why = problem or f"'{root / LATEST}' names {latest}"
            logger.warning("%s; using the newest verified checkpoint %s", why, tag)
        return tag
    if failures:
        raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(failures))
    return None


def find_resume_checkpoint(run_dir: str | Path, root: Path | None = None) -> str | None:
    """The tag of the newest verified checkpoint of ``run_dir`` to resume from, or None for a new run.

    Raises CheckpointError rather than letting the run start over when there are step folders but none
    verifies, or no checkpoint but a metrics history: starting from step 0 would truncate the history
    and later overwrite what is left of the run.
    """
    root = checkpoint_root(run_dir) if root is None else Path(root)
    try:
        tag = newest_verified_tag(root)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. Refusing to start over in this run dir (it would overwrite the run's "
                              "history): restore a good checkpoint or choose another --run-dir") from None
    metrics = Path(run_dir) / METRICS
    if tag is None and metrics.is_file() and metrics.stat().st_size > 0:
        raise CheckpointError(f"{run_dir} has a metrics history ({metrics}) but no checkpoint in {root}: "
                              "refusing to start over (it would truncate the history). Restore the checkpoints, "
                              "or choose another --run-dir")
    return tag


# ==================================================================================================
# Random streams of one rank
# ==================================================================================================
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


def _all_ok(ok: bool) -> bool:
    """True when ``ok`` holds on every rank (a collective: every rank must call it)."""
    return int(all_reduce_sum(torch.tensor([0 if ok else 1], dtype=torch.int64)).item()) == 0


def _broadcast_text(text: str | None) -> str:
    """Rank 0's ``text`` on every rank, through the one collective the trainer already uses."""
    data = (text or "").encode() if _rank() == 0 else b""
    length = int(all_reduce_sum(torch.tensor([len(data)], dtype=torch.int64)).item())
    buffer = torch.zeros(length, dtype=torch.int64)
    if data:
        buffer[:] = torch.tensor(list(data), dtype=torch.int64)
    return bytes(all_reduce_sum(buffer).tolist()).decode()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _free_space(path: Path) -> str:
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            return f"{shutil.disk_usage(candidate).free / 2**20:.0f} MiB free"
    return "free space unknown"


def _write_failure(path: Path, exc: BaseException | None) -> str:
    """One line: what could not be written where, and how much room is left there."""
    if exc is None:
        return f"another rank could not write its part of {path}"
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in cause
    return (f"{'disk full: ' if full else ''}could not write checkpoint {path} ({type(exc).__name__}: "
            f"{cause[:200]}); {_free_space(path)} there")


def _fp32_tensors(engine) -> list[torch.Tensor]:
    """This rank's weights as the optimizer updates them: the module's parameters (their ZeRO-3
    partitions) and the fp32 master partitions of DeepSpeed's mixed-precision / ZeRO optimizers."""
    tensors = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    for attribute in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat",
                      "fp32_groups_flat_partition"):
        tensors += [t for t in (getattr(engine.optimizer, attribute, None) or []) if isinstance(t, torch.Tensor)]
    return [t for t in tensors if t.numel()]


class Checkpoints:
    """Save/prune/resume for one run directory (every rank calls save and load; rank 0 seals and
    renames, or with ``node_local`` each node's first rank its own node's folder).

    Node-local storage (DeepSpeed's ``"checkpoint": {"use_node_local_storage": true}``): ``root`` is a
    folder on each node's own disk, the same path everywhere. Every node holds the model states and the
    partitions and random streams of its own ranks; its first rank writes the manifest of those files
    and publishes the folder. On resume every rank verifies its own files (its partition, its random
    streams; the node's first rank the shared ones too) and one collective decides: the newest step
    that verifies on every rank, else the one before, and so on.
    """

    def __init__(self, run_dir: Path, rank: int, local_rank: int, keep_last: int, root: Path | None = None,
                 node_local: bool = False):
        self.run_dir = Path(run_dir)
        self.root = checkpoint_root(run_dir) if root is None else Path(root)
        self.rank, self.local_rank, self.keep_last = rank, local_rank, keep_last
        self.node_local = node_local
        # The rank that writes, seals and renames a folder: each node's first under node-local storage.
        self.sealer = (local_rank == 0) if node_local else (rank == 0)

    def tags(self) -> list[str]:
        return list_tags(self.root)

    def clean_partial(self) -> None:
        """Remove folders of saves that never finished (a crash between writing and renaming)."""
        if self.sealer and self.root.is_dir():
            for path in self.root.iterdir():
                if path.is_dir() and path.name.endswith(TMP_SUFFIX):
                    shutil.rmtree(path, ignore_errors=True)
        barrier()

    # -------------------------------------------------------------------------------------------- save
    def save(self, engine, step: int, client_state: dict, rank_state: dict, config: Config) -> str:
        tag = tag_for(step)
        tmp = self.root / (tag + TMP_SUFFIX)
        last = read_latest(self.root)
        kept = f"the last checkpoint {self.root / last} is intact" if last else "no earlier checkpoint"
        # NaN/inf weights would be saved as `latest` and prune the last good checkpoint: refuse instead.
        finite = all(bool(torch.isfinite(t).all()) for t in _fp32_tensors(engine))
        if not _all_ok(finite):
            raise CheckpointError(f"step {step}: the weights hold NaN or inf values, so no checkpoint was written; "
                                  f"{kept}. Resume from it with a lower train.lr or more train.warmup_steps")
        failure: BaseException | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=client_state, save_latest=False)
            # DeepSpeed keeps client state only in rank 0's file; the random streams differ per rank.
            torch.save(rank_state, tmp / RANK_STATE.format(rank=self.rank))
            if self.sealer:
                (tmp / CONFIG_SIDECAR).write_text(json.dumps(config.to_dict(), indent=2))
        except (OSError, RuntimeError) as exc:  # a full disk surfaces as either, depending on the writer
            failure = exc
        if _all_ok(failure is None):  # every rank's files are complete: the sealers read them back, seal
            failure = self._seal(tmp, step, engine, self.node_local) if self.sealer else None
        if not _all_ok(failure is None):
            message = _write_failure(tmp, failure)
            if self.sealer or self.local_rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            barrier()
            raise CheckpointError(f"{message}; the partial folder was removed and {kept}")
        if self.sealer:
            self._publish(tmp, tag)
        barrier()
        # A shared-looking root that is not shared (no node-local setting): each node's first rank seals
        # and renames the copy on its own disk, so that no .tmp folder is left behind there.
        if self.local_rank == 0 and tmp.is_dir() and not (self.root / tag).exists():
            failure = self._seal(tmp, step, engine)
            if failure is not None:
                raise CheckpointError(f"{_write_failure(tmp, failure)}; {kept}")
            self._publish(tmp, tag)
        return tag

    @staticmethod
    def _seal(tmp: Path, step: int, engine, node_local: bool = False) -> BaseException | None:
        """Read every file back, write the manifest, verify against it; returns the failure, if any."""
        try:
            write_manifest(tmp, step=step, world_size=_world_size(), zero_stage=engine.zero_optimization_stage(),
                           node_local=node_local)
            verify_checkpoint(tmp, check_hashes=False)
        except (OSError, CheckpointError) as exc:
            return exc
        return None

    def _publish(self, tmp: Path, tag: str) -> None:
        final = self.root / tag
        if final.exists():  # a save of the same step by an earlier, interrupted attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        try:  # the sealed folder is the checkpoint; `latest` is only a hint for people and old tools
            write_text_atomic(self.root / LATEST, tag, durable=True)
        except OSError as exc:
            logger.warning("checkpoint %s is complete but '%s' could not be updated (%s); resume finds it anyway",
                           final, self.root / LATEST, exc)
        self._prune(tag)

    def _prune(self, keep: str) -> None:
        """Delete the oldest tags beyond keep_last, only once ``keep`` (just verified) is in place."""
        tags = self.tags()
        for old in tags[:-self.keep_last]:
            if old != keep and _step_of(old) < _step_of(keep):
                shutil.rmtree(self.root / old, ignore_errors=True)

    # -------------------------------------------------------------------------------------------- load
    def resume_tag(self) -> str | None:
        """:func:`find_resume_checkpoint` on rank 0, the same answer (or error) on every rank. Newer
        step folders that failed verification are renamed ``*.rejected`` (kept for inspection; never
        loaded, never pruned in place of a good one)."""
        if self.node_local:
            return self._node_local_resume_tag()
        answer = None
        if self.rank == 0:
            try:
                tag = find_resume_checkpoint(self.run_dir, self.root)
                answer = json.dumps({"tag": tag})
                for newer in (t for t in self.tags() if tag is not None and _step_of(t) > _step_of(tag)):
                    target = self.root / f"{newer}{REJECTED_SUFFIX}-{int(time.time())}"
                    os.replace(self.root / newer, target)
                    logger.warning("moved the unusable checkpoint %s aside to %s", newer, target)
            except CheckpointError as exc:
                answer = json.dumps({"error": str(exc)})
        reply = json.loads(_broadcast_text(answer))
        if "error" in reply:
            raise CheckpointError(reply["error"])
        return reply["tag"]

    def _owns(self, name: str) -> bool:
        """Whether this rank verifies file ``name`` of its node's folder: its own random streams and ZeRO
        partitions; the node's first rank also what belongs to no rank (model states, config)."""
        rank_marks = (re.search(r"zero_pp_rank_(\d+)_", name), RANK_STATE_PATTERN.match(name))
        owners = {int(m.group(1)) for m in rank_marks if m}
        return self.rank in owners if owners else self.sealer

    def _verify_own_part(self, tag_dir: Path) -> None:
        manifest = verify_checkpoint(tag_dir, only=self._owns)
        mine = RANK_STATE.format(rank=self.rank)
        if mine not in manifest["files"]:
            raise CheckpointError(f"{tag_dir}: holds no files of rank {self.rank} ({mine} is not in its {MANIFEST}): "
                                  "not this node's part of the checkpoint")

    def _node_local_resume_tag(self) -> str | None:
        """Node-local storage: every rank verifies its own part of each step folder on its node's disk;
        the newest step verified by every rank is resumed (one collective per candidate step)."""
        tags = self.tags()
        verified: set[int] = set()
        for tag in reversed(tags):
            try:
                self._verify_own_part(self.root / tag)
                verified.add(_step_of(tag))
            except CheckpointError as exc:
                logger.warning("rank %d: skipping checkpoint %s on this node: %s", self.rank, tag, exc)
        anywhere = int(all_reduce_sum(torch.tensor([len(tags)], dtype=torch.int64)).item()) > 0
        bound, chosen = 2**62, None
        while True:
            newest_here = max((step for step in verified if step <= bound), default=-1)
            step = int(all_reduce_min(torch.tensor([newest_here], dtype=torch.int64)).item())
            if step < 0:
                break
            if _all_ok(step in verified):  # every rank verified its part of this step
                chosen = tag_for(step)
                break
            bound = step - 1
        if chosen is not None:
            if self.sealer:
                for newer in (t for t in tags if _step_of(t) > _step_of(chosen)):
                    target = self.root / f"{newer}{REJECTED_SUFFIX}-{int(time.time())}"
                    os.replace(self.root / newer, target)
                    logger.warning("moved %s aside to %s: it does not verify on every node", newer, target)
            barrier()
            return chosen
        if anywhere:
            raise CheckpointError(f"no checkpoint in {self.root} verifies on every node (each rank's warning above "
                                  "names its files). Refusing to start over in this run dir: restore the nodes' step "
                                  "folders or choose another --run-dir")
        metrics = self.run_dir / METRICS
        if not _all_ok(not (metrics.is_file() and metrics.stat().st_size > 0)):
            raise CheckpointError(f"{self.run_dir} has a metrics history but no node holds a checkpoint in "
                                  f"{self.root}: refusing to start over (it would truncate the history)")
        return None

    def load(self, engine, world_size: int, tag: str | None = None) -> tuple[str, dict, dict | None]:
        """Restore ``tag`` (default: :meth:`resume_tag`) into ``engine``: (tag, client state, this rank's
        state or None when the random streams cannot be restored exactly, with a warning saying why)."""
        tag = tag or self.resume_tag()
        if tag is None:
            raise CheckpointError(f"no checkpoint in {self.root}")
        tag_dir = self.root / tag
        manifest = read_manifest(tag_dir)
        model_states = _rank0_model_states(tag_dir, self.rank if self.node_local else 0)
        states = safe_torch_load(model_states, mmap=True)
        saved_world = int(manifest["world_size"] if manifest else states.get("world_size", states.get("dp_world_size")))
        saved_stage = int(manifest["zero_stage"] if manifest else _zero_stage_of(states))
        stage = engine.zero_optimization_stage()
        # A checkpoint from before QKV fusion: its weights load through the model's fusing hook, but its
        # optimizer state is laid out per old query/key/value parameter (and ZeRO's flat partitions in
        # their order), so it is left out; the step, schedule and data position still resume.
        unfused = _states_have_unfused_qkv(states)
        if self.node_local and (saved_world, saved_stage) != (world_size, stage):
            raise CheckpointError(f"{tag_dir} is a node-local checkpoint of {saved_world} rank(s) with ZeRO-{saved_stage}: "
                                  "its partitions are spread over the nodes' disks, so it resumes only on that shape. "
                                  "To resume on another, copy every node's step folder into one folder (merging "
                                  "their files) and resume from there without use_node_local_storage")
        if (saved_world, saved_stage) == (world_size, stage):
            client = self._load_deepspeed(engine, tag_dir, optimizer_states=not unfused)
        elif unfused:
            raise CheckpointError(f"{tag_dir} predates fused QKV: it resumes only on the world size and ZeRO stage "
                                  f"it was written with ({saved_world} rank(s), ZeRO-{saved_stage})")
        else:
            client, not_restored = self._load_consolidated(engine, tag_dir, states)
            if self.rank == 0:
                kept = ("Adam's moments and step counts" if not_restored is None else
                        f"not Adam's moments, which restart from zero: {not_restored}")
                logger.warning(
                    "checkpoint %s was written by %d rank(s) with ZeRO-%d, resuming on %d with ZeRO-%d: restored "
                    "per parameter (weights, %s, step, LR schedule and data position exact%s)", tag_dir, saved_world,
                    saved_stage, world_size, stage, kept,
                    "" if saved_world == world_size else "; random streams reseeded, so not bit-exact")
        if unfused:
            refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
            if refresh is not None:  # fp32 masters (bf16/fp16, ZeRO): re-derived from the loaded weights
                refresh()
            if self.rank == 0:
                logger.warning("%s predates fused QKV (separate query/key/value weights): resuming its weights, step "
                               "and LR schedule, but not its optimizer state (Adam's moments start from zero)",
                               tag_dir)
        _lr_from_schedule(engine)
        rank_state = None
        rank_file = tag_dir / RANK_STATE.format(rank=self.rank)
        if saved_world == world_size:
            if rank_file.is_file():
                rank_state = safe_torch_load(rank_file)
            else:
                logger.warning("resuming %s not exact: rank state missing (%s): random streams reseeded, data "
                               "position taken from the global state", tag_dir, rank_file)
        return tag, client, rank_state

    def _load_deepspeed(self, engine, tag_dir: Path, optimizer_states: bool = True) -> dict:
        """The same world size and ZeRO stage: DeepSpeed's own loader, every torch.load weights-only."""
        try:
            with deepspeed_loads_safely():
                path, client = engine.load_checkpoint(str(self.root), tag=tag_dir.name,
                                                      load_optimizer_states=optimizer_states,
                                                      load_lr_scheduler_states=True)
        except CheckpointError:
            raise
        except (AssertionError, AttributeError, KeyError, RuntimeError, ValueError, OSError) as exc:
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it ({type(exc).__name__}: "
                                  f"{str(exc).strip()[:200] or 'no detail'})") from exc
        if path is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it (a model-states file is missing)")
        return client

    def _load_consolidated(self, engine, tag_dir: Path, states: dict) -> tuple[dict, str | None]:
        """Another world size or ZeRO stage: the consolidated fp32 weights into the model and the
        optimizer's masters, Adam's state per parameter (electra_fast.optimizer_state), and the step,
        LR schedule position and client state from rank 0's model states. Returns the client state and,
        when the optimizer's state could not be converted, why (its moments then restart)."""
        import deepspeed

        from .optimizer_state import UnsupportedOptimizerLayout, load_optimizer_state, set_full_fp32

        weights = consolidated_state_dict(tag_dir)
        params = dict(engine.module.named_parameters())
        missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        if missing or unexpected:
            raise CheckpointError(f"{tag_dir}: its weights do not match the model (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]})")
        try:
            optimizer_state, not_restored = checkpoint_optimizer_state(tag_dir), None
        except UnsupportedOptimizerLayout as exc:
            optimizer_state, not_restored = None, str(exc)
        zero3 = any(hasattr(p, "ds_id") for p in params.values())
        for name, param in params.items():
            value = weights[name]
            if zero3:  # gather, write the whole tensor on rank 0, let DeepSpeed broadcast and re-partition
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if self.rank == 0:
                        param.data.copy_(value.reshape(param.ds_shape).to(param.dtype))
            else:
                param.data.copy_(value.reshape(param.shape).to(param.dtype))
        for name, param in params.items():  # the fp32 masters, where the optimizer keeps them (exact under bf16)
            set_full_fp32(engine, param, weights[name].float())
        if optimizer_state is not None:
            load_optimizer_state(engine, optimizer_state)
        if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
            engine.lr_scheduler.load_state_dict(states["lr_scheduler"])
        for counter in ("global_steps", "global_samples", "skipped_steps"):
            if counter in states:
                setattr(engine, counter, int(states[counter]))
        client = {key: states[key] for key in ("step", "tokens_seen", "world_size", "loader", "format") if key in states}
        return client, not_restored


def checkpoint_config(tag_dir: Path) -> Config | None:
    """The resolved config saved with a checkpoint (its sidecar), or None for one without."""
    sidecar = Path(tag_dir) / CONFIG_SIDECAR
    return config_from_dict(json.loads(sidecar.read_text())) if sidecar.is_file() else None


def checkpoint_optimizer_state(tag_dir: Path):
    """Adam's state per parameter in a verified checkpoint folder (electra_fast.optimizer_state)."""
    from . import optimizer_state

    return optimizer_state.read_optimizer_state(tag_dir, checkpoint_config(tag_dir))


def _lr_from_schedule(engine) -> None:
    """The learning rate of the next update, from the restored schedule at the restored step.

    The schedule sets the optimizer's learning rate when it steps, after each update; a resume restores
    the schedule's position but the optimizer's rate is whatever the load left there: the fresh engine's
    first value (consolidated path), or the rate saved with the optimizer, which is stale when a resume
    changed train.max_steps or train.lr. Computing it is what the schedule's own step does, so an
    unchanged run gets the very same float."""
    import warnings

    scheduler = engine.lr_scheduler
    if scheduler is None or not hasattr(scheduler, "get_lr"):
        return
    with warnings.catch_warnings():  # torch asks for get_last_lr() outside step(); the computation is wanted
        warnings.simplefilter("ignore", UserWarning)
        rates = list(scheduler.get_lr())
    for group, lr in zip(engine.optimizer.param_groups, rates):
        group["lr"] = lr


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _zero_stage_of(states: dict) -> int:
    """The ZeRO stage of a checkpoint without a manifest, from the DeepSpeed config saved in it."""
    config = states.get("ds_config") or {}
    return int((config.get("zero_optimization") or {}).get("stage", 0)) if isinstance(config, dict) else 0


def _rank0_model_states(tag_dir: Path, rank: int = 0) -> Path:
    """The model-states file with the step, schedule and client state (ZeRO-3 writes one per rank; on
    node-local storage a rank reads its own, the one on its node)."""
    path = Path(tag_dir) / "mp_rank_00_model_states.pt"
    if not path.is_file():  # ZeRO-3 names its model states by the partition
        path = Path(tag_dir) / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
    return path


def _states_have_unfused_qkv(states: dict) -> bool:
    from .model import has_unfused_qkv

    names = list(states.get("module") or {})
    names += [name for shapes in states.get("param_shapes") or [] for name in shapes]  # ZeRO-3 keeps them here too
    return has_unfused_qkv(names)


def checkpoint_has_unfused_qkv(tag_dir: Path) -> bool:
    """Whether a checkpoint folder holds separate query/key/value weights (written before QKV fusion).
    Reads the parameter names of rank 0's model-states file without unpickling code (memory-mapped)."""
    return _states_have_unfused_qkv(safe_torch_load(_rank0_model_states(tag_dir), mmap=True))


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, its checkpoints/ folder, or one tag folder -> the verified tag folder to export."""
    path = Path(path)
    if (path / MANIFEST).is_file() or list(path.glob("*model_states.pt")):  # one checkpoint folder
        if verify_checkpoint(path) is None:
            logger.warning("%s has no %s (written by an earlier version): its files passed the weights-only "
                           "load but cannot be checked for damage", path, MANIFEST)
        return path
    for root in dict.fromkeys((checkpoint_root(path), path / CHECKPOINT_DIR, path)):  # the run's own first
        tag = newest_verified_tag(root)
        if tag is not None:
            return root / tag
    raise FileNotFoundError(f"{path}: no checkpoint here (expected a run dir, its checkpoints/ folder, or a "
                            f"checkpoint folder step-XXXXXXXX)")


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint folder, whatever its ZeRO stage and world size (every
    file read weights-only; callers verify the folder first)."""
    tag_dir = Path(tag_dir)
    if list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        # ZeRO 1-3 (and bf16 master weights): the fp32 partitions, merged by DeepSpeed's own tool,
        # whose torch.load calls are made weights-only for the duration.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            with deepspeed_loads_safely(), contextlib.redirect_stdout(sys.stderr):  # it prints progress
                return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except CheckpointError:
            raise
        except (AssertionError, AttributeError, KeyError, RuntimeError, ValueError, OSError, IndexError,
                pickle.UnpicklingError) as exc:
            raise CheckpointError(f"{tag_dir}: its ZeRO partitions cannot be merged ({type(exc).__name__}: "
                                  f"{str(exc).strip()[:200] or 'no detail'})") from exc
    # ZeRO-0 keeps the whole module in rank 0's model-states file, among DeepSpeed's own objects; only
    # tensors and plain containers are needed, so it is read without unpickling code.
    state = safe_torch_load(tag_dir / "mp_rank_00_model_states.pt")
    weights = {name: tensor.float() for name, tensor in state["module"].items()}
    # With bf16/fp16 the module holds rounded weights; the optimizer wrapper keeps the fp32 masters,
    # one list per parameter group, in the order of optim.weight_decay_groups() (decayed first).
    optimizer = state.get("optimizer")
    masters = optimizer.get("fp32_groups") if isinstance(optimizer, dict) else None
    if masters and (tag_dir / CONFIG_SIDECAR).is_file():
        from .optimizer_state import zero0_parameter_names

        groups = zero0_parameter_names(checkpoint_config(tag_dir))
        if [len(g) for g in groups] != [len(m) for m in masters]:
            raise ValueError(f"{tag_dir}: the optimizer's fp32 master weights do not match the model's parameter "
                             "groups")
        for names, tensors in zip(groups, masters):
            for name, master in zip(names, tensors):
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
    broken = [name for name, tensor in state.items() if not bool(torch.isfinite(tensor).all())]
    if broken:
        raise CheckpointError(f"{tag_dir}: {len(broken)} weight tensors hold NaN or inf (e.g. {broken[0]}); "
                              "nothing was exported")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{tag_dir}: the checkpoint does not match its config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    tokenizer_dir = data_dir or cfg.data.path
    if not tokenizer_dir or not any((Path(tokenizer_dir).expanduser() / name).is_file()
                                    for name in ("vocab.txt", "tokenizer.json")):
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


