"""What does rounding packed batches up to token buckets (for CUDA graphs) cost in tokens?

    electra-fast prepare --default --out data/default
    python benchmarks/bucket_padding.py --data data/default --batch 128              # ELECTRA-Small's micro-batch
    python benchmarks/bucket_padding.py --data data/default-512 --batch 32 --buckets 8,16,32,64

With ``train.cuda_graphs`` and the packed layout (``model.unpad=true``) every micro-batch's real tokens are
rounded up to one of ``count`` fixed row counts (electra_fast.buckets; the default is
``DEFAULT_BUCKETS``); the rows added are inert but cost what real tokens cost in every layer. This reads
the batches the trainer's loader would hand out (``--epochs`` passes over the data, each in its own
order) and reports, per bucket count: the rows added as a share of the real tokens (mean and worst
batch), how many distinct buckets the run meets (= graphs captured, per compiled part and mode) and, for
scale, the padding the padded layout would compute instead. Host arithmetic only: no model, no GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_args, append_rows, print_table  # noqa: E402

from electra_fast.buckets import DEFAULT_BUCKETS, bucket_rows  # noqa: E402
from electra_fast.loader import PretrainingLoader  # noqa: E402


def token_counts(data: str, batch: int, epochs: int, seed: int) -> tuple[list[int], int]:
    """Real tokens of every micro-batch the loader yields over ``epochs`` passes; and seq_len."""
    loader = PretrainingLoader(data, micro_batch_size=batch, num_workers=0, seed=seed, pin_memory=False)
    stream = iter(loader)
    counts = [next(stream)["packed_sizes"]["total_tokens"] for _ in range(loader.batches_per_epoch * epochs)]
    return counts, loader.seq_len


def bucket_costs(counts: list[int], batch: int, seq_len: int, bucket_count: int) -> dict:
    rows = [bucket_rows(total, batch, seq_len, bucket_count) for total in counts]
    real = sum(counts)
    return {
        "buckets": bucket_count, "batches": len(counts), "real_tokens_per_batch": real / len(counts),
        "rows_per_batch": sum(rows) / len(rows), "added_fraction": (sum(rows) - real) / real,
        "worst_added_fraction": max((r - t) / t for r, t in zip(rows, counts) if t),
        "buckets_met": len(set(rows)), "padded_layout_fraction": (batch * seq_len * len(counts) - real) / real,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", required=True, help="a folder written by `electra-fast prepare`")
    parser.add_argument("--batch", type=int, default=128, help="micro-batch (sequences per step)")
    parser.add_argument("--buckets", default=f"8,16,{DEFAULT_BUCKETS}", help="comma-separated bucket counts")
    parser.add_argument("--epochs", type=int, default=20, help="passes over the data (each in a new order)")
    parser.add_argument("--seed", type=int, default=0)
    add_common_args(parser)
    args = parser.parse_args(argv)

    counts, seq_len = token_counts(args.data, args.batch, args.epochs, args.seed)
    rows = [{"data": args.data, "batch": args.batch, "seq_len": seq_len, **bucket_costs(counts, args.batch, seq_len, n)}
            for n in (int(v) for v in args.buckets.split(",") if v.strip())]
    print_table(["buckets", "B x S", "batches", "real tokens/batch", "rows/batch", "added (mean)", "added (worst)",
                 "buckets met", "padded layout adds"],
                [[r["buckets"], f"{r['batch']}x{r['seq_len']}", r["batches"], r["real_tokens_per_batch"],
                  r["rows_per_batch"], f"{100 * r['added_fraction']:.2f}%", f"{100 * r['worst_added_fraction']:.2f}%",
                  r["buckets_met"], f"{100 * r['padded_layout_fraction']:.1f}%"] for r in rows],
                f"Token buckets on {args.data}: rows added to the packed layout, as a share of the real tokens")
    path = append_rows(args, "bucket_padding", rows)
    if path:
        print(f"rows: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
