"""How fast is our fused attention against PyTorch SDPA (cuDNN, flash, mem-efficient) and flash-attn?

    python benchmarks/attention.py                       # the ELECTRA shapes, d=64, bf16, unpadded and padded
    python benchmarks/attention.py --check               # first compare outputs and gradients with SDPA
    python benchmarks/attention.py --shapes 32x12x512 --dropout 0.1
    python benchmarks/attention.py --no-autotune         # one fixed config per kernel: no tuning pass (fast start)
    python benchmarks/attention.py --compile-report      # no GPU needed: compile every candidate config for
                                                         # --arch (benchmarks/compile_report.py --kernel attention)
    python benchmarks/attention.py --modern-sweep        # ModernBERT rows: S = 512..8192 at a fixed token
                                                         # count, sliding window 64 vs global, rotary vs none

Shapes are BxHxS (head_dim from --head-dim, default 64): B128 H4 S128 (ELECTRA-Small), B32 H12 S512
(Base), B16 H16 S512 (Large), B4 H12 S2048 (long). Each runs twice:
  * unpadded: every sequence has S tokens. Ours: ``attention`` on (B, S, H, D). SDPA on (B, H, S, D).
  * padded:   lengths uniform in [S/2, S]. Ours: ``attention_varlen`` on the packed real tokens (what the
              encoder does after ``unpad_input``; the pack itself is once per encoder pass, not timed here)
              and ``attention`` with a key-padding mask. SDPA with a boolean (B, 1, 1, S) mask; the flash
              backend refuses masks (n/a). flash-attn (if it imports): ``flash_attn_varlen_func``.
Times are ``triton.testing.do_bench`` medians in ms of the forward, the backward (dO given, graph
retained) and forward+backward. TFLOP/s count the dense work of the unpadded shape, 4·B·H·S²·d for the
forward and 2.5x that for the backward (3.5x in all, as the reference numbers in RESULTS.md count it), so rows of one shape
compare directly; padded rows therefore show "effective" TFLOP/s. ``vs best SDPA`` is fwd+bwd time
divided by the fastest SDPA backend's for the same shape and padding (< 1 is faster).

Results: a table on stdout, rows appended to ``benchmarks/results/attention.csv`` and
``attention.jsonl`` (GPU name, torch/triton versions, date, commit), and ``attention.png``.
Needs a CUDA GPU; on a machine without one it exits with status 2 and a message (except
``--compile-report``, which only needs triton's bundled compiler tool-chain).
Targets on H100 (benchmarks/RESULTS.md): B32 H12 S512 fwd+bwd <= 0.36 ms unpadded, <= 0.40 ms padded, and
no shape more than 10% slower than the best SDPA backend.

``--modern-sweep`` (ModernBERT-base attention: H12, d=64, bf16, packed sequences of S tokens, B = 8192/S
so every row holds 8,192 tokens): ``attention_varlen`` global, with ``window=64`` (local_attention=128),
each without ``rotary_base`` and with it both ways (``fused``: rotated in the attention kernels' tile
loads; ``separate``: the rotary kernel first; ELECTRA_KERNELS_ROTARY), and flash-attn's varlen with
window_size=(64, 64) when it imports.
Columns: fwd / bwd / fwd+bwd ms and fwd+bwd µs per 1k tokens. Targets (issue 21, H100): window 64 at
S=8192 >= 10x faster than global at S=8192; the windowed time per token flat in S (the S=8192 row within
1.3x of the S=512 row); rotary within 1.1x of no rotary (global, every S). Rows go to
``modern_attention.jsonl``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_args, append_rows, machine_info, print_table, save_plot  # noqa: E402

DEFAULT_SHAPES = "128x4x128,32x12x512,16x16x512,4x12x2048"
CSV_FIELDS = ["date", "commit", "gpu", "torch", "triton", "shape", "batch", "heads", "seqlen", "head_dim", "dtype",
              "padded", "real_tokens", "dropout_p", "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "fwd_tflops",
              "bwd_tflops", "fwd_bwd_tflops", "vs_best_sdpa"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated BxHxS (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--dropout", type=float, default=0.0, help="attention dropout for every impl (default 0)")
    parser.add_argument("--padding", default="both", choices=["both", "none", "only"],
                        help="unpadded rows, padded rows, or both")
    parser.add_argument("--check", action="store_true", help="compare with SDPA (math backend) before timing")
    parser.add_argument("--no-autotune", action="store_true",
                        help="one fixed config per kernel (sets ELECTRA_KERNELS_AUTOTUNE=0): skips the tuning "
                             "pass that compiles every candidate on the first call")
    parser.add_argument("--compile-report", action="store_true",
                        help="compile every autotune candidate for --arch (no GPU needed) and print registers, "
                             "spilled bytes and shared memory per config; then exit")
    parser.add_argument("--arch", type=int, default=90, help="compute capability for --compile-report (default 90)")
    parser.add_argument("--modern-sweep", action="store_true",
                        help="ModernBERT rows: sliding window 64 vs global, rotary vs none, S = --sweep-lengths")
    parser.add_argument("--sweep-lengths", default="512,1024,2048,4096,8192",
                        help="sequence lengths of --modern-sweep (default %(default)s)")
    parser.add_argument("--sweep-tokens", type=int, default=8192, help="tokens per --modern-sweep row")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time, ms")
    parser.add_argument("--csv", type=Path, default=None, help="CSV file (default <results dir>/attention.csv)")
    parser.add_argument("--seed", type=int, default=0)
    add_common_args(parser)
    args = parser.parse_args(argv)
    try:
        args.shape_list = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",") if s]
        assert all(len(s) == 3 for s in args.shape_list)
    except (ValueError, AssertionError):
        parser.error(f"--shapes must look like 32x12x512,4x12x2048, got {args.shapes!r}")
    return args


# -------------------------------------------------------------------------------------------------
# The implementations: each returns (forward() -> out, the tensors to differentiate, the output dtype)
# -------------------------------------------------------------------------------------------------
def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
            "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


def _flash_attn():
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        return flash_attn_func, flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - any import failure (missing, ABI mismatch) means "not available"
        return None


class Problem:
    """One shape's inputs in every layout the implementations need (same values everywhere)."""

    def __init__(self, batch, heads, seqlen, head_dim, dtype, padded, seed):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.batch, self.heads, self.seqlen, self.head_dim, self.padded = batch, heads, seqlen, head_dim, padded
        shape = (batch, seqlen, heads, head_dim)
        self.q, self.k, self.v = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
        self.dout = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
        if padded:
            cpu_gen = torch.Generator().manual_seed(seed)
            lengths = torch.randint(seqlen // 2, seqlen + 1, (batch,), generator=cpu_gen)
        else:
            lengths = torch.full((batch,), seqlen)
        self.lengths = lengths
        self.mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).cuda()
        self.real_tokens = int(lengths.sum())
        self.indices = torch.nonzero(self.mask.flatten()).flatten()
        self.cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
        # Padded query rows get no gradient (as in a model, whose loss ignores padding), so the padded
        # and packed formulations have the same dK and dV.
        self.dout = self.dout * self.mask[:, :, None, None].to(dtype)

    def packed(self, t):
        return t.reshape(-1, self.heads, self.head_dim).index_select(0, self.indices)

    def bhsd(self, t):
        return t.transpose(1, 2).contiguous()


