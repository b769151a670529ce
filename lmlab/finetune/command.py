"""`lmlab finetune --config FILE [key=value ...]`: a thin map onto lmlab.finetune.runner.finetune.

The CLI hooks it in with `lmlab.finetune.command.register(subparsers)`.
"""
from __future__ import annotations

import argparse
import json


def finetune(config: str | None, overrides: list[str]) -> dict:
    """Run a fine-tuning recipe with overrides; returns the run's summary."""
    from lmlab.finetune.config import load_finetune_config
    from lmlab.finetune.runner import finetune as run

    return run(load_finetune_config(config, overrides))


def _finetune(args: argparse.Namespace) -> int:
    if args.print_config:
        from lmlab.finetune.config import dump_finetune_config, load_finetune_config

        print(dump_finetune_config(load_finetune_config(args.config, args.overrides)), end="")
        return 0
    print(json.dumps(finetune(args.config, args.overrides), indent=2))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a model (LoRA or full; instruction tuning or classification) from a YAML recipe",
        description="Fine-tune with a YAML recipe (see configs/finetune-*.yaml). Override any key: "
                    "method=full lora.r=16 data.limit=200 max_iters=50. LoRA adapters are written in HF PEFT's "
                    "layout (<out_dir>/adapter), the merged model as an HF folder (<out_dir>/hf).")
    p.add_argument("--config", "-c", help="YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_finetune)
