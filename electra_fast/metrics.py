"""Training metrics: device-side accumulation with one host sync per log step; the progress bar (on a
terminal; plain lines in a log file), metrics.jsonl and TensorBoard on rank 0, held-out evaluations
among them; curves.png at the end; the FLOPs and peak behind the MFU figure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from pathlib import Path

import torch

from .config import Config
from .distributed import all_reduce_sum

logger = logging.getLogger(__name__)

# Names of the per-step statistics accumulated on the device between log steps.
STAT_NAMES = ("loss", "mlm_loss", "disc_loss", "gen_accuracy", "disc_accuracy", "disc_precision", "disc_recall",
              "replaced_fraction")


class StepStats:
    """Sums of the per-micro-step statistics, kept on the device (no host sync until they are read)."""

    def __init__(self, device: torch.device):
        # STAT_NAMES summed over finite micro-steps, then the finite and the non-finite counts.
        self.sums = torch.zeros(len(STAT_NAMES) + 2, dtype=torch.float64, device=device)
        self.tokens = torch.zeros((), dtype=torch.float64, device=device)  # real (non-pad) tokens
        self.step_nonfinite = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, out, attention_mask: torch.Tensor) -> None:
        values = torch.stack([loss.detach().float(), out.mlm_loss.float(), out.disc_loss.float()]
                             + [out.metrics[name].float() for name in STAT_NAMES[3:]]).double()
        finite = torch.isfinite(values).all()
        self.sums[:len(STAT_NAMES)] += torch.where(finite, values, torch.zeros_like(values))
        self.sums[len(STAT_NAMES)] += finite.double()
        self.sums[len(STAT_NAMES) + 1] += (~finite).double()
        self.tokens += attention_mask.sum()
        self.step_nonfinite += (~finite).double()

    def any_nonfinite_this_step(self) -> bool:
        """Whether any rank saw a non-finite loss in the step just taken (a collective: all ranks call it)."""
        return all_reduce_sum(self.step_nonfinite.clone()).item() > 0

    def end_step(self) -> None:
        self.step_nonfinite.zero_()

    def take_tokens(self) -> int:
        """Real tokens of all ranks since the last call (a collective)."""
        tokens = int(all_reduce_sum(self.tokens.clone()).item())
        self.tokens.zero_()
        return tokens

    def take(self) -> dict[str, float]:
        """Means over ranks and finite micro-steps since the last call, and the non-finite count (a collective)."""
        values = all_reduce_sum(self.sums.clone()).tolist()
        self.sums.zero_()
        finite, nonfinite = values[len(STAT_NAMES):]
        means = {name: (values[i] / finite if finite else float("nan")) for i, name in enumerate(STAT_NAMES)}
        means["nonfinite_micro_steps"] = int(nonfinite)
        return means


def is_eval_record(record: dict) -> bool:
    """A held-out evaluation row of metrics.jsonl (the training rows carry "loss" instead)."""
    return bool(record.get("eval")) or "split" in record


def eval_line(record: dict) -> str:
    """One readable line of a held-out evaluation, each number beside what a constant guess scores."""
    return (f"[electra-fast] held-out at step {record['step']}: discriminator ROC-AUC {record['disc_auc']:.3f} "
            f"(0.5 = chance), AP {record['disc_ap']:.3f} (chance {record['replaced_fraction']:.3f}), loss "
            f"{record['disc_loss']:.4f} (prior {record['disc_prior_loss']:.4f}); generator accuracy "
            f"{record['gen_accuracy']:.3f} (unigram {record['unigram_accuracy']:.3f}), loss {record['gen_loss']:.3f}")


class MetricsLog:
    """Rank 0's outputs: the progress bar, metrics.jsonl and TensorBoard (each optional).

    The progress bar is drawn only on a terminal and only from the first step on, so that lines
    printed before (the run's header) come first; in a log file each training record is one plain line
    instead, which a bar's carriage returns would garble.
    """

    def __init__(self, run_dir: Path, enabled: bool, start_step: int, max_steps: int, resumed: bool,
                 interactive: bool | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = self.tensorboard = self.jsonl = None
        self.start_step, self.max_steps = start_step, max_steps
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.last_eval: dict | None = None
        if not enabled:
            return
        if resumed and self.path.is_file():
            # Records past the checkpoint belong to steps that are about to be run again (a kill can also
            # leave a half-written last line).
            kept = [record for record in read_metrics(run_dir) if record.get("step", 0) <= start_step]
            self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        elif self.path.exists():
            self.path.unlink()
        self.jsonl = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                             purge_step=start_step + 1 if resumed else None)
        except ImportError:
            logger.warning("tensorboard is not installed: no TensorBoard events (metrics.jsonl is still written)")

    def _open_bar(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.max_steps, initial=self.start_step, desc="pretrain", unit="step",
                        dynamic_ncols=True, mininterval=1.0, smoothing=0.1, file=sys.stderr)

    def say(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.enabled and self.interactive and self.bar is None:
            self._open_bar()
        if self.bar is not None:
            self.bar.update(steps)

    def record(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None and "loss" in record:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"])
        if "loss" not in record:
            return
        postfix = {"loss": f"{record['loss']:.4f}", "gen_acc": f"{record['gen_accuracy']:.3f}",
                   "disc_acc": f"{record['disc_accuracy']:.3f}"}
        if self.last_eval is not None:
            postfix["heldout_auc"] = f"{self.last_eval['disc_auc']:.3f}"
        postfix.update({"seq/s": f"{record['seq_per_s']:.1f}", "tok/s": f"{record['tokens_per_s']:.0f}",
                        "TFLOP/s": f"{record['tflops']:.2f}", "lr": f"{record['lr']:.2e}"})
        if record.get("mfu") is not None:
            postfix["MFU"] = f"{100 * record['mfu']:.1f}%"
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
        elif not self.interactive:
            eta = record.get("eta_s")
            self.say(f"[electra-fast] step {record['step']}/{self.max_steps}: "
                     + ", ".join(f"{key} {value}" for key, value in postfix.items())
                     + (f", {eta / 60:.1f} min left" if eta is not None else ""))

    def record_eval(self, record: dict) -> None:
        """A held-out evaluation: metrics.jsonl, TensorBoard's heldout/ scalars, one line, the bar's postfix."""
        if not self.enabled:
            return
        self.last_eval = record
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "time", "eval") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(f"heldout/{key}", value, record["step"])
        self.say(eval_line(record))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.jsonl is not None:
            self.jsonl.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl (a line cut short by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def plot_curves(run_dir: str | Path) -> Path | None:
    """Loss and accuracy curves from metrics.jsonl into run_dir/curves.png (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no curves.png")
        return None
    everything = read_metrics(run_dir)
    records = [r for r in everything if "loss" in r]
    evals = [r for r in everything if is_eval_record(r)]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(16 if evals else 11, 4))
    ax_loss, ax_acc = axes[0], axes[1]
    for key, label in (("mlm_loss", "generator MLM loss"), ("disc_loss", "discriminator BCE loss")):
        ax_loss.plot(steps, [r[key] for r in records], label=label)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("losses")
    ax_loss.legend()
    for key, label in (("gen_accuracy", "generator accuracy (masked tokens)"),
                       ("disc_accuracy", "discriminator accuracy (all tokens)"),
                       ("disc_recall", "discriminator recall (replaced)")):
        ax_acc.plot(steps, [r[key] for r in records], label=label)
    ax_acc.set_ylim(0, 1)
    ax_acc.set_xlabel("step")
    ax_acc.set_title("accuracy")
    ax_acc.legend()
    if evals:
        _plot_heldout(axes[2], evals)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _plot_heldout(ax, evals: list[dict]) -> None:
    """The held-out panel: the discriminator's ranking (ROC-AUC, AP) and the generator's accuracy, each
    with the value a constant guess scores as a dotted line of the same colour."""
    steps = [r["step"] for r in evals]
    for key, chance_key, label in (("disc_auc", None, "discriminator ROC-AUC"),
                                   ("disc_ap", "replaced_fraction", "discriminator AP"),
                                   ("gen_accuracy", "unigram_accuracy", "generator accuracy")):
        line, = ax.plot(steps, [r[key] for r in evals], marker="o", label=label)
        chance = [0.5] * len(evals) if chance_key is None else [r[chance_key] for r in evals]
        ax.plot(steps, chance, linestyle=":", color=line.get_color())
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_title("held-out (dotted: chance / unigram baseline)")
    ax.legend()


def model_flops_per_step(cfg: Config) -> tuple[float, str]:
    """Analytic training FLOPs of one optimizer step (all ranks) for the MFU figure."""
    try:
        from .flops import training_flops_per_step

        return float(training_flops_per_step(cfg)), "electra_fast.flops (modern convention)"
    except ImportError:  # keeps the trainer usable without the FLOPs module
        from .model import ElectraPretrainingModel

        params = sum(p.numel() for p in ElectraPretrainingModel(cfg).parameters())
        return 6.0 * params * cfg.train.global_batch_size * cfg.data.seq_len, "estimate 6*params*tokens"


def peak_tflops(cfg: Config, device: torch.device, precision: str) -> float | None:
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None  # the table holds dense bf16/fp16 tensor-core peaks only
    from .flops import peak_tflops_for_device

    return peak_tflops_for_device(torch.cuda.get_device_name(device))


