"""The `lmlab` command: a thin map from subcommand to a typed function.

Core subcommands live in lmlab.commands; each pillar (evaluation, pretraining, ...) registers its own
subcommands from the module named in PILLARS, through `register(subparsers)`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from lmlab.errors import LmlabError, first_line

# The tail of the one line an unexpected exception becomes; the tests fail any run that prints it.
FALLBACK = "rerun with --debug for the traceback"

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
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in PILLARS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, as the hint says "rerun with --debug"
    args = parser.parse_args([a for a in argv if a != "--debug"])
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
    except Exception as e:  # noqa: BLE001 - a bug or an unchecked input: one line, the traceback on request
        if debug:
            raise
        unexpected(args.command, e)
        sys.exit(1)
    sys.exit(code or 0)


def unexpected(command: str, e: BaseException) -> None:
    """The one line an exception other than LmlabError becomes (the tests treat reaching it as a failure)."""
    print(f"lmlab {command}: unexpected error: {type(e).__name__}: {first_line(e)} ({FALLBACK})", file=sys.stderr)
