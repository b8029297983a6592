"""Train or resume the tiny model on this launch's ranks (used by tests/test_checkpoints.py).

    python tests/_resume_world.py --data DIR --run RUN --stage 0 --set train.max_steps=3 ...
    deepspeed --num_gpus 2 tests/_resume_world.py --data DIR --run RUN --stage 3 --resume --report OUT.json ...

With --resume the trainer is built on this launch's world size and ZeRO stage, resumed from the run's
checkpoint, and before any step the full fp32 weights it now holds (gathered from every rank) are
compared with the checkpoint's consolidated weights; rank 0 writes the largest difference, the step
and the learning rate to --report. Then training continues to train.max_steps.

--optimizer-dump FILE: without --resume, the engine's full optimizer state after the run (gathered
through DeepSpeed's per-parameter API, what the last checkpoint holds) is written to FILE; with
--resume, the state just restored is compared with FILE and the result added to --report.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def full_fp32_weights(trainer) -> dict:
    """Every parameter's fp32 value as the optimizer holds it (a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, param in trainer.engine.module.named_parameters():
        value = safe_get_full_fp32_param(param)
        weights[name] = (param.detach() if value is None else value).float().cpu().reshape(-1)
    return weights


def compare_optimizer_state(restored, saved: dict) -> dict:
    """How the optimizer state restored on this launch's shape differs from the one saved on another."""
    keys = sorted(saved["tensors"])
    differences = [float((restored.tensors[key][name] - value).abs().max())
                   for key in keys for name, value in saved["tensors"][key].items()]
    return {"optimizer_keys": keys, "optimizer_names_equal": restored.steps.keys() == saved["steps"].keys(),
            "optimizer_steps_equal": restored.steps == saved["steps"], "optimizer_steps": sorted(set(restored.steps.values())),
            "optimizer_max_abs_difference": max(differences)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report", default=None)
    parser.add_argument("--optimizer-dump", default=None)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()

    from electra_fast.checkpoints import consolidated_state_dict
    from electra_fast.config import load_config
    from electra_fast.ds_config import read_deepspeed_json
    from electra_fast.optimizer_state import gather_optimizer_state
    from electra_fast.train import Trainer, apply_data_manifest

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(repo, "configs", "electra-tiny.yaml"), [
        f"data.path={args.data}", f"train.deepspeed_config={repo}/configs/deepspeed/zero{args.stage}.json",
        *args.overrides])
    manifest = apply_data_manifest(cfg)
    ds_user, ds_path = read_deepspeed_json(cfg.train.deepspeed_config)
    trainer = Trainer(cfg, Path(args.run), ds_user, ds_path, manifest, local_rank=args.local_rank)
    if args.resume:
        trainer.resume()
        restored = gather_optimizer_state(trainer.engine) if args.optimizer_dump else None  # a collective
        held = full_fp32_weights(trainer)
        if trainer.rank == 0:
            saved = consolidated_state_dict(trainer.checkpoints.root / trainer.resumed_from)
            difference = max(float((held[name].detach() - saved[name].reshape(-1)).abs().max()) for name in saved)
            module = {name: float((p.detach().float().reshape(-1) - saved[name].reshape(-1)).abs().max())
                      for name, p in trainer.engine.module.named_parameters() if p.numel() == saved[name].numel()}
            report = {"step": trainer.step, "max_abs_difference": difference, "names": sorted(held) == sorted(saved),
                      "module_max_abs_difference": max(module.values()) if module else None,
                      "lr": float(trainer.engine.get_lr()[0]), "world_size": trainer.world_size}
            if restored is not None:
                report.update(compare_optimizer_state(restored, torch.load(args.optimizer_dump, weights_only=True)))
            with open(args.report, "w") as handle:
                json.dump(report, handle)
    trainer.run()
    if args.optimizer_dump and not args.resume:
        state = gather_optimizer_state(trainer.engine)  # a collective
        if trainer.rank == 0:
            torch.save({"tensors": state.tensors, "steps": state.steps}, args.optimizer_dump)
    return 0


if __name__ == "__main__":
    sys.exit(main())
