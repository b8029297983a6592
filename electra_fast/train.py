"""Pretraining entry point: ELECTRA generator + discriminator on DeepSpeed's engine.

Launch (every config key can be changed with ``--set section.key=value``; ``--run-dir`` holds the
checkpoints, metrics and the Hugging Face export):

    # one process: the CPU (fp32) or one GPU (bf16); a named size needs no file (tiny/small/base/large)
    python -m electra_fast.train --size small --set data.path=data/default --run-dir runs/small
    python -m electra_fast.train --config configs/electra-small.yaml --set data.path=data/default --run-dir runs/small

    # eight GPUs on one node (DeepSpeed's launcher spells `python -m` as --module)
    deepspeed --num_gpus 8 --module electra_fast.train --config configs/electra-small.yaml \
        --set data.path=data/owt --run-dir runs/small

    # many nodes (hostfile lines look like "node1 slots=8"; the run dir must be on a shared filesystem)
    deepspeed --hostfile hostfile --num_nodes 4 --num_gpus 8 --module electra_fast.train \
        --config configs/electra-base.yaml --set data.path=/data/owt --run-dir /nfs/runs/base

    # torchrun works as well (it sets LOCAL_RANK instead of passing --local_rank)
    torchrun --nproc_per_node 8 -m electra_fast.train --config configs/electra-small.yaml --run-dir runs/small

    # continued pretraining from Hugging Face ELECTRA folders (an export or a download; fresh optimizer)
    electra-fast pretrain --config configs/electra-small.yaml --run-dir runs/dapt --set data.path=data/domain \
        --init-from runs/small/export/discriminator --init-generator runs/small/export/generator

    # continue after a crash, a kill or a preemption: the run's own config and data (electra_fast.run_state);
    # a changed key is refused unless named by --allow-config-change, and then recorded
    deepspeed --num_gpus 8 --module electra_fast.train --run-dir runs/small --resume
    deepspeed --num_gpus 8 --module electra_fast.train --run-dir runs/small --resume \
        --set train.max_steps=2000000 --allow-config-change train.max_steps

    # ZeRO-3, a bigger batch, 10k steps: any key, from the command line
    deepspeed --num_gpus 8 --module electra_fast.train --config configs/electra-base.yaml --run-dir runs/base \
        --set train.deepspeed_config=zero3 train.global_batch_size=2048 train.max_steps=10000

    # the same through the CLI, and the export of any checkpoint to Hugging Face folders
    electra-fast pretrain --config configs/electra-small.yaml --run-dir runs/small --set train.max_steps=10000
    electra-fast export --checkpoint runs/small --out runs/small/export

A run directory::

    config.yaml           the resolved config (sizes, special ids and vocabulary from the data)
    run_identity.json     the data trained on (vocabulary hash, special ids, seq_len, fingerprint), the YAML
                          and overrides it was started from, and the config changes accepted on resume
    deepspeed.json        the DeepSpeed config given to deepspeed.initialize (JSON + derived values)
    env.json              versions, git commit, devices, world size, command line
    metrics.jsonl         one record per log step (and one per skipped update); held-out evaluations
                          as records with "split": "heldout" (see electra_fast.evaluation)
    tensorboard/          the same as TensorBoard events
    checkpoints/          step-00001000/ ... (DeepSpeed's format) and `latest`
    export/               discriminator/ and generator/ in Hugging Face format, written at the end
    curves.png            loss and accuracy curves, drawn at the end

How the pieces fit: the YAML names a DeepSpeed JSON (``train.deepspeed_config``), which is read and
has the values both need filled in from the YAML in one place (:mod:`electra_fast.ds_config`: batch
sizes, clipping, precision, optimizer, LR schedule; "auto" is filled, a contradiction is an error). It
goes to ``deepspeed.initialize`` with the model and its weight-decay parameter groups
(:mod:`electra_fast.optim`, the decisions shared with fine-tuning). DeepSpeed builds the optimizer
(torch AdamW, fused on CUDA; DeepSpeed's CPU Adam under ZeRO-Offload, or its fused LAMB), the LR schedule, ZeRO
partitioning, mixed precision, gradient clipping and the skipping of updates whose gradient norm is
not finite. The whole ELECTRA step (masking, generator, sampling, discriminator) is the model's
forward, so ZeRO-3 gathers every parameter where it is used.

This file is the loop; the other jobs have their own modules: ``ds_config`` (the DeepSpeed config),
``distributed`` (the process group), ``checkpoints`` (save, resume, consolidation, export) and
``metrics`` (statistics, logs, curves, MFU), ``run_state`` (the run's identity and what a resume may
change) and ``stop_signals`` (SIGINT/SIGTERM: finish the step, save, exit 130/143). Tests and tools
hook into the loop through :class:`TrainerCallback` (``train(..., callbacks=[...])``), never through the config.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .checkpoints import (CheckpointError, Checkpoints, checkpoint_root, export_checkpoint, list_tags, read_latest,
                          rng_state, set_rng_state, tag_for)
from .config import Config, ConfigError, build_config, load_config
from .distributed import barrier, init_distributed, launcher_world, quiet_deepspeed_logger, shutdown_distributed
from .ds_config import build_deepspeed_config, lookup, read_deepspeed_json
from .metrics import MetricsLog, StepStats, model_flops_per_step, peak_tflops, plot_curves
from .optim import warmup_decay_schedule, weight_decay_groups
from .provenance import git_commit
from .run_state import RunRecord, RunRecordUpdate, data_identity, has_checkpoint, launch_record
from .step import compile_model, step_inputs
from .stop_signals import StepBoundaryControl, TrainingStopped, host_group

logger = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """The run stopped on purpose (e.g. too many non-finite steps); the message says why and what to do."""


class TrainerCallback:
    """Hooks into the step loop; every method does nothing here. Tests install subclasses that inject
    faults (tests/_faults.py); they are passed to :func:`train` / :func:`main`, never read from the config."""

    def on_loss(self, trainer: "Trainer", loss: torch.Tensor) -> torch.Tensor:
        """Each micro-step's loss before the non-finite guard and backward; returns the loss to use."""
        return loss

    def on_step_end(self, trainer: "Trainer") -> None:
        """After optimizer step ``trainer.step`` finished (and its checkpoint, if any, was written)."""


