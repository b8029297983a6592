"""Train or resume the tiny model on this launch's ranks (used by tests/test_checkpoints.py).

    python tests/_resume_world.py --data DIR --run RUN --stage 0 --set train.max_steps=3 ...
    deepspeed --num_gpus 2 tests/_resume_world.py --data DIR --run RUN --stage 3 --resume --report OUT.json ...

With --resume the trainer is built on this launch's world size and ZeRO stage, resumed from the run's
checkpoint, and before any step the full fp32 weights it now holds (gathered from every rank) are
compared with the checkpoint's consolidated weights; rank 0 writes the largest difference, the step
and the learning rate to --report. Then training continues to train.max_steps.
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report", default=None)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()

    from electra_fast.checkpoints import consolidated_state_dict
    from electra_fast.config import load_config
    from electra_fast.ds_config import read_deepspeed_json
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
        held = full_fp32_weights(trainer)
        if trainer.rank == 0:
            saved = consolidated_state_dict(trainer.checkpoints.root / trainer.resumed_from)
            difference = max(float((held[name].detach() - saved[name].reshape(-1)).abs().max()) for name in saved)
            module = {name: float((p.detach().float().reshape(-1) - saved[name].reshape(-1)).abs().max())
                      for name, p in trainer.engine.module.named_parameters() if p.numel() == saved[name].numel()}
            report = {"step": trainer.step, "max_abs_difference": difference, "names": sorted(held) == sorted(saved),
                      "module_max_abs_difference": max(module.values()) if module else None,
                      "lr": float(trainer.engine.get_lr()[0]), "world_size": trainer.world_size}
            with open(args.report, "w") as handle:
                json.dump(report, handle)
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
