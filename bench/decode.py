"""Batch-1 greedy decoding speed and quality: lmlab against HF transformers on the same SmolLM2-135M weights.

One process, one run, every number next to its peer measured in the same run:
  * memory read bandwidth (sum over a tensor larger than the last-level cache) and the decode limit it implies;
  * decode tokens/s for --new-tokens after a --prompt-tokens prompt, float32 and bfloat16 for both
    libraries, plus lmlab int8 and int4; same prompt ids, greedy, tokens compared. lmlab is timed on the
    path `lmlab generate` runs (lmlab.inference.text.generate_from_ids: the one decoding loop, streaming
    detokenizer and stop-string filter included) and, as the comparison, on the bare loop that was the
    benchmark's before (chunked prefill, then step + argmax, one host sync per run), with the ratio;
  * time to first token and prefill tokens/s for a --prefill-tokens prompt;
  * the fraction of the bandwidth limit each decode reaches (bytes of weights read per token × tokens/s);
  * wikitext-2 perplexity over --ppl-windows windows for float32 / bfloat16 / int8 / int4, with the
    +1% / +2% / +5% checks against float32.
Machines are shared and noisy: each timing is the best of --repeats runs, lmlab and HF interleaved.

    python bench/decode.py                      # everything (~12 min on 2 cores)
    python bench/decode.py --ppl-windows 0      # speed only
    python bench/decode.py --eager              # lmlab without its compiled decoding step
    python bench/decode.py --new-tokens 8 --prefill-tokens 32 --repeats 1 --ppl-windows 0 --no-hf \
        --configs float32 --eager                # a smoke run (seconds)
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmlab.checkpoints import load, resolve  # noqa: E402
from lmlab.inference.load import RunConfig, prepare  # noqa: E402
from lmlab.inference.quantize import weight_bytes  # noqa: E402
from lmlab.inference.sampling import GenerationConfig  # noqa: E402
from lmlab.inference.text import generate_from_ids  # noqa: E402
from lmlab.utils import device as devices  # noqa: E402

WIKITEXT = ROOT / ".." / "shared" / "data" / "corpora" / "wikitext-2-raw-test.txt"
PPL_LIMITS = {"bfloat16": 0.01, "int8": 0.02, "int4": 0.05}
LLAMA_CPP_Q4_1 = 199.0  # tok/s measured on this machine class (issue 6), for reference only


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- the machine
def read_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 10) -> float:
    """Best-of-N GB/s of summing a float32 tensor of `gib` GiB (beyond the last-level cache), on every
    usable core (or the GPU): the device's limit, whatever share of it other jobs leave us right now."""
    threads = torch.get_num_threads()
    torch.set_num_threads(devices.machine_threads())
    x = torch.ones(int(gib * 2**30 / 4), dtype=torch.float32, device=device)
    best = math.inf
    for _ in range(repeats):
        devices.synchronize(device)
        t = time.perf_counter()
        x.sum()
        devices.synchronize(device)
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(threads)
    return x.numel() * 4 / best / 1e9


# --------------------------------------------------------------------------- HF transformers
def load_hf(spec: str):
    from transformers import AutoModelForCausalLM

    path = resolve(spec)
    if path.is_file():  # a GGUF: transformers de-quantizes it itself
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


@torch.inference_mode()
def hf_generate(model, ids: list[int], n: int) -> tuple[list[int], float]:
    x = torch.tensor([ids], device=model.device)
    devices.synchronize(model.device)
    t = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    devices.synchronize(model.device)
    return out[0, len(ids):].tolist(), time.perf_counter() - t


def hf_run(model, prompt: list[int], n: int, long_prompt: list[int]) -> dict:
    tokens, total = hf_generate(model, prompt, n)
    _, first = hf_generate(model, prompt, 1)
    _, ttft = hf_generate(model, long_prompt, 1)
    return dict(tokens=tokens, decode_tps=(n - 1) / max(total - first, 1e-9), ttft=ttft)


# --------------------------------------------------------------------------- lmlab
@torch.inference_mode()
def old_loop(runner, prompt: list[int], n: int, chunk: int) -> tuple[list[int], float]:
    """The benchmark's loop before the one decoding core (kept here only as the comparison): chunked
    prefill, then n - 1 steps of step + argmax, one host sync for the whole run. (tokens, decode seconds)"""
    ids = torch.tensor([prompt], device=runner.device)
    cache = runner.new_cache(1, len(prompt) + n)
    nxt = runner.prefill(ids, cache, chunk=chunk).argmax(-1, keepdim=True)
    out = [nxt]
    devices.synchronize(runner.device)
    t0 = time.perf_counter()
    for _ in range(n - 1):
        nxt = runner.step(nxt, cache).argmax(-1, keepdim=True)
        out.append(nxt)
    tokens = torch.cat(out, 1)[0].tolist()
    devices.synchronize(runner.device)
    return tokens, time.perf_counter() - t0


