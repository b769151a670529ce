"""Core subcommands: download, info, generate, chat, convert and the end-to-end demo.

Each subcommand is a typed function; `register` only maps argparse options onto its arguments.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lmlab.errors import LmlabError

DEFAULT_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------- typed functions
def download(name: str) -> Path:
    from lmlab import hub

    path = hub.download(name)
    print(path)
    return path


def info(model: str, kernels: bool = False, run=None) -> dict:
    """`kernels`: also prepare the model as `generate` would with `run` (dtype, threads, quantization) and
    print which kernel each weight shape runs on, with the timings that chose it."""
    from lmlab.checkpoints import load, resolve

    if not kernels:
        m, tok = load(model)
        return describe(model, resolve(model), m, tok)
    from lmlab.inference.load import load as load_runner

    runner, tok = load_runner(model, run)
    facts = describe(model, resolve(model), runner.model, tok)
    if runner.kernels is None:
        print(f"\nkernels: F.linear everywhere (no choice is measured on {runner.device.type})")
    else:
        print("\n" + runner.kernels.table())
    facts["kernels"] = runner.kernels
    return facts


def describe(spec: str, path: Path, model, tok) -> dict:
    """Print (and return) what a user wants to know about a loaded model."""
    cfg = model.cfg
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    facts = {
        "model": spec,
        "path": str(path),
        "architecture": f"{cfg.arch} ({cfg.family or 'custom'})",
        "parameters": f"{model.num_params():,}",
        "dtype": ", ".join(dtypes) + (" (de-quantized from GGUF)" if path.suffix == ".gguf" else ""),
        "layers": cfg.n_layer if cfg.arch != "encoder-decoder" else f"{cfg.n_layer} encoder + {cfg.n_decoder_layer} decoder",
        "width": cfg.d_model,
        "heads": f"{cfg.n_head} query / {cfg.n_kv_head} key-value (head dim {cfg.head_dim})",
        "mlp": f"{cfg.mlp}, {cfg.d_ff} hidden",
        "positions": cfg.pos + (f" (theta {cfg.rope_theta:g})" if cfg.pos == "rope" else ""),
        "norm": f"{cfg.norm}, {'pre' if cfg.prenorm else 'post'}-norm, eps {cfg.norm_eps:g}",
        "context length": cfg.max_seq_len,
        "tied embeddings": cfg.tie_embeddings,
    }
    if tok is not None:
        facts["tokenizer"] = (f"vocabulary {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id}, "
                              f"chat template {'yes' if tok.chat_template else 'no'}")
    width = max(len(k) for k in facts)
    for k, v in facts.items():
        print(f"{k:<{width}}  {v}")
    return facts


def read_stdin() -> str:
    """The prompt `-p -` reads: all of stdin, which must be UTF-8 text (the trailing newline dropped)."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8").rstrip("\n")
    except UnicodeDecodeError as e:
        raise LmlabError(f"stdin: -p -: not UTF-8 text (invalid byte 0x{data[e.start]:02x} at byte offset "
                         f"{e.start})") from None


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _load(model: str, run=None):
    """A Runner (lmlab.inference) for the model: dtype, quantization, threads, compile, device."""
    from lmlab.inference.load import load

    m, tok = load(model, run)
    if tok is None:
        raise LmlabError(f"{model}: has no tokenizer (tokenizer.json) to turn text into tokens")
    return m, tok


def _speculation(m, tok, model: str, speculate: dict | None, run):
    """The Speculation for --draft/--speculate/--prompt-lookup/--no-adapt (None: plain decoding)."""
    from lmlab.inference.load import load_speculation

    return load_speculation(m, tok, run=run, target_name=model, **(speculate or {}))


def generate(model: str, prompts: list[str], *, max_new_tokens: int = 128, temperature: float = 0.8,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, stop: list[str] | None = None,
             seed: int | None = None, run=None, stats: bool = False, stream: bool = True,
             speculate: dict | None = None, retrieve: dict | None = None) -> list[str]:
    """`run`: a lmlab.inference.load.RunConfig (dtype, quantize, threads, compile, device); default float32.
    `speculate`: load_speculation's options (draft=, speculate=, prompt_lookup=, adapt=).
    `retrieve`: lmlab.retrieval.augment.load's options (index=, k=, embed=): each prompt follows the
    passages it retrieves."""
    from lmlab.inference.sampling import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, stop=list(stop or []), seed=seed)
    if retrieve:
        from lmlab.retrieval.command import augmenter

        prompts = augmenter(retrieve).prompts(prompts)
    m, tok = _load(model, run)
    spec = _speculation(m, tok, model, speculate, run)
    return _generate(m, tok, prompts, cfg, stream=stream, stats=stats, speculation=spec)


