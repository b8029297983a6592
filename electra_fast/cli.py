"""The ``electra-fast`` command: parses arguments and calls into the modules that do the work.

    electra-fast prepare --default --out data/default
    electra-fast prepare --input corpus/ --out data/wiki --vocab-size 30522 --seq-len 128
    electra-fast pretrain --config configs/electra-small.yaml --run-dir runs/small --set data.path=data/wiki
    electra-fast export --checkpoint runs/small --out runs/small/export
    electra-fast finetune --model runs/small --task sst-2 --data-dir glue/SST-2 --out runs/small/sst2
    electra-fast config --config configs/electra-base.yaml --set train.lr=1e-4   # print the resolved config

Each sub-command's module is imported only when that sub-command runs, so ``electra-fast --help`` is
fast and does not import DeepSpeed, datasets or transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

DESCRIPTION = """electra-fast: pretrain ELECTRA text encoders (a generator that fills masked words and a
discriminator that spots the replaced ones), export them to Hugging Face folders, and fine-tune them."""

EPILOG = """a first run, start to finish (on a CPU: a few minutes on a small model):
  electra-fast prepare --default --out data/default               # the embedded corpus, no download
  electra-fast pretrain --config configs/electra-small.yaml --run-dir runs/small --set data.path=data/default
  electra-fast finetune --model runs/small --task sst-2 --data-dir glue/SST-2 --out runs/small/sst2

every config key and its value:        electra-fast config --config configs/electra-small.yaml
a command's own options:               electra-fast COMMAND --help
`make demo` in the repository runs the first two on a small model and prints what it learned."""

# sub-command -> (module, add-arguments function, run function, help)
COMMANDS = {
    "prepare": ("electra_fast.prepare", "add_prepare_arguments", "run_prepare",
                "tokenise a corpus into packed ELECTRA examples (or build the embedded default corpus)"),
    "pretrain": ("electra_fast.train", "add_train_arguments", "run_train",
                 "pretrain generator + discriminator (also: deepspeed --module electra_fast.train); "
                 "`electra-fast config --config FILE` lists every key --set can change"),
    "export": ("electra_fast.checkpoints", "add_export_arguments", "run_export",
               "consolidate a checkpoint and write Hugging Face folders"),
    "finetune": ("electra_fast.finetune", "add_finetune_arguments", "run_finetune",
                 "fine-tune the discriminator on GLUE, classification, regression or token tagging"),
}


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (configs/electra-*.yaml)")
    parser.add_argument("--size", help="a named size instead of / over the YAML's (tiny, small, base, large)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")


def _run_config(args: argparse.Namespace) -> int:
    import yaml

    from .config import load_config

    cfg = load_config(args.config, args.overrides, size=args.size)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: lists the sub-commands without importing their modules."""
    parser = argparse.ArgumentParser(prog="electra-fast", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    config = sub.add_parser("config", help="print the resolved configuration", description="print the resolved configuration")
    _add_config_arguments(config)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Build only the chosen sub-command's parser when possible (imports stay lazy).
    parser = build_parser() if not argv or argv[0] not in COMMANDS else _single_parser(argv[0])
    args = parser.parse_args(argv)
    from .config import ConfigError

    try:
        if args.command == "config":
            return _run_config(args)
        module, _, run_fn, _ = COMMANDS[args.command]
        return int(getattr(importlib.import_module(module), run_fn)(args) or 0)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"electra-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # DataError, ExportError, FinetuneError are ValueErrors with a clear message
        if type(exc).__name__.endswith("Error") and type(exc) is not ValueError:
            print(f"electra-fast {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


def _single_parser(name: str) -> argparse.ArgumentParser:
    module, add_fn, _, help_text = COMMANDS[name]
    parser = argparse.ArgumentParser(prog="electra-fast", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    command = sub.add_parser(name, help=help_text, description=help_text)
    getattr(importlib.import_module(module), add_fn)(command)
    return parser


if __name__ == "__main__":
    sys.exit(main())
