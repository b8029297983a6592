"""How much compute does ELECTRA save over BERT masked-LM?  The FLOPs report.

    python benchmarks/flops.py                     # all three sections below, rows + flops.png
    python benchmarks/flops.py --paper             # 1. the paper's seven models, by the paper's method
    python benchmarks/flops.py --paper --json      #    ... as one JSON object {name: total FLOPs}
    python benchmarks/flops.py --compare           # 2. ELECTRA vs BERT-MLM for our small/base/large
    python benchmarks/flops.py --counted           # 3. FlopCounterMode on real steps vs the formulas
    python benchmarks/flops.py --counted --counted-size small --batch 8   # a bigger counted check
    python benchmarks/flops.py --config configs/electra-base.yaml --set data.seq_len=128   # any config

1. The analytic method of Clark et al. (2020), Appendix D (electra_fast/flops.py, convention
   "paper"), for BERT-Small/Base/Large and ELECTRA-Small/Base/400K/1.75M, against the totals printed
   in the paper's Tables 1 and 2.
2. The same formulas for our configs (configs/electra-{small,base,large}.yaml): ELECTRA
   (generator + discriminator) and BERT-MLM at the discriminator's size, per step, per token and to
   train, in both conventions ("paper": all ops, backward = forward; "modern": matmuls only,
   backward = 2 x forward, the MFU numerator).
3. One real training step of our model (PyTorch reference path) and of the Hugging Face pair
   (ElectraForMaskedLM + ElectraForPreTraining, when transformers imports), and our BertMLMModel,
   under torch.utils.flop_counter.FlopCounterMode, against the "modern" matmul count. Attention runs
   on SDPA's math backend there, so its two matmuls are visible to the counter (fused SDPA kernels
   are counted only on CUDA, and with a recompute in the backward).
4. ``--config``: the breakdown of one YAML config (ELECTRA and BERT-MLM at its discriminator size),
   by component, in both conventions, per step (the config's global batch), per token and to train
   (its max_steps).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_args, append_rows, print_table, save_plot  # noqa: E402

from electra_fast.config import build_config, load_config, max_predictions  # noqa: E402
from electra_fast.flops import (  # noqa: E402
    CONVENTIONS,
    PAPER_MODELS,
    PAPER_REPORTED,
    bert_mlm_flops,
    electra_flops,
    paper_training_flops,
)

# The BERT schedules the paper compares each ELECTRA size with (steps, batch): Table 1 and 2.
BERT_SCHEDULE = {"small": (1.45e6, 128), "base": (1.0e6, 256), "large": (1.0e6, 256)}
BERT_MASK_PROB = 0.15


# ----------------------------------------------------------------------------------------------
# 1. The paper's models
# ----------------------------------------------------------------------------------------------
def paper_section(args) -> list[dict]:
    ours = paper_training_flops("paper")
    modern = paper_training_flops("modern")
    rows, table = [], []
    for name, model in PAPER_MODELS.items():
        ratio = ours[name] / PAPER_REPORTED[name]
        gen = f", gen h{model.generator_hidden}" if model.kind == "electra" else ""
        setting = f"h{model.hidden} L{model.layers} e{model.embedding}{gen}; {model.batch}x{model.seq_len}"
        table.append([name, setting, f"{model.steps:.3g}", ours[name], PAPER_REPORTED[name], f"{ratio:.3f}",
                      modern[name]])
        rows.append({"section": "paper", "model": name, "setting": setting, "steps": model.steps,
                     "train_flops_paper_method": ours[name], "train_flops_reported": PAPER_REPORTED[name],
                     "ratio_to_reported": ratio, "train_flops_modern": modern[name]})
    print_table(["model", "setting", "steps", "train FLOPs (paper method)", "paper's table", "ratio",
                 "modern (matmul, bwd=2x)"], table,
                "1. Pre-training FLOPs of the paper's models (Clark et al. 2020, Tables 1-2)")
    return rows


# ----------------------------------------------------------------------------------------------
# 2. Our configs: ELECTRA vs BERT-MLM
# ----------------------------------------------------------------------------------------------
def compare_section(args) -> list[dict]:
    rows, table = [], []
    for size in ("small", "base", "large"):
        cfg = build_config(size)
        seq, steps = cfg.data.seq_len, cfg.train.max_steps
        bert_steps, bert_batch = BERT_SCHEDULE[size]
        bert_rows = max_predictions(BERT_MASK_PROB, seq)
        for conv in CONVENTIONS:
            electra = electra_flops(cfg, convention=conv)
            bert = bert_mlm_flops(cfg, batch=bert_batch, convention=conv, mlm_rows_per_seq=bert_rows)
            electra_total, bert_total = electra.training_flops(steps), bert.training_flops(bert_steps)
            table.append([size, conv, electra.forward_per_token, electra.training_per_token,
                          bert.forward_per_token, bert.training_per_token,
                          f"{electra.training_per_token / bert.training_per_token:.2f}",
                          electra.training_per_step, bert.training_per_step,
                          electra_total, bert_total])
            for fl, total, n_steps in ((electra, electra_total, steps), (bert, bert_total, bert_steps)):
                rows.append({"section": "compare", "size": size, **fl.as_dict(), "steps": n_steps,
                             "train_flops": total,
                             "forward_by_component": fl.by_component()})
    print_table(["size", "convention", "ELECTRA fwd/token", "ELECTRA train/token", "BERT fwd/token",
                 "BERT train/token", "ELECTRA/BERT per token", "ELECTRA train/step", "BERT train/step",
                 "ELECTRA to train", "BERT to train"], table,
                "2. ELECTRA (generator + discriminator) vs BERT-MLM at the discriminator's size, our configs")
    print("   per step: ELECTRA at the config's global batch (small 128x128, base 256x512, large 2048x512);\n"
          "   BERT-MLM at the paper's BERT batch (128, 256, 256). 'to train': ELECTRA for the config's max_steps\n"
          "   (1M, 766K, 400K), BERT for the paper's (1.45M, 1M, 1M). MLM head rows: ELECTRA the model's\n"
          "   max_predictions_per_seq (large masks 25%), BERT 15%.\n")
    paper = paper_training_flops("paper")
    print("   So where is the saving? Per token ELECTRA costs more (a second, smaller encoder runs, and its\n"
          "   binary head sees every token), but it needs fewer tokens for the same downstream quality. The\n"
          "   paper, at equal pre-training compute (GLUE dev):\n"
          f"     ELECTRA-Small {paper['electra_small']:.2e} FLOPs: 79.9   vs  BERT-Small {paper['bert_small']:.2e}: 75.1\n"
          f"     ELECTRA-Base  {paper['electra_base']:.2e} FLOPs: 85.1   vs  BERT-Base  {paper['bert_base']:.2e}: 82.2\n"
          "   benchmarks/equal_compute.py checks the same claim at our scale.\n")
    return rows


# ----------------------------------------------------------------------------------------------
# 3. Counted by FlopCounterMode
# ----------------------------------------------------------------------------------------------
def count_step(loss_fn) -> tuple[int, int]:
    """(forward, backward) FLOPs of ``loss_fn().backward()`` as FlopCounterMode sees them.

    SDPA is pinned to its math backend so attention is two visible matmuls (the CPU's fused kernel
    is not in the counter's registry, and the fused CUDA kernels' backward formula adds a recompute).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        loss = loss_fn()
        forward = counter.get_total_flops()
        loss.backward()
        total = counter.get_total_flops()
    return forward, total - forward


