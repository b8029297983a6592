"""Do the fused kernels train like the PyTorch references?  ELECTRA-Small, bf16, on one GPU.

    python benchmarks/convergence.py                     # ELECTRA-Small, 128 x 128, 300 steps, bf16
    python benchmarks/convergence.py --steps 1000 --batch 64
    python benchmarks/convergence.py --cpu-smoke         # tiny, a few steps, references vs the interpreter

Three runs from the same initial weights, on the same batches, with the same masks:

  reference   every hot spot on its PyTorch reference (model.*_impl=torch)
  fused       every hot spot on its Triton kernel (attention, MLM head, BCE head, LayerNorm/GELU), packed
  perturbed   the reference again, every initial weight moved by half a bf16 ulp (2^-9 relative) with a
              random sign per weight (on the CPU, fp32: one fp32 ulp; half of one would round away). That
              is the size of the rounding autocast applies to each weight anyway, so this run differs
              from the reference only by round-off, and their distance is the noise bound: how far two
              runs that are "the same" up to bf16 round-off drift apart in this many steps.

What is controlled, so that round-off is all that separates the runs: dropout is off (the kernels draw
their masks in-kernel, the references from torch's generator), the masks come from the objective's own
seeded generator, and the generator's samples are the arg-max of each run's own logits plus the *same*
Gumbel noise (``electra_kernels.mlm_head.gumbel_noise_ref`` of the step's seed), as in
tests/test_convergence.py. The packed sizes come from the host, as the loader gives them.

Reported: both loss curves (MLM and replaced-token), each smoothed over ``--window`` steps, and the
max over steps of |fused - reference| / reference against the same statistic for perturbed vs
reference. Verdict: the fused run is within ``--factor`` (default 2) times the noise bound. Exit status
1 when it is not, on the GPU; a CPU smoke run (fp32, tiny) checks the script, not the kernels' bf16
behaviour, and gives no verdict.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", help="a named model size (default: small)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--pool", type=int, default=16, help="distinct batches, cycled (the loss falls as they are "
                                                             "learnt)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--window", type=int, default=10, help="steps per smoothing window of the curves")
    parser.add_argument("--factor", type=float, default=2.0, help="allowed multiple of the noise bound")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model, few steps, CPU (Triton interpreter)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import add_common_args

    add_common_args(parser)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.size, args.steps, args.batch, args.seq_len, args.pool, args.warmup, args.window = "tiny", 6, 2, 16, 2, 2, 2
    return args


def _config(args, impl: str):
    from electra_fast.config import build_config

    overrides = [f"model.{spot}_impl={impl}" for spot in ("attention", "mlm_head", "disc_head", "elementwise")]
    overrides += ["model.dropout=0", "model.attention_dropout=0", f"data.seq_len={args.seq_len}"]
    if args.cpu_smoke:  # an interpreted step must take well under a second
        overrides += ["model.num_layers=1", "model.hidden_size=32", "model.num_heads=1", "model.intermediate_size=64",
                      "model.embedding_size=16", "model.vocab_size=128"]
    return build_config(args.size, overrides=overrides)


def shared_noise_sampler(head):
    """The MLM head with its sample replaced by the arg-max of its logits plus the reference noise of
    the step's seed: both runs sample alike, the loss and gradients still come from ``head``."""
    import torch
    import torch.nn.functional as F

    from electra_kernels.mlm_head import gumbel_noise_ref

    def wrapped(hidden, weight, bias, targets, *, temperature, seed):
        loss, _own, correct = head(hidden, weight, bias, targets, temperature=temperature, seed=seed)
        with torch.no_grad():
            logits = F.linear(hidden.float(), weight.float(), bias.float())
            sampled = torch.argmax(logits / temperature + gumbel_noise_ref(logits.shape, seed, logits.device), dim=-1)
        return loss, sampled, correct

    return wrapped