def _generate(m, tok, prompts: list[str], cfg, *, stream: bool = True, stats: bool = False,
              speculation=None) -> list[str]:
    from lmlab.inference.text import generate as run

    single = len(prompts) == 1 and stream
    if single:
        _write(prompts[0])
    t0 = time.perf_counter()
    outs = run(m, tok, prompts, cfg, on_text=(lambda row, piece: _write(piece)) if single else None,
               speculation=speculation)
    elapsed = time.perf_counter() - t0
    if single:
        sys.stdout.write("\n")
    else:
        for prompt, out in zip(prompts, outs):
            print(prompt + out.text)
            print("-" * 40)
    if stats:
        n = sum(len(o.token_ids) for o in outs)
        print(f"[{n} tokens in {elapsed:.2f} s: {n / max(elapsed, 1e-9):.1f} tok/s; "
              f"finish: {', '.join(o.finish_reason for o in outs)}]", file=sys.stderr)
        if outs and outs[0].spec is not None:
            print(_spec_report(outs[0].spec, len(outs)), file=sys.stderr)
        if getattr(m, "kernels", None) is not None:
            print(m.kernels.summary(), file=sys.stderr)
        if getattr(m, "compiled", False):
            print(m.decode_step.describe(), file=sys.stderr)
    return [o.text for o in outs]


def _spec_report(spec, rows: int) -> str:
    """SpecStats.format, with plain decoding's speed estimated from the plain steps this run timed."""
    plain = rows * spec.plain_steps / spec.plain_s if spec.plain_s > 0 else None
    note = "\n  (plain tok/s from this run's timed plain steps)" if plain else ""
    return spec.format(plain) + note


def chat(model: str, *, system: str | None = None, max_new_tokens: int = 512, temperature: float = 0.7,
         top_p: float = 0.95, seed: int | None = None, run=None, speculate: dict | None = None,
         stats: bool = False) -> None:
    from lmlab.inference.sampling import GenerationConfig
    from lmlab.inference.text import generate_from_ids

    m, tok = _load(model, run)
    if not tok.chat_template:
        raise LmlabError(f"{model}: has no chat template; use `lmlab generate`")
    spec = _speculation(m, tok, model, speculate, run)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with", model, "— empty line or Ctrl-D to quit, /reset to start over.")
    while True:
        try:
            line = input("> " if interactive else "")
            line.encode("utf-8")  # a C locale reads undecodable bytes as surrogates
        except EOFError:
            break
        except UnicodeError:
            raise LmlabError("stdin: chat input is not UTF-8 text") from None
        if not line.strip():
            if interactive:
                break
            continue
        if line.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        (out,) = generate_from_ids(m, tok, [ids], cfg, on_text=lambda row, piece: _write(piece), speculation=spec)
        sys.stdout.write("\n")
        if stats and out.spec is not None:
            print(_spec_report(out.spec, 1), file=sys.stderr)
        messages.append({"role": "assistant", "content": out.text})


def convert(model: str, out: str, to: str = "lmlab", dtype: str = "float32") -> Path:
    from lmlab.checkpoints import hf, load, native
    from lmlab.utils.atomic import check_writable

    if Path(out).exists() and not Path(out).is_dir():
        raise LmlabError(f"{out}: is a file, expected a folder to write the {to} checkpoint into")
    check_writable(Path(out) / "config.json")  # before loading anything
    m, tok = load(model, dtype=dtype)
    if to == "lmlab":
        path = native.save(m, tok, out)
    elif to == "hf":
        path = hf.export(m, tok, out)
    else:
        raise LmlabError(f"unknown target format '{to}' (choose lmlab or hf)")
    print(f"wrote {path} ({to} format)")
    return Path(path)


