"""The `lmlab` command: a thin map from subcommand to a typed function.

Core subcommands live in lmlab.commands; each pillar (evaluation, pretraining, ...) registers its own
subcommands from the module named in PILLARS, through `register(subparsers)`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from lmlab.errors import LmlabError

# Pillar modules that add subcommands of their own.
PILLARS = [
    "lmlab.commands",
    "lmlab.eval.command",
    "lmlab.data.command",
    "lmlab.train.command",
    "lmlab.finetune.command",
    "lmlab.icl.command",
    "lmlab.retrieval.command",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description="Language models from theory to practice.")
    parser.add_argument("--version", action="version", version=f"lmlab {__import__('lmlab').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in PILLARS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    try:
        code = args.func(args)
    except LmlabError as e:
        message = " ".join(str(e).split("\n"))
        print(f"lmlab {args.command}: error: {message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"lmlab {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code or 0)
