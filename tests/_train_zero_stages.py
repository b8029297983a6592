"""Run the trainer once per ZeRO stage inside one multi-rank launch (used by tests/test_train.py).

    deepspeed --num_gpus 2 tests/_train_zero_stages.py --data DIR --out DIR --stages 0 1 2 3 [--set k=v ...] \
        [--then-fail-rank 1]

Launching once and calling ``electra_fast.train.train`` per stage pays the start-up of two Python
processes with torch and DeepSpeed once instead of four times. Each stage writes OUT/zero{stage}.
With --then-fail-rank R, a last run through the module's command line (``electra_fast.train.main``)
makes rank R raise after its second step (a fault callback from tests/_faults.py), so the launch must
end with that rank's error.
"""

import argparse
import os
import sys

from _faults import FailAfterStep

from electra_fast.config import load_config
from electra_fast.train import main as main_entry
from electra_fast.train import train


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", type=int, nargs="+", required=True)
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[])
    parser.add_argument("--checkpointing-stages", type=int, nargs="*", default=[],
                        help="stages that also run with model.activation_checkpointing=true")
    parser.add_argument("--then-fail-rank", type=int, default=None)
    parser.add_argument("--config", default=None, help="the YAML each stage starts from (default: electra-tiny)")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = args.config or os.path.join(repo, "configs", "electra-tiny.yaml")
    for stage in args.stages:
        cfg = load_config(config, [
            f"data.path={args.data}", f"train.deepspeed_config={repo}/configs/deepspeed/zero{stage}.json",
            *args.overrides, f"model.activation_checkpointing={str(stage in args.checkpointing_stages).lower()}"])
        train(cfg, os.path.join(args.out, f"zero{stage}"), local_rank=args.local_rank)
    if args.then_fail_rank is not None:
        fault = FailAfterStep("raise", 2, rank=args.then_fail_rank)
        return main_entry(["--config", os.path.join(repo, "configs", "electra-tiny.yaml"),
                           "--run-dir", os.path.join(args.out, "failing"), "--local_rank", str(args.local_rank),
                           "--set", f"data.path={args.data}", "train.max_steps=50", "train.export_at_end=false"],
                          callbacks=[fault])
    return 0


if __name__ == "__main__":
    sys.exit(main())