def demo(model: str = DEFAULT_MODEL, out_dir: str = "runs/demo") -> None:
    """The main job on the embedded defaults: fetch the default model, generate, chat, pretrain."""
    from lmlab.checkpoints import resolve
    from lmlab.inference.sampling import GenerationConfig
    from lmlab.inference.text import chat_turn

    print(f"== 1. the default model: {model}")
    path = resolve(model)
    m, tok = _load(model)
    describe(model, path, m.model, tok)
    print("\n== 2. greedy generation")
    _generate(m, tok, ["The capital of France is"], GenerationConfig(max_new_tokens=24, temperature=0.0), stats=True)
    print("\n== 3. a chat turn through the model's chat template")
    question = "What is the tallest mountain on Earth? Answer in one sentence."
    print(f"user: {question}\nassistant: ", end="", flush=True)
    chat_turn(m, tok, [{"role": "user", "content": question}], GenerationConfig(max_new_tokens=48, temperature=0.0),
              on_text=_write)
    print()
    del m
    from lmlab.train import demo_pretrain

    print("\n== 4. pretrain a small GPT on the standard library's docstrings (no download)")
    result = demo_pretrain(str(Path(out_dir) / "pretrain"))
    print(f"validation loss {result['val_loss_start']:.3f} -> {result['val_loss']:.3f} after {result['iters']} "
          f"iterations ({result['params']:,} parameters, {result['tokens_per_s']:,.0f} tokens/s)")
    print(f"model saved to {result['model_dir']}" + (f", loss curve {result['plot']}" if result.get("plot") else ""))
    print("sample:", end=" ")
    generate(result["model_dir"], ["Return the "], max_new_tokens=60, temperature=0.8, seed=0)


# --------------------------------------------------------------------------- argparse mapping
def _model_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-m", "--model", required=required, default=None if required else DEFAULT_MODEL,
                   help="preset name (e.g. smollm2-135m), .gguf file, HF folder or lmlab checkpoint folder")


def _dtype_arg(p: argparse.ArgumentParser) -> None:
    from lmlab.utils.device import DTYPES

    p.add_argument("--dtype", default="float32", choices=list(DTYPES))


def register(sub) -> None:
    from lmlab.inference.load import add_run_args, add_speculation_args, run_config, speculation_options

    p = sub.add_parser("download", help="fetch a preset's weights into $LMLAB_HOME")
    p.add_argument("name", help="preset name, e.g. smollm2-135m")
    p.set_defaults(func=lambda a: download(a.name) and 0)

    p = sub.add_parser("info", help="architecture, parameters, dtype, context length, tokenizer")
    _model_arg(p)
    p.add_argument("--kernels", action="store_true",
                   help="prepare the model as generate would (--dtype, --threads, --quantize, ...) and print the "
                        "kernel each weight shape runs on, with the timings (cached in $LMLAB_HOME/kernels)")
    add_run_args(p)
    p.set_defaults(func=lambda a: (info(a.model, True, run_config(a)) if a.kernels else info(a.model)) and 0)

    p = sub.add_parser("generate", help="continue a prompt")
    _model_arg(p)
    p.add_argument("-p", "--prompt", action="append", required=True,
                   help="prompt text (repeat for a batch); '-' reads stdin")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stats", action="store_true",
                   help="print tokens/s, finish reasons, the kernels the layers run on (and speculation's "
                        "acceptance and speed-up) to stderr")
    add_run_args(p)
    add_speculation_args(p)
    from lmlab.retrieval.command import add_retrieve_args, retrieve_options

    add_retrieve_args(p)
    p.set_defaults(func=lambda a: generate(
        a.model, [read_stdin() if x == "-" else x for x in a.prompt], max_new_tokens=a.max_new_tokens,
        temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
        stop=a.stop, seed=a.seed, run=run_config(a), stats=a.stats, speculate=speculation_options(a),
        retrieve=retrieve_options(a)) and 0)

    p = sub.add_parser("chat", help="talk to a model through its chat template")
    _model_arg(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stats", action="store_true", help="print speculation's acceptance and speed-up after each reply")
    add_run_args(p)
    add_speculation_args(p)
    p.set_defaults(func=lambda a: chat(a.model, system=a.system, max_new_tokens=a.max_new_tokens,
                                       temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                                       run=run_config(a), speculate=speculation_options(a), stats=a.stats))

    p = sub.add_parser("convert", help="GGUF / HF folder / lmlab checkpoint → lmlab checkpoint or HF folder")
    _model_arg(p)
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--to", default="lmlab", choices=["lmlab", "hf"])
    _dtype_arg(p)
    p.set_defaults(func=lambda a: convert(a.model, a.out, a.to, a.dtype) and 0)

    p = sub.add_parser("demo", help="the main job: fetch the default model, generate, chat, pretrain")
    _model_arg(p, required=False)
    p.add_argument("--out-dir", default="runs/demo")
    p.set_defaults(func=lambda a: demo(a.model, a.out_dir))