def make_impls(problem: Problem, dropout_p: float):
    """name -> callable(): (forward closure, leaves, dout) or None when the impl does not apply."""
    import electra_kernels
    from torch.nn.attention import sdpa_kernel

    p = problem
    impls = {}

    def leaves(*ts):
        return [t.detach().clone().requires_grad_() for t in ts]

    if p.padded:
        def ours_varlen():
            q, k, v = leaves(p.packed(p.q), p.packed(p.k), p.packed(p.v))
            return (lambda: electra_kernels.attention_varlen(q, k, v, p.cu_seqlens, p.seqlen, dropout_p),
                    [q, k, v], p.packed(p.dout))

        def ours_mask():
            q, k, v = leaves(p.q, p.k, p.v)
            return lambda: electra_kernels.attention(q, k, v, p.mask, dropout_p), [q, k, v], p.dout

        impls["ours-varlen"] = ours_varlen
        impls["ours-mask"] = ours_mask
    else:
        def ours():
            q, k, v = leaves(p.q, p.k, p.v)
            return lambda: electra_kernels.attention(q, k, v, None, dropout_p), [q, k, v], p.dout

        impls["ours"] = ours

    attn_mask = p.mask[:, None, None, :] if p.padded else None
    for name, backend in _sdpa_backends().items():
        if p.padded and name == "sdpa-flash":
            impls[name] = None  # the flash backend refuses any mask
            continue

        def sdpa(backend=backend):
            q, k, v = leaves(p.bhsd(p.q), p.bhsd(p.k), p.bhsd(p.v))

            def forward():
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                                            dropout_p=dropout_p)

            return forward, [q, k, v], p.bhsd(p.dout)

        impls[name] = sdpa

    fa = _flash_attn()
    if fa is not None:
        flash_attn_func, flash_attn_varlen_func = fa
        if p.padded:
            def flash_varlen():
                q, k, v = leaves(p.packed(p.q), p.packed(p.k), p.packed(p.v))
                return (lambda: flash_attn_varlen_func(q, k, v, p.cu_seqlens, p.cu_seqlens, p.seqlen, p.seqlen,
                                                       dropout_p), [q, k, v], p.packed(p.dout))

            impls["flash-attn"] = flash_varlen
        else:
            def flash():
                q, k, v = leaves(p.q, p.k, p.v)
                return lambda: flash_attn_func(q, k, v, dropout_p), [q, k, v], p.dout

            impls["flash-attn"] = flash
    return impls


