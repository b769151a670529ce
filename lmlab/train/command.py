"""`lmlab pretrain --config FILE [key=value ...]`: a thin map onto lmlab.train.train."""
from __future__ import annotations

import argparse
import json


def pretrain(config: str | None, overrides: list[str]) -> dict:
    from lmlab.train import load_config, train

    summary = train(load_config(config, overrides))
    return summary


def _pretrain(args: argparse.Namespace) -> int:
    if args.print_config:
        from lmlab.train.config import dump_config, load_config

        print(dump_config(load_config(args.config, args.overrides)), end="")
        return 0
    summary = pretrain(args.config, args.overrides)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain a model from a YAML recipe (works under torchrun)",
        description="Pretrain with a YAML recipe (see configs/). Override any key: optim.lr=3e-4 "
                    "objectives.0.weight=0.5 model.n_layer=6. Under `torchrun --nproc-per-node N` "
                    "it trains with DDP (or distributed=fsdp).")
    p.add_argument("--config", "-c", help="YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_pretrain)
