"""Loading a model to run fast on this machine: dtype, quantization, threads, device and an optional
compiled decoding step, chosen by what `--dtype`, `--quantize`, `--compile`, `--threads`, `--device` ask.

Which matmul kernel each layer runs on is measured once per machine and cached (lmlab.inference.kernels).

Everything here degrades with a one-line notice instead of failing: a dtype the hardware cannot run
falls back to float32, a missing fast kernel falls back to the reference route, a compiler that is not
there leaves the eager model. Nothing assumes a CPU: the same calls run on CUDA.

    runner, tok = load("smollm2-135m", RunConfig(dtype="bfloat16", quantize="int8"))
    spec = load_speculation(runner, tok, draft="other-model", speculate=4, run=run)   # --draft/--speculate
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lmlab.checkpoints import load as load_checkpoint
from lmlab.errors import LmlabError
from lmlab.inference.compile import compile_step
from lmlab.inference.drafting import DEFAULT_K, Speculation, check_pair, compile_few, narrow_head
from lmlab.inference.kernels import choose as choose_kernels
from lmlab.inference.kernels import quantized_choices, use_row_linears
from lmlab.inference.quantize import SCHEMES, quantization_route, quantize_model
from lmlab.inference.runner import Runner
from lmlab.utils.device import DTYPES, notice, resolve_device, resolve_dtype, set_threads


@dataclass
class RunConfig:
    """How to run a model: what `--dtype`, `--quantize`, `--compile`, `--threads`, `--device` ask for."""

    dtype: str = "float32"
    quantize: str | None = None  # None, "int8" or "int4"
    group_size: int = 32  # int4 only
    device: str | None = None  # None = cuda when present, else cpu
    compile: bool = False
    threads: int | None = None  # None = one per idle usable core (CPU only)
    adapter: str | None = None  # a LoRA adapter folder (lmlab's or PEFT's), merged in at load time


def add_run_args(p, dtype_default: str = "float32") -> None:
    """The options every command that runs a model shares (argparse)."""
    p.add_argument("--dtype", default=dtype_default, choices=list(DTYPES),
                   help="weights/activations dtype (falls back to float32 where unsupported)")
    p.add_argument("--quantize", default=None, choices=list(SCHEMES), help="weight-only quantization")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (32, 64, 128, 256 are fast on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoding step (slow start, faster steps)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per idle usable core)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="LoRA adapter folder (lmlab finetune's <out_dir>/adapter or PEFT's), merged in at load time")


def run_config(args) -> RunConfig:
    """RunConfig from parsed add_run_args options."""
    return RunConfig(dtype=args.dtype, quantize=args.quantize, group_size=args.group_size, device=args.device,
                     compile=args.compile, threads=args.threads, adapter=getattr(args, "adapter", None))


# --------------------------------------------------------------------------- preparing and loading
def prepare(model: torch.nn.Module, run: RunConfig | None = None) -> Runner:
    """Move, cast, quantize and (optionally) compile a model according to `run`. Returns its Runner."""
    run = run or RunConfig()
    device = resolve_device(run.device)
    if device.type == "cpu":
        set_threads(run.threads)
    dtype = resolve_dtype(run.dtype, device)
    model = model.to(device=device, dtype=dtype).eval()
    if device.type == "cpu" and not run.quantize:
        use_row_linears(model)
    runner = Runner(model)
    if device.type == "cpu" and not run.quantize:
        runner.kernels = choose_kernels(model)  # measured once per machine, torch, threads, dtype, shape; cached
    if run.quantize:
        if run.quantize not in SCHEMES:
            raise LmlabError(f"unknown quantization '{run.quantize}' (choose from {', '.join(SCHEMES)})")
        if quantization_route(run.quantize, device) == "reference":
            notice(f"{run.quantize}: no fast {run.quantize} kernel for {device.type} in this PyTorch; "
                   "falling back to de-quantizing weights on the fly (correct, slower)")
        quantize_model(model, run.quantize, group_size=run.group_size)
        runner.warm()  # pick and check each layer's kernel eagerly, before any compiling
        runner.kernels = quantized_choices(model)
    if run.compile:
        runner.decode_step = compile_step(model)
        if runner.kernels is not None and runner.kernels.packed_bytes:
            runner.kernels.source += "; the compiled step runs packed layers on their fastest unpacked kernel"
    return runner


def load(spec: str, run: RunConfig | None = None, **kw) -> tuple[Runner, object]:
    """checkpoints.load + prepare: `load("smollm2-135m", dtype="bfloat16", quantize="int8")` → (runner, tokenizer)."""
    run = run or RunConfig(**kw)
    model, tok = load_checkpoint(spec, dtype="float32", device="cpu")
    if run.adapter:
        from lmlab.adapters.attach import attach_adapter

        attach_adapter(model, run.adapter, spec)
    return prepare(model, run), tok


# --------------------------------------------------------------------------- speculation
def add_speculation_args(p) -> None:
    """--draft M2 --speculate K | --prompt-lookup N, --no-adapt (argparse; generate, chat, eval)."""
    p.add_argument("--draft", default=None, help="draft model for speculative decoding (shares the vocabulary)")
    p.add_argument("--speculate", type=int, default=None,
                   help=f"most draft tokens per pass (default {DEFAULT_K}; adaptive below it unless --no-adapt)")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="draft by prompt lookup: the longest recent n-gram (n <= N) seen earlier proposes what followed")
    p.add_argument("--no-adapt", action="store_true", help="always draft --speculate tokens (no switching off)")
    p.add_argument("--draft-quantize", default=None, choices=list(SCHEMES),
                   help="quantize the draft only (the target keeps --quantize): a cheaper draft, the same output")
    p.add_argument("--draft-vocab", type=int, default=0, metavar="N",
                   help="the draft scores only the first N token ids (+ stop ids): a cheaper draft step, the same output")


def load_speculation(target: Runner, target_tok, *, draft: str | None = None, speculate: int | None = None,
                     prompt_lookup: int = 0, adapt: bool = True, run: RunConfig | None = None,
                     draft_quantize: str | None = None, draft_vocab: int = 0,
                     target_name: str = "target") -> Speculation | None:
    """The Speculation that --draft/--speculate/--prompt-lookup ask for (None: plain decoding). The draft is
    loaded with the target's RunConfig (dtype, quantization, compiled step, device), its quantization
    replaced by `draft_quantize` when given, and checked against the target: decoder-only, the same
    vocabulary and tokenizer. `draft_vocab` N > 0 narrows the draft's LM head to the first N ids and the stop
    ids (drafting.narrow_head). Greedy output stays the target's whatever the draft is."""
    if draft_quantize and draft is None:
        raise LmlabError("--draft-quantize needs --draft MODEL (prompt lookup has no draft model)")
    if draft_vocab and draft is None:
        raise LmlabError("--draft-vocab needs --draft MODEL (prompt lookup has no draft model)")
    if draft is None and not prompt_lookup:
        if speculate is not None:
            raise LmlabError("--speculate needs --draft MODEL or --prompt-lookup N")
        return None
    k = DEFAULT_K if speculate is None else speculate
    if draft is not None and prompt_lookup:
        Speculation(draft=draft, prompt_lookup=prompt_lookup, k=k)  # raises the one-line conflict error
    if prompt_lookup:
        spec = Speculation(prompt_lookup=prompt_lookup, k=k, adaptive=adapt)
        compile_few(target)
        return spec
    Speculation(draft=draft, k=k)  # validate k before loading anything
    model, tok = load_checkpoint(draft, dtype="float32", device="cpu")
    check_pair(target.cfg, model.cfg, target_tok, tok, draft_name=draft, target_name=target_name)
    vocab = narrow_head(model, draft_vocab, getattr(tok, "stop_ids", ())) if draft_vocab else None
    draft_run = replace(run or RunConfig(), quantize=draft_quantize) if draft_quantize else run
    draft_runner = prepare(model, draft_run)
    compile_few(target, draft_runner)
    return Speculation(draft=draft_runner, k=k, adaptive=adapt, draft_name=draft, draft_vocab=vocab)


def speculation_options(args) -> dict:
    """load_speculation's keyword arguments from parsed add_speculation_args options."""
    return dict(draft=args.draft, speculate=args.speculate, prompt_lookup=args.prompt_lookup, adapt=not args.no_adapt,
                draft_quantize=args.draft_quantize, draft_vocab=args.draft_vocab)
