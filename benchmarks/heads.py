"""How fast are the fused output heads (generator MLM head, discriminator head) against PyTorch?

    python benchmarks/heads.py                          # every size, bf16, on the current CUDA GPU
    python benchmarks/heads.py --sizes base --heads mlm # one question at a time
    python benchmarks/heads.py --no-save                # print only
    python benchmarks/heads.py --cpu-smoke              # tiny shapes, Triton interpreter: the script runs
    python benchmarks/heads.py --bytes                  # MLM backward memory traffic (a model, no GPU)

Needs a CUDA GPU (it refuses otherwise: interpreter timings would mean nothing); ``--cpu-smoke`` only
checks that the script works.

MLM head: forward + backward, including the replacement sampling, of the generator's output head at
the masked positions (15% of the tokens) over the 30,522-id vocabulary, bf16 weights and activations:

    ours       electra_kernels.mlm_head_loss on the gathered rows (loss, Gumbel-max samples, accuracy)
    hf-full    logits at every position as Hugging Face computes them (B·S rows), cross-entropy with
               -100 labels, Gumbel noise over the full logits (the reference baseline in RESULTS.md)
    torch      gather first, then F.linear + fp32 cross-entropy + an (M, V) Gumbel noise tensor
    liger      Liger-Kernel's fused linear cross-entropy on the gathered rows, when `liger_kernel`
               imports (loss only: it does not sample)

Sizes (rows x features; tokens for hf-full): small 2,457 x 128 (16,384), base 2,457 x 768 (16,384),
large 1,228 x 1,024 (8,192). Targets on an H100: base <= 1.25 ms and <= 0.15 GiB extra, small <= 0.8 ms
and <= 0.1 GiB.

Discriminator head at 16,384 tokens, hidden 256 and 768, forward + backward:

    ours-head   dense h->h, GELU (PyTorch), then electra_kernels.replaced_token_bce
    torch-head  dense h->h, GELU, dense h->1, masked BCE, all PyTorch eager
    ours-final / torch-final   only the last projection + masked BCE (the part the kernel replaces)

Target: ours-head at h768 <= 0.5 ms (torch eager 1.07 ms, RESULTS.md).

``--bytes`` prints, without a GPU, the bytes one MLM-head backward moves at M = 2k, 16k and 80k masked
rows (E 768, V 30,522, bf16), counted from the launchers' chunking (``mlm_head.backward_bytes``): the
dlogits chunks (written once, read by the dW and dH matmuls), H and W reads, and the fp32 dH
accumulator, before (256-column floor, a fresh (M, E) product per chunk added to the accumulator) and
after (2,048-column floor, addmm into the accumulator in place).

Times are triton.testing.do_bench medians (gradients reset between calls); "extra GiB" is the peak of
torch.cuda.max_memory_allocated during one call minus what was allocated before it (gradients
included). Each variant is also checked against the `torch` variant (loss and gradient differences are
printed) so that a fast wrong kernel cannot pass unnoticed. Rows go to <results>/heads.csv and
<results>/heads.jsonl (GPU name, versions, date, commit); the plot to <results>/heads.png.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

from _common import add_common_args, append_rows, machine_info, print_table, save_plot

MLM_SIZES = {  # name: (gathered rows, features, tokens in the batch)
    "small": (2457, 128, 16384),
    "base": (2457, 768, 16384),
    "large": (1228, 1024, 8192),
}
VOCAB = 30522
DISC_TOKENS = 16384
DISC_HIDDEN = {"small": 256, "base": 768}
DEVICE = "cuda"


def use_cpu_smoke_shapes():
    global VOCAB, DISC_TOKENS, DEVICE
    MLM_SIZES.update(small=(7, 16, 40), base=(9, 32, 50), large=(5, 48, 30))
    DISC_HIDDEN.update(small=16, base=48)
    VOCAB, DISC_TOKENS, DEVICE = 300, 50, "cpu"
TARGETS = {  # (head, size): (ms, GiB) on an H100, from the issue
    ("mlm", "small"): (0.8, 0.1),
    ("mlm", "base"): (1.25, 0.15),
    ("disc", "base"): (0.5, None),
}
CSV_FIELDS = ["date", "commit", "gpu", "torch", "triton", "liger_kernel", "head", "size", "rows", "features",
              "vocab", "variant", "median_ms", "peak_extra_gib", "ours_speedup", "max_abs_diff"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--heads", default="mlm,disc", help="comma list of mlm, disc")
    parser.add_argument("--sizes", default="small,base,large",
                        help="comma list of small, base, large (disc: small = h256, base = h768)")
    parser.add_argument("--skip", default="", help="comma list of variants not to run (e.g. hf-full)")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench measuring time per variant")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on the CPU under the Triton interpreter, nothing saved")
    parser.add_argument("--bytes", action="store_true",
                        help="print the MLM backward's memory traffic at M = 2k, 16k, 80k (no GPU needed) and exit")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.no_save = True
    args.heads = [h for h in args.heads.split(",") if h]
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.skip = set(s for s in args.skip.split(",") if s)
    for size in args.sizes:
        if size not in MLM_SIZES:
            parser.error(f"unknown size {size!r} (small, base, large)")
    for head in args.heads:
        if head not in ("mlm", "disc"):
            parser.error(f"unknown head {head!r} (mlm, disc)")
    return args


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
def measure(step, leaves, rep_ms):
    """(median ms, peak extra GiB) of step(); gradients of ``leaves`` are reset before every call."""
    import torch

    def reset():
        for t in leaves:
            t.grad = None

    reset()
    step()  # compile / autotune outside the measurement
    reset()
    if DEVICE == "cpu":  # --cpu-smoke: one timed call, no memory statistics
        start = time.perf_counter()
        step()
        reset()
        return (time.perf_counter() - start) * 1e3, float("nan")
    from triton.testing import do_bench

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    extra_gib = (torch.cuda.max_memory_allocated() - before) / 2**30
    reset()
    ms = do_bench(step, warmup=max(rep_ms // 4, 10), rep=rep_ms, grad_to_none=list(leaves),
                  return_mode="median")
    reset()
    return float(ms), float(extra_gib)


def max_diff(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def gumbel_like(rows, cols, device):
    import torch

    u = torch.rand(rows, cols, device=device).clamp_(1e-9, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


# ----------------------------------------------------------------------------------------------
# MLM head
# ----------------------------------------------------------------------------------------------
def mlm_rows(size, args):
    import torch
    import torch.nn.functional as F

    import electra_kernels as ek

    M, E, tokens = MLM_SIZES[size]
    device, dtype = DEVICE, torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(VOCAB, E, device=device, generator=gen) * 0.05).to(dtype).requires_grad_()
    bias = torch.zeros(VOCAB, device=device, dtype=dtype).requires_grad_()
    hidden = torch.randn(M, E, device=device, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, VOCAB, (M,), device=device, generator=gen)
    targets[-M // 50:] = ek.IGNORE_INDEX  # a fixed-size gather has a few unused slots
    leaves = [hidden, weight, bias]
    calls = {"n": 0}

    def ours():
        calls["n"] += 1
        loss, sampled, correct = ek.mlm_head_loss(hidden, weight, bias, targets, seed=calls["n"])
        loss.backward()
        return loss, sampled

    def torch_gathered():
        logits = F.linear(hidden, weight, bias)
        loss = F.cross_entropy(logits.float(), targets, ignore_index=ek.IGNORE_INDEX)
        with torch.no_grad():
            sampled = torch.argmax(logits.float() + gumbel_like(M, VOCAB, device), dim=-1)
        loss.backward()
        return loss, sampled

    variants = {"ours": (ours, leaves), "torch": (torch_gathered, leaves)}

    if "hf-full" not in args.skip:
        hidden_all = torch.randn(tokens, E, device=device, generator=gen).to(dtype).requires_grad_()
        positions = torch.randperm(tokens, device=device, generator=gen)[:M]
        labels_all = torch.full((tokens,), ek.IGNORE_INDEX, device=device, dtype=torch.long)
        labels_all[positions] = targets

        def hf_full():
            logits = F.linear(hidden_all, weight, bias)  # (B·S, V), as ElectraForMaskedLM returns
            loss = F.cross_entropy(logits.float(), labels_all, ignore_index=ek.IGNORE_INDEX)
            with torch.no_grad():
                full = logits.float()
                sampled = torch.argmax(full + gumbel_like(tokens, VOCAB, device), dim=-1)[positions]
            loss.backward()
            return loss, sampled

        variants["hf-full"] = (hf_full, [hidden_all, weight, bias])

    if "liger" not in args.skip:
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            if size == args.sizes[0]:
                print("note: liger_kernel does not import; no liger rows")
        else:
            liger_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=ek.IGNORE_INDEX)

            def liger():
                loss = liger_loss(weight, hidden, targets, bias)
                loss.backward()
                return loss, None

            variants["liger"] = (liger, leaves)

    # Correctness first: every variant's loss and gradients against the torch one (same inputs).
    grads = {}
    for name in ("torch", "ours") + tuple(v for v in ("liger",) if v in variants):
        for t in leaves:
            t.grad = None
        loss, _ = variants[name][0]()
        grads[name] = (loss.detach().float(), [t.grad.clone() for t in leaves])
    diffs = {name: max(abs(grads[name][0].item() - grads["torch"][0].item()),
                       max_diff(grads[name][1], grads["torch"][1])) for name in grads}

    rows = []
    for name, (step, step_leaves) in variants.items():
        if name in args.skip:
            continue
        ms, gib = measure(step, step_leaves, args.rep_ms)
        rows.append(dict(head="mlm", size=size, rows=tokens if name == "hf-full" else M, features=E,
                         vocab=VOCAB, variant=name, median_ms=ms, peak_extra_gib=gib,
                         max_abs_diff=diffs.get(name)))
    return rows


# ----------------------------------------------------------------------------------------------
# Discriminator head
# ----------------------------------------------------------------------------------------------
def disc_rows(size, args):
    import torch
    import torch.nn.functional as F

    import electra_kernels as ek

    H, N = DISC_HIDDEN[size], DISC_TOKENS
    device, dtype = DEVICE, torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)

    def param(*shape, scale):
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype).requires_grad_()

    x = param(N, H, scale=1.0)                       # the encoder's last hidden states
    dense_w, dense_b = param(H, H, scale=H**-0.5), param(H, scale=0.02)
    proj_w, proj_b = param(1, H, scale=H**-0.5), param(1, scale=0.02)
    features = param(N, H, scale=1.0)                # the head's GELU output, for the *-final rows
    labels = (torch.rand(N, device=device, generator=gen) < 0.15).long()
    mask = torch.rand(N, device=device, generator=gen) < 0.9

    def masked_bce(logits):
        per_token = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
        mask_f = mask.float()
        return (per_token * mask_f).sum() / mask_f.sum().clamp(min=1.0)

    def torch_head():
        h = F.gelu(F.linear(x, dense_w, dense_b))
        loss = masked_bce(F.linear(h, proj_w, proj_b).squeeze(-1))
        loss.backward()
        return loss

    def ours_head():
        h = F.gelu(F.linear(x, dense_w, dense_b))
        loss, _ = ek.replaced_token_bce(h, proj_w, proj_b, labels, mask)
        loss.backward()
        return loss

    def torch_final():
        loss = masked_bce(F.linear(features, proj_w, proj_b).squeeze(-1))
        loss.backward()
        return loss

    def ours_final():
        loss, _ = ek.replaced_token_bce(features, proj_w, proj_b, labels, mask)
        loss.backward()
        return loss

    head_leaves = [x, dense_w, dense_b, proj_w, proj_b]
    final_leaves = [features, proj_w, proj_b]
    variants = {"ours-head": (ours_head, head_leaves), "torch-head": (torch_head, head_leaves),
                "ours-final": (ours_final, final_leaves), "torch-final": (torch_final, final_leaves)}

    diffs = {}
    for ours_name, torch_name, leaves in (("ours-head", "torch-head", head_leaves),
                                          ("ours-final", "torch-final", final_leaves)):
        results = {}
        for name in (torch_name, ours_name):
            for t in leaves:
                t.grad = None
            loss = variants[name][0]()
            results[name] = (loss.detach(), [t.grad.clone() for t in leaves])
        diffs[ours_name] = max(abs(results[ours_name][0].item() - results[torch_name][0].item()),
                               max_diff(results[ours_name][1], results[torch_name][1]))
        diffs[torch_name] = 0.0

    rows = []
    for name, (step, leaves) in variants.items():
        if name in args.skip:
            continue
        ms, gib = measure(step, leaves, args.rep_ms)
        rows.append(dict(head="disc", size=size, rows=N, features=H, vocab=None, variant=name, median_ms=ms,
                         peak_extra_gib=gib, max_abs_diff=diffs.get(name)))
    return rows


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
def add_ratios(rows):
    """ours_speedup = variant time / ours time, per (head, size); the disc *-final rows compare with
    ours-final, the *-head rows with ours-head."""
    for row in rows:
        if row["head"] == "mlm":
            ours_name = "ours"
        else:
            ours_name = "ours-final" if row["variant"].endswith("final") else "ours-head"
        ours = next((r for r in rows if r["head"] == row["head"] and r["size"] == row["size"]
                     and r["variant"] == ours_name), None)
        row["ours_speedup"] = row["median_ms"] / ours["median_ms"] if ours else None


def print_report(rows):
    table = []
    for r in rows:
        target = None
        if DEVICE == "cuda" and r["variant"] in ("ours", "ours-head"):
            target = TARGETS.get((r["head"], r["size"]))
        verdict = "-"
        if target is not None:
            ok = r["median_ms"] <= target[0] and (target[1] is None or r["peak_extra_gib"] <= target[1])
            verdict = ("met" if ok else "MISSED") + f" (<= {target[0]} ms" + (
                f", {target[1]} GiB)" if target[1] is not None else ")")
        table.append([r["head"], r["size"], f"{r['rows']} x {r['features']}", r["variant"], r["median_ms"],
                      r["peak_extra_gib"], r["ours_speedup"], r["max_abs_diff"], verdict])
    print_table(["head", "size", "rows x features", "variant", "median ms", "extra GiB", "time / ours",
                 "max |diff| vs torch", "H100 target"], table, title="Fused heads, forward + backward (bf16)")


def write_csv(args, rows):
    if args.no_save or not rows:
        return None
    path = Path(args.results_dir) / "heads.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    info = machine_info(optional_modules=("liger_kernel",))
    new_file = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({**{k: info.get(k) for k in ("date", "commit", "gpu", "torch", "triton",
                                                         "liger_kernel")}, **row})
    print(f"rows: {path}")
    return path


def draw(rows):
    def plot(plt):
        fig = plt.gcf()
        fig.set_size_inches(12, 5)
        for i, head in enumerate(("mlm", "disc")):
            ax = fig.add_subplot(1, 2, i + 1)
            head_rows = [r for r in rows if r["head"] == head]
            sizes = list(dict.fromkeys(r["size"] for r in head_rows))
            variants = list(dict.fromkeys(r["variant"] for r in head_rows))
            width = 0.8 / max(len(variants), 1)
            for j, variant in enumerate(variants):
                xs, ys = [], []
                for k, size in enumerate(sizes):
                    r = next((r for r in head_rows if r["size"] == size and r["variant"] == variant), None)
                    if r is not None:
                        xs.append(k + j * width)
                        ys.append(r["median_ms"])
                ax.bar(xs, ys, width=width, label=variant)
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(sizes))])
            ax.set_xticklabels(sizes if head == "mlm" else [f"h{DISC_HIDDEN[s]}" for s in sizes])
            ax.set_yscale("log")
            ax.set_ylabel("ms per forward + backward (log)")
            ax.set_title(f"MLM head, V={VOCAB}" if head == "mlm" else f"Discriminator head, {DISC_TOKENS} tokens")
            ax.legend(fontsize=8)

    return plot


BYTES_ROWS = (2048, 16384, 80000)


def print_backward_bytes(embedding: int = 768) -> list:
    """The MLM backward's bytes moved per call, before and after the in-place accumulation (a model)."""
    from electra_kernels import mlm_head

    table, rows = [], []
    for m in BYTES_ROWS:
        before = mlm_head.backward_bytes(m, VOCAB, embedding, in_place=False, min_chunk_cols=256)
        after = mlm_head.backward_bytes(m, VOCAB, embedding)
        rows.append(dict(M=m, before=before, after=after))
        table.append([f"{m:,}", f"{before['chunks']} x {before['chunk_cols']}", f"{before['accumulator'] / 1e9:.2f}",
                      f"{before['total'] / 1e9:.2f}", f"{after['chunks']} x {after['chunk_cols']}",
                      f"{after['accumulator'] / 1e9:.2f}", f"{after['total'] / 1e9:.2f}"])
    print_table(["M (masked rows)", "before: chunks x cols", "dH acc GB", "total GB", "after: chunks x cols",
                 "dH acc GB", "total GB"], table,
                title=f"MLM head backward, bytes moved per call (E {embedding}, V {VOCAB:,}, bf16; a model)")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.bytes:
        print_backward_bytes()
        return 0
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        use_cpu_smoke_shapes()
    import torch

    if not args.cpu_smoke:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/heads.py needs a CUDA GPU: no GPU is visible here (the Triton interpreter's "
                     "CPU timings would say nothing about the kernels)")
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            sys.exit("benchmarks/heads.py: unset TRITON_INTERPRET; the interpreter would be timed, "
                     "not the kernels")

    info = machine_info(optional_modules=("liger_kernel",))
    print(f"{info['gpu'] or 'cpu (smoke run)'} | torch {info['torch']} | triton {info['triton']} | "
          f"liger_kernel {info.get('liger_kernel') or '-'} | commit {info['commit']}\n", flush=True)
    rows = []
    for size in args.sizes:
        if "mlm" in args.heads:
            rows += mlm_rows(size, args)
        if "disc" in args.heads and size in DISC_HIDDEN:
            rows += disc_rows(size, args)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    add_ratios(rows)
    print_report(rows)
    write_csv(args, rows)
    append_rows(args, "heads", rows)
    save_plot(args, "heads", draw(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