def counted_cases(size: str, batch: int, seq_len: int | None, device: str = "cpu"):
    """Yield (name, analytic FlopsBreakdown, (forward, backward) counted) for each model that runs."""
    import torch

    from _common import build_hf_bert_mlm, build_hf_electra, hf_bert_mlm_loss, hf_electra_loss, synthetic_batch
    from electra_fast.mlm_baseline import BertMLMModel
    from electra_fast.model import ElectraPretrainingModel

    # The analytic count is the algorithm's (every row through every layer); model.last_layer_subset
    # skips the last-layer rows no loss reads, so it is off here for the counts to be comparable.
    overrides = ["model.attention_impl=torch", "model.mlm_head_impl=torch", "model.disc_head_impl=torch",
                 "model.last_layer_subset=false"]
    if seq_len:
        overrides.append(f"data.seq_len={seq_len}")
    if build_config(size).model.architecture == "modern":
        # The reference path's masked SDPA computes every query-key pair, also outside a sliding window: windows
        # that cover the sequence make that the algorithm's count too.
        overrides.append(f"model.local_attention={2 * (seq_len or build_config(size).data.seq_len)}")
    cfg = build_config(size, overrides=overrides)
    seq = cfg.data.seq_len
    inputs = synthetic_batch(cfg.model, batch, seq, device=device)
    torch.manual_seed(0)

    ours = ElectraPretrainingModel(cfg).to(device).train()
    yield ("ours: ElectraPretrainingModel", electra_flops(cfg, seq_len=seq, batch=batch),
           count_step(lambda: ours(*inputs).loss))
    del ours
    bert = BertMLMModel(cfg).to(device).train()
    yield ("ours: BertMLMModel", bert_mlm_flops(cfg, seq_len=seq, batch=batch),
           count_step(lambda: bert(*inputs).loss))
    del bert
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("note: transformers is not installed; the Hugging Face rows are skipped")
        return
    if cfg.model.architecture == "modern":  # its peer: transformers' ModernBERT pair, full-vocabulary logits
        from _common import build_hf_modernbert, hf_modernbert_loss

        generator, discriminator = build_hf_modernbert(cfg.model, device)
        generator.train(), discriminator.train()
        yield ("HF: ModernBertForMaskedLM + ModernBertForTokenClassification",
               electra_flops(cfg, seq_len=seq, batch=batch, mlm_rows_per_seq=seq),
               count_step(lambda: hf_modernbert_loss(generator, discriminator, cfg.model, *inputs)))
        return
    generator, discriminator = build_hf_electra(cfg.model, device)
    generator.train(), discriminator.train()
    # HF's ElectraForMaskedLM projects every position onto the vocabulary, not only the masked ones.
    yield ("HF: ElectraForMaskedLM + ElectraForPreTraining",
           electra_flops(cfg, seq_len=seq, batch=batch, mlm_rows_per_seq=seq),
           count_step(lambda: hf_electra_loss(generator, discriminator, cfg.model, *inputs)))
    del generator, discriminator
    hf_bert = build_hf_bert_mlm(cfg.model, device).train()
    yield ("HF: ElectraForMaskedLM (BERT-MLM)", bert_mlm_flops(cfg, seq_len=seq, batch=batch, mlm_rows_per_seq=seq),
           count_step(lambda: hf_bert_mlm_loss(hf_bert, cfg.model, *inputs)))


