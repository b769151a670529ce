"""`lmlab finetune --config FILE [key=value ...]`: a thin map onto lmlab.finetune.runner.finetune, through
the recipe command shape `lmlab pretrain` uses (lmlab.train.command.register_recipe)."""
from __future__ import annotations


def finetune(config: str | None, overrides: list[str]) -> dict:
    """Run a fine-tuning recipe with overrides; returns the run's summary."""
    from lmlab.finetune.config import load_finetune_config
    from lmlab.finetune.runner import finetune as run

    return run(load_finetune_config(config, overrides))


def _load(path, overrides):
    from lmlab.finetune.config import load_finetune_config

    return load_finetune_config(path, overrides)


def _dump(cfg) -> str:
    from lmlab.finetune.config import dump_finetune_config

    return dump_finetune_config(cfg)


def _run(cfg) -> dict:
    from lmlab.finetune.runner import finetune as run

    return run(cfg)


def register(subparsers) -> None:
    from lmlab.train.command import register_recipe

    register_recipe(
        subparsers, "finetune",
        help="fine-tune a model (LoRA or full; instruction tuning or classification) from a YAML recipe",
        description="Fine-tune with a YAML recipe (see configs/finetune-*.yaml). Override any key: "
                    "method=full lora.r=16 data.limit=200 max_iters=50. LoRA adapters are written in HF PEFT's "
                    "layout (<out_dir>/adapter), the merged model as an HF folder (<out_dir>/hf). Rerunning the "
                    "same command continues from <out_dir>/ckpt.pt (resume=false starts over).",
        load=_load, dump=_dump, run=_run)
