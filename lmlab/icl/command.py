"""`lmlab icl`: a thin map from the command line onto lmlab.icl.experiment (the grid of retrievers ×
shots × seeds on one task, scored by the evaluation engine)."""
from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.inference.load import RunConfig, add_run_args, run_config


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LmlabError(f"{what} must be comma-separated integers, got {text!r}") from None


@dataclass
class ICLArgs:
    model: str
    task: str
    data_dir: str | None = None
    split: str | None = None
    shots: str = "0,1,4,8,16"
    seeds: int = 5
    retriever: str = "random"
    order: str | None = None
    scoring: str = "direct"
    calibrate: bool = False
    limit: int | None = None
    sample: int | None = None
    sample_seed: int = 0
    batch_size: int = 32
    instruction: str | None = None
    template: str | None = None
    channel_template: str | None = None
    separator: str | None = None
    verbalizer: str | None = None
    encoder: str = "all-minilm-l6-v2"
    mmr_lambda: float = 0.5
    no_shared_prefix: bool = False
    output: str | None = None
    plot: str | None = None
    log_demos: bool = False
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_namespace(cls, a: argparse.Namespace) -> "ICLArgs":
        own = {f.name: getattr(a, f.name) for f in dataclasses.fields(cls) if f.name != "run"}
        return cls(**own, run=run_config(a))


def register(subparsers) -> None:
    p = subparsers.add_parser("icl", help="in-context learning experiments (shots × retrievers × seeds)",
                              description="Score a classification task with in-context demonstrations over a "
                                          "grid of shot counts, demonstration retrievers and seeds.")
    p.add_argument("-m", "--model", required=True, help="preset name, .gguf file, HF folder or lmlab checkpoint")
    p.add_argument("--task", required=True, help="sst2, trec, agnews, subj, mr, cr, mpqa, rte, cb or a task .yaml")
    p.add_argument("--data-dir", help="folder holding the task's files (layouts: docs/icl.md)")
    p.add_argument("--split", help="test split (default: dev for sst2, val for rte/cb, else test)")
    p.add_argument("--shots", default="0,1,4,8,16", help="comma-separated shot counts (default 0,1,4,8,16)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per random cell (default 5)")
    p.add_argument("--retriever", default="random", help="comma-separated: random, balanced, bm25, topk, mmr")
    p.add_argument("--order", choices=["random", "similarity"],
                   help="demonstration order for bm25/topk/mmr (default similarity: most similar last)")
    p.add_argument("--scoring", default="direct", choices=["direct", "channel", "generate"])
    p.add_argument("--calibrate", action="store_true", help="also report contextual calibration (direct scoring)")
    p.add_argument("--limit", type=int, help="score only the first N test items")
    p.add_argument("--sample", type=int, help="score a seeded random N of the test items (the same in every cell)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of --sample (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per forward pass (default 32)")
    p.add_argument("--instruction", help="text before the demonstrations (\\n for newlines)")
    p.add_argument("--template", help="demonstration template over the task's fields, ending with {label}")
    p.add_argument("--channel-template", help="channel scoring's template: {label} first")
    p.add_argument("--separator", help="between demonstrations (default \\n\\n)")
    p.add_argument("--verbalizer", help="label words: LABEL=WORD,LABEL=WORD")
    p.add_argument("--encoder", default="all-minilm-l6-v2", help="sentence encoder for topk/mmr")
    p.add_argument("--mmr-lambda", type=float, default=0.5, help="MMR relevance weight (default 0.5)")
    p.add_argument("--no-shared-prefix", action="store_true",
                   help="score fixed demonstrations without reusing the shared prefix's KV cache")
    p.add_argument("--output", help="write the results JSON here (every cell and the full config)")
    p.add_argument("--plot", help="write a PNG of accuracy vs shots here (needs matplotlib)")
    p.add_argument("--log-demos", action="store_true",
                   help="write each item's demonstrations and predictions to <output>_demos.jsonl")
    add_run_args(p)
    p.set_defaults(func=lambda a: run(ICLArgs.from_namespace(a)))


