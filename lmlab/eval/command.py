"""`lmlab eval`: a thin map from the command line onto lmlab.eval.evaluate."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class EvalArgs:
    model: str
    tasks: str
    data_dir: str | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    batch_size: int = 32
    max_length: int | None = None
    rolling_stride: int | None = None
    seed: int = 1234
    output: str | None = None
    log_samples: bool = False
    dtype: str = "float32"
    quantize: str | None = None
    group_size: int = 32
    compile: bool = False
    threads: int | None = None
    device: str | None = None


def register(subparsers) -> None:
    from lmlab.inference.load import add_run_args

    p = subparsers.add_parser("eval", help="evaluate a model on benchmarks or YAML tasks",
                              description="Evaluate a base model: built-in tasks read --data-dir; a .yaml path "
                                          "is a task in lm-evaluation-harness format over local files.")
    p.add_argument("-m", "--model", required=True, help="preset name, .gguf file, HF folder or lmlab checkpoint")
    p.add_argument("--tasks", required=True, help="comma-separated built-in task names and/or task .yaml paths")
    p.add_argument("--data-dir", help="folder holding the benchmarks' files (layouts: README, Evaluation)")
    p.add_argument("--num-fewshot", type=int, help="override each task's few-shot count")
    p.add_argument("--limit", type=int, help="score only the first N items of each task")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per forward pass (default 32)")
    p.add_argument("--max-length", type=int, help="context window in tokens (default: the model's)")
    p.add_argument("--rolling-stride", type=int, help="rolling perplexity: new tokens per window "
                                                      "(default: the window, i.e. disjoint windows)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed")
    p.add_argument("--output", help="write the results JSON here (only once the run has completed)")
    p.add_argument("--log-samples", action="store_true", help="also write per-item records next to --output")
    add_run_args(p)
    p.set_defaults(func=lambda a: run(EvalArgs(**{k: getattr(a, k) for k in EvalArgs.__dataclass_fields__})))


def _init_distributed() -> bool:
    """Join the torchrun process group (gloo: works on CPU and GPU tensors alike). True if this call made it."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        return True
    return False


def run(args: EvalArgs) -> int:
    import torch.distributed as dist

    owned = _init_distributed()
    try:
        rc = _run(args)
        if owned:
            dist.barrier()  # rank 0 writes last; everyone leaves together
        return rc
    finally:
        if owned and dist.is_initialized():  # no gloo thread may outlive the interpreter (it aborts the process)
            dist.destroy_process_group()


def _run(args: EvalArgs) -> int:
    import torch

    from lmlab.inference.load import load, run_config
    from lmlab.errors import LmlabError
    from lmlab.eval.evaluator import evaluate
    from lmlab.eval.report import markdown_table, write_json

    if args.limit is not None and args.limit < 1:
        raise LmlabError(f"--limit must be at least 1 (got {args.limit})")
    if args.output and Path(args.output).is_dir():
        raise LmlabError(f"--output {args.output}: is a folder; give a file name")
    run = run_config(args)
    if run.device is None and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        run.device = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun on a GPU machine: one GPU per process
    model, tok = load(args.model, run)
    if tok is None:
        raise LmlabError(f"{args.model}: no tokenizer found with this model")
    results = evaluate(model, tok, args.tasks, data_dir=args.data_dir, num_fewshot=args.num_fewshot,
                       limit=args.limit, batch_size=args.batch_size, seed=args.seed, max_length=args.max_length,
                       rolling_stride=args.rolling_stride, log_samples=args.log_samples)
    results["config"]["model"] = args.model
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    samples = results.pop("samples", None)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        if samples is not None:
            for task, records in samples.items():
                _write_jsonl(out.with_name(f"{out.stem}_samples_{task}.jsonl"), records)
        write_json(results, out)
    print(markdown_table(results))
    return 0


def _write_jsonl(path: Path, records: list[dict]) -> None:
    from lmlab.eval.report import _clean

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(_clean(r), ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def add_to(parser: argparse.ArgumentParser) -> None:  # pragma: no cover - convenience for other CLIs
    register(parser.add_subparsers())
