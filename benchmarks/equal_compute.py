"""Does ELECTRA beat BERT masked-LM for the same pre-training compute?  The paper's claim, at our scale.

    python benchmarks/equal_compute.py                       # tiny models on the CPU, a few minutes
    python benchmarks/equal_compute.py --size small          # ELECTRA-Small-sized, on a GPU
    python benchmarks/equal_compute.py --size small --electra-steps 3000 --seeds 1,2,3,4,5
    python benchmarks/equal_compute.py --corpus my_corpus.txt --heldout-every 20
    python benchmarks/equal_compute.py --size small --sharing tied,gdes,separate   # embedding sharing modes

1. Corpus: ``--corpus`` (text in the reference layout: one sentence a line, a blank line between
   documents) or the embedded default corpus (electra_fast/corpus.py: Python's own documentation
   prose, no download). Every ``--heldout-every``-th document is held out for the probe; the rest
   is the pre-training corpus.
2. Prepared once, used by both models, by the project's own pipeline: the pre-training documents
   go through ``electra_fast.prepare`` (a lower-cased WordPiece vocabulary trained on them, examples
   packed as the reference does into ``[CLS] A [SEP] B [SEP]`` of ``seq_len`` tokens) into a temporary
   folder, and are read back by the training loader (``electra_fast.loader.PretrainingLoader``), so
   both models see the same batches in the same order.
3. Pre-training: ElectraPretrainingModel and BertMLMModel (electra_fast/mlm_baseline.py) with the
   same discriminator size, in a plain PyTorch loop (AdamW with electra_fast.optim's weight-decay
   groups, linear warm-up and decay to 0, gradient
   clipping 1.0, bf16 autocast on CUDA). ELECTRA runs ``--electra-steps``; BERT runs as many steps as
   cost the same FLOPs (electra_fast/flops.py, ``--convention``, default the paper's method), so it
   sees more tokens. Encoders are snapshotted at the ``--checkpoints`` fractions of that budget.
   ``--sharing`` trains one ELECTRA per embedding-sharing mode (``model.embedding_sharing``: tied,
   gdes, separate; rows ``electra``, ``electra_gdes``, ``electra_separate``): the modes cost the same
   FLOPs per step, so they get the same steps and one BERT-MLM baseline serves them all. On the CPU
   this is a pipeline check; the GPU runs at ``--size small`` are what compare them.
4. Probe: a CoLA-like acceptability task from held-out sentences: half as written, half corrupted
   -- by default a quarter of the words replaced with words drawn from the corpus's running text
   (frequency-matched, so only context gives them away); ``--corruption shuffle`` reorders all words,
   ``--corruption swap`` exchanges two (word-order tasks, which the tiny models stay at chance on).
   Every snapshot (and a randomly initialised encoder, at 0 FLOPs) is fine-tuned identically with
   electra_fast.finetune.finetune_classifier (the paper's recipe: layer-wise lr decay, warm-up, the
   ELECTRA classification head) for each of ``--seeds``; the table reports the dev accuracy's median
   and spread.

Rows go to results/equal_compute.jsonl, the plot (probe accuracy vs pre-training FLOPs) to
results/equal_compute.png. Small runs are noisy: compare the curves, and use more seeds and steps
before drawing conclusions.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import add_common_args, append_rows, print_table, save_plot  # noqa: E402

import torch  # noqa: E402

from electra_fast.config import build_config  # noqa: E402
from electra_fast.flops import bert_mlm_flops, electra_flops  # noqa: E402
from electra_fast.optim import warmup_decay_schedule, weight_decay_groups  # noqa: E402

# Per-size defaults (every one can be overridden on the command line).
PRESETS = {
    # tiny: the config's lr 1e-3 (made for seconds-long tests) stalls the discriminator at disc_weight
    # 50 (it stays at the "never replaced" prior); 2e-4 learns. Both models get the same lr.
    "tiny": dict(vocab_size=2048, batch=32, electra_steps=600, pretrain_lr=2e-4, probe_train=1000, probe_dev=400,
                 probe_epochs=3, probe_lr=1e-3, seeds="1,2,3"),
    "small": dict(vocab_size=8192, batch=128, electra_steps=1500, pretrain_lr=None, probe_train=2000, probe_dev=500,
                  probe_epochs=3, probe_lr=3e-4, seeds="1,2,3"),
}
# The modern backbone (model.architecture=modern; BERT-MLM is then ModernBERT's masked LM at the same size):
# the same budgets as the ELECTRA sizes of about the same cost, not tuned for it.
PRESETS["modern-tiny"] = dict(PRESETS["tiny"])
PRESETS["modern-small"] = dict(PRESETS["small"])


# ----------------------------------------------------------------------------------------------
# Corpus, tokenizer, examples
# ----------------------------------------------------------------------------------------------
def read_documents(path: str | None) -> list[list[str]]:
    """Documents as lists of sentences: from a text file (blank line between documents; read as
    ``prepare`` reads it) or the embedded default corpus."""
    if path is None:
        from electra_fast.corpus import build_default_corpus

        return [list(d.sentences) for d in build_default_corpus()]
    from electra_fast.corpus_reader import file_documents
    from electra_fast.manifest import DataError

    try:
        documents = list(file_documents(path))
    except DataError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not documents:
        raise SystemExit(f"error: {path} holds no text")
    return documents


def prepare_pretraining_data(documents: list[list[str]], workdir: Path, vocab_size: int, seq_len: int,
                             seed: int) -> Path:
    """The pre-training documents through ``electra_fast.prepare`` (WordPiece trained on them, examples
    packed as the reference does); returns the prepared folder."""
    from electra_fast.prepare import prepare

    corpus = workdir / "pretraining.txt"
    corpus.write_text("\n\n".join("\n".join(document) for document in documents) + "\n", encoding="utf-8")
    return prepare([str(corpus)], str(workdir / "data"), vocab_size=vocab_size, seq_len=seq_len, seed=seed,
                   num_proc=1, verbose=False)


def swap_two_words(sentence: str, rng: random.Random) -> str | None:
    """The sentence with two different words exchanged (None when it has too few distinct words)."""
    words = sentence.split()
    candidates = [(i, j) for i in range(len(words)) for j in range(i + 1, len(words)) if words[i] != words[j]]
    if not candidates:
        return None
    i, j = rng.choice(candidates)
    words[i], words[j] = words[j], words[i]
    return " ".join(words)


def shuffle_words(sentence: str, rng: random.Random) -> str | None:
    """The sentence's words in a random order that differs from the original (None if impossible)."""
    words = sentence.split()
    if len(set(words)) < 2:
        return None
    shuffled = words[:]
    while shuffled == words:
        rng.shuffle(shuffled)
    return " ".join(shuffled)