def grid_config(args: ICLArgs):
    from lmlab.icl.experiment import GridConfig

    return GridConfig(shots=_ints(args.shots, "--shots"), seeds=args.seeds,
                      retrievers=[r.strip() for r in args.retriever.split(",") if r.strip()], order=args.order,
                      scoring=args.scoring, calibrate=args.calibrate, limit=args.limit,
                      sample=args.sample, sample_seed=args.sample_seed,
                      share_prefix=not args.no_shared_prefix, log_demos=args.log_demos, mmr_lambda=args.mmr_lambda)


def task_of(args: ICLArgs):
    from lmlab.icl.prompt import parse_verbalizer, unescape
    from lmlab.icl.tasks import load_task

    task = load_task(args.task, args.data_dir, args.split)
    task.prompt = task.prompt.with_overrides(
        instruction=unescape(args.instruction), template=unescape(args.template),
        channel_template=unescape(args.channel_template), separator=unescape(args.separator),
        verbalizer=parse_verbalizer(args.verbalizer) if args.verbalizer else None)
    task.prompt.check_labels(task.labels, args.task)
    return task


def run(args: ICLArgs) -> int:
    from lmlab.eval.engine import Engine
    from lmlab.icl.experiment import Grid, markdown, summarize
    from lmlab.inference.load import load
    from lmlab.utils.atomic import check_writable

    for path in (args.output, args.plot):
        if path:
            check_writable(path)
    if args.log_demos and not args.output:
        raise LmlabError("--log-demos writes next to --output; give --output too")
    cfg = grid_config(args)
    task = task_of(args)
    cfg.check(len(task.pool))
    encoder = None
    if any(r in ("topk", "mmr") for r in cfg.retrievers) and any(cfg.shots):
        from lmlab.retrieval.embed import SentenceEncoder

        encoder = SentenceEncoder.load(args.encoder)
    started = time.perf_counter()
    model, tok = load(args.model, args.run)
    if tok is None:
        raise LmlabError(f"{args.model}: no tokenizer found with this model")
    engine = Engine(model, tok, batch_size=args.batch_size, progress=False)
    grid = Grid(engine, task, cfg, encoder=encoder)

    def save(cells: list[dict[str, Any]], planned: int) -> dict[str, Any]:
        """The results so far, written atomically after every cell, so a stopped run keeps what it did."""
        rows = summarize(cells, cfg.retrievers, cfg.shots)
        results = _results(args, task, cfg, cells, rows, time.perf_counter() - started)
        results.update(cells_planned=planned, complete=len(cells) == planned,
                       test_items=grid.test_origins)  # which items were scored ("file:line")
        if args.output:
            from lmlab.utils.atomic import write_json, write_jsonl

            out = Path(args.output)
            if args.log_demos:
                write_jsonl(out.with_name(f"{out.stem}_demos.jsonl"), grid.demo_log)
            write_json(out, results, indent=2)
        return results

    cells = grid.run(on_cell=save)
    rows = save(cells, len(cells))["summary"]
    if args.plot:
        from lmlab.icl.plot import plot_curve

        plot_curve(rows, args.plot, title=f"{task.name}, {args.model}, {cfg.scoring} scoring")
    print(markdown(rows))
    return 0


def _results(args: ICLArgs, task, cfg, cells, rows, seconds: float) -> dict[str, Any]:
    from lmlab.icl.experiment import config_dict

    prompt = task.prompt
    return {"task": task.name, "model": args.model, "summary": rows, "cells": cells,
            "config": {**dataclasses.asdict(args), "grid": config_dict(cfg), "source": task.source,
                       "labels": task.labels, "pool_size": len(task.pool), "test_size": len(task.test),
                       "prompt": {"instruction": prompt.instruction, "template": prompt.template,
                                  "channel_template": prompt.channel_template, "separator": prompt.separator,
                                  "verbalizer": prompt.verbalizer}},
            "total_seconds": round(seconds, 3)}
