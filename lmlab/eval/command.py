"""`lmlab eval`: a thin map from the command line onto lmlab.eval.evaluate."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.inference.load import RunConfig, add_run_args, add_speculation_args, run_config, speculation_options


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
    run: RunConfig = field(default_factory=RunConfig)  # dtype, quantize, threads, compile, device
    speculation: dict = field(default_factory=dict)  # --draft/--speculate/--prompt-lookup/--no-adapt
    retrieve: dict = field(default_factory=dict)  # --retrieve INDEX and its options (lmlab.retrieval.command)

    @classmethod
    def from_namespace(cls, a: argparse.Namespace) -> "EvalArgs":
        from lmlab.retrieval.command import retrieve_options

        own = {f.name: getattr(a, f.name) for f in dataclasses.fields(cls)
               if f.name not in ("run", "speculation", "retrieve")}
        return cls(**own, run=run_config(a), speculation=speculation_options(a), retrieve=retrieve_options(a))


def register(subparsers) -> None:
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
    add_speculation_args(p)
    from lmlab.retrieval.command import add_retrieve_args

    add_retrieve_args(p)
    p.set_defaults(func=lambda a: run(EvalArgs.from_namespace(a)))


def run(args: EvalArgs) -> int:
    """Evaluate; under torchrun every process takes part (gloo: CPU and GPU tensors alike) and rank 0
    prints and writes."""
    from lmlab.utils import dist

    with dist.group(backend="gloo") as d:
        return _run(args, d)


def _run(args: EvalArgs, d) -> int:
    import torch

    from lmlab.inference.load import load, load_speculation
    from lmlab.errors import LmlabError
    from lmlab.eval.evaluator import evaluate
    from lmlab.eval.report import markdown_table, write_results, write_samples

    if args.limit is not None and args.limit < 1:
        raise LmlabError(f"--limit must be at least 1 (got {args.limit})")
    for flag, value, low in (("--num-fewshot", args.num_fewshot, 0), ("--max-length", args.max_length, 1),
                             ("--rolling-stride", args.rolling_stride, 1)):
        if value is not None and value < low:
            raise LmlabError(f"{flag}: {value} is out of range (allowed: an integer >= {low})")
    if not 0 <= args.seed < 2**64:
        raise LmlabError(f"--seed: {args.seed} is out of range (allowed: an integer from 0 to 2**64-1)")
    if args.output:
        from lmlab.utils.atomic import check_writable

        check_writable(args.output)
    from lmlab.retrieval.command import augmenter

    augment = augmenter(args.retrieve)  # before the model: a bad index fails fast
    run = args.run
    if run.device is None and d.enabled and torch.cuda.is_available():
        run = dataclasses.replace(run, device=f"cuda:{d.local_rank}")  # torchrun on GPUs: one per process
    model, tok = load(args.model, run)
    if tok is None:
        raise LmlabError(f"{args.model}: no tokenizer found with this model")
    spec = load_speculation(model, tok, run=run, target_name=args.model, **args.speculation)
    results = evaluate(model, tok, args.tasks, data_dir=args.data_dir, num_fewshot=args.num_fewshot,
                       limit=args.limit, batch_size=args.batch_size, seed=args.seed, max_length=args.max_length,
                       rolling_stride=args.rolling_stride, log_samples=args.log_samples, speculation=spec,
                       augment=augment)
    results["config"]["model"] = args.model
    results["config"]["run"] = dataclasses.asdict(run)
    if not d.main:
        return 0
    samples = results.pop("samples", None)
    print(markdown_table(results), flush=True)  # first: a failed write still leaves the table on the screen
    if args.output:
        out = Path(args.output)
        for task, records in (samples or {}).items():
            write_samples(out.with_name(f"{out.stem}_samples_{task}.jsonl"), records)
        write_results(out, results)
    return 0