def replace_words(sentence: str, rng: random.Random, pool: list[str], share: float = 0.25) -> str | None:
    """A quarter of the words (at least one) replaced by words drawn from the corpus's running text,
    so replacements are frequency-matched: telling them apart takes context, not word rarity."""
    words = sentence.split()
    count = max(1, round(share * len(words)))
    for i in rng.sample(range(len(words)), count):
        choice = rng.choice(pool)
        for _ in range(10):
            if choice.lower() != words[i].lower():
                break
            choice = rng.choice(pool)
        words[i] = choice
    corrupted = " ".join(words)
    return corrupted if corrupted != sentence else None


CORRUPTIONS = {"shuffle": shuffle_words, "swap": swap_two_words, "replace": replace_words}


def build_probe(documents: list[list[str]], n_train: int, n_dev: int, seed: int, corruption: str = "replace"):
    """(train, dev) lists of (text, None, label): 1 = the sentence as written, 0 = corrupted
    (``replace``: a quarter of its words swapped for frequency-matched corpus words; ``shuffle``: its
    words reordered; ``swap``: two words exchanged)."""
    rng = random.Random(seed)
    sentences = sorted({s for doc in documents for s in doc if 6 <= len(s.split()) <= 40})
    pool = [w for s in sentences for w in s.split()]
    corrupt = CORRUPTIONS[corruption]
    if corruption == "replace":
        corrupt = lambda sentence, rng: replace_words(sentence, rng, pool)  # noqa: E731
    rng.shuffle(sentences)
    examples = []
    for sentence in sentences:
        if rng.random() < 0.5:
            examples.append((sentence, None, 1))
        else:
            corrupted = corrupt(sentence, rng)
            if corrupted is not None:
                examples.append((corrupted, None, 0))
        if len(examples) == n_train + n_dev:
            break
    if len(examples) < n_train + n_dev:
        raise SystemExit(f"error: the held-out documents give {len(examples)} probe sentences, fewer than "
                         f"--probe-train {n_train} + --probe-dev {n_dev}; lower them or --heldout-every")
    return examples[:n_train], examples[n_train:]