# ==================================================================================================
# Data and model set-up
# ==================================================================================================
def read_data_manifest(cfg: Config) -> dict:
    """The manifest of the prepared data ``data.path`` names; one clear error if there is none."""
    from .manifest import DataError, read_manifest

    if not cfg.data.path:
        raise ConfigError("data.path is not set: point it at a folder written by `electra-fast prepare` "
                          "(e.g. --set data.path=data/default)")
    if not Path(cfg.data.path).expanduser().is_dir():
        raise DataError(f"data.path: no such directory: {cfg.data.path} (run `electra-fast prepare` first)")
    return read_manifest(cfg.data.path)


def apply_data_manifest(cfg: Config, manifest: dict | None = None) -> dict:
    """Read the prepared data's manifest and make the model's vocabulary and special ids match it."""
    from .manifest import check_seq_len, check_vocab

    manifest = read_data_manifest(cfg) if manifest is None else manifest
    check_seq_len(manifest, cfg.data.seq_len)
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


# ==================================================================================================
# Training
# ==================================================================================================
def train(cfg: Config, run_dir: str | Path, *, resume: bool = False, local_rank: int = -1,
          callbacks: Sequence[TrainerCallback] = (), allow_config_change: Sequence[str] = (),
          launch: dict | None = None, init_from: str | None = None, init_generator: str | None = None) -> dict:
    """Pretrain under DeepSpeed; returns a summary (steps, final metrics, paths). See the module docstring.

    With ``resume`` and a checkpoint to continue from, ``cfg`` and the data must be what the run was
    trained with, except for the keys named in ``allow_config_change`` (rules: electra_fast.run_state).
    ``launch`` is what the run was started from (YAML and overrides), recorded in the run directory.
    ``init_from`` / ``init_generator``: HF folders the new run starts from (electra_fast.init_from)."""
    run_dir = Path(run_dir)
    # Everything that can be checked without DeepSpeed is checked first, so a bad config fails in seconds.
    if init_generator is not None and init_from is None:
        raise ConfigError("--init-generator needs --init-from (the discriminator the run starts from)")
    resuming = resume and has_checkpoint(run_dir)
    root = checkpoint_root(run_dir, cfg.train.checkpoint_dir)
    if not resume and (read_latest(root) is not None or list_tags(root)):
        raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose "
                          "another --run-dir")
    manifest = read_data_manifest(cfg)
    record = RunRecord.read(run_dir) if resuming else RunRecord(run_dir)
    identity = data_identity(cfg.data.path, manifest)
    changes = record.check_resume(cfg, identity, allow_config_change) if resuming else {}
    apply_data_manifest(cfg, manifest)
    init = None
    if init_from is not None:
        from .init_from import adopt_architecture

        adopt_architecture(cfg, manifest, init_from, init_generator)
        init = (init_from, init_generator)
    cfg.train.batch_layout(launcher_world()[2])
    ds_user, ds_path = read_deepspeed_json(cfg.train.deepspeed_config)
    update = RunRecordUpdate(record, identity, launch, changes, tuple(allow_config_change))
    quiet_deepspeed_logger()
    trainer = Trainer(cfg, run_dir, ds_user, ds_path, manifest, local_rank=local_rank, callbacks=callbacks,
                      record_update=update, init=init)
    return trainer.run(resume=resume)