def counted_section(args) -> list[dict]:
    rows, table = [], []
    for name, analytic, (forward, backward) in counted_cases(args.counted_size, args.batch, args.seq_len):
        modern = analytic  # electra_flops defaults to the modern convention
        fwd_ratio = forward / modern.forward_per_step
        bwd_ratio = backward / modern.backward_per_step
        paper_fwd = analytic.forward_of(CONVENTIONS["paper"].counted_kinds)
        table.append([name, forward, round(modern.forward_per_step), f"{fwd_ratio:.6f}", backward,
                      round(modern.backward_per_step), f"{bwd_ratio:.6f}", f"{forward / paper_fwd:.3f}"])
        rows.append({"section": "counted", "model": name, "size": args.counted_size, "batch": args.batch,
                     "seq_len": analytic.seq_len, "counted_forward": forward, "counted_backward": backward,
                     "analytic_matmul_forward": modern.forward_per_step,
                     "analytic_matmul_backward": modern.backward_per_step,
                     "analytic_paper_forward": paper_fwd, "forward_ratio": fwd_ratio, "backward_ratio": bwd_ratio})
    print_table(["step", "counted fwd", "analytic fwd (matmul)", "ratio", "counted bwd", "analytic bwd (2x)",
                 "ratio", "counted / paper-method fwd"], table,
                f"3. FlopCounterMode on one training step ({args.counted_size}, batch {args.batch}) vs the formulas")
    print("   FlopCounterMode counts matmuls only (mm/addmm/bmm, SDPA): it matches the 'modern' count. The paper's\n"
          "   method also counts the one-hot embedding lookups (2·E·V per token), LayerNorm/GELU/softmax/dropout and\n"
          "   bias/residual adds, which a counter of matmuls cannot see: that is the last column's residual.\n")
    return rows