@torch.inference_mode()
def time_to_first_token(runner, prompt: list[int], chunk: int) -> float:
    ids = torch.tensor([prompt], device=runner.device)
    cache = runner.new_cache(1, len(prompt) + 1)
    devices.synchronize(runner.device)
    t0 = time.perf_counter()
    runner.prefill(ids, cache, chunk=chunk)
    devices.synchronize(runner.device)
    return time.perf_counter() - t0


def lmlab_run(runner, tok, prompt: list[int], n: int, long_prompt: list[int], chunk: int) -> dict:
    """`lmlab generate`'s path (streaming text, greedy, exactly n tokens) and the old loop, back to back."""
    cfg = GenerationConfig(max_new_tokens=n, temperature=0.0, ignore_eos=True)
    (c,) = generate_from_ids(runner, tok, [prompt], cfg, on_text=lambda row, piece: None)
    old_tokens, old_s = old_loop(runner, prompt, n, chunk)
    return dict(tokens=c.token_ids, decode_tps=(n - 1) / max(c.timing.decode_s, 1e-9),
                old_tokens=old_tokens, old_tps=(n - 1) / max(old_s, 1e-9),
                ttft=time_to_first_token(runner, long_prompt, chunk))


def best_of(runs: list[dict]) -> dict:
    best = dict(runs[0])
    best.update(decode_tps=max(r["decode_tps"] for r in runs), ttft=min(r["ttft"] for r in runs))
    if "old_tps" in runs[0]:
        best["old_tps"] = max(r["old_tps"] for r in runs)
    return best


