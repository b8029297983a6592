"""Shared helpers of the benchmark scripts: machine description, result rows, tables, plots, timing.

Every benchmark appends one JSON object per measurement to ``<results dir>/<benchmark>.jsonl``
(default ``benchmarks/results/``, or ``$ELECTRA_BENCH_RESULTS``, or ``--results-dir``), each row
carrying the machine it was measured on (:func:`machine_info`): GPU name, versions, date, commit.

    from _common import add_common_args, machine_info, append_rows, print_table, save_plot
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from electra_fast.provenance import git_commit

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--results-dir", default=os.environ.get("ELECTRA_BENCH_RESULTS", str(DEFAULT_RESULTS_DIR)),
                        help="folder for the .jsonl rows and .png plots (default: benchmarks/results, "
                             "or $ELECTRA_BENCH_RESULTS)")
    parser.add_argument("--no-save", action="store_true", help="print only: write no rows and no plot")
    parser.add_argument("--no-plot", action="store_true", help="write rows but no PNG")
    return parser


def _version(distribution: str) -> str | None:
    """Installed version from the package metadata, without importing it (deepspeed takes seconds)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


_MACHINE: dict[str, Any] | None = None


def machine_info(optional_modules: Sequence[str] = ("transformers", "deepspeed")) -> dict[str, Any]:
    """GPU (or CPU) name, library versions, UTC date and the repository commit."""
    global _MACHINE
    if _MACHINE is None:
        import torch

        info: dict[str, Any] = {
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(short=True),
            "host": platform.node(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
        }
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(device="cuda", gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        gpu_count=torch.cuda.device_count())
        else:
            info.update(device="cpu", gpu=None, cpu=platform.processor() or platform.machine(),
                        cpu_threads=torch.get_num_threads())
        _MACHINE = info
    info = dict(_MACHINE)
    for distribution in optional_modules:
        info[distribution] = _version(distribution)
    return info


def append_rows(args: argparse.Namespace, benchmark: str, rows: Iterable[dict[str, Any]]) -> Path | None:
    """Append rows (each merged with machine_info and the benchmark name) to <results>/<benchmark>.jsonl."""
    rows = list(rows)
    if getattr(args, "no_save", False) or not rows:
        return None
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{benchmark}.jsonl"
    machine = machine_info()
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({"benchmark": benchmark, **machine, **row}, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def fmt(value: Any, digits: int = 3) -> str:
    """Numbers for tables: scientific above 1e6, thousands separators for integers."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 1e6 or (0 < abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A GitHub-markdown table (readable in a terminal and pasteable into RESULTS.md)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    print(format_table(headers, rows, title) + "\n", flush=True)


def save_plot(args: argparse.Namespace, name: str, draw: Callable[[Any], None]) -> Path | None:
    """Draw with matplotlib (imported here, lazily, on the Agg backend) into <results>/<name>.png.

    ``draw(plt)`` makes the figure. Missing matplotlib is a printed note, not an error.
    """
    if getattr(args, "no_save", False) or getattr(args, "no_plot", False):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; no {name}.png")
        return None
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    plt.figure(figsize=(8, 5))
    try:
        draw(plt)
        plt.tight_layout()
        plt.savefig(path, dpi=120)
    finally:
        plt.close("all")
    print(f"plot: {path}")
    return path


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def time_step(step: Callable[[], Any], *, warmup: int, iters: int, device) -> list[float]:
    """Seconds per call of ``step`` after ``warmup`` calls: CUDA events on a GPU (each call timed on
    the stream, synchronised once at the end), perf_counter on the CPU."""
    import time

    import torch

    for _ in range(warmup):
        step()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends):
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def device_peak_tflops(device) -> float | None:
    """Dense bf16 peak of the current GPU (None on CPU or an unknown GPU); ELECTRA_PEAK_TFLOPS overrides."""
    import torch

    from electra_fast.flops import peak_tflops_for_device

    if os.environ.get("ELECTRA_PEAK_TFLOPS"):
        return float(os.environ["ELECTRA_PEAK_TFLOPS"])
    if torch.device(device).type != "cuda":
        return None
    return peak_tflops_for_device(torch.cuda.get_device_name(torch.device(device)))


# ----------------------------------------------------------------------------------------------
# Synthetic batches (no dataset needed: throughput does not depend on which tokens are seen)
# ----------------------------------------------------------------------------------------------
def synthetic_batch(model_cfg, batch: int, seq_len: int, *, device, random_lengths: bool = False, seed: int = 0):
    """(input_ids, attention_mask, token_type_ids), each (batch, seq_len): [CLS] w... [SEP] [PAD]...

    Word ids are uniform over the vocabulary above the special ids; two segments (types 0 then 1).
    With ``random_lengths`` each sequence's real length is uniform in [seq_len/2, seq_len] and the
    rest is padding (what a padded, unpacked loader produces); otherwise every row is full.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    specials = (model_cfg.pad_token_id, model_cfg.unk_token_id, model_cfg.cls_token_id, model_cfg.sep_token_id,
                model_cfg.mask_token_id)
    low = max(specials) + 1
    if low >= model_cfg.vocab_size:
        raise ValueError(f"vocab_size={model_cfg.vocab_size} leaves no word ids above the special ids")
    input_ids = torch.randint(low, model_cfg.vocab_size, (batch, seq_len), generator=gen)
    if random_lengths:
        lengths = torch.randint(max(3, seq_len // 2), seq_len + 1, (batch,), generator=gen)
    else:
        lengths = torch.full((batch,), seq_len)
    positions = torch.arange(seq_len)[None, :]
    attention_mask = positions < lengths[:, None]
    input_ids[:, 0] = model_cfg.cls_token_id
    input_ids[torch.arange(batch), lengths - 1] = model_cfg.sep_token_id
    input_ids[~attention_mask] = model_cfg.pad_token_id
    token_type_ids = ((positions >= (lengths[:, None] // 2)) & attention_mask).long()
    return (input_ids.to(device), attention_mask.to(device), token_type_ids.to(device))


# ----------------------------------------------------------------------------------------------
# The Hugging Face baselines (as a user would write them today; the reference numbers are in benchmarks/RESULTS.md)
# ----------------------------------------------------------------------------------------------
def hf_config(model_cfg, *, generator: bool, attn_implementation: str = "sdpa"):
    """transformers.ElectraConfig for our generator or discriminator."""
    from transformers import ElectraConfig

    c = model_cfg
    return ElectraConfig(
        vocab_size=c.vocab_size, embedding_size=c.embedding_size,
        hidden_size=c.generator_hidden_size if generator else c.hidden_size,
        num_hidden_layers=c.generator_num_layers if generator else c.num_layers,
        num_attention_heads=c.generator_num_heads if generator else c.num_heads,
        intermediate_size=c.generator_intermediate_size if generator else c.intermediate_size,
        hidden_act="gelu", hidden_dropout_prob=c.dropout, attention_probs_dropout_prob=c.attention_dropout,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.layer_norm_eps, initializer_range=c.initializer_range, pad_token_id=c.pad_token_id,
        attn_implementation=attn_implementation,
    )


def build_hf_electra(model_cfg, device):
    """ElectraForMaskedLM generator + ElectraForPreTraining discriminator sharing ``electra.embeddings``
    (the generator's output projection stays tied to the shared word embeddings)."""
    from transformers import ElectraForMaskedLM, ElectraForPreTraining

    generator = ElectraForMaskedLM(hf_config(model_cfg, generator=True))
    discriminator = ElectraForPreTraining(hf_config(model_cfg, generator=False))
    generator.electra.embeddings = discriminator.electra.embeddings
    generator.generator_lm_head.weight = discriminator.electra.embeddings.word_embeddings.weight
    return generator.to(device), discriminator.to(device)


def build_hf_modernbert(model_cfg, device, attn_implementation: str = "sdpa"):
    """The modern backbone's peer: transformers' ModernBertForMaskedLM generator + a one-label
    ModernBertForTokenClassification discriminator (the export's classes) sharing the token embeddings
    (and so the decoder tied to them), SDPA attention."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM, ModernBertForTokenClassification

    from electra_fast.hf_modern import modernbert_config_dict

    def config(network: str, **extra):
        values = {k: v for k, v in modernbert_config_dict(model_cfg, network).items()
                  if k not in ("architectures", "electra_fast", "torch_dtype", "id2label", "label2id")}
        return ModernBertConfig(**values, **extra)

    generator = ModernBertForMaskedLM(config("generator"))
    discriminator = ModernBertForTokenClassification(config("discriminator"))  # num_labels=1 in the dict
    for model in (generator, discriminator):
        model.config._attn_implementation = attn_implementation
    if model_cfg.generator_hidden_size == model_cfg.hidden_size:  # tied sharing needs one width
        generator.model.embeddings.tok_embeddings = discriminator.model.embeddings.tok_embeddings
        generator.decoder.weight = discriminator.model.embeddings.tok_embeddings.weight
    return generator.to(device), discriminator.to(device)


def hf_modernbert_loss(generator, discriminator, model_cfg, input_ids, attention_mask, token_type_ids, *,
                       mask_prob: float = 0.15, disc_weight: float = 50.0, rng=None):
    """hf_electra_loss's objective on the ModernBERT pair (no segment ids; the discriminator's one logit
    per token through BCE over real tokens)."""
    import torch

    gen_loss, disc_input, is_replaced = _generator_replacements(generator, model_cfg, input_ids, attention_mask,
                                                                mask_prob, rng)
    disc_logits = discriminator(input_ids=disc_input, attention_mask=attention_mask).logits[..., 0].float()
    real = attention_mask.bool()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(disc_logits[real], is_replaced[real].float())
    return gen_loss + disc_weight * bce


def build_hf_bert_mlm(model_cfg, device):
    """BERT-MLM as benchmarks/RESULTS.md defines it: ElectraForMaskedLM at the discriminator's size."""
    from transformers import ElectraForMaskedLM

    return ElectraForMaskedLM(hf_config(model_cfg, generator=False)).to(device)


def _candidates(input_ids, attention_mask, model_cfg):
    return attention_mask.bool() & (input_ids != model_cfg.cls_token_id) & (input_ids != model_cfg.sep_token_id)


def _generator_replacements(generator, model_cfg, input_ids, attention_mask, mask_prob, rng, **segments):
    """The generator's half of the Hugging Face way: 15% of real tokens masked ([MASK] everywhere chosen),
    the MLM loss from its full (B, S, V) logits, and Gumbel-max samples from those logits.
    Returns (MLM loss, the discriminator's input, is_replaced (B, S) bool)."""
    import torch

    chosen = (torch.rand(input_ids.shape, device=input_ids.device, generator=rng) < mask_prob)
    chosen &= _candidates(input_ids, attention_mask, model_cfg)
    generator_input = torch.where(chosen, torch.full_like(input_ids, model_cfg.mask_token_id), input_ids)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    gen_out = generator(input_ids=generator_input, attention_mask=attention_mask, labels=labels, **segments)
    with torch.no_grad():
        logits = gen_out.logits.float()
        uniform = torch.rand(logits.shape, device=logits.device, generator=rng).clamp_(1e-9, 1.0 - 1e-7)
        sampled = torch.argmax(logits - torch.log(-torch.log(uniform)), dim=-1)
        disc_input = torch.where(chosen, sampled, input_ids)
    return gen_out.loss, disc_input, disc_input != input_ids


def hf_electra_loss(generator, discriminator, model_cfg, input_ids, attention_mask, token_type_ids, *,
                    mask_prob: float = 0.15, disc_weight: float = 50.0, rng=None):
    """One ELECTRA loss the Hugging Face way: the generator's MLM loss and samples
    (:func:`_generator_replacements`), discriminator BCE over real tokens; loss = MLM + disc_weight x BCE."""
    gen_loss, disc_input, is_replaced = _generator_replacements(generator, model_cfg, input_ids, attention_mask,
                                                                mask_prob, rng, token_type_ids=token_type_ids)
    disc_out = discriminator(input_ids=disc_input, attention_mask=attention_mask, token_type_ids=token_type_ids,
                             labels=is_replaced.long())
    return gen_loss + disc_weight * disc_out.loss


def hf_bert_mlm_loss(model, model_cfg, input_ids, attention_mask, token_type_ids, *, mask_prob: float = 0.15,
                     rng=None):
    """BERT's MLM loss: 15% of real tokens, 80% [MASK] / 10% random / 10% kept, full-logit cross-entropy."""
    import torch

    chosen = (torch.rand(input_ids.shape, device=input_ids.device, generator=rng) < mask_prob)
    chosen &= _candidates(input_ids, attention_mask, model_cfg)
    draw = torch.rand(input_ids.shape, device=input_ids.device, generator=rng)
    random_ids = torch.randint(0, model_cfg.vocab_size, input_ids.shape, device=input_ids.device, generator=rng)
    corrupted = torch.where(draw < 0.8, torch.full_like(input_ids, model_cfg.mask_token_id),
                            torch.where(draw < 0.9, random_ids, input_ids))
    masked_input = torch.where(chosen, corrupted, input_ids)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    return model(input_ids=masked_input, attention_mask=attention_mask, token_type_ids=token_type_ids,
                 labels=labels).loss
