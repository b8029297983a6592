"""Run the trainer once per ZeRO stage inside one multi-rank launch (used by tests/test_train.py).

    deepspeed --num_gpus 2 tests/_train_zero_stages.py --data DIR --out DIR --stages 0 1 2 3 [--set k=v ...]

Launching once and calling ``electra_fast.train.train`` per stage pays the start-up of two Python
processes with torch and DeepSpeed once instead of four times. Each stage writes OUT/zero{stage}.
"""

import argparse
import os
import sys

from electra_fast.config import load_config
from electra_fast.train import train


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", type=int, nargs="+", required=True)
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[])
    parser.add_argument("--checkpointing-stages", type=int, nargs="*", default=[],
                        help="stages that also run with model.activation_checkpointing=true")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for stage in args.stages:
        cfg = load_config(os.path.join(repo, "configs", "electra-tiny.yaml"), [
            f"data.path={args.data}", f"train.deepspeed_config={repo}/configs/deepspeed/zero{stage}.json",
            *args.overrides, f"model.activation_checkpointing={str(stage in args.checkpointing_stages).lower()}"])
        train(cfg, os.path.join(args.out, f"zero{stage}"), local_rank=args.local_rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