class Trainer:
    """One pretraining run on a DeepSpeed engine: set-up, resume, the step loop, checkpoints, logs."""

    def __init__(self, cfg: Config, run_dir: Path, ds_user: dict, ds_path: Path, manifest: dict, *,
                 local_rank: int, callbacks: Sequence[TrainerCallback] = (),
                 record_update: RunRecordUpdate | None = None, init: tuple[str, str | None] | None = None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from .loader import PretrainingLoader
        from .model import ElectraPretrainingModel

        quiet_deepspeed_logger()  # again: its import may have reset the level
        self.cfg, self.run_dir, self.manifest, self.callbacks = cfg, run_dir, manifest, list(callbacks)
        self.record_update = record_update or RunRecordUpdate(RunRecord(run_dir),
                                                              data_identity(cfg.data.path, manifest))
        self.rank, self.world_size, self.device = init_distributed(local_rank, cfg.train.dist_timeout_minutes)
        self.local_rank = local_rank if local_rank >= 0 else launcher_world()[1]
        self.is_main = self.rank == 0
        accelerator = get_accelerator()
        self.ds_config = build_deepspeed_config(cfg, ds_user, world_size=self.world_size,
                                                device_type=self.device.type, source=str(ds_path),
                                                bf16_supported=accelerator.is_bf16_supported(),
                                                fp16_supported=accelerator.is_fp16_supported())
        ds = self.ds_config
        self.precision = "bf16" if ds["bf16"]["enabled"] else "fp16" if ds["fp16"]["enabled"] else "fp32"
        self.micro, self.accumulation = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
        self.zero_stage = int(lookup(ds, "zero_optimization.stage") or 0)
        if cfg.train.warmup_steps > cfg.train.max_steps and self.is_main:
            logger.warning("train.warmup_steps=%d > train.max_steps=%d: the learning rate never reaches train.lr",
                           cfg.train.warmup_steps, cfg.train.max_steps)

        # Identical initial weights on every rank (DeepSpeed also broadcasts rank 0's for ZeRO 0-2); each
        # rank draws its own masks and samples: the objective's streams are seeded by (seed, rank) here,
        # once, and restored on resume.
        seed = cfg.train.seed + self.rank
        torch.manual_seed(cfg.train.seed)
        model = ElectraPretrainingModel(cfg, seed=seed)
        if init is not None:  # before DeepSpeed partitions / broadcasts the weights; a resume loads over them
            from .init_from import load_initial_weights

            load_initial_weights(model, *init)
        self.init = init
        self.num_parameters = model.num_parameters()
        self.compiled = compile_model(model, cfg.train)  # train.compile / cuda_graphs: in place, names unchanged
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=weight_decay_groups(model.named_parameters(), cfg.train.weight_decay),
            lr_scheduler=None if "scheduler" in ds else self._schedule, config=ds)
        self.module = self.engine.module
        if self.zero_stage == 3:
            # The top-level forward uses parameters of its submodules directly, outside their forward:
            # the tied word-embedding matrix (the MLM head's output projection, owned by `embeddings`) and
            # the discriminator's output layer (handed to the fused BCE head as tensors). ZeRO-3 gathers a
            # parameter only around its owner's forward unless it is registered with the module using it.
            # gdes: the discriminator's word-table delta is summed with that matrix up there as well; it is a
            # parameter of the top-level module (gathered around its forward anyway) and is named here so
            # that every parameter the top-level forward reads directly is registered in one list.
            head = self.module.discriminator_predictions.dense_prediction
            external = [self.module.embeddings.word_embeddings.weight, head.weight, head.bias]
            if cfg.model.embedding_sharing == "gdes":
                external.append(self.module.discriminator_word_embeddings_delta)
            for parameter in external:
                deepspeed.zero.register_external_parameter(self.module, parameter)
        # Dropout and the other global streams: seeded by (seed, rank) as well.
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
        # The fixed held-out sample, the same on every rank (see _evaluate).
        self.heldout: list[dict] = []
        if cfg.train.eval_every and cfg.train.eval_batches:
            from .loader import heldout_batches

            self.heldout = heldout_batches(cfg.data.path, batch_size=self.micro, max_batches=cfg.train.eval_batches,
                                           manifest=manifest)
        self.checkpoints = Checkpoints(run_dir, self.rank, self.local_rank, cfg.train.keep_last,
                                       root=checkpoint_root(run_dir, cfg.train.checkpoint_dir),
                                       node_local=bool(lookup(ds, "checkpoint.use_node_local_storage")))
        self.control = StepBoundaryControl(cfg.train.save_every_minutes, host_group())
        self.stats = StepStats(self.device)
        self.step = self.tokens_seen = 0
        self.resumed_from: str | None = None
        self.last_saved: int | None = None
        self.nonfinite_streak = 0
        self.log: MetricsLog | None = None

    def _schedule(self, optimizer):
        """The LR schedule when the DeepSpeed JSON names none: the one shared with fine-tuning (optim)."""
        return warmup_decay_schedule(optimizer, self.cfg.train.max_steps, self.cfg.train.warmup_steps)

    # ---------------------------------------------------------------------------------------- resume
    def resume(self) -> None:
        from .objective import ObjectiveRNG

        # The newest verified checkpoint (checkpoints.find_resume_checkpoint): damaged ones are skipped,
        # and a run dir with a history but no usable checkpoint is refused rather than started over.
        tag = self.checkpoints.resume_tag()
        if tag is None:
            if self.is_main:
                logger.warning("--resume: no checkpoint in %s yet, starting from step 0", self.checkpoints.root)
            return
        self.resumed_from, client, rank_state = self.checkpoints.load(self.engine, self.world_size, tag)
        self.step = self.last_saved = int(client["step"])
        self.tokens_seen = int(client["tokens_seen"])
        if rank_state is not None:
            set_rng_state(self.module, rank_state["rng"])
            self.loader.load_state_dict(rank_state["loader"])
        else:
            # Another world size or a missing rank state (Checkpoints.load said which): the data position
            # is global and carries over; the random streams are per rank and are reseeded.
            self.loader.load_state_dict(client["loader"])
            self.module.rng = ObjectiveRNG(self.cfg.train.seed + self.rank + 1_000_003 * self.step)

    # ---------------------------------------------------------------------------------------- the loop
    def run(self, resume: bool = False) -> dict:
        cfg, run_dir = self.cfg, self.run_dir
        self.checkpoints.clean_partial()
        if resume:
            self.resume()
        if self.is_main:
            self.record_update.write(cfg, self.step)  # config.yaml and run_identity.json
            (run_dir / "deepspeed.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
            environment = _environment(self.world_size, self.device, self.precision, self.resumed_from)
            (run_dir / "env.json").write_text(json.dumps(environment, indent=2) + "\n")
        self.log = MetricsLog(run_dir, self.is_main, self.step, cfg.train.max_steps,
                              resumed=self.resumed_from is not None)
        self.flops_per_step, flops_source = model_flops_per_step(cfg)
        self.peak_tflops = peak_tflops(cfg, self.device, self.precision)
        self.log.say(
            f"[electra-fast] {self.world_size} rank(s) on {self.device.type}, {self.precision}, ZeRO-{self.zero_stage};"
            f" global batch {cfg.train.global_batch_size} = {self.micro} x {self.accumulation} accumulation x "
            f"{self.world_size}; {self.num_parameters / 1e6:.2f}M parameters; data {cfg.data.path} "
            f"({self.manifest['num_examples']} examples of {self.manifest['seq_len']} tokens, "
            f"{self.manifest.get('num_heldout_examples', 0)} held out); FLOPs/step "
            f"{self.flops_per_step:.3g} ({flops_source})" + (f"; {self.compiled}" if self.compiled else "")
            + (f"; resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else ""))
        if self.init is not None and self.resumed_from is None:
            self.log.say(f"[electra-fast] weights from {' + '.join(str(d) for d in self.init if d)} "
                         f"({'fresh generator, ' if self.init[1] is None else ''}fresh optimizer and schedule)")
        for line in self.record_update.describe():
            self.log.say(f"[electra-fast] {line}")
        if cfg.train.eval_every and cfg.train.eval_batches and not self.heldout:
            self.log.say(f"[electra-fast] no held-out evaluation: {cfg.data.path} has no held-out split "
                         "(prepare it with --heldout N)")

        batches: Iterator[dict] = iter(self.loader)
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.run_start = time.perf_counter()
        if self.step == 0 and self.step < cfg.train.max_steps:
            self._evaluate()  # the starting point every later evaluation is compared with
        last: dict = {}
        self.engine.train()
        self.control.install()
        try:
            while self.step < cfg.train.max_steps:
                for _ in range(self.accumulation):
                    self._micro_step(batches)
                self.step += 1
                self._check_update_applied()
                self.window_steps += 1
                self.log.advance()
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps:
                    last = self._log_window()
                if cfg.train.eval_every and (self.step % cfg.train.eval_every == 0 or self.step == cfg.train.max_steps):
                    self._evaluate()
                stop_signal, save_now = self.control.poll()  # the same answer on every rank
                if stop_signal and self.window_steps:
                    last = self._log_window()  # the steps since the last log are not lost
                if (save_now or stop_signal or self.step % cfg.train.save_every == 0
                        or self.step == cfg.train.max_steps):
                    self._save(announce=not stop_signal)
                for callback in self.callbacks:
                    callback.on_step_end(self)
                if stop_signal:
                    raise TrainingStopped(stop_signal, self.step, self.checkpoints.root / tag_for(self.step))
        finally:
            self.control.restore()
            self.log.close()
            # Shut the loader's worker processes down now. Left to garbage collection (the generator can sit
            # in a reference cycle, or in a traceback) they would outlive the run, and as they ignore
            # SIGTERM (a stop must finish its step), the interpreter's exit would wait on them for ever.
            batches.close()

        export_dir = None
        if self.is_main:
            if cfg.train.export_at_end and self.checkpoints.node_local and self.zero_stage and self.world_size > 1:
                # The ZeRO partitions are on the nodes' own disks: no one node can merge the weights.
                self.log.say(f"[electra-fast] no export at the end: the node-local checkpoint's partitions are "
                             f"spread over the nodes; copy every node's {tag_for(self.step)} folder into one, then "
                             "run `electra-fast export --checkpoint FOLDER --out DIR`")
            elif cfg.train.export_at_end:
                export_dir = export_checkpoint(self.checkpoints.root, run_dir / "export", data_dir=cfg.data.path)
                logger.info("exported %s", export_dir)
            plot_curves(run_dir)
        barrier()
        return {"step": self.step, "tokens_seen": self.tokens_seen, "last": last, "run_dir": str(run_dir),
                "export": None if export_dir is None else str(export_dir)}

    def _micro_step(self, batches: Iterator[dict]) -> None:
        # The packed layout's sizes come from the loader (host ints): no host-device sync in the step.
        (input_ids, attention_mask, token_type_ids), sizes = step_inputs(next(batches), self.device)
        out = self.engine(input_ids, attention_mask, token_type_ids, **sizes)
        loss = out.loss
        for callback in self.callbacks:
            loss = callback.on_loss(self, loss)
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

    def _evaluate(self) -> None:
        """Held-out metrics of the model as it is now (electra_fast.evaluation), fixed masks and samples.

        Every rank scores the same fixed sample through the engine's module: under ZeRO-3 each forward
        gathers parameters from all ranks, so all of them must run it, and the ranking metrics (ROC-AUC,
        AP) need every score in one place. The ranks' results are thus identical; rank 0 logs them.
        """
        if not self.heldout:
            return
        from .evaluation import evaluate_pretraining

        started = time.perf_counter()
        result = evaluate_pretraining(self.module, self.heldout, seed=self.cfg.train.seed)
        seconds = time.perf_counter() - started
        self.log.record_eval({"step": self.step, "split": "heldout", "eval": True, **result.to_dict(),
                              "eval_s": seconds, "time": time.time()})
        self.window_start += seconds  # throughput excludes evaluation

    def _save(self, announce: bool = True) -> None:
        started = time.perf_counter()
        self.tokens_seen += self.stats.take_tokens()  # exact in every checkpoint
        client = {"step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world_size,
                  "loader": self.loader.state_dict(), "format": 1}
        rank_state = {"rng": rng_state(self.module), "loader": self.loader.state_dict()}
        tag = self.checkpoints.save(self.engine, self.step, client, rank_state, self.cfg)
        self.last_saved = self.step
        self.control.saved()
        if announce:
            self.log.say(f"[electra-fast] step {self.step}: saved checkpoint {self.checkpoints.root / tag}")
        self.window_start += time.perf_counter() - started  # throughput excludes checkpointing


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
# Command line
# ==================================================================================================
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `python -m electra_fast.train`, `deepspeed -m electra_fast.train` and `electra-fast pretrain`."""
    parser.add_argument("--config", help="YAML config (configs/electra-*.yaml), on top of --size when both are "
                                         "given; with --resume, default: the run dir's config.yaml")
    parser.add_argument("--size", help="a named size instead of / over the YAML's (tiny, small, base, large)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="override config values, e.g. --set train.max_steps=1000 train.eval_every=200; "
                             "`electra-fast config --config FILE` prints every key with its value")
    parser.add_argument("--run-dir", required=True, help="folder for checkpoints, metrics and the export")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run dir's latest checkpoint (starts fresh if there is none), with "
                             "the run's own config and data; --config/--set may change only what "
                             "--allow-config-change names (and where the data lives, logging and saving)")
    parser.add_argument("--allow-config-change", dest="allow_config_change", nargs="+", action="extend", default=[],
                        metavar="SECTION.KEY", help="with --resume: accept a new value for these keys (e.g. "
                                                    "train.max_steps); each change is recorded in run_identity.json")
    parser.add_argument("--init-from", metavar="DISC_DIR",
                        help="start a new run from these weights (a Hugging Face ELECTRA discriminator folder: an "
                             "`electra-fast export` or a download), with a fresh optimizer and schedule")
    parser.add_argument("--init-generator", metavar="GEN_DIR",
                        help="with --init-from: the generator's folder (default: a fresh generator)")
    # The deepspeed launcher passes --local_rank=N (torch's launchers: --local-rank or $LOCAL_RANK).
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                        help=argparse.SUPPRESS)


def resolve_train_config(args: argparse.Namespace) -> tuple[Config, dict | None]:
    """The config to train with, and what it was started from (None: keep the run's record).

    Resuming a run that has a checkpoint: the run's own config with the user's changes on top
    (RunRecord.resolve; train() then refuses changes it does not allow). Otherwise a fresh start from
    --config (or, with --resume and nothing to resume yet, the run dir's config.yaml) and --set."""
    run_dir, size = Path(args.run_dir), getattr(args, "size", None)
    if args.resume and has_checkpoint(run_dir):
        return RunRecord.read(run_dir).resolve(args.config, args.overrides, size)
    if args.config is None:
        saved = run_dir / "config.yaml"
        if args.resume and saved.is_file():
            return load_config(saved, args.overrides, size=size), None
        if size is None:
            raise ConfigError("--config or --size is required (or --resume with a run dir that holds config.yaml)")
        # A named size needs no file: the paper's settings for it (config.SIZES), --set on top.
        return load_config(None, args.overrides, size=size), launch_record(None, args.overrides, size)
    return load_config(args.config, args.overrides, size=size), launch_record(args.config, args.overrides, size)


def resume_command(args: argparse.Namespace, world_size: int) -> str:
    """The command that continues this run (its own config is in the run dir, so no --config)."""
    run_dir = shlex.quote(str(args.run_dir))
    if world_size > 1:
        return f"the same launcher with --module electra_fast.train --run-dir {run_dir} --resume"
    prog = "electra-fast pretrain" if getattr(args, "command", None) == "pretrain" else "python -m electra_fast.train"
    return f"{prog} --run-dir {run_dir} --resume"


def run_train(args: argparse.Namespace, callbacks: Sequence[TrainerCallback] = ()) -> int:
    """Run training from parsed arguments: 0 when done, 1 if the run aborted itself (the message says
    why), 128 + the signal's number when SIGINT/SIGTERM stopped it (130, 143)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[electra-fast] %(levelname)s: %(message)s")
    cfg, launch = resolve_train_config(args)
    try:
        train(cfg, args.run_dir, resume=args.resume, local_rank=args.local_rank, callbacks=callbacks,
              allow_config_change=getattr(args, "allow_config_change", ()), launch=launch,
              init_from=getattr(args, "init_from", None), init_generator=getattr(args, "init_generator", None))
    except TrainingAborted as exc:
        print(f"electra-fast pretrain: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except TrainingStopped as stop:
        rank, _, world = launcher_world()
        if rank == 0:
            print(f"stopped at step {stop.step}; checkpoint {stop.checkpoint}; resume with: "
                  f"{resume_command(args, world)}", file=sys.stderr, flush=True)
        return stop.exit_code
    except KeyboardInterrupt:  # outside the step loop (set-up, export), or Ctrl-C twice
        if launcher_world()[0] == 0:
            print(f"interrupted (nothing saved since the last checkpoint); resume with: "
                  f"{resume_command(args, launcher_world()[2])}", file=sys.stderr, flush=True)
        return 130
    return 0


def main(argv: list[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m electra_fast.train",
                                     description="Pretrain ELECTRA on DeepSpeed (see the module docstring).")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    from .manifest import DataError

    try:
        return run_train(args, callbacks)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as exc:
        print(f"electra_fast.train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
