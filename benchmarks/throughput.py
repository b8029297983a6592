"""How fast is this trainer on my GPU compared with what I would otherwise use?  One training step.

    python benchmarks/throughput.py                                  # small, base, large; every variant
    python benchmarks/throughput.py --sizes small --variants ours-triton,hf-compile
    python benchmarks/throughput.py --random-lengths                 # padded batches, lengths in [S/2, S]
    python benchmarks/throughput.py --sync-check                     # + one step under sync debug mode "error"
    python benchmarks/throughput.py --cpu-smoke                      # tiny model on the CPU, a few steps
    python benchmarks/throughput.py --count-ops                      # device ops per step, counted on the CPU

One full optimizer step (forward, backward, AdamW) on synthetic token batches, per variant:

  ours-torch      ElectraPretrainingModel, PyTorch reference path (SDPA attention, gathered MLM head),
                  fused torch AdamW, autocast bf16
  ours-triton     the same with the Triton kernels (unpadded varlen attention, fused heads, fused
                  LayerNorm/GELU, fused QKV, generator last layer at the masked rows only); every "ours"
                  variant gets the packed sizes from the host, as the loader provides them (no sync)
  ours-fast       every fast path on: ours-triton + torch.compile of the encoders (train.compile=default)
  ours-graphs     ours-fast on the padded layout with CUDA graphs (train.cuda_graphs=true, unpad=false)
  ours-packed-graphs  ours-fast on the packed layout with CUDA graphs (train.cuda_graphs=true, unpad=true):
                  the real tokens rounded up to a token bucket (electra_fast.buckets)
  ours-deepspeed  ours-triton under a DeepSpeed engine (bf16, ZeRO-2, torch AdamW); needs deepspeed
                  (under --cpu-smoke: DeepSpeed's CPU accelerator, fp32, to check the script only)
  hf-eager        Hugging Face ElectraForMaskedLM generator + ElectraForPreTraining discriminator sharing
                  embeddings, 15% masking, Gumbel-max sampling from the generator's full logits,
                  loss = MLM + 50 BCE, fused torch AdamW, autocast bf16, SDPA attention (the reference step in benchmarks/RESULTS.md)
  hf-compile      hf-eager with torch.compile on both networks
  hf-bert-mlm[-compile]  BERT-MLM: ElectraForMaskedLM at the discriminator's size, 80/10/10 masking
  hf-modernbert[-compile]  the modern sizes' peer (model.architecture=modern): transformers'
                  ModernBertForMaskedLM generator + one-label ModernBertForTokenClassification discriminator
                  sharing the token embeddings, the same objective as hf-eager, SDPA attention

at small (batch 128 x seq 128), base (32 x 512) and large (16 x 512); the modern sizes (--sizes
modern-base, ...) at sequence 1,024 (modern-small 64, modern-base 32, modern-large 16 sequences), where the
ratios are against hf-modernbert (the ELECTRA hf-* rows do not apply to them and are skipped).
Timing: CUDA events around each
step after the warm-up steps (which include compilation), the median over the timed steps.
Model TFLOP/s counts the algorithm's FLOPs (electra_fast.flops, "modern" convention: matmuls,
backward = 2 x forward, MLM head at the masked positions only) for every ELECTRA variant alike, so
a variant that computes more (HF's full-vocabulary logits) gets no credit for it. MFU = that over
the GPU's dense bf16 peak. Ratios are against hf-compile at the same size.

Off the GPU every "ours" variant runs the PyTorch reference path (the Triton kernels need CUDA), so a
--cpu-smoke run checks the script, not the speed; its plot says so.
``--sync-check`` (CUDA) runs one more step of each non-DeepSpeed "ours" variant under
``torch.cuda.set_sync_debug_mode("error")`` and records whether it synchronised (column "sync-free").
``--count-ops`` times nothing: it counts the operations one training micro-step of the kernel path sends
to the device, eager and compiled, at each size, on the CPU with fake tensors (benchmarks/_op_count.py),
against the host time per launch the throughput target leaves.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_common_args,
    append_rows,
    build_hf_bert_mlm,
    build_hf_electra,
    build_hf_modernbert,
    device_peak_tflops,
    hf_bert_mlm_loss,
    hf_electra_loss,
    hf_modernbert_loss,
    median,
    print_table,
    save_plot,
    synthetic_batch,
    time_step,
)

import torch  # noqa: E402

from electra_fast.config import build_config  # noqa: E402
from electra_fast.flops import bert_mlm_flops, electra_flops  # noqa: E402

SHAPES = {"small": (128, 128), "base": (32, 512), "large": (16, 512), "tiny": (4, 32),
          # model.architecture=modern: ModernBERT's pretraining length
          "modern-small": (64, 1024), "modern-base": (32, 1024), "modern-large": (16, 1024), "modern-tiny": (4, 64)}
# What each "ours" variant turns on: hot-spot implementation, train.compile, CUDA graphs, unpadding.
OURS = {
    "ours-torch": dict(impl="torch", compile="none", cuda_graphs=False, unpad=True),
    "ours-triton": dict(impl="triton", compile="none", cuda_graphs=False, unpad=True),
    "ours-fast": dict(impl="triton", compile="default", cuda_graphs=False, unpad=True),
    "ours-graphs": dict(impl="triton", compile="default", cuda_graphs=True, unpad=False),
    "ours-packed-graphs": dict(impl="triton", compile="default", cuda_graphs=True, unpad=True),
    "ours-deepspeed": dict(impl="triton", compile="none", cuda_graphs=False, unpad=True),
}
VARIANTS = (*OURS, "hf-eager", "hf-compile", "hf-bert-mlm", "hf-bert-mlm-compile", "hf-modernbert",
            "hf-modernbert-compile")
DEFAULT_VARIANTS = ("ours-torch", "ours-triton", "ours-fast", "ours-graphs", "ours-packed-graphs", "ours-deepspeed",
                    "hf-eager", "hf-compile", "hf-bert-mlm-compile", "hf-modernbert")
BASELINE = "hf-compile"
MODERN_BASELINE = "hf-modernbert"  # the modern sizes' peer row


def baseline_of(size: str) -> str:
    return MODERN_BASELINE if size.startswith("modern") else BASELINE


class Skip(Exception):
    """A variant that cannot run here (missing package, no GPU); the message says why."""


def _config(size: str, seq_len: int, impl: str, dropout: float | None, unpad: bool = True):
    overrides = [f"data.seq_len={seq_len}", f"model.attention_impl={impl}", f"model.mlm_head_impl={impl}",
                 f"model.disc_head_impl={impl}", f"model.elementwise_impl={impl}", f"model.unpad={str(unpad).lower()}"]
    if dropout is not None:
        overrides += [f"model.dropout={dropout}", f"model.attention_dropout={dropout}"]
    return build_config(size, overrides=overrides)


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def _adamw(params, device: torch.device, lr: float):
    # fused=True is torch's single-kernel AdamW on CUDA (what a performance-minded user picks).
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=device.type == "cuda")


def make_step(variant: str, size: str, batch_inputs, args, device: torch.device):
    """Build the variant's model and optimizer; return (step function, FLOPs config, notes)."""
    seq_len = batch_inputs[0].shape[1]
    bf16 = device.type == "cuda" and not args.fp32
    if variant in OURS:
        from electra_fast.compile import compile_for_training
        from electra_fast.model import ElectraPretrainingModel

        spec = OURS[variant]
        # The kernels need CUDA: off the GPU every "ours" variant is the reference path (a script check).
        impl = spec["impl"] if device.type == "cuda" else "torch"
        cfg = _config(size, seq_len, impl, args.dropout, spec["unpad"])
        model = ElectraPretrainingModel(cfg).to(device).train()
        if variant == "ours-deepspeed":
            return _deepspeed_step(model, cfg, batch_inputs, args, device)
        compile_for_training(model, spec["compile"], spec["cuda_graphs"] and device.type == "cuda",
                             backend=args.compile_backend)
        optimizer = _adamw(model.parameters(), device, cfg.train.lr)
        sizes = args.host_sizes  # computed on the host, as the loader does: no sync in the step

        def step():
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, bf16):
                loss = model(*batch_inputs, **sizes).loss
            loss.backward()
            optimizer.step()
            return loss

        notes = [f"impl={impl}"] + ([f"compile={spec['compile']}"] if spec["compile"] != "none" else [])
        notes += ["cuda_graphs"] if spec["cuda_graphs"] and device.type == "cuda" else []
        return step, cfg, " ".join(notes)

    cfg = _config(size, seq_len, "torch", args.dropout)
    compiled = variant.endswith("-compile")
    modern = cfg.model.architecture == "modern"
    if modern != variant.startswith("hf-modernbert"):
        raise Skip("a peer of the other architecture (hf-modernbert is the modern sizes' peer, the other hf-* "
                   "rows ELECTRA's)")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise Skip("transformers is not installed") from None
    if variant.startswith("hf-bert-mlm"):
        model = build_hf_bert_mlm(cfg.model, device).train()
        params = list(model.parameters())
        net = torch.compile(model, backend=args.compile_backend) if compiled else model

        def loss_fn():
            return hf_bert_mlm_loss(net, cfg.model, *batch_inputs)
    else:  # a generator + discriminator pair: transformers' ModernBERT at the modern sizes, ELECTRA otherwise
        build, pair_loss = (build_hf_modernbert, hf_modernbert_loss) if modern else (build_hf_electra, hf_electra_loss)
        generator, discriminator = build(cfg.model, device)
        generator.train(), discriminator.train()
        params = list({id(p): p for m in (generator, discriminator) for p in m.parameters()}.values())
        gen = torch.compile(generator, backend=args.compile_backend) if compiled else generator
        disc = torch.compile(discriminator, backend=args.compile_backend) if compiled else discriminator

        def loss_fn():
            return pair_loss(gen, disc, cfg.model, *batch_inputs, mask_prob=0.15, disc_weight=cfg.objective.disc_weight)
    optimizer = _adamw(params, device, cfg.train.lr)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, bf16):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss

    return step, cfg, f"torch.compile({args.compile_backend})" if compiled else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_step(model, cfg, batch_inputs, args, device):
    cuda = device.type == "cuda"
    if not cuda and not args.cpu_smoke:
        raise Skip("the DeepSpeed engine variant needs a CUDA device (or --cpu-smoke to check the script)")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # DeepSpeed's op builder chokes on "9.0a"
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except ImportError:
        raise Skip("deepspeed is not installed (on a GPU machine without a registry, carry its wheels in: see benchmarks/README.md)") from None
    if get_accelerator().device_name() != device.type:
        raise Skip(f"DeepSpeed's accelerator is {get_accelerator().device_name()!r}, not {device.type!r}")
    # A single-process "world": DeepSpeed still wants torch.distributed initialised.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
    ds_config = {
        "train_micro_batch_size_per_gpu": batch_inputs[0].shape[0],
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": cuda and not args.fp32},
        "zero_optimization": {"stage": args.zero_stage, "overlap_comm": True, "contiguous_gradients": True},
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.01, fused=cuda)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    def step():
        loss = engine(*batch_inputs, **args.host_sizes).loss
        engine.backward(loss)
        engine.step()
        return loss

    return step, cfg, f"DeepSpeed {deepspeed.__version__} ZeRO-{args.zero_stage} {'bf16' if cuda else 'fp32'}"