def time_impl(make, warmup, rep):
    """(fwd ms, bwd ms, fwd+bwd ms) medians, or None when the backend refuses this problem."""
    from triton.testing import do_bench

    forward, leaves, dout = make()
    try:
        out = forward()  # also the autotuning pass for our kernels
        out.backward(dout)
    except Exception as exc:  # noqa: BLE001 - "No available kernel" from an SDPA backend, a compile error...
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        print(f"    failed/refused ({type(exc).__name__}): {first_line[:160]}", flush=True)
        return None
    torch.cuda.synchronize()

    with torch.no_grad():
        fwd = do_bench(forward, warmup=warmup, rep=rep, return_mode="median")
    out = forward()
    bwd = do_bench(lambda: out.backward(dout, retain_graph=True), warmup=warmup, rep=rep, grad_to_none=leaves,
                   return_mode="median")

    def fwd_bwd():
        forward().backward(dout)

    both = do_bench(fwd_bwd, warmup=warmup, rep=rep, grad_to_none=leaves, return_mode="median")
    return fwd, bwd, both


# -------------------------------------------------------------------------------------------------
# --check: outputs and gradients against SDPA's math backend (fp32 math on the same bf16 inputs)
# -------------------------------------------------------------------------------------------------
def check(args, dtype) -> bool:
    import electra_kernels
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ok = True
    rows = []
    for batch, heads, seqlen in args.shape_list:
        batch = min(batch, 4)  # the math backend materialises B·H·S² floats
        for padded in (False, True):
            p = Problem(batch, heads, seqlen, args.head_dim, dtype, padded, args.seed)
            q, k, v = (t.detach().clone().requires_grad_() for t in (p.q, p.k, p.v))
            if padded:
                pq, pk, pv = (p.packed(t).detach().requires_grad_() for t in (p.q, p.k, p.v))
                out_packed = electra_kernels.attention_varlen(pq, pk, pv, p.cu_seqlens, seqlen)
                out_packed.backward(p.packed(p.dout))
                out_mask = electra_kernels.attention(q, k, v, p.mask)
                out_mask.backward(p.dout)
            else:
                out_mask = electra_kernels.attention(q, k, v)
                out_mask.backward(p.dout)
            # Reference: fp32 math backend on the same (rounded) inputs.
            rq, rk, rv = (p.bhsd(t).float().requires_grad_() for t in (p.q, p.k, p.v))
            attn_mask = p.mask[:, None, None, :] if padded else None
            with sdpa_kernel(SDPBackend.MATH):
                ref = torch.nn.functional.scaled_dot_product_attention(rq, rk, rv, attn_mask=attn_mask)
            ref.backward(p.bhsd(p.dout).float())
            ref_out = ref.transpose(1, 2)
            ref_grads = [g.transpose(1, 2) for g in (rq.grad, rk.grad, rv.grad)]
            # And the same in the low precision, as the yardstick of an acceptable error.
            lq, lk, lv = (p.bhsd(t).detach().requires_grad_() for t in (p.q, p.k, p.v))
            with sdpa_kernel(SDPBackend.MATH):
                low = torch.nn.functional.scaled_dot_product_attention(lq, lk, lv, attn_mask=attn_mask)
            low.backward(p.bhsd(p.dout))
            low_all = [low.transpose(1, 2)] + [g.transpose(1, 2) for g in (lq.grad, lk.grad, lv.grad)]

            real = p.mask  # compare real query rows (padded query rows are defined but unused)
            ours_all = [out_mask, q.grad, k.grad, v.grad]
            for name, ours, want, low_p in zip(("out", "dq", "dk", "dv"), ours_all, [ref_out] + ref_grads, low_all):
                err = (ours.float() - want)[real].abs().max().item()
                base = (low_p.float() - want)[real].abs().max().item()
                passed = math.isfinite(err) and err <= 2 * base + 1e-3
                ok &= passed
                rows.append([f"{batch}x{heads}x{seqlen}", "yes" if padded else "no", f"ours {name}", err, base,
                             "ok" if passed else "FAIL"])
            if padded:
                packed_ref = [p.packed(t) for t in [ref_out] + ref_grads]
                packed_low = [p.packed(t) for t in low_all]
                for name, ours, want, low_p in zip(("out", "dq", "dk", "dv"), [out_packed, pq.grad, pk.grad, pv.grad],
                                                   packed_ref, packed_low):
                    err = (ours.float() - want).abs().max().item()
                    base = (low_p.float() - want).abs().max().item()
                    passed = math.isfinite(err) and err <= 2 * base + 1e-3
                    ok &= passed
                    rows.append([f"{batch}x{heads}x{seqlen}", "yes", f"varlen {name}", err, base,
                                 "ok" if passed else "FAIL"])
    ok &= _check_dropout(args, dtype, rows)
    print_table(["shape", "padded", "tensor", "max err vs fp32", "torch low-precision err", "verdict"], rows,
                title="--check: ours vs SDPA math backend (fp32), budget 2x torch's own low-precision error + 1e-3")
    return ok