# ----------------------------------------------------------------------------------------------
# 4. One config, by component
# ----------------------------------------------------------------------------------------------
def config_section(args) -> list[dict]:
    cfg = load_config(args.config, overrides=args.overrides)
    steps = cfg.train.max_steps
    rows = []
    for model, fn in (("electra", electra_flops), ("bert_mlm", bert_mlm_flops)):
        paper, modern = (fn(cfg, convention=c) for c in ("paper", "modern"))
        components = list(dict.fromkeys(t.component for t in paper.terms))
        by_paper, by_modern = paper.by_component(), modern.by_component()
        table = [[c, by_paper.get(c, 0.0), by_modern.get(c, 0.0)] for c in components]
        table += [["forward, per step", paper.forward_per_step, modern.forward_per_step],
                  ["backward, per step", paper.backward_per_step, modern.backward_per_step],
                  ["training, per step", paper.training_per_step, modern.training_per_step],
                  ["training, per token", paper.training_per_token, modern.training_per_token],
                  [f"to train ({steps:,} steps)", paper.training_flops(steps), modern.training_flops(steps)]]
        print_table(["forward FLOPs per step by component", "paper", "modern"], table,
                    f"4. {model} at {args.config} (batch {paper.batch} x seq {paper.seq_len})")
        for fl in (paper, modern):
            rows.append({"section": "config", "config": str(args.config), "overrides": list(args.overrides),
                         **fl.as_dict(), "steps": steps, "train_flops": fl.training_flops(steps),
                         "forward_by_component": fl.by_component()})
    return rows


def draw(rows):
    def _draw(plt):
        paper = [r for r in rows if r["section"] == "paper"]
        compare = [r for r in rows if r["section"] == "compare" and r["convention"] == "paper"]
        fig, axes = plt.subplots(1, 2, figsize=(13, 5)) if compare and paper else plt.subplots(1, 1, figsize=(8, 5))
        axes = list(axes) if hasattr(axes, "__len__") else [axes]
        if paper:
            ax = axes.pop(0)
            names = [r["model"] for r in paper]
            x = range(len(names))
            ax.bar([i - 0.2 for i in x], [r["train_flops_paper_method"] for r in paper], 0.4, label="this method")
            ax.bar([i + 0.2 for i in x], [r["train_flops_reported"] for r in paper], 0.4, label="paper's table")
            ax.set_yscale("log"), ax.set_xticks(list(x)), ax.set_xticklabels(names, rotation=30, ha="right")
            ax.set_ylabel("pre-training FLOPs"), ax.set_title("The paper's models"), ax.legend()
        if compare:
            ax = axes.pop(0)
            sizes = ["small", "base", "large"]
            for offset, model, label in ((-0.2, "electra", "ELECTRA"), (0.2, "bert_mlm", "BERT-MLM")):
                values = [next(r["training_per_token"] for r in compare if r["size"] == s and r["model"] == model)
                          for s in sizes]
                ax.bar([i + offset for i in range(3)], values, 0.4, label=label)
            ax.set_yscale("log"), ax.set_xticks(range(3)), ax.set_xticklabels(sizes)
            ax.set_ylabel("training FLOPs per token (paper method)"), ax.set_title("ELECTRA vs BERT-MLM, our configs")
            ax.legend()
    return _draw


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--paper", action="store_true", help="section 1: the paper's seven models")
    parser.add_argument("--compare", action="store_true", help="section 2: ELECTRA vs BERT-MLM, our configs")
    parser.add_argument("--counted", action="store_true", help="section 3: FlopCounterMode vs the formulas")
    parser.add_argument("--config", default=None, help="section 4: the breakdown of this YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override for --config (repeatable), e.g. --set data.seq_len=256")
    parser.add_argument("--json", action="store_true",
                        help="print only JSON: with --paper {name: total training FLOPs}, else the rows")
    parser.add_argument("--counted-size", default="tiny", help="named size for --counted (default tiny)")
    parser.add_argument("--batch", type=int, default=4, help="batch for --counted (default 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length for --counted (default: config)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    if not (args.paper or args.compare or args.counted or args.config):
        args.paper = args.compare = args.counted = True

    if args.json and args.paper and not (args.compare or args.counted or args.config):
        print(json.dumps(paper_training_flops("paper")))
        return 0
    if args.json:  # tables go to stderr so stdout stays one JSON document
        real_stdout, sys.stdout = sys.stdout, sys.stderr
    rows: list[dict] = []
    if args.paper:
        rows += paper_section(args)
    if args.compare:
        rows += compare_section(args)
    if args.counted:
        rows += counted_section(args)
    if args.config:
        rows += config_section(args)
    path = append_rows(args, "flops", rows)
    if path:
        print(f"rows: {path}")
    save_plot(args, "flops", draw(rows))
    if args.json:
        sys.stdout = real_stdout
        print(json.dumps(rows, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
