"""How fast is a Hugging Face BERT training step before and after ``electra_kernels.patch_hf``?

    python benchmarks/hf_bert.py                          # bert-base shape, 32 x 512, bf16 autocast
    python benchmarks/hf_bert.py --batch 64 --seq 128 --steps 30
    python benchmarks/hf_bert.py --hf-attn eager          # compare against HF's eager attention instead of SDPA
    python benchmarks/hf_bert.py --cpu-smoke              # tiny config on the CPU: the script runs (tests use it)
    python benchmarks/hf_bert.py --model modernbert --batch 16 --seq 1024   # ModernBertForMaskedLM (base shape)

One process builds a randomly initialised ``BertForMaskedLM`` from a bert-base config (no download), copies
it, patches the copy, and times full training steps (forward + MLM loss + backward + AdamW) of both on the
same batches: a padded batch whose sequence lengths are drawn between ``(1 - pad_fraction)·seq`` and
``seq``, 15% of real tokens as MLM targets, dropout on. Steps are timed with CUDA events after warm-up;
the table gives medians, tokens/s (real tokens), peak memory and the speed-up over the unpatched model.
One row per variant goes to ``<results dir>/hf_bert.csv`` and ``hf_bert.jsonl`` (GPU name, versions,
date, commit; see benchmarks/README.md), and a bar chart to ``hf_bert.png``. The defaults fit the 40 s
that ``run_gpu.sh`` gives this script (bert-base, 3 + 10 steps per variant).

``--model modernbert``: the same comparison for ``ModernBertForMaskedLM`` at the ModernBERT-base shape
(22 layers, hidden 768, GeGLU 1152, sliding window 128 every layer but each third, rotary, no biases);
the patched model runs windowed/global attention, rotary, GeGLU and bias-free LayerNorm on
electra_kernels, on the real tokens only (``patch_hf`` unpads the encoder). Variants are named
``hf-modernbert`` / ``patched-modernbert`` / ``patched-modernbert-padded``. Target (issue 21, H100, bf16,
padded batches of mixed lengths): patched >= 1.3x the SDPA baseline.

Both models get a ``patched-*-padded`` row too: ``patch_hf(unpad=False)``, the same kernels with the
padding kept in every layer, so the table shows what running on the real tokens only adds.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import add_common_args, append_rows, machine_info, print_table, save_plot

CSV_FIELDS = ["date", "commit", "gpu", "torch", "triton", "transformers", "variant", "hf_attention", "batch",
              "seq", "real_tokens", "dtype", "steps", "median_ms", "p20_ms", "p80_ms", "tokens_per_s",
              "peak_mem_gib", "speedup_vs_hf", "first_loss"]
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)
MODERNBERT_BASE = dict(vocab_size=50368, hidden_size=768, num_hidden_layers=22, num_attention_heads=12,
                       intermediate_size=1152, max_position_embeddings=8192, local_attention=128,
                       global_attn_every_n_layers=3)
TINY_MODERNBERT = dict(vocab_size=99, hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                       max_position_embeddings=32, local_attention=8, global_attn_every_n_layers=2, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
# The smoke config also turns dropout off: Triton's interpreter spends most of a CPU step drawing it.
TINY = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (Triton autotuning, caches)")
    parser.add_argument("--pad-fraction", type=float, default=0.25,
                        help="sequence lengths are drawn uniformly in [(1 - f)·seq, seq]")
    parser.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="baseline attention")
    parser.add_argument("--model", default="bert", choices=["bert", "modernbert"],
                        help="BertForMaskedLM (bert-base) or ModernBertForMaskedLM (ModernBERT-base)")
    parser.add_argument("--csv", type=Path, default=None, help="CSV file (default <results dir>/hf_bert.csv)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-padded-row", action="store_true",
                        help="skip the patched-*-padded variant (patch_hf(unpad=False)); saves a third of the run")
    add_common_args(parser)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny config, one step per variant on the CPU, fp32: checks that the script works")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.batch, args.seq, args.steps, args.warmup = 2, 16, 1, 0
    if not 0.0 <= args.pad_fraction < 1.0:
        parser.error("--pad-fraction must be in [0, 1)")
    return args


def make_batches(n, batch, seq, vocab, pad_fraction, device, generator):
    """n padded MLM batches (input_ids, attention_mask, labels) with random lengths."""
    batches = []
    shortest = max(1, int(round(seq * (1.0 - pad_fraction))))
    for _ in range(n):
        lengths = torch.randint(shortest, seq + 1, (batch,), generator=generator)
        attention_mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        input_ids = torch.randint(5, vocab, (batch, seq), generator=generator) * attention_mask
        is_target = (torch.rand(batch, seq, generator=generator) < 0.15) & attention_mask.bool()
        is_target[:, 0] = True  # at least one target per sequence
        labels = torch.where(is_target, input_ids, torch.full_like(input_ids, -100))
        batches.append({k: v.to(device) for k, v in
                        dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels).items()})
    return batches


def time_training(model, batches, warmup, device, autocast_dtype):
    """Per-step milliseconds (timed steps only), peak memory in GiB, and the first step's loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    model.train()
    times_ms, first_loss = [], None

    def step(batch):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)  # peak = this model, its optimizer state, its steps
    for i, batch in enumerate(batches):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step(batch)
            end.record()
            if i >= warmup:
                times_ms.append((start, end))
        else:
            t0 = time.perf_counter()
            loss = step(batch)
            if i >= warmup:
                times_ms.append((time.perf_counter() - t0) * 1e3)
        if first_loss is None:
            first_loss = float(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
        times_ms = [s.elapsed_time(e) for s, e in times_ms]
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = float("nan")
    return times_ms, peak, first_loss


def _quantile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv=None):
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("hf_bert.py measures GPU training steps and needs CUDA; use --cpu-smoke to check the "
                         "script on a CPU")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    import electra_kernels

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    autocast_dtype = None if args.cpu_smoke else torch.bfloat16
    modern = args.model == "modernbert"
    if modern:
        shape = TINY_MODERNBERT if args.cpu_smoke else MODERNBERT_BASE
    else:
        shape = TINY if args.cpu_smoke else BERT_BASE
    if args.seq > shape["max_position_embeddings"]:
        raise SystemExit(f"--seq {args.seq} exceeds max_position_embeddings {shape['max_position_embeddings']}")
    torch.manual_seed(args.seed)
    config_class, model_class = ((transformers.ModernBertConfig, transformers.ModernBertForMaskedLM) if modern
                                 else (transformers.BertConfig, transformers.BertForMaskedLM))
    config = config_class(**shape, attn_implementation=args.hf_attn)
    # Both models wait on the CPU and visit the device one at a time, so each peak is its own.
    reference = model_class(config)
    patched, replaced = electra_kernels.patch_hf(copy.deepcopy(reference))
    suffix = "-modernbert" if modern else ""
    # patched-*-padded: the same kernels in the padded layout, to show what running on real tokens adds.
    variants = [(f"hf{suffix}", reference), (f"patched{suffix}", patched)]
    if not args.no_padded_row:
        variants.append((f"patched{suffix}-padded", electra_kernels.patch_hf(copy.deepcopy(reference), unpad=False)[0]))
    generator = torch.Generator().manual_seed(args.seed)
    batches = make_batches(args.warmup + args.steps, args.batch, args.seq, shape["vocab_size"], args.pad_fraction,
                           device, generator)
    real_tokens = int(sum(int(b["attention_mask"].sum()) for b in batches[args.warmup:]) / max(args.steps, 1))

    results = {}
    for variant, model in variants:
        model.to(device)
        times, peak, first_loss = time_training(model, batches, args.warmup, device, autocast_dtype)
        results[variant] = dict(median_ms=statistics.median(times), p20_ms=_quantile(times, 0.2),
                                p80_ms=_quantile(times, 0.8), peak_mem_gib=peak, first_loss=first_loss)
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    machine = machine_info()
    device_name = machine.get("gpu") or "cpu (smoke)"
    rows = []
    for variant, r in results.items():
        rows.append(dict(
            date=machine["date"], commit=machine["commit"], gpu=device_name, torch=machine["torch"],
            triton=machine["triton"], transformers=machine["transformers"], variant=variant,
            hf_attention=args.hf_attn, batch=args.batch, seq=args.seq, real_tokens=real_tokens,
            dtype="bf16-autocast" if autocast_dtype else "fp32", steps=args.steps,
            median_ms=round(r["median_ms"], 3), p20_ms=round(r["p20_ms"], 3), p80_ms=round(r["p80_ms"], 3),
            tokens_per_s=round(real_tokens / (r["median_ms"] / 1e3)), peak_mem_gib=round(r["peak_mem_gib"], 3),
            speedup_vs_hf=round(results[f"hf{suffix}"]["median_ms"] / r["median_ms"], 3),
            first_loss=round(r["first_loss"], 4),
        ))
    write_csv(args, rows)
    append_rows(args, "hf_bert", rows)
    save_plot(args, "hf_bert", lambda plt: _draw(plt, rows))

    print(f"{type(reference).__name__} {shape['hidden_size']}h x {shape['num_hidden_layers']}L, batch {args.batch} x seq "
          f"{args.seq} ({real_tokens} real tokens/step), {rows[0]['dtype']}, {device_name}; "
          f"{len(replaced)} modules patched by electra_kernels.patch_hf")
    print_table(["variant", "median ms", "p20 ms", "p80 ms", "tokens/s", "peak GiB", "speed-up", "loss @ step 1"],
                [[r["variant"], r["median_ms"], r["p20_ms"], r["p80_ms"], r["tokens_per_s"], r["peak_mem_gib"],
                  r["speedup_vs_hf"], r["first_loss"]] for r in rows],
                title=f"HF {type(reference).__name__} training step, {args.hf_attn} baseline vs patch_hf")
    return rows


def write_csv(args, rows):
    if args.no_save:
        return None
    path = args.csv or Path(args.results_dir) / "hf_bert.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    return path


def _draw(plt, rows):
    names = [r["variant"] for r in rows]
    plt.bar(names, [r["median_ms"] for r in rows], color=["tab:gray", "tab:blue", "tab:cyan"][: len(rows)])
    for i, r in enumerate(rows):
        plt.text(i, r["median_ms"], f"{r['median_ms']:.1f} ms ({r['speedup_vs_hf']:.2f}x)", ha="center", va="bottom")
    plt.ylabel("training step, median ms")
    plt.title(f"HF {rows[-1]['variant']} {rows[0]['batch']}x{rows[0]['seq']} on {rows[0]['gpu']}")


if __name__ == "__main__":
    main(sys.argv[1:])