def _check_dropout(args, dtype, rows) -> bool:
    """Dropout on the GPU: same seed -> same output, keep rate ~ q (the keep probability, quantised to
    1/256), and forward/backward equal to the fp32 reference that applies the kernel's own keep-mask."""
    import electra_kernels

    batch, heads, seqlen, p_drop = 2, 4, 256, 0.1
    prob = Problem(batch, heads, seqlen, args.head_dim, dtype, True, args.seed)
    q, k, v = (t.detach().clone().requires_grad_() for t in (prob.q, prob.k, prob.v))
    torch.manual_seed(11)
    out, keep = electra_kernels.attention(q, k, v, prob.mask, p_drop, return_dropout_mask=True)
    torch.manual_seed(11)
    again = electra_kernels.attention(q, k, v, prob.mask, p_drop)
    again.backward(prob.dout)
    ok = torch.equal(out, again)
    rows.append([f"{batch}x{heads}x{seqlen}", "yes", "dropout same seed", 0.0 if ok else float("nan"), 0.0,
                 "ok" if ok else "FAIL"])
    keep_rate = keep.float().mean().item()
    q_keep = electra_kernels.dropout_keep_probability(p_drop)
    rate_ok = abs(keep_rate - q_keep) < 0.01
    ok &= rate_ok
    rows.append([f"{batch}x{heads}x{seqlen}", "yes", "dropout keep rate", keep_rate, q_keep,
                 "ok" if rate_ok else "FAIL"])
    rq, rk, rv = (t.detach().float().requires_grad_() for t in (prob.q, prob.k, prob.v))
    ref = electra_kernels.attention_ref(rq, rk, rv, prob.mask, p_drop, dropout_mask=keep)
    ref.backward(prob.dout.float())
    lq, lk, lv = (t.detach().clone().requires_grad_() for t in (prob.q, prob.k, prob.v))
    with torch.autocast("cuda", enabled=False):
        scores = (lq.transpose(1, 2) @ lk.transpose(1, 2).transpose(-1, -2)) / math.sqrt(args.head_dim)
        scores = scores.masked_fill(~prob.mask[:, None, None, :], float("-inf"))
        low = ((scores.softmax(-1) * keep / q_keep) @ lv.transpose(1, 2)).transpose(1, 2)
    low.backward(prob.dout)
    real = prob.mask
    for name, ours, want, lowp in zip(("out", "dq", "dk", "dv"), (again, q.grad, k.grad, v.grad),
                                      (ref, rq.grad, rk.grad, rv.grad), (low, lq.grad, lk.grad, lv.grad)):
        err = (ours.float() - want)[real].abs().max().item()
        base = (lowp.float() - want)[real].abs().max().item()
        passed = math.isfinite(err) and err <= 2 * base + 1e-3
        ok &= passed
        rows.append([f"{batch}x{heads}x{seqlen}", "yes", f"dropout {name}", err, base, "ok" if passed else "FAIL"])
    return ok