def _perturbed(state: dict, bf16: bool, seed: int) -> dict:
    """Every floating weight moved by half a bf16 ulp (one fp32 ulp for fp32 runs), with a random sign."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    # frexp: x = m * 2^e with m in [0.5, 1); an ulp is 2^(e - significand bits): bf16 has 8, fp32 24.
    shift = 8 + 1 if bf16 else 24
    out = {}
    for name, tensor in state.items():
        if tensor.is_floating_point():
            sign = torch.randint(0, 2, tensor.shape, generator=gen).to(tensor) * 2 - 1
            nudge = torch.ldexp(torch.ones_like(tensor), torch.frexp(tensor).exponent - shift)
            tensor = torch.where(tensor != 0, tensor + sign * nudge, tensor)
        out[name] = tensor
    return out


def _train(args, impl: str, state: dict, batches, device, bf16: bool):
    import torch

    from electra_fast.model import ElectraPretrainingModel, packed_sizes
    from electra_fast.optim import warmup_decay_schedule, weight_decay_groups

    cfg = _config(args, impl)
    model = ElectraPretrainingModel(cfg, seed=args.seed).to(device).train()
    model.load_state_dict(state)
    optimizer = torch.optim.AdamW(weight_decay_groups(model.named_parameters(), 0.01), lr=args.lr, betas=(0.9, 0.999),
                                  eps=1e-6, fused=device.type == "cuda")
    schedule = warmup_decay_schedule(optimizer, args.steps, args.warmup)
    curve = []
    for step in range(args.steps):
        ids, mask, types = batches[step % len(batches)]
        sizes = packed_sizes(mask)  # on the host, as the loader computes them
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(ids.to(device), mask.to(device), types.to(device), **sizes)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        curve.append(torch.stack([out.mlm_loss.detach().float(), out.disc_loss.detach().float()]))
    return torch.stack(curve).cpu()  # (steps, 2): one host sync, at the end


def _smooth(curve, window: int):
    steps = curve.shape[0] // window * window
    return curve[:steps].reshape(-1, window, curve.shape[1]).mean(dim=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on the CPU
    import torch

    import electra_kernels as ek
    from electra_fast.model import ElectraPretrainingModel

    from _common import append_rows, print_table, save_plot, synthetic_batch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    if device.type == "cpu" and not args.cpu_smoke:
        print("convergence.py: no GPU; run with --cpu-smoke to check the script on the CPU", file=sys.stderr)
        return 2
    bf16 = device.type == "cuda"
    ek.mlm_head_loss = shared_noise_sampler(ek.mlm_head_loss)
    ek.mlm_head_loss_ref = shared_noise_sampler(ek.mlm_head_loss_ref)

    torch.manual_seed(args.seed)
    cfg = _config(args, "torch")
    state = ElectraPretrainingModel(cfg, seed=args.seed).state_dict()
    batches = [synthetic_batch(cfg.model, args.batch, args.seq_len, device="cpu", random_lengths=True, seed=i)
               for i in range(args.pool)]
    runs = {"reference": ("torch", state), "fused": ("triton", state),
            "perturbed": ("torch", _perturbed(state, bf16, args.seed + 1))}
    curves = {name: _train(args, impl, weights, batches, device, bf16) for name, (impl, weights) in runs.items()}

    smooth = {name: _smooth(curve, args.window) for name, curve in curves.items()}
    reference = smooth["reference"]

    def max_rel(name):  # per loss (mlm, disc): max over windows of |run - reference| / reference
        return ((smooth[name] - reference).abs() / reference.abs().clamp(min=1e-6)).max(dim=0).values

    fused_diff, noise = max_rel("fused"), max_rel("perturbed")
    steps = [(i + 1) * args.window for i in range(reference.shape[0])]
    print_table(["step", "ref mlm", "fused mlm", "perturbed mlm", "ref disc", "fused disc", "perturbed disc"],
                [[s, *(smooth[n][i, 0].item() for n in runs), *(smooth[n][i, 1].item() for n in runs)]
                 for i, s in enumerate(steps)],
                title=f"ELECTRA-{args.size} losses, mean of each {args.window} steps ({device.type}, "
                      f"{'bf16' if bf16 else 'fp32'}, batch {args.batch} x {args.seq_len})")
    within = bool((fused_diff <= args.factor * noise).all())
    print(f"max relative difference, fused vs reference:   mlm {fused_diff[0]:.3e}  disc {fused_diff[1]:.3e}")
    print(f"noise bound, perturbed vs reference           : mlm {noise[0]:.3e}  disc {noise[1]:.3e}")
    if args.cpu_smoke:
        print("CPU smoke run (fp32, tiny, interpreted kernels): checks the script; no verdict")
    else:
        print(f"verdict: fused {'within' if within else 'OUTSIDE'} {args.factor:g} x the bf16 noise bound")

    row = {"size": args.size, "steps": args.steps, "batch": args.batch,
           "seq_len": args.seq_len, "precision": "bf16" if bf16 else "fp32", "device": device.type,
           "cpu_smoke": args.cpu_smoke, "window": args.window, "factor": args.factor,
           "max_rel_diff_mlm": fused_diff[0].item(), "max_rel_diff_disc": fused_diff[1].item(),
           "noise_bound_mlm": noise[0].item(), "noise_bound_disc": noise[1].item(),
           "within_bound": within, "curves": {name: curve.tolist() for name, curve in curves.items()}}
    append_rows(args, "convergence", [row])

    def draw(plt):
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        for column, (axis, title) in enumerate(zip(axes, ("generator MLM loss", "replaced-token loss"))):
            for name in runs:
                axis.plot(range(1, args.steps + 1), curves[name][:, column].numpy(), label=name, linewidth=1)
            axis.set_title(title)
            axis.set_xlabel("step")
            axis.legend()
        figure.suptitle(("CPU smoke run: " if args.cpu_smoke else "") + f"ELECTRA-{args.size}, fused kernels vs "
                        "references" + ("" if args.cpu_smoke else " (bf16)"))

    save_plot(args, "convergence", draw)
    return 0 if within or args.cpu_smoke else 1


if __name__ == "__main__":
    sys.exit(main())
