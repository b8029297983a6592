"""How close is the fused GeGLU (electra_kernels.geglu) to the memory bandwidth limit, against PyTorch?

    python benchmarks/geglu.py                  # ModernBERT-base / -large MLP widths, 8,192 tokens, bf16
    python benchmarks/geglu.py --tokens 16384 --widths 1152
    python benchmarks/geglu.py --cpu-smoke      # no GPU: a tiny run of the script itself (PyTorch reference)

GeGLU is ``gelu(a) * b`` with ``a, b = x.chunk(2, -1)``, x = ModernBERT's ``Wi(h)`` of (tokens, 2n). It
moves bytes and does no matmul, so its yardstick is the copy bandwidth: the forward reads 2n and writes n
elements per token, the backward reads 2n + n and writes 2n, 8n elements in all (times the element size).
``bound ms`` = those bytes / --bandwidth (H100 SXM: 2.98 TB/s, what a device-to-device copy reaches).
Rows: ours (Triton), torch eager (``F.gelu(a) * b``: separate kernels, gelu(a) kept for the backward) and,
with --compile, torch.compile of the same. Target (issue 21, H100 bf16): ours fwd+bwd within 1.3x of the
bound. Times are ``triton.testing.do_bench`` medians (ms); rows go to ``<results>/geglu.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_args, append_rows, print_table  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--widths", default="1152,2624", help="n, the GeGLU output width (default: %(default)s, "
                                                              "ModernBERT base and large intermediate sizes)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--bandwidth", type=float, default=2.98, help="TB/s for the bound (default: H100 SXM)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(gelu(a) * b)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run of the script (reference path)")
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--rep", type=int, default=100)
    add_common_args(parser)
    return parser.parse_args(argv)


def _torch_geglu(x):
    a, b = x.chunk(2, dim=-1)
    return F.gelu(a) * b


def _bench(fn, x, dy, warmup, rep, cpu):
    """(fwd ms, fwd+bwd ms) for y = fn(x), backward with dy."""
    leaf = x.detach().clone().requires_grad_()

    def fwd():
        return fn(leaf)

    def fwd_bwd():
        fn(leaf).backward(dy)

    if cpu:
        def timed(f):
            f()
            start = time.perf_counter()
            f()
            return (time.perf_counter() - start) * 1e3
        with torch.no_grad():
            t_fwd = timed(fwd)
        return t_fwd, timed(fwd_bwd)
    from triton.testing import do_bench

    with torch.no_grad():
        t_fwd = do_bench(fwd, warmup=warmup, rep=rep, return_mode="median")
    return t_fwd, do_bench(fwd_bwd, warmup=warmup, rep=rep, grad_to_none=[leaf], return_mode="median")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (torch.cuda.is_available() or args.cpu_smoke):
        print("benchmarks/geglu.py needs a CUDA GPU (or --cpu-smoke); none is visible here.", file=sys.stderr)
        return 2
    import electra_kernels

    device = "cpu" if args.cpu_smoke else "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    tokens, widths = (64, [48]) if args.cpu_smoke else (args.tokens, [int(w) for w in args.widths.split(",") if w])
    impls = {"ours": electra_kernels.geglu, "torch eager": _torch_geglu}
    if args.compile and not args.cpu_smoke:
        impls["torch.compile"] = torch.compile(_torch_geglu)
    rows = []
    for n in widths:
        x = torch.randn(tokens, 2 * n, device=device, dtype=dtype)
        dy = torch.randn(tokens, n, device=device, dtype=dtype)
        element = x.element_size()
        fwd_bytes, total_bytes = 3 * n * tokens * element, 8 * n * tokens * element
        bound_fwd, bound_total = (b / (args.bandwidth * 1e12) * 1e3 for b in (fwd_bytes, total_bytes))
        for name, fn in impls.items():
            t_fwd, t_both = _bench(fn, x, dy, args.warmup, args.rep, args.cpu_smoke)
            rows.append(dict(tokens=tokens, n=n, dtype=args.dtype, impl=name, fwd_ms=t_fwd, fwd_bwd_ms=t_both,
                             bound_fwd_ms=bound_fwd, bound_fwd_bwd_ms=bound_total, vs_bound=t_both / bound_total,
                             cpu_smoke=args.cpu_smoke))
    title = f"GeGLU {args.dtype}, {tokens} tokens, bound at {args.bandwidth} TB/s"
    if args.cpu_smoke:
        title = "CPU smoke run (PyTorch reference path, not a measurement): " + title
    print_table(["n", "impl", "fwd ms", "fwd+bwd ms", "bound fwd+bwd ms", "x bound"],
                [[r["n"], r["impl"], r["fwd_ms"], r["fwd_bwd_ms"], r["bound_fwd_bwd_ms"], r["vs_bound"]] for r in rows],
                title=title)
    for r in rows:
        if r["impl"] == "ours" and not args.cpu_smoke:
            verdict = "met" if r["vs_bound"] <= 1.3 else "MISSED"
            print(f"target n={r['n']}: fwd+bwd within 1.3x of the bandwidth bound: {r['vs_bound']:.2f}x ({verdict})")
    append_rows(args, "geglu", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
