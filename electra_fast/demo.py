"""What a pretrained run learned, in one table: the exported discriminator on a hand-corrupted sentence.

    python -m electra_fast.demo runs/demo                      # the default sentence and replacements
    python -m electra_fast.demo runs/demo --sentence "the cat sat on the mat ." --replace 1=dog 3=under

The run's Hugging Face export (``RUN/export/discriminator`` and ``generator``, written at the end of
training or by ``electra-fast export``) is loaded with transformers, as any downstream user would.
Some words of a held-out sentence are replaced by hand; the table lists every token with the
discriminator's probability that it was replaced (ELECTRA's pretraining task), and for each replaced
word the generator's top guesses when that word is masked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

# A sentence in the style of the default corpus (the Python documentation), not taken from it; the
# replacements are plausible-looking but wrong words.
DEFAULT_SENTENCE = "the function returns a new list containing all items from the iterable in sorted order ."
DEFAULT_REPLACEMENTS = {2: "deletes", 5: "thread"}


def _bar(p: float, width: int = 20) -> str:
    filled = int(round(p * width))
    return "#" * filled + "." * (width - filled)


def demo_summary(run_dir: str | Path, sentence: str = DEFAULT_SENTENCE,
                 replacements: dict[int, str] | None = None, out: TextIO = sys.stdout, top_k: int = 3) -> list[dict]:
    """Print the table described in the module docstring; returns its rows (one per word piece).

    ``replacements`` maps word positions (0-based, whitespace-split) to the word put there.
    """
    import torch
    from transformers import AutoTokenizer, ElectraForMaskedLM, ElectraForPreTraining

    replacements = DEFAULT_REPLACEMENTS if replacements is None else replacements
    export = Path(run_dir) / "export"
    disc_dir, gen_dir = export / "discriminator", export / "generator"
    if not (disc_dir / "config.json").is_file():
        raise FileNotFoundError(f"{disc_dir}: no exported discriminator (train with train.export_at_end=true "
                                f"or run `electra-fast export --checkpoint {run_dir} --out {export}`)")
    words = sentence.split()
    bad = [i for i in replacements if not 0 <= i < len(words)]
    if bad:
        raise ValueError(f"replacement positions {bad} are outside the sentence's {len(words)} words")
    corrupted = [replacements.get(i, word) for i, word in enumerate(words)]

    tokenizer = AutoTokenizer.from_pretrained(str(disc_dir))
    discriminator = ElectraForPreTraining.from_pretrained(str(disc_dir)).eval()
    encoded = tokenizer(corrupted, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        probabilities = torch.sigmoid(discriminator(**encoded).logits[0]).tolist()

    rows = []
    for position, (token_id, word_index) in enumerate(zip(encoded["input_ids"][0].tolist(), encoded.word_ids())):
        if word_index is None:  # [CLS] / [SEP]
            continue
        rows.append({"position": position, "token": tokenizer.convert_ids_to_tokens(token_id),
                     "word": word_index, "original": words[word_index],
                     "replaced": word_index in replacements, "p_replaced": probabilities[position]})

    guesses = {}
    if (gen_dir / "config.json").is_file():
        generator = ElectraForMaskedLM.from_pretrained(str(gen_dir)).eval()
        for word_index in sorted(replacements):
            masked = list(corrupted)
            masked[word_index] = tokenizer.mask_token
            enc = tokenizer(masked, is_split_into_words=True, return_tensors="pt")
            at = enc["input_ids"][0].tolist().index(tokenizer.mask_token_id)
            with torch.no_grad():
                logits = generator(**enc).logits[0, at]
            guesses[word_index] = tokenizer.convert_ids_to_tokens(logits.topk(top_k).indices.tolist())

    print(f"original : {sentence}", file=out)
    print(f"corrupted: {' '.join(corrupted)}", file=out)
    print(f"\n{'token':<16} {'original':<14} {'replaced':<9} {'P(replaced)':>11}", file=out)
    for row in rows:
        original = row["original"] if row["replaced"] else ""
        flag = "yes" if row["replaced"] else ""
        print(f"{row['token']:<16} {original:<14} {flag:<9} {row['p_replaced']:>11.3f}  {_bar(row['p_replaced'])}",
              file=out)
    replaced = [r["p_replaced"] for r in rows if r["replaced"]]
    kept = [r["p_replaced"] for r in rows if not r["replaced"]]
    if replaced and kept:
        print(f"\nmean P(replaced): {sum(replaced) / len(replaced):.3f} on replaced tokens, "
              f"{sum(kept) / len(kept):.3f} on original tokens", file=out)
    for word_index, top in guesses.items():
        print(f"generator's top-{top_k} for [MASK] at '{words[word_index]}': {', '.join(top)}", file=out)
    return rows


def _parse_replacements(items: list[str]) -> dict[int, str]:
    replacements = {}
    for item in items:
        index, sep, word = item.partition("=")
        if not sep or not index.strip().isdigit() or not word.strip():
            raise ValueError(f"--replace expects POSITION=WORD, got {item!r}")
        replacements[int(index)] = word.strip()
    return replacements


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m electra_fast.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory with export/discriminator (and export/generator)")
    parser.add_argument("--sentence", default=DEFAULT_SENTENCE)
    parser.add_argument("--replace", nargs="+", default=None, metavar="POSITION=WORD",
                        help="words to put in by hand (0-based word positions)")
    args = parser.parse_args(argv)
    try:
        replacements = None if args.replace is None else _parse_replacements(args.replace)
        demo_summary(args.run_dir, args.sentence, replacements)
    except (FileNotFoundError, ValueError) as exc:
        print(f"electra_fast.demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
