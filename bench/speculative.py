"""Speculative decoding: lmlab against plain lmlab and HF transformers, in one process and one run.

  1. the Qwen pair (Qwen2.5-Coder 0.5B draft, 1.5B target, the same dtype) on code and open prose prompts:
     plain lmlab greedy, lmlab speculative (draft model, adaptive k <= --k), the same with the draft alone
     quantized (--draft-quantize, default int4: a cheaper draft step, the same output), the same with the
     draft's head narrowed to the first --draft-vocab ids (when given), HF greedy and HF
     assisted generation (assistant_model=); batch --batch speculative vs batch --batch plain.
  2. SmolLM2-135M on input-grounded prompts (copy / rewrite / continue a given passage): plain lmlab,
     lmlab prompt lookup, HF greedy and HF prompt_lookup_num_tokens.
For each speculative run: tokens/s, speed-up, acceptance rate, α (solved from tokens per pass), the measured
cost ratio c, the analytical speed-up (1 - α^(k+1)) / ((1 - α)(k·c + 1)) for the mean k drafted, and the
measured cost of a verification pass in plain steps (the formula takes it as 1); and the same formula over
the steps the run took (its passes at S, its plain steps at 1: no lookup match, the controller re-timing a plain
step, speculation switched off).
Greedy everywhere: lmlab's speculative tokens are checked against its plain tokens.

    python bench/speculative.py                               # the full run (quiet machine: ~30+ min on CPU)
    python bench/speculative.py --max-new-tokens 16 --prompts 1 --skip-hf --batch 0    # a smoke run

The Qwen pair is looked up in --pair, else $LMLAB_QWEN_PAIR, else ../qwen beside the checkout
(`../shared/tools/get-qwen-pair.sh ../qwen` puts it there); that part is skipped when absent.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmlab.checkpoints import load as load_checkpoint, resolve  # noqa: E402
from lmlab.inference.drafting import Speculation, compile_few, narrow_head  # noqa: E402
from lmlab.inference.generate import generate_tokens  # noqa: E402
from lmlab.inference.load import RunConfig, prepare  # noqa: E402
from lmlab.inference.sampling import GenerationConfig  # noqa: E402
from lmlab.inference.speculative import expected_tokens  # noqa: E402

DRAFT, TARGET = "qwen2.5-coder-0.5b.gguf", "qwen2.5-coder-1.5b.gguf"
CODE = [
    "def quicksort(items):\n    \"\"\"Sort a list with quicksort and return a new list.\"\"\"\n",
    "class Stack:\n    \"\"\"A last-in first-out stack backed by a Python list.\"\"\"\n\n    def __init__(self):\n",
    "import json\n\n\ndef load_config(path):\n    \"\"\"Read a JSON config file and fill in defaults for missing keys.\"\"\"\n",
    "def is_prime(n: int) -> bool:\n    \"\"\"Return True when n is a prime number.\"\"\"\n",
]
PROSE = [
    "The old lighthouse keeper looked out over the grey sea and",
    "Write a short story about a child who finds a strange key in the garden.\n\n",
    "The history of the bicycle begins in the early nineteenth century, when",
    "My favourite season is autumn, because",
]
PASSAGES = [
    "The river town woke slowly. Fishermen untied their boats before sunrise, the baker opened his shutters "
    "at six, and by seven the market square was full of carts carrying apples, cheese and bread from the "
    "farms up the valley. Children ran between the stalls while their parents argued about prices.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into "
    "sugar and oxygen. It happens mostly in the leaves, inside small structures called chloroplasts, which "
    "contain the green pigment chlorophyll that absorbs the light.",
    "The committee met on Tuesday to review the budget. It agreed to raise the library's funding by ten "
    "percent, to delay the repair of the town hall roof until spring, and to ask the mayor for a report on "
    "the cost of new street lights before the next meeting.",
]
GROUNDED = [
    "Passage: {p}\n\nThe same passage, copied word for word:\n",
    "{p}\n\nRewrite the passage above in plain words, keeping every detail:\n",
    "Read the passage and continue it.\n\n{p} {p}",
]


def log(msg: str = "") -> None:
    print(msg, flush=True)


def pair_dir(given: str | None) -> Path | None:
    folder = Path(given or os.environ.get("LMLAB_QWEN_PAIR", ROOT.parent / "qwen"))
    return folder if (folder / DRAFT).is_file() and (folder / TARGET).is_file() else None


# --------------------------------------------------------------------------- HF transformers
def load_hf(path: Path, dtype: str, model=None, tok=None):
    """A transformers model from a GGUF (gguf_file=, de-quantized to `dtype` as lmlab does: the same dtype,
    the same weights), else from lmlab's HF export of `model`."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers import GgufConfig

        dense = {"quantization_config": GgufConfig(gguf_file=path.name, dequantize=True)}
    except ImportError:  # older transformers de-quantize GGUF files anyway
        dense = {}
    try:
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype),
                                                    local_files_only=True, **dense).eval()
    except Exception as e:  # noqa: BLE001 - fall back to lmlab's own export
        log(f"  (transformers cannot read {path.name} itself: {str(e).splitlines()[0][:120]}; using lmlab's HF export)")
        from lmlab.checkpoints import hf

        out = Path(tempfile.mkdtemp(prefix="specbench-"))
        hf.export(model, tok, out)
        return AutoModelForCausalLM.from_pretrained(str(out), dtype=getattr(torch, dtype)).eval()