def run_variant(variant, size, batch_inputs, lengths, args, device, peak_tflops):
    step, cfg, note = make_step(variant, size, batch_inputs, args, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    last = {}

    def timed_step():
        last["loss"] = step()

    times = time_step(timed_step, warmup=args.warmup, iters=args.iters, device=device)
    sync_free = _sync_check(timed_step, variant, device) if args.sync_check else None
    loss = float(last["loss"].detach().float())
    if loss != loss:
        raise RuntimeError(f"{variant} at {size}: the loss is NaN")
    seconds = median(times)
    batch, seq_len = batch_inputs[0].shape
    flops_fn = bert_mlm_flops if "bert-mlm" in variant else electra_flops
    # The algorithm's FLOPs over the real tokens (padded rows are not useful work).
    flops = flops_fn(cfg, seq_len=seq_len, batch=batch, lengths=lengths).training_per_step
    tflops = flops / seconds / 1e12
    row = {
        "size": size, "variant": variant, "batch": batch, "seq_len": seq_len, "random_lengths": args.random_lengths,
        "real_tokens": int(sum(lengths)), "step_ms": seconds * 1e3, "step_ms_min": min(times) * 1e3,
        "seq_per_s": batch / seconds, "tokens_per_s": sum(lengths) / seconds, "model_tflops": tflops,
        "mfu": (tflops / peak_tflops) if peak_tflops else None,
        "peak_mem_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
        "flops_per_step": flops, "loss": loss, "dtype": "fp32" if (args.fp32 or device.type != "cuda") else "bf16",
        "warmup": args.warmup, "iters": args.iters, "note": note, "sync_free": sync_free,
    }
    return row


def _sync_check(step, variant: str, device: torch.device) -> bool | None:
    """One more step under ``torch.cuda.set_sync_debug_mode("error")``: True when nothing in it
    synchronised with the host. None where it does not apply (CPU; baselines; DeepSpeed's engine, whose
    overflow checks and logging synchronise by design)."""
    if device.type != "cuda" or variant not in OURS or variant == "ours-deepspeed":
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return True
    except RuntimeError as exc:
        print(f"  {variant}: the step synchronised: {str(exc).splitlines()[0]}", flush=True)
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def _cleanup(device):
    # Compiled graphs keep their modules (and so their weights and optimizer state) alive.
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _count_ops(args, parser) -> int:
    from _op_count import count_ops_rows, print_count_ops

    sizes = [s.strip() for s in (args.sizes or "small,base,large").split(",") if s.strip()]
    if any(s not in SHAPES for s in sizes):
        parser.error(f"unknown size in {sizes}; choose from {', '.join(SHAPES)}")
    shapes = {s: (args.batch or SHAPES[s][0], args.seq_len or SHAPES[s][1]) for s in sizes}
    rows = count_ops_rows(sizes, shapes, lambda size, seq_len: _config(size, seq_len, "triton", args.dropout))
    print_count_ops(rows)
    path = append_rows(args, "op_count", rows)
    if path:
        print(f"rows: {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes", default=None, help="comma-separated: small,base,large (default), or tiny")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--batch", type=int, default=None, help="override every size's batch")
    parser.add_argument("--seq-len", type=int, default=None, help="override every size's sequence length")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--iters", type=int, default=10, help="timed steps; the median is reported")
    parser.add_argument("--random-lengths", action="store_true", help="real lengths uniform in [S/2, S], padded")
    parser.add_argument("--dropout", type=float, default=None, help="override hidden and attention dropout")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(1, 2), help="ZeRO stage of ours-deepspeed")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the -compile variants")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on the GPU")
    parser.add_argument("--sync-check", action="store_true",
                        help='one extra step per "ours" variant under torch.cuda.set_sync_debug_mode("error")')
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny size on the CPU, 1 warm-up + 2 timed steps, compile with the eager backend")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--count-ops", action="store_true",
                        help="count the device operations of one micro-step per size (CPU, fake tensors) and exit")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.count_ops:
        return _count_ops(args, parser)

    if args.cpu_smoke:
        args.device = "cpu"
        args.sizes = args.sizes or "tiny"
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 2)
        if args.compile_backend == "inductor":  # no C++ toolchain needed, and seconds instead of minutes
            args.compile_backend = "eager"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    sizes = [s.strip() for s in (args.sizes or "small,base,large").split(",") if s.strip()]
    for s in sizes:
        if s not in SHAPES:
            parser.error(f"unknown size {s!r}; choose from {', '.join(SHAPES)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = device_peak_tflops(device)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          f"  (dense bf16 peak: {f'{peak:g} TFLOP/s' if peak else 'unknown, no MFU'})", flush=True)

    rows, skipped = [], []
    for size in sizes:
        batch, seq_len = SHAPES[size]
        batch, seq_len = args.batch or batch, args.seq_len or seq_len
        model_cfg = build_config(size).model
        inputs = synthetic_batch(model_cfg, batch, seq_len, device=device, random_lengths=args.random_lengths,
                                 seed=1234)
        lengths = inputs[1].sum(dim=1).tolist()
        args.host_sizes = {"max_seqlen": int(max(lengths)), "total_tokens": int(sum(lengths))}
        for variant in variants:
            try:
                row = run_variant(variant, size, inputs, lengths, args, device, peak)
            except Skip as why:
                skipped.append((size, variant, str(why)))
                print(f"skip {variant} at {size}: {why}", flush=True)
                continue
            except Exception as exc:  # one failing variant must not lose the others' numbers
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    why = "out of memory"
                else:
                    why = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                skipped.append((size, variant, f"failed: {why}"))
                print(f"FAILED {variant} at {size}: {why}", flush=True)
                continue
            finally:
                _cleanup(device)
            rows.append(row)
            print(f"  {size:6s} {variant:20s} {row['step_ms']:9.2f} ms  {row['seq_per_s']:9.1f} seq/s", flush=True)

    for row in rows:
        base = next((r for r in rows if r["size"] == row["size"] and r["variant"] == baseline_of(r["size"])), None)
        row["baseline"] = baseline_of(row["size"])
        row["vs_hf_compile"] = (row["seq_per_s"] / base["seq_per_s"]) if base else None
    print()
    print_table(["size", "B x S", "variant", "step ms", "seq/s", "tokens/s", "model TFLOP/s", "MFU",
                 "peak GiB", f"x {BASELINE}" if not any(r["size"].startswith("modern") for r in rows)
                 else f"x baseline ({BASELINE} / {MODERN_BASELINE})", "sync-free"],
                [[r["size"], f"{r['batch']}x{r['seq_len']}", r["variant"], r["step_ms"], r["seq_per_s"],
                  r["tokens_per_s"], r["model_tflops"], f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-",
                  r["peak_mem_gib"], f"{r['vs_hf_compile']:.2f}" if r["vs_hf_compile"] else "-",
                  r["sync_free"]] for r in rows],
                "Training step throughput (median of timed steps, warm-up excluded)"
                + (" - CPU smoke run of the PyTorch reference path, not a speed measurement" if args.cpu_smoke else ""))
    for size, variant, why in skipped:
        print(f"note: {variant} at {size} not measured: {why}")
    path = append_rows(args, "throughput", rows)
    if path:
        print(f"rows: {path}")

    def draw(plt):
        sizes_seen = [s for s in sizes if any(r["size"] == s for r in rows)]
        names = [v for v in variants if any(r["variant"] == v for r in rows)]
        width = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            xs, ys = [], []
            for i, s in enumerate(sizes_seen):
                r = next((r for r in rows if r["size"] == s and r["variant"] == name), None)
                if r:
                    xs.append(i + (k - (len(names) - 1) / 2) * width)
                    ys.append(r["vs_hf_compile"] if r["vs_hf_compile"] else r["seq_per_s"])
            plt.bar(xs, ys, width, label=name)
        have_base = any(r["vs_hf_compile"] for r in rows)
        plt.axhline(1.0, color="grey", lw=0.8) if have_base else None
        plt.xticks(range(len(sizes_seen)), sizes_seen)
        plt.ylabel(f"sequences/s relative to {BASELINE}" if have_base else "sequences/s")
        if args.cpu_smoke:
            plt.title("CPU smoke run (PyTorch reference path, tiny model): checks the script, not a speed result")
        else:
            plt.title(f"ELECTRA training step, {rows[0]['dtype'] if rows else ''}")
        plt.legend(fontsize=8)

    if rows:
        save_plot(args, "throughput", draw)
    return 0 if rows or not variants else 1


if __name__ == "__main__":
    sys.exit(main())