# --------------------------------------------------------------------------- perplexity
@torch.inference_mode()
def perplexity(model, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for w in windows:
        ids = torch.tensor([w], device=model.device)
        logits = model(ids[:, :-1]).float()
        nll += F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# --------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default="smollm2-135m")
    p.add_argument("--new-tokens", "--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=21)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--chunk", type=int, default=512, help="lmlab prefill chunk length")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ppl-windows", type=int, default=12, help="wikitext windows per configuration (0 = skip)")
    p.add_argument("--ppl-window-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=32, help="int4 group size")
    p.add_argument("--quant-dtype", default="bfloat16", help="activation dtype of the int8/int4 runs")
    p.add_argument("--eager", action="store_true",
                   help="lmlab without its compiled decoding step (default: compiled, as `--compile` does)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present); HF runs there too")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--data", default=str(WIKITEXT))
    p.add_argument("--configs", default="float32,bfloat16,int8,int4", help="which runs (comma-separated)")
    a = p.parse_args(argv)
    if a.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed needs a step after the first token)")

    threads = devices.set_threads(a.threads)
    device = devices.resolve_device(a.device)
    bw = read_bandwidth(device)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log(f"device {device}; machine: {devices.machine_threads()} usable cores, 1-min load {load1:.1f} before start, {threads} threads; "
        f"torch {torch.__version__}; memory read bandwidth {bw:.1f} GB/s; lmlab decoding "
        + ("eager" if a.eager else "compiled (lmlab.inference.compile; prefill eager)"))

    base, tok = load(a.model, dtype="float32")
    text = Path(a.data).read_text(encoding="utf-8") if Path(a.data).is_file() else ""
    if not text:
        log(f"note: {a.data} not found; prompts repeat a fixed sentence and perplexity is skipped")
        text = "The quick brown fox jumps over the lazy dog while the capital of France is Paris. " * 400
        a.ppl_windows = 0
    need = max(a.prefill_tokens, a.prompt_tokens) + a.ppl_windows * a.ppl_window_len + 1
    corpus = tok.encode(text[: need * 8])
    prompt, long_prompt = corpus[: a.prompt_tokens], corpus[: a.prefill_tokens]
    windows = [corpus[i * a.ppl_window_len: (i + 1) * a.ppl_window_len + 1] for i in range(a.ppl_windows)]
    windows = [w for w in windows if len(w) == a.ppl_window_len + 1]
    log(f"prompt: {len(prompt)} tokens ({tok.decode(prompt)!r}); prefill prompt {len(long_prompt)} tokens; "
        f"{a.new_tokens} new tokens, greedy, batch 1; best of {a.repeats}")

    hf = None if a.no_hf else load_hf(a.model)
    configs = [("float32", "float32", None), ("bfloat16", "bfloat16", None),
               ("int8", a.quant_dtype, "int8"), ("int4", a.quant_dtype, "int4")]
    wanted = a.configs.split(",")
    unknown = [c for c in wanted if c not in [name for name, _, _ in configs]]
    if unknown:
        p.error(f"--configs: unknown run {unknown[0]!r} (choose from float32, bfloat16, int8, int4)")
    configs = [c for c in configs if c[0] in wanted]
    rows, ppl = [], {}
    for name, dtype, quant in configs:
        run = RunConfig(dtype=dtype, quantize=quant, group_size=a.group_size, compile=not a.eager,
                        threads=threads, device=str(device))
        runner = prepare(copy.deepcopy(base), run)
        model = runner.model
        real_dtype = next(model.parameters()).dtype
        hf_model = hf.to(device=device, dtype=real_dtype) if hf is not None and quant is None else None
        ours, theirs = [], []
        for _ in range(a.repeats):
            ours.append(lmlab_run(runner, tok, prompt, a.new_tokens, long_prompt, a.chunk))
            if hf_model is not None:
                theirs.append(hf_run(hf_model, prompt, a.new_tokens, long_prompt))
        o = best_of(ours)
        h = best_of(theirs) if theirs else None
        nbytes = weight_bytes(model)
        limit = bw * 1e9 / nbytes
        rows.append(dict(name=name, o=o, h=h, nbytes=nbytes, limit=limit))
        log(f"\n[{name}] lmlab: decode {o['decode_tps']:.1f} tok/s ({o['decode_tps'] / limit:.0%} of the "
            f"{limit:.0f} tok/s bandwidth limit for {nbytes / 1e6:.0f} MB of weights), "
            f"TTFT {len(long_prompt)} tokens {o['ttft'] * 1e3:.0f} ms = {len(long_prompt) / o['ttft']:.0f} tok/s")
        log(f"[{name}] lmlab old loop (step + argmax, one sync per run): decode {o['old_tps']:.1f} tok/s;  "
            f"ratio `lmlab generate` path / old loop {o['decode_tps'] / o['old_tps']:.2f}x;  tokens identical for "
            f"{same_prefix(o['tokens'], o['old_tokens'])}/{a.new_tokens}")
        if h is not None:
            match = same_prefix(o["tokens"], h["tokens"])
            log(f"[{name}] HF:    decode {h['decode_tps']:.1f} tok/s, TTFT {h['ttft'] * 1e3:.0f} ms = "
                f"{a.prefill_tokens / h['ttft']:.0f} tok/s;  ratios lmlab/HF: decode "
                f"{o['decode_tps'] / h['decode_tps']:.2f}x, prefill {h['ttft'] / o['ttft']:.2f}x;  "
                f"greedy tokens identical for {match}/{a.new_tokens}")
        log(f"[{name}] text: {tok.decode(o['tokens'])[:100]!r}")
        if windows:
            ppl[name] = perplexity(model, windows)
            log(f"[{name}] wikitext perplexity ({len(windows)}×{a.ppl_window_len} tokens): {ppl[name]:.3f}")
        del model, runner
        torch._dynamo.reset()

    log("\n| run | lmlab tok/s | old loop tok/s | new/old | HF tok/s | ratio | % of BW limit | TTFT ms (lmlab/HF) "
        "| prefill ratio | ppl | Δppl |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for r in rows:
        o, h = r["o"], r["h"]
        d = ""
        if r["name"] in ppl and "float32" in ppl:
            rel = ppl[r["name"]] / ppl["float32"] - 1
            lim = PPL_LIMITS.get(r["name"])
            passed = lim is None or rel <= lim
            ok &= passed
            d = f"{rel:+.2%}" + ("" if lim is None else f" (≤ +{lim:.0%}: {'ok' if passed else 'FAIL'})")
        hf_cols = (f"{h['decode_tps']:.1f} | {o['decode_tps'] / h['decode_tps']:.2f}x" if h else "– | –")
        ttft = f"{o['ttft'] * 1e3:.0f} / " + (f"{h['ttft'] * 1e3:.0f} | {h['ttft'] / o['ttft']:.2f}x" if h else "– | –")
        ours = f"{o['decode_tps']:.1f} | {o['old_tps']:.1f} | {o['decode_tps'] / o['old_tps']:.2f}x"
        log(f"| {r['name']} | {ours} | {hf_cols} | {o['decode_tps'] / r['limit']:.0%} | {ttft} | "
            f"{ppl.get(r['name'], float('nan')):.3f} | {d} |")
    quantized = [r["o"]["decode_tps"] for r in rows if r["name"] in ("int8", "int4")]
    if quantized:
        log(f"\nbest quantized decode {max(quantized):.1f} tok/s (llama.cpp Q4_1 on this machine class: "
            f"≈{LLAMA_CPP_Q4_1:.0f}, quoted from issue 6, not measured here)")
    if devices.NOTES:
        log("fallbacks taken: " + "; ".join(devices.NOTES))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