@torch.inference_mode()
def hf_generate(model, ids: list[int], n: int, **kw) -> tuple[list[int], float]:
    x = torch.tensor([ids])
    t = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist(), time.perf_counter() - t


# --------------------------------------------------------------------------- lmlab
def lmlab_run(runner, prompts: list[list[int]], n: int, spec: Speculation | None = None):
    cfg = GenerationConfig(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    res = generate_tokens(runner, prompts, cfg, stop_ids=[], pad_id=0, speculation=spec)
    return res, time.perf_counter() - t


def bracketed(runner, prompts: list[list[int]], specs: list[Speculation], n: int):
    """Plain runs before and after the speculative ones, their mean the baseline: a shared machine's speed
    drifts over the minutes a prompt takes, and a drift that is linear cancels out of the ratios.
    (the first plain result, its mean tok/s, a note of both, [(result, seconds)] per spec)."""
    plain, t_before = lmlab_run(runner, prompts, n)
    fasts = [lmlab_run(runner, prompts, n, spec) for spec in specs]
    _, t_after = lmlab_run(runner, prompts, n)
    tokens = sum(map(len, plain.tokens))
    before, after = tokens / t_before, tokens / t_after
    return plain, (before + after) / 2, f"(mean of {before:.2f} before and {after:.2f} after)", fasts


def solve_alpha(tokens_per_pass: float, k: int) -> float:
    """The per-token acceptance α whose expected tokens per pass with k drafts is the measured one."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, k) < tokens_per_pass else (lo, mid)
    return lo


def analytical(stats) -> tuple[float, int, float, float]:
    """(α, k, c, S) for a run: k = mean drafts per row-pass (rounded), α from tokens per pass, c measured."""
    k = max(1, round(stats.proposed / max(stats.row_passes, 1)))
    alpha = solve_alpha(stats.tokens_per_pass, k) if stats.row_passes else 0.0
    c = stats.cost_ratio or 0.0
    s = expected_tokens(alpha, k) / (k * c + 1.0)
    return alpha, k, c, s


def spec_line(name: str, n_tok: int, secs: float, plain_tps: float, stats, same: bool) -> str:
    """One speculative run. `verify` is the mean verification pass in plain decoding steps (the plain run's
    seconds per token): the analytical figure assumes 1, so above 1 is where the achieved speed-up goes."""
    tps = n_tok / secs
    alpha, k, c, s = analytical(stats)
    verify = (stats.target_s / stats.passes) * plain_tps if stats.passes else 0.0
    off = "; switched off" if stats.switched_off else ""
    # the same formula over the steps the run took: its passes at S, its plain steps (no lookup match, the
    # controller's re-timing steps, speculation off) at 1, in plain-step units
    mix = ((stats.passes * expected_tokens(alpha, k) + stats.plain_steps)
           / (stats.passes * (k * c + 1.0) + stats.plain_steps)) if stats.passes else 1.0
    return (f"  {name:<34} {tps:7.2f} tok/s  x{tps / plain_tps:5.2f}  acc {stats.acceptance_rate:.2f}  "
            f"α {alpha:.2f}  c {c:.3f}  k {k}  expected x{s:.2f}  achieved/expected {tps / plain_tps / s:.0%}  "
            f"({stats.passes} passes, {stats.plain_steps} plain steps: expected x{mix:.2f}, achieved "
            f"{tps / plain_tps / mix:.0%})  verify pass = {verify:.2f} plain steps{off}  "
            f"{'tokens = plain' if same else 'TOKENS DIFFER'}")


def compare(title: str, runner, tok, prompts: list[str], specs: list[Speculation], args, hf_pair=None,
            hf_kw=None):
    """Every prompt: lmlab plain vs lmlab speculative, once per strategy in `specs` (+ HF plain vs HF
    speculative). Returns the speed-ups of the first strategy."""
    log(f"\n== {title}")
    ratios = []
    for text in prompts:
        ids = tok.encode(text)
        log(f"- {text[:60]!r} ({len(ids)} prompt tokens)")
        plain, p_tps, spread, fasts = bracketed(runner, [ids], specs, args.max_new_tokens)
        log(f"  {'lmlab plain greedy':<34} {p_tps:7.2f} tok/s  {spread}")
        for i, (spec, (fast, t_fast)) in enumerate(zip(specs, fasts)):
            log(spec_line("lmlab " + spec.method, len(fast.tokens[0]), t_fast, p_tps, fast.spec,
                          fast.tokens == plain.tokens))
            if i == 0:
                ratios.append(p_tps and (len(fast.tokens[0]) / t_fast) / p_tps)
        if hf_pair is not None:
            hf_model, kw = hf_pair, hf_kw
            h_plain, th = hf_generate(hf_model, ids, args.max_new_tokens)
            h_fast, tf = hf_generate(hf_model, ids, args.max_new_tokens, **kw)
            log(f"  {'HF greedy':<34} {len(h_plain) / th:7.2f} tok/s  (x{(len(h_plain) / th) / p_tps:.2f} of lmlab plain)")
            log(f"  {'HF ' + next(iter(kw)):<34} {len(h_fast) / tf:7.2f} tok/s  x{th / tf:5.2f} over HF greedy  "
                f"{'tokens = HF greedy' if h_fast == h_plain else 'tokens differ from HF greedy'}")
    log(f"  speed-up over plain lmlab ({specs[0].method}): {', '.join(f'x{r:.2f}' for r in ratios)}")
    return ratios


def batched(runner, tok, prompts: list[str], specs: list[Speculation], args) -> None:
    ids = [tok.encode(p) for p in prompts[:args.batch]]
    k = max(s.k for s in specs)  # the batch-B graphs (a one-time cost) built outside the timings:
    runner.warm(batch=len(ids), tokens=(2, k + 1))  # verification passes of up to k+1 tokens
    for spec in specs:
        if spec.draft is not None:
            spec.draft.warm(batch=len(ids), tokens=(2,))  # the draft catching up
    for spec in [None, *specs]:
        lmlab_run(runner, ids, 4, spec)
    plain, p_tps, spread, fasts = bracketed(runner, ids, specs, args.max_new_tokens)
    log(f"\n== batch {len(ids)}: plain {p_tps:.2f} tok/s {spread}")
    for spec, (fast, tf) in zip(specs, fasts):
        n_f, st = sum(map(len, fast.tokens)), fast.spec
        step_s = len(ids) / p_tps  # one plain batch step
        verify = f"{st.target_s / st.passes / step_s:.2f}" if st.passes else "-"
        off = f"; switched off: {st.switched_off}" if st.switched_off else ""
        log(f"  {spec.method}: {n_f / tf:.2f} tok/s (x{(n_f / tf) / p_tps:.2f}; acceptance "
            f"{st.acceptance_rate:.2f}, {st.passes} passes and {st.plain_steps} plain steps, a pass = {verify} "
            f"plain batch steps to verify, c {st.cost_ratio or 0:.3f}{off}; "
            f"{'tokens = plain' if fast.tokens == plain.tokens else 'TOKENS DIFFER'})")


def qwen_part(folder: Path, args, run: RunConfig) -> None:
    log(f"\n### Qwen pair from {folder} ({run.dtype})")
    t_model, tok = load_checkpoint(str(folder / TARGET), dtype=run.dtype, device="cpu")
    d_model, _ = load_checkpoint(str(folder / DRAFT), dtype=run.dtype, device="cpu")
    hf_target = hf_draft = None
    if not args.skip_hf:  # four models at once: float32 needs ~17 GB of memory, bfloat16 half that
        hf_target = load_hf(folder / TARGET, run.dtype, t_model, tok)
        hf_draft = load_hf(folder / DRAFT, run.dtype, d_model, tok)
    target = prepare(t_model, run)
    specs = [Speculation(draft=prepare(d_model, run), k=args.k, adaptive=not args.fixed_k,
                         draft_name=f"qwen2.5-coder-0.5b ({run.quantize or run.dtype})")]
    if args.draft_quantize and args.draft_quantize != run.quantize:  # the same draft, quantized: cheaper steps
        d_model, _ = load_checkpoint(str(folder / DRAFT), dtype="float32", device="cpu")
        specs.append(Speculation(draft=prepare(d_model, replace(run, quantize=args.draft_quantize)), k=args.k,
                                 adaptive=not args.fixed_k, draft_name=f"qwen2.5-coder-0.5b ({args.draft_quantize})"))
    if args.draft_vocab:  # the same draft, its head narrowed to the first N ids (+ stop ids): cheaper steps
        d_model, _ = load_checkpoint(str(folder / DRAFT), dtype=run.dtype, device="cpu")
        ids = narrow_head(d_model, args.draft_vocab, tok.stop_ids)
        specs.append(Speculation(draft=prepare(d_model, run), k=args.k, adaptive=not args.fixed_k, draft_vocab=ids,
                                 draft_name=f"qwen2.5-coder-0.5b ({run.quantize or run.dtype}, head {len(ids)} ids)"))
    compile_few(target, *(s.draft for s in specs))  # before the timings (the loop would build them on first use)
    hf_kw = {"assistant_model": hf_draft}
    n = args.prompts
    compare("code prompts", target, tok, CODE[:n], specs, args, hf_target, hf_kw)
    compare("open prose prompts", target, tok, PROSE[:n], specs, args, hf_target, hf_kw)
    if args.batch:
        batched(target, tok, (CODE[:2] + PROSE[:2] + CODE[2:] + PROSE[2:]), specs, args)


def lookup_part(args, run: RunConfig) -> None:
    log(f"\n### SmolLM2-135M, prompt lookup (n <= {args.lookup_n}, k <= {args.lookup_k}; {run.dtype})")
    model, tok = load_checkpoint("smollm2-135m", dtype=run.dtype, device="cpu")
    hf_model = None
    if not args.skip_hf:
        hf_model = load_hf(resolve("smollm2-135m"), run.dtype, model, tok)
    runner = prepare(model, run)
    compile_few(runner)
    spec = Speculation(prompt_lookup=args.lookup_n, k=args.lookup_k, adaptive=not args.fixed_k)
    prompts = [t.format(p=p) for t, p in zip(GROUNDED, PASSAGES)][:args.prompts]
    compare("input-grounded prompts", runner, tok, prompts, [spec], args, hf_model,
            {"prompt_lookup_num_tokens": args.lookup_k})
    if args.batch:
        batched(runner, tok, [t.format(p=p) for t in GROUNDED for p in PASSAGES], [spec], args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default=None, help="folder holding the Qwen pair")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=3, help="prompts per kind")
    ap.add_argument("--k", type=int, default=6, help="most drafts per pass (draft model)")
    ap.add_argument("--lookup-n", type=int, default=3)
    ap.add_argument("--lookup-k", type=int, default=8)
    ap.add_argument("--fixed-k", action="store_true", help="always draft k (no adaptive k, no switching off)")
    ap.add_argument("--batch", type=int, default=4, help="batch size of the batched comparison (0 = skip)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantize", default=None, choices=["int8", "int4"], help="both models' weights (lmlab)")
    ap.add_argument("--draft-quantize", default="int4", choices=["int8", "int4", "none"],
                    help="also run lmlab with the draft alone quantized (none: skip that run)")
    ap.add_argument("--draft-vocab", type=int, default=0,
                    help="also run lmlab with the draft's head narrowed to the first N ids, e.g. 32768 (0: skip)")
    ap.add_argument("--compile", action="store_true", help="lmlab's compiled decoding step")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-qwen", action="store_true")
    ap.add_argument("--skip-lookup", action="store_true")
    args = ap.parse_args()
    run = RunConfig(dtype=args.dtype, quantize=args.quantize, compile=args.compile, threads=args.threads)
    args.draft_quantize = None if args.draft_quantize == "none" else args.draft_quantize
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.max_new_tokens} new tokens, greedy")
    if not args.skip_qwen:
        folder = pair_dir(args.pair)
        if folder is None:
            log("\n### Qwen pair: absent (give --pair, set LMLAB_QWEN_PAIR, or run ../shared/tools/get-qwen-pair.sh ../qwen)")
        else:
            qwen_part(folder, args, run)
    if not args.skip_lookup:
        lookup_part(args, run)


if __name__ == "__main__":
    main()
