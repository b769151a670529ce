"""`lmlab pretrain --config FILE [key=value ...]`: a thin map onto lmlab.train.train.

`register_recipe` is the shape every recipe-driven command shares (pretrain, finetune): a YAML recipe,
`key=value` overrides, `--print-config`, and the run's summary as JSON on stdout (rank 0 only).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable


def pretrain(config: str | None, overrides: list[str]) -> dict:
    from lmlab.train import load_config, train

    return train(load_config(config, overrides))


def register_recipe(subparsers, name: str, *, help: str, description: str, load: Callable[[Any, list], Any],
                    dump: Callable[[Any], str], run: Callable[[Any], dict]) -> argparse.ArgumentParser:
    """A subcommand that loads a recipe (`load(path, overrides)`), prints it (`dump`) or runs it (`run`)."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.add_argument("--config", "-c", help="YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    def handler(args: argparse.Namespace) -> int:
        cfg = load(args.config, args.overrides)
        if args.print_config:
            print(dump(cfg), end="")
            return 0
        summary = run(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(summary, indent=2))
        return 0

    p.set_defaults(func=handler)
    return p


def _load(path, overrides):
    from lmlab.train.config import load_config

    return load_config(path, overrides)


def _dump(cfg) -> str:
    from lmlab.train.config import dump_config

    return dump_config(cfg)


def _train(cfg) -> dict:
    from lmlab.train import train

    return train(cfg)


def register(subparsers) -> None:
    register_recipe(
        subparsers, "pretrain", help="pretrain a model from a YAML recipe (works under torchrun)",
        description="Pretrain with a YAML recipe (see configs/). Override any key: optim.lr=3e-4 "
                    "objectives.0.weight=0.5 model.n_layer=6. Under `torchrun --nproc-per-node N` "
                    "it trains with DDP (or distributed=fsdp).",
        load=_load, dump=_dump, run=_train)