# -------------------------------------------------------------------------------------------------
# --compile-report: the attention rows of benchmarks/compile_report.py (every candidate config compiled
# for --arch, no GPU needed: registers, spills, shared memory, tensor cores).
# -------------------------------------------------------------------------------------------------
def compile_report(args) -> int:
    import compile_report as report

    argv = ["--kernel", "attention", "--arch", str(args.arch), "--dtype", args.dtype, "--head-dim",
            str(args.head_dim)]
    return report.main(argv + (["--no-save"] if args.no_save else []))


# -------------------------------------------------------------------------------------------------
# --modern-sweep: sliding window and rotary (ModernBERT)
# -------------------------------------------------------------------------------------------------
WINDOW, ROTARY_BASE = 64, 160000.0  # ModernBERT-base: local_attention 128, global_rope_theta 160k


def modern_sweep(args, dtype) -> int:
    import electra_kernels

    heads, head_dim = 12, args.head_dim
    fa = _flash_attn()
    results = []
    for seqlen in (int(x) for x in args.sweep_lengths.split(",") if x):
        batch = max(1, args.sweep_tokens // seqlen)
        tokens = batch * seqlen
        gen = torch.Generator(device="cuda").manual_seed(args.seed)
        q, k, v, dout = (torch.randn(tokens, heads, head_dim, device="cuda", dtype=dtype, generator=gen)
                         for _ in range(4))
        cu = torch.arange(0, tokens + 1, seqlen, device="cuda", dtype=torch.int32)
        impls, rotary_modes = {}, {}
        for window in (None, WINDOW):
            for rotary_base, mode in ((None, None), (ROTARY_BASE, "fused"), (ROTARY_BASE, "separate")):
                name = f"ours {'window' + str(window) if window else 'global'}{f' +rotary {mode}' if mode else ''}"

                def make(window=window, rotary_base=rotary_base):
                    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                    return (lambda: electra_kernels.attention_varlen(*leaves, cu, seqlen, args.dropout, window=window,
                                                                     rotary_base=rotary_base), leaves, dout)

                impls[name] = make
                rotary_modes[name] = mode
        if fa is not None:
            flash_varlen = fa[1]
            for window in (None, WINDOW):
                def make_fa(window=window):
                    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                    size = (window, window) if window else (-1, -1)
                    return (lambda: flash_varlen(*leaves, cu, cu, seqlen, seqlen, args.dropout, window_size=size),
                            leaves, dout)

                impls[f"flash-attn {'window' + str(window) if window else 'global'}"] = make_fa
        for name, make in impls.items():
            print(f"  S={seqlen} B={batch} {name} ...", flush=True)
            previous = os.environ.get("ELECTRA_KERNELS_ROTARY")
            if rotary_modes.get(name):  # fused in the tile loads vs the separate rotary kernel
                os.environ["ELECTRA_KERNELS_ROTARY"] = rotary_modes[name]
            try:
                t = time_impl(make, args.warmup, args.rep)
            finally:
                if previous is None:
                    os.environ.pop("ELECTRA_KERNELS_ROTARY", None)
                else:
                    os.environ["ELECTRA_KERNELS_ROTARY"] = previous
            row = dict(seqlen=seqlen, batch=batch, heads=heads, head_dim=head_dim, dtype=args.dtype, tokens=tokens,
                       dropout_p=args.dropout, impl=name)
            if t is not None:
                row.update(fwd_ms=t[0], bwd_ms=t[1], fwd_bwd_ms=t[2], us_per_1k_tokens=t[2] * 1e6 / tokens)
            results.append(row)
        del q, k, v, dout
        torch.cuda.empty_cache()
    table = [[r["seqlen"], r["batch"], r["impl"]] + [r.get(c, "n/a") for c in ("fwd_ms", "bwd_ms", "fwd_bwd_ms",
                                                                                "us_per_1k_tokens")] for r in results]
    print_table(["S", "B", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd+bwd µs / 1k tokens"], table,
                title=f"ModernBERT attention sweep: H{heads} d={head_dim} {args.dtype}, {args.sweep_tokens} tokens "
                      f"per row, window {WINDOW}, rotary θ={ROTARY_BASE:g} (do_bench medians)")
    print("\n".join(_modern_targets(results)) + "\n", flush=True)
    if not args.no_save:
        append_rows(args, "modern_attention", results)
    return 0


def _modern_targets(results):
    by = {(r["seqlen"], r["impl"]): r.get("fwd_bwd_ms") for r in results}
    lengths = sorted({r["seqlen"] for r in results})
    lines = []
    top, low = lengths[-1], lengths[0]
    glob, win = by.get((top, "ours global")), by.get((top, f"ours window{WINDOW}"))
    if glob and win:
        lines.append(f"target window {WINDOW} >= 10x faster than global at S={top}: {glob / win:.1f}x "
                     f"({'met' if glob / win >= 10 else 'MISSED'})")
    w_low = by.get((low, f"ours window{WINDOW}"))
    if win and w_low:  # same token count per row: flat per token <=> flat time
        lines.append(f"window time per token S={top} vs S={low}: {win / w_low:.2f}x "
                     f"({'flat' if win / w_low <= 1.3 else 'NOT flat'})")
    for s in lengths:
        base = by.get((s, "ours global"))
        for mode in ("fused", "separate"):
            rot = by.get((s, f"ours global +rotary {mode}"))
            if base and rot:
                verdict = "met" if rot / base <= 1.1 else "MISSED"
                lines.append(f"target rotary ({mode}) within 1.1x at S={s}: {rot / base:.2f}x ({verdict})")
    return lines


# -------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_report:
        return compile_report(args)
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU (Triton kernels vs SDPA backends); none is visible here.",
              file=sys.stderr)
        return 2
    if args.no_autotune:
        os.environ["ELECTRA_KERNELS_AUTOTUNE"] = "0"  # read when electra_kernels.attention is imported
    import triton

    import electra_kernels  # noqa: F401

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    machine = machine_info(optional_modules=("flash-attn",))
    print(f"{machine.get('gpu')} | torch {torch.__version__} | triton {triton.__version__} | "
          f"flash-attn {'yes' if _flash_attn() else 'no'} | {args.dtype} d={args.head_dim} dropout={args.dropout}",
          flush=True)
    if args.check and not check(args, dtype):
        print("--check failed: not timing a kernel that computes wrong results", file=sys.stderr)
        return 1
    if args.modern_sweep:
        return modern_sweep(args, dtype)

    paddings = {"both": (False, True), "none": (False,), "only": (True,)}[args.padding]
    results = []
    for batch, heads, seqlen in args.shape_list:
        fwd_flops = 4 * batch * heads * seqlen * seqlen * args.head_dim
        for padded in paddings:
            problem = Problem(batch, heads, seqlen, args.head_dim, dtype, padded, args.seed)
            shape = f"B{batch} H{heads} S{seqlen}"
            print(f"{shape} {'padded' if padded else 'unpadded'} ({problem.real_tokens} real tokens)", flush=True)
            timed = {}
            for name, make in make_impls(problem, args.dropout).items():
                if make is None:
                    timed[name] = None
                    continue
                print(f"  {name} ...", flush=True)
                timed[name] = time_impl(make, args.warmup, args.rep)
                del make
                torch.cuda.empty_cache()
            sdpa_times = [t[2] for n, t in timed.items() if n.startswith("sdpa") and t is not None]
            best_sdpa = min(sdpa_times) if sdpa_times else None
            for name, t in timed.items():
                row = dict(shape=shape, batch=batch, heads=heads, seqlen=seqlen, head_dim=args.head_dim,
                           dtype=args.dtype, padded=padded, real_tokens=problem.real_tokens, dropout_p=args.dropout,
                           impl=name)
                if t is not None:
                    fwd, bwd, both = t
                    row.update(fwd_ms=fwd, bwd_ms=bwd, fwd_bwd_ms=both, fwd_tflops=fwd_flops / fwd / 1e9,
                               bwd_tflops=2.5 * fwd_flops / bwd / 1e9, fwd_bwd_tflops=3.5 * fwd_flops / both / 1e9,
                               vs_best_sdpa=both / best_sdpa if best_sdpa else None)
                results.append(row)
            del problem
            torch.cuda.empty_cache()

    table = []
    for r in results:
        if "fwd_ms" not in r:
            table.append([r["shape"], "yes" if r["padded"] else "no", r["impl"], "n/a", "n/a", "n/a", "n/a", "n/a"])
            continue
        table.append([r["shape"], "yes" if r["padded"] else "no", r["impl"], r["fwd_ms"], r["bwd_ms"], r["fwd_bwd_ms"],
                      r["fwd_bwd_tflops"], r["vs_best_sdpa"]])
    print_table(["shape", "padded", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd+bwd TFLOP/s", "vs best SDPA"], table,
                title=f"attention, {args.dtype}, d={args.head_dim}, dropout {args.dropout} (do_bench medians)")
    _report_targets(results)

    if not args.no_save:
        _append_csv(args, machine, results)
        append_rows(args, "attention", results)
        save_plot(args, "attention", lambda plt: _draw(plt, results))
    return 0


def _report_targets(results):
    """The targets in RESULTS.md, checked against this run."""
    lines = []
    for padded, limit in ((False, 0.36), (True, 0.40)):
        for r in results:
            if (r["shape"] == "B32 H12 S512" and r["padded"] == padded and r["impl"] in ("ours", "ours-varlen")
                    and "fwd_bwd_ms" in r):
                verdict = "met" if r["fwd_bwd_ms"] <= limit else "MISSED"
                lines.append(f"target B32 H12 S512 {'padded' if padded else 'unpadded'} fwd+bwd <= {limit} ms: "
                             f"{r['fwd_bwd_ms']:.3f} ms ({verdict})")
    for r in results:
        if r["impl"] in ("ours", "ours-varlen") and r.get("vs_best_sdpa") is not None and r["vs_best_sdpa"] > 1.10:
            lines.append(f"slower than the best SDPA backend by more than 10%: {r['shape']} "
                         f"{'padded' if r['padded'] else 'unpadded'} ({r['vs_best_sdpa']:.2f}x)")
    print("\n".join(lines) + "\n", flush=True)


def _append_csv(args, machine, results):
    path = args.csv or Path(args.results_dir) / "attention.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in results:
            writer.writerow({**{k: machine.get(k) for k in ("date", "commit", "gpu", "torch", "triton")}, **r})
    print(f"rows: {path}")


def _draw(plt, results):
    shapes = list(dict.fromkeys(f"{r['shape']}{' pad' if r['padded'] else ''}" for r in results))
    impls = list(dict.fromkeys(r["impl"] for r in results))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, s in enumerate(shapes):
            for r in results:
                if r["impl"] == impl and f"{r['shape']}{' pad' if r['padded'] else ''}" == s and "fwd_bwd_tflops" in r:
                    xs.append(j + i * width)
                    ys.append(r["fwd_bwd_tflops"])
        if ys:  # impls that never ran (refused, n/a) get no legend entry
            plt.bar(xs, ys, width=width, label=impl)
    plt.xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=30, ha="right", fontsize=8)
    plt.ylabel("fwd+bwd TFLOP/s (dense count 3.5 x 4BHS²d)")
    plt.title("Attention forward+backward (higher is better)")
    plt.legend(fontsize=8)


if __name__ == "__main__":
    sys.exit(main())
