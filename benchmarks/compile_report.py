"""What every Triton kernel costs on real GPUs, from the compiler alone (no GPU needed).

    python benchmarks/compile_report.py --defaults-only           # each default, sm_80 + sm_90: the CI gate's rows
    python benchmarks/compile_report.py                           # every autotune candidate too (long)
    python benchmarks/compile_report.py --kernel attention --dtype bf16 --head-dim 64 --arch 90
    python benchmarks/compile_report.py --electra --defaults-only  # what ELECTRA Small/Base/Large run

Compiles every kernel x autotune candidate x constexpr variant the launchers use (the lists come from
each kernel file's ``compile_variants()``, built from the launchers' own config lists: the dtypes each
kernel runs on a GPU (bf16 / fp16, and fp32 for LayerNorm, bias-GELU and the BCE head); padded / packed
layouts; key mask; dropout; fused dQ; head dims 16 / 32 / 64 / 96 / 128; hidden 128 / 256 / 768 / 1024;
vocabulary 30522) with ``triton.compile`` for sm_80 and sm_90, and prints one
table: registers per thread, spilled bytes (ptxas), shared memory per block against the architecture's
limit (sm_90 232,448 B, sm_80 166,912 B), and the tensor-core instructions in the PTX (wgmma / mma /
none). A last column names what a default config must not do (spill, exceed shared memory, miss the
tensor cores); the exit status is 1 when some default does.

Rows are appended to ``<results dir>/compile_report.jsonl`` (machine, triton version, commit) like
the other benchmarks. Compiles run ``--jobs`` at a time (default: the CPU count) in a fresh Triton cache.
Needs triton and torch (CPU build is enough); TRITON_INTERPRET must be unset (it replaces the compiler).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_args, append_rows, print_table  # noqa: E402

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--defaults-only", action="store_true", help="only each kernel's first (default) config")
    parser.add_argument("--electra", action="store_true",
                        help="only the variants ELECTRA Small/Base/Large run (bf16, d=64, padded+mask / packed, "
                             "E 128/768/1024, hidden 256/768/1024)")
    parser.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default %(default)s)")
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains this text")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPUs)")
    add_common_args(parser)
    return parser.parse_args(argv)


def select(variants, args):
    from electra_kernels._gpu_compile import is_electra

    chosen = []
    for v in variants:
        if args.defaults_only and not v.default:
            continue
        if args.electra and not is_electra(v):
            continue
        if args.kernel and args.kernel not in v.kernel:
            continue
        if args.dtype and v.tags.get("dtype", args.dtype) != args.dtype:
            continue
        if args.head_dim and v.tags.get("head_dim", args.head_dim) != args.head_dim:
            continue
        chosen.append(v)
    return chosen


def _size(row) -> str:
    parts = []
    for key in ("layout", "head_dim", "embedding", "hidden", "vocab", "features"):
        if row.get(key) is not None:
            parts.append(f"{key.replace('head_dim', 'd').replace('embedding', 'E')}={row[key]}"
                         if key != "layout" else str(row[key]))
    if row.get("dropout") is not None:
        parts.append("dropout" if row["dropout"] else "no dropout")
    if row.get("residual"):
        parts.append("residual")
    return " ".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_report.py compiles real kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    import triton

    from electra_kernels import _gpu_compile

    archs = [int(a) for a in args.arch.split(",") if a]
    variants = select(_gpu_compile.all_variants(), args)
    print(f"triton {triton.__version__}: compiling {len(variants)} variants x {len(archs)} archs, "
          f"{args.jobs} at a time", flush=True)
    start = time.time()
    done = [0]

    def progress(row):
        done[0] += 1
        if done[0] % 20 == 0:
            print(f"  {done[0]} compiled ({time.time() - start:.0f} s)", flush=True)

    rows = _gpu_compile.compile_many(variants, archs, jobs=args.jobs, progress=progress)
    for row in rows:
        row["problems"] = "; ".join(_gpu_compile.problems(row))
    table = [[r["kernel"], r.get("dtype") or "-", _size(r), r["config"] + (" *" if r["default"] else ""),
              f"sm_{r['arch']}", r["registers"], r["spill_bytes"],
              f"{r['shared']}/{r['smem_limit']}" if r["shared"] is not None else "-",
              r["tensor_core"] or "-", r["problems"]] for r in rows]
    print_table(["kernel", "dtype", "variant", "config (* default)", "arch", "regs", "spill B", "smem B / limit",
                 "tensor cores", "problems"], table,
                title=f"compile report: triton {triton.__version__}, {len(rows)} compiles in {time.time() - start:.0f} s")
    bad_defaults = [r for r in rows if r["default"] and r["problems"]]
    failed = [r for r in rows if r["error"]]
    print(f"{len(bad_defaults)} default configs with problems; {len(failed)} configs fail to compile")
    path = append_rows(args, "compile_report", rows)
    if path:
        print(f"rows: {path}")
    return 1 if bad_defaults else 0


if __name__ == "__main__":
    sys.exit(main())