# ----------------------------------------------------------------------------------------------
# Pre-training
# ----------------------------------------------------------------------------------------------
def encoder_snapshot(model, cfg):
    """The fine-tunable encoder (embeddings + discriminator-size body) as a CPU task_models.ElectraModel."""
    from electra_fast.task_models import encoder_class

    if hasattr(model, "network_state_dict"):  # ELECTRA: the embeddings the discriminator reads (any sharing)
        state = model.network_state_dict("discriminator")
    else:
        state = {name[len("electra."):] if name.startswith("electra.") else name: tensor
                 for name, tensor in model.state_dict().items() if name.startswith(("embeddings.", "electra."))}
    encoder = encoder_class(cfg.model)(cfg.model)  # ElectraModel, or ModernEncoder for the modern sizes
    encoder.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()})
    return encoder


def pretrain(kind: str, cfg, data_dir: Path, steps: int, snapshot_steps: list[int], args, device):
    """Train ``kind`` ("electra*" | "bert_mlm") for ``steps``; returns ({step: encoder}, log)."""
    from electra_fast.loader import PretrainingLoader
    from electra_fast.mlm_baseline import BertMLMModel
    from electra_fast.model import ElectraPretrainingModel

    torch.manual_seed(args.seed)
    model = (BertMLMModel(cfg) if kind == "bert_mlm" else ElectraPretrainingModel(cfg)).to(device).train()
    optimizer = torch.optim.AdamW(weight_decay_groups(model.named_parameters(), cfg.train.weight_decay),
                                  lr=cfg.train.lr, betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps,
                                  **({"fused": True} if device.type == "cuda" else {}))
    warmup = max(1, min(cfg.train.warmup_steps, steps // 10))
    scheduler = warmup_decay_schedule(optimizer, steps, warmup)
    # The same example order for both models: the training loader with the same seed.
    loader = PretrainingLoader(str(data_dir), micro_batch_size=args.batch, seed=args.seed,
                               num_workers=0 if device.type == "cpu" else 2)
    batches = iter(loader)
    snapshots, losses, started = {}, [], time.perf_counter()
    for step in range(1, steps + 1):
        batch = next(batches)
        input_ids, attention_mask, token_type_ids = (
            batch[key].to(device, non_blocking=True) for key in ("input_ids", "attention_mask", "token_type_ids"))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(input_ids, attention_mask, token_type_ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())  # read back only when logging: no host sync per step
        if step in snapshot_steps:
            snapshots[step] = encoder_snapshot(model, cfg)
        if (args.log_every and step % args.log_every == 0) or step == steps:
            recent = torch.stack(losses[-(args.log_every or 1):]).float()
            if not torch.isfinite(recent).all():
                raise RuntimeError(f"{kind}: the pre-training loss became non-finite before step {step}")
            if args.log_every and step % args.log_every == 0:
                print(f"  {kind:8s} step {step:6d}/{steps}  loss {recent.mean().item():.4f}", flush=True)
    final_loss = torch.stack(losses[-max(1, steps // 20):]).float().mean().item()
    return snapshots, {"seconds": time.perf_counter() - started, "final_loss": final_loss}


# ----------------------------------------------------------------------------------------------
# Probe
# ----------------------------------------------------------------------------------------------
def probe_accuracy(encoder, tokenizer, train, dev, args, device) -> list[float]:
    """Dev accuracy per seed after identical fine-tuning (electra_fast.finetune's recipe)."""
    from electra_fast.finetune import FinetuneConfig, finetune_classifier

    config = FinetuneConfig.from_overrides([
        f"train.epochs={args.probe_epochs}", f"train.lr={args.probe_lr}", "train.progress=false",
        "train.save_model=false", f"train.device={device}", f"task.max_seq_length={args.seq_len}",
        f"train.batch_size={args.probe_batch}",
    ])
    result = finetune_classifier(encoder, train, dev, num_labels=2, tokenizer=tokenizer, config=config,
                                 seeds=args.seed_list, task_name=f"acceptability-{args.corruption}")
    return [float(result["per_seed"][str(s)]["final"]["accuracy"]) for s in args.seed_list]


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--size", default="tiny", choices=sorted(PRESETS), help="discriminator size (named config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, e.g. --set train.lr=1e-3 (repeatable)")
    parser.add_argument("--corpus", default=None, help="text file (default: the embedded default corpus)")
    parser.add_argument("--max-documents", type=int, default=0, help="use only the first N documents (0 = all)")
    parser.add_argument("--heldout-every", type=int, default=10, help="every N-th document is held out for the probe")
    parser.add_argument("--vocab-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None, help="default: the config's data.seq_len")
    parser.add_argument("--batch", type=int, default=None, help="pre-training batch (sequences per step)")
    parser.add_argument("--electra-steps", type=int, default=None, help="ELECTRA's steps; BERT gets equal FLOPs")
    parser.add_argument("--sharing", default="tied",
                        help="ELECTRA embedding-sharing modes to train, comma-separated: tied, gdes, separate "
                             "(model.embedding_sharing; equal FLOPs, one BERT-MLM baseline)")
    parser.add_argument("--convention", default="paper", choices=("paper", "modern"),
                        help="FLOPs convention that equalises the budgets (default: the paper's)")
    parser.add_argument("--checkpoints", default="0.25,0.5,1.0", help="fractions of the budget to probe at")
    parser.add_argument("--corruption", default="replace", choices=sorted(CORRUPTIONS),
                        help="probe negatives: a quarter of the words replaced by corpus words (default), "
                             "the words shuffled, or two words swapped")
    parser.add_argument("--pretrain-lr", type=float, default=None, help="default: the size's (tiny 2e-4, else config)")
    parser.add_argument("--probe-train", type=int, default=None)
    parser.add_argument("--probe-dev", type=int, default=None)
    parser.add_argument("--probe-epochs", type=float, default=None)
    parser.add_argument("--probe-lr", type=float, default=None)
    parser.add_argument("--probe-batch", type=int, default=32)
    parser.add_argument("--seeds", default=None, help="fine-tuning seeds, comma-separated")
    parser.add_argument("--seed", type=int, default=1234, help="pre-training seed (initialisation, data order)")
    parser.add_argument("--no-random-init", action="store_true", help="skip the 0-FLOPs random encoder row")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--log-every", type=int, default=100)
    add_common_args(parser)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    from electra_fast.config import EMBEDDING_SHARING

    args.sharing_modes = list(dict.fromkeys(m.strip() for m in args.sharing.split(",") if m.strip()))
    unknown = [m for m in args.sharing_modes if m not in EMBEDDING_SHARING]
    if not args.sharing_modes or unknown:
        parser.error(f"--sharing takes modes among {', '.join(EMBEDDING_SHARING)}; got {args.sharing!r}")
    fractions = sorted({float(f) for f in args.checkpoints.split(",") if f.strip()})
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        parser.error("--checkpoints must be fractions in (0, 1]")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory(prefix="equal_compute-") as workdir:
        return run(args, parser, fractions, device, Path(workdir))


def run(args, parser, fractions: list[float], device: torch.device, workdir: Path) -> int:
    """Everything after the command line; the prepared data lives in ``workdir`` for the run."""
    from electra_fast.manifest import load_tokenizer, read_manifest

    # 1-2. Corpus, split, tokenizer, examples.
    started = time.perf_counter()
    documents = read_documents(args.corpus)
    if args.max_documents:
        documents = documents[: args.max_documents]
    heldout = documents[:: args.heldout_every]
    pretraining_docs = [d for i, d in enumerate(documents) if i % args.heldout_every]
    if not pretraining_docs or not heldout:
        parser.error(f"{len(documents)} documents cannot be split with --heldout-every {args.heldout_every}")
    overrides = [f"train.lr={args.pretrain_lr}"] if args.pretrain_lr else []
    overrides += args.overrides
    if args.seq_len:
        overrides.append(f"data.seq_len={args.seq_len}")
    args.seq_len = build_config(args.size, overrides=overrides).data.seq_len
    data_dir = prepare_pretraining_data(pretraining_docs, workdir, args.vocab_size, args.seq_len, args.seed)
    manifest = read_manifest(str(data_dir))
    tokenizer = load_tokenizer(data_dir)
    vocab_size = int(manifest["vocab_size"])
    cfg_overrides = [f"model.vocab_size={vocab_size}", *overrides] + [
        f"model.{name}_token_id={token_id}" for name, token_id in manifest["special_token_ids"].items()]
    cfg = build_config(args.size, overrides=cfg_overrides)
    num_examples = int(manifest["num_examples"])
    probe_train, probe_dev = build_probe(heldout, args.probe_train, args.probe_dev, seed=args.seed,
                                        corruption=args.corruption)
    positives = sum(label for *_, label in probe_dev) / len(probe_dev)
    majority = max(positives, 1 - positives)  # the accuracy of always answering the commoner label
    real_tokens = int(manifest["num_tokens"])
    print(f"corpus: {len(documents)} documents ({len(heldout)} held out), {num_examples} examples of "
          f"{args.seq_len} tokens ({real_tokens:,} real), vocab {vocab_size}; probe {len(probe_train)} train / "
          f"{len(probe_dev)} dev; prepared in {time.perf_counter() - started:.1f}s", flush=True)
    if num_examples < args.batch:
        parser.error(f"only {num_examples} pre-training examples for --batch {args.batch}")

    # 3. Equal budgets: every sharing mode costs ELECTRA's FLOPs per step (checked here), so one BERT-MLM
    # step count matches them all.
    electra_step = electra_flops(cfg, seq_len=args.seq_len, batch=args.batch, convention=args.convention)
    bert_step = bert_mlm_flops(cfg, seq_len=args.seq_len, batch=args.batch, convention=args.convention)
    budget = electra_step.training_per_step * args.electra_steps
    bert_steps = max(1, round(budget / bert_step.training_per_step))
    plan = {}  # row name -> (steps, FLOPs of a step, config)
    for mode in args.sharing_modes:
        mode_cfg = build_config(args.size, overrides=[*cfg_overrides, f"model.embedding_sharing={mode}"])
        mode_step = electra_flops(mode_cfg, seq_len=args.seq_len, batch=args.batch, convention=args.convention)
        if mode_step.training_per_step != electra_step.training_per_step:
            raise RuntimeError(f"embedding sharing {mode} changes the FLOPs per step: the budgets would differ")
        plan["electra" if mode == "tied" else f"electra_{mode}"] = (args.electra_steps, mode_step, mode_cfg)
    plan["bert_mlm"] = (bert_steps, bert_step, cfg)
    print(f"budget: {budget:.3e} FLOPs ({args.convention} convention) = ELECTRA {args.electra_steps} steps "
          f"x {electra_step.training_per_step:.3e} = BERT-MLM {bert_steps} steps x "
          f"{bert_step.training_per_step:.3e}", flush=True)

    rows = []
    if not args.no_random_init:
        from electra_fast.task_models import encoder_class

        torch.manual_seed(args.seed)
        accs = probe_accuracy(encoder_class(cfg.model)(cfg.model), tokenizer, probe_train, probe_dev, args, device)
        rows.append({"model": "random_init", "fraction": 0.0, "steps": 0, "flops": 0.0, "accuracies": accs})
        print(f"  probe random_init: accuracy {statistics.median(accs):.4f} {accs}", flush=True)
    for kind, (steps, step_flops, kind_cfg) in plan.items():
        snapshot_steps = sorted({max(1, round(f * steps)) for f in fractions})
        snapshots, log = pretrain(kind, kind_cfg, data_dir, steps, snapshot_steps, args, device)
        print(f"pre-trained {kind} for {steps} steps in {log['seconds']:.1f}s (final loss {log['final_loss']:.4f})",
              flush=True)
        for step in snapshot_steps:
            accs = probe_accuracy(snapshots.pop(step), tokenizer, probe_train, probe_dev, args, device)
            rows.append({"model": kind, "sharing": kind_cfg.model.embedding_sharing if kind != "bert_mlm" else None,
                         "fraction": step / steps, "steps": step,
                         "flops": step * step_flops.training_per_step, "accuracies": accs,
                         "pretrain_seconds": log["seconds"], "final_pretrain_loss": log["final_loss"]})
            print(f"  probe {kind} @ step {step}: accuracy {statistics.median(accs):.4f} {accs}", flush=True)

    for row in rows:
        accs = row["accuracies"]
        row.update(size=args.size, convention=args.convention, batch=args.batch, seq_len=args.seq_len,
                   vocab_size=vocab_size, corpus=args.corpus or "default", seeds=args.seed_list,
                   accuracy_median=statistics.median(accs), accuracy_mean=statistics.fmean(accs),
                   accuracy_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                   probe_train=len(probe_train), probe_dev=len(probe_dev), corruption=args.corruption,
                   dev_majority=majority,
                   device_type=device.type)
    print()
    print_table(["model", "budget", "steps", "pre-train FLOPs", "probe acc (median)", "mean ± std", "seeds"],
                [[r["model"], f"{r['fraction']:.0%}", r["steps"], r["flops"], f"{r['accuracy_median']:.4f}",
                  f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}", len(r["accuracies"])] for r in rows],
                f"Acceptability probe ({args.corruption}) accuracy vs pre-training FLOPs ({args.size}, {args.convention} FLOPs, "
                f"ELECTRA {args.electra_steps} steps = BERT-MLM {bert_steps} steps; embedding sharing: "
                f"{', '.join(args.sharing_modes)})")
    print(f"chance: always answering the commoner label scores {majority:.4f} on this dev set; a row at that "
          "value learned nothing from the probe's training set.\n")
    path = append_rows(args, "equal_compute", rows)
    if path:
        print(f"rows: {path}")

    def draw(plt):
        labels = {kind: "BERT-MLM" if kind == "bert_mlm" else "ELECTRA" + (
            f" ({kind.split('_', 1)[1]} embeddings)" if "_" in kind else "") for kind in plan}
        for kind, label in labels.items():
            series = [r for r in rows if r["model"] in (kind, "random_init")]
            series.sort(key=lambda r: r["flops"])
            plt.errorbar([r["flops"] for r in series], [r["accuracy_median"] for r in series],
                         yerr=[r["accuracy_std"] for r in series], marker="o", capsize=3, label=label)
        plt.axhline(majority, color="grey", lw=0.8, ls="--", label="majority class")
        plt.xlabel(f"pre-training FLOPs ({args.convention} convention)")
        plt.ylabel(f"acceptability probe ({args.corruption}) dev accuracy, median over seeds")
        plt.title(f"Equal compute, {args.size}: ELECTRA vs BERT-MLM")
        plt.legend()

    save_plot(args, "equal_compute", draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
