"""Batch-1 greedy decoding speed and quality: lmlab against HF transformers on the same SmolLM2-135M weights.

One process, one run, every number next to its peer measured in the same run:
  * memory read bandwidth (sum over a tensor larger than the last-level cache), read at the start and before
    each run, and the decode limit the highest reading implies;
  * decode tokens/s for --new-tokens after a --prompt-tokens prompt, float32 and bfloat16 for both
    libraries, plus lmlab int8 and int4; same prompt ids, greedy, tokens compared. lmlab is timed on the
    path `lmlab generate` runs (lmlab.inference.text.generate_from_ids: the one decoding loop, streaming
    detokenizer and stop-string filter included) and, as the comparison, on the bare loop that was the
    benchmark's before (chunked prefill, then step + argmax, one host sync per run), with the ratio;
  * time to first token and prefill tokens/s for a --prefill-tokens prompt;
  * the fraction of the bandwidth limit each decode reaches (bytes of weights read per token × tokens/s);
  * wikitext-2 perplexity over --ppl-windows windows for float32 / bfloat16 / int8 / int4, with the
    +1% / +2% / +5% checks against float32;
  * llama.cpp (llama-cpp-python, built from source by bench/build_llamacpp.sh into bench/.llamacpp, never
    a dependency of lmlab) as the peer of int4: the same GGUF file lmlab loads, the same prompt ids, the same
    number of new tokens, greedy, the same thread count; its decode tok/s, 512-token prefill, % of its own
    bandwidth limit (the file's matrix bytes) and how many greedy tokens agree with lmlab int4. Skipped with
    a notice when it is not built or the model is not a GGUF file.
Machines are shared and noisy: each timing is the best of --repeats runs (lmlab, HF and llama.cpp
interleaved), printed with its spread (min–max over the runs). The last lines state each goal as PASS/FAIL:
decode ≥ HF and prefill ≥ HF per dtype, float32/bfloat16 ≥ 80% and int8/int4 ≥ 60% of their bandwidth limit,
int4 ≥ llama.cpp. The exit status is 1 only when a perplexity check fails (timings are too noisy to gate on).

    python bench/decode.py                      # everything (~12 min on 2 cores)
    python bench/decode.py --ppl-windows 0      # speed only
    python bench/decode.py --eager              # lmlab without its compiled decoding step
    python bench/decode.py --no-llamacpp        # without the llama.cpp row
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
LLAMACPP_DIR = ROOT / "bench" / ".llamacpp"  # where bench/build_llamacpp.sh puts llama-cpp-python
BW_GOALS = {"float32": 0.80, "bfloat16": 0.80, "int8": 0.60, "int4": 0.60}  # decode ≥ this share of its limit


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


class _Clock:
    """A transformers streamer that only notes when each `put` arrives: the first carries the prompt, the
    second the first new token (after prefill), the last the last token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_generate(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """(n greedy tokens, seconds from the first new token to the last: the n - 1 decoding steps)."""
    x = torch.tensor([ids], device=model.device)
    clock = _Clock()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, streamer=clock)
    return out[0, len(ids):].tolist(), clock.times[-1] - clock.times[1]


@torch.inference_mode()
def hf_prefill(model, ids: list[int]) -> float:
    """Seconds of one generate call for one token: prefill of `ids` and the first token (the TTFT figure)."""
    x = torch.tensor([ids], device=model.device)
    devices.synchronize(model.device)
    t = time.perf_counter()
    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False, pad_token_id=0)
    devices.synchronize(model.device)
    return time.perf_counter() - t


def hf_run(model, prompt: list[int], n: int, long_prompt: list[int]) -> dict:
    tokens, decode_s = hf_generate(model, prompt, n)
    return dict(tokens=tokens, decode_tps=(n - 1) / max(decode_s, 1e-9), ttft=hf_prefill(model, long_prompt))


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
    """The first run's tokens, the best of each timing, and every run's figures (for the spread):
    decode_tps / old_tps the highest, ttft the lowest; `all_<key>` lists them all."""
    best = dict(runs[0])
    for key, pick in (("decode_tps", max), ("old_tps", max), ("ttft", min)):
        if key in runs[0]:
            best[key] = pick(r[key] for r in runs)
            best["all_" + key] = [r[key] for r in runs]
    return best


def spread(values: list[float], scale: float = 1.0, best=max, digits: int = 1) -> str:
    """'best (min–max, n=N)' of timings over repeats, e.g. '24.9 (23.7–24.9, n=3)'; best is max for
    rates, min for durations. One run: '24.9 (n=1)'."""
    v = [x * scale for x in values]
    b = f"{best(v):.{digits}f}"
    if len(v) == 1:
        return f"{b} (n=1)"
    return f"{b} ({min(v):.{digits}f}–{max(v):.{digits}f}, n={len(v)})"


# --------------------------------------------------------------------------- llama.cpp
def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of matrix weights one decoding step of a GGUF model reads, as stored in the file (its own
    quantized block layout): every tensor of two or more dimensions except the token embedding (one row of
    it is read), which counts only when it doubles as the output head (no output.weight: tied). The same
    definition as lmlab.inference.quantize.weight_bytes (linears and LM head; norms and embedding out)."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    names = {t.name for t in tensors}
    total = 0
    for t in tensors:
        if sum(int(d) > 1 for d in t.shape) < 2:
            continue
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue
        total += int(t.n_bytes)
    return total


def load_llamacpp(folder: Path, gguf: Path, threads: int, n_ctx: int):
    """(Llama, a line saying what was loaded) or (None, why it is skipped). llama_cpp is imported from
    `folder` (appended to sys.path, so lmlab's own numpy and friends keep precedence), or from wherever
    it is already importable."""
    if not (folder / "llama_cpp").is_dir():
        try:
            import llama_cpp  # noqa: F401  (installed some other way)
        except ImportError:
            return None, f"llama.cpp: not built (run bench/build_llamacpp.sh; looked in {folder}); skipped"
    elif str(folder) not in sys.path:
        sys.path.append(str(folder))
    from lmlab.checkpoints import is_gguf

    if not is_gguf(gguf):
        return None, f"llama.cpp: {gguf} is not a GGUF file (llama.cpp needs one); skipped"
    try:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                              n_threads_batch=threads, logits_all=False, verbose=False)
    except Exception as e:  # a broken build, an unsupported file: the bench goes on without it
        return None, f"llama.cpp: could not load {gguf.name} ({type(e).__name__}: {e}); skipped"
    return llm, (f"llama.cpp: llama-cpp-python {llama_cpp.__version__} from {Path(llama_cpp.__file__).parent}, "
                 f"{gguf.name}, {threads} threads")


def llamacpp_generate(llm, ids: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens after `ids` through llama-cpp-python's own generation loop (its greedy sampler).
    (tokens, seconds of the n - 1 decoding steps): the clock starts at the first token, so prompt
    processing is not in it."""
    llm.reset()  # no prefix reuse: the prompt is processed afresh each run
    out, t0 = [], 0.0
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if not out:
            t0 = time.perf_counter()
        out.append(token)
        if len(out) == n:
            break
    return out, time.perf_counter() - t0


def llamacpp_prefill(llm, ids: list[int]) -> float:
    """Seconds to process `ids` from an empty cache up to the last position's logits (the TTFT figure)."""
    import llama_cpp

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    llama_cpp.llama_synchronize(llm.ctx)  # the logits are ready
    return time.perf_counter() - t0


def llamacpp_run(llm, prompt: list[int], n: int, long_prompt: list[int]) -> dict:
    tokens, decode_s = llamacpp_generate(llm, prompt, n)
    return dict(tokens=tokens, decode_tps=(n - 1) / max(decode_s, 1e-9), ttft=llamacpp_prefill(llm, long_prompt))


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
    p.add_argument("--llamacpp", default=str(LLAMACPP_DIR),
                   help="folder bench/build_llamacpp.sh built llama-cpp-python into (default: %(default)s)")
    p.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp peer")
    a = p.parse_args(argv)
    if a.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed needs a step after the first token)")

    threads = devices.set_threads(a.threads)
    device = devices.resolve_device(a.device)
    readings = [read_bandwidth(device)]  # read again before each run; limits use the highest reading
    bw = readings[0]
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
    llm, gguf_path, gguf_bytes = None, resolve(a.model), 0
    if not a.no_llamacpp:
        n_ctx = max(len(long_prompt), len(prompt) + a.new_tokens) + 16
        llm, note = load_llamacpp(Path(a.llamacpp), gguf_path, threads, n_ctx)
        log(note)
        if llm is not None:
            gguf_bytes = gguf_bytes_per_token(gguf_path)
            made = llm.tokenize(tok.decode(prompt).encode("utf-8"), add_bos=False, special=False)
            log(f"llama.cpp: fed lmlab's prompt ids; its own tokenizer gives "
                + ("the same ids" if made == prompt else f"different ids ({len(made)} tokens)")
                + f"; {gguf_bytes / 1e6:.0f} MB of matrix weights read per token in the file")
    configs = [("float32", "float32", None), ("bfloat16", "bfloat16", None),
               ("int8", a.quant_dtype, "int8"), ("int4", a.quant_dtype, "int4")]
    wanted = a.configs.split(",")
    unknown = [c for c in wanted if c not in [name for name, _, _ in configs]]
    if unknown:
        p.error(f"--configs: unknown run {unknown[0]!r} (choose from float32, bfloat16, int8, int4)")
    configs = [c for c in configs if c[0] in wanted]
    # llama.cpp runs interleaved with int4 (its peer); alone at the end when int4 is not among the runs
    lc_runs: list[dict] = []
    rows, ppl = [], {}
    for name, dtype, quant in configs:
        run = RunConfig(dtype=dtype, quantize=quant, group_size=a.group_size, compile=not a.eager,
                        threads=threads, device=str(device))
        readings.append(read_bandwidth(device))
        bw = max(readings)
        runner = prepare(copy.deepcopy(base), run)
        model = runner.model
        real_dtype = next(model.parameters()).dtype
        hf_model = hf.to(device=device, dtype=real_dtype) if hf is not None and quant is None else None
        ours, theirs = [], []
        for _ in range(a.repeats):
            ours.append(lmlab_run(runner, tok, prompt, a.new_tokens, long_prompt, a.chunk))
            if hf_model is not None:
                theirs.append(hf_run(hf_model, prompt, a.new_tokens, long_prompt))
            if llm is not None and name == "int4":
                lc_runs.append(llamacpp_run(llm, prompt, a.new_tokens, long_prompt))
        o = best_of(ours)
        h = best_of(theirs) if theirs else None
        nbytes = weight_bytes(model)
        limit = bw * 1e9 / nbytes
        rows.append(dict(name=name, o=o, h=h, nbytes=nbytes, limit=limit))
        log(f"\n[{name}] lmlab: decode {spread(o['all_decode_tps'])} tok/s ({o['decode_tps'] / limit:.0%} of the "
            f"{limit:.0f} tok/s bandwidth limit for {nbytes / 1e6:.0f} MB of weights), "
            f"TTFT {len(long_prompt)} tokens {spread(o['all_ttft'], 1e3, min, 0)} ms = "
            f"{len(long_prompt) / o['ttft']:.0f} tok/s")
        log(f"[{name}] lmlab old loop (step + argmax, one sync per run): decode {spread(o['all_old_tps'])} tok/s;  "
            f"ratio `lmlab generate` path / old loop {o['decode_tps'] / o['old_tps']:.2f}x;  tokens identical for "
            f"{same_prefix(o['tokens'], o['old_tokens'])}/{a.new_tokens}")
        if h is not None:
            match = same_prefix(o["tokens"], h["tokens"])
            log(f"[{name}] HF:    decode {spread(h['all_decode_tps'])} tok/s, TTFT "
                f"{spread(h['all_ttft'], 1e3, min, 0)} ms = {len(long_prompt) / h['ttft']:.0f} tok/s;  "
                f"ratios lmlab/HF: decode {o['decode_tps'] / h['decode_tps']:.2f}x, prefill "
                f"{h['ttft'] / o['ttft']:.2f}x;  greedy tokens identical for {match}/{a.new_tokens}")
        log(f"[{name}] text: {tok.decode(o['tokens'])[:100]!r}")
        if windows:
            ppl[name] = perplexity(model, windows)
            log(f"[{name}] wikitext perplexity ({len(windows)}×{a.ppl_window_len} tokens): {ppl[name]:.3f}")
        del model, runner
        torch._dynamo.reset()

    # the limits by the highest bandwidth reading of the whole run: a reading taken while other jobs shared the
    # memory bus would flatter every share (a float32 decode once read 136% of a low start-of-run reading)
    for r in rows:
        r["limit"] = bw * 1e9 / r["nbytes"]
    log(f"\nmemory read bandwidth readings (GB/s, at the start and before each run): "
        f"{', '.join(f'{x:.1f}' for x in readings)}; the limits below use the highest, {bw:.1f}")
    lc = None
    if llm is not None:
        if not lc_runs:
            lc_runs = [llamacpp_run(llm, prompt, a.new_tokens, long_prompt) for _ in range(a.repeats)]
        lc = best_of(lc_runs)
        lc.update(nbytes=gguf_bytes, limit=bw * 1e9 / gguf_bytes)
        int4 = next((r["o"] for r in rows if r["name"] == "int4"), None)
        vs = ""
        if int4 is not None:
            vs = (f";  lmlab int4 / llama.cpp: decode {int4['decode_tps'] / lc['decode_tps']:.2f}x, prefill "
                  f"{lc['ttft'] / int4['ttft']:.2f}x;  greedy tokens identical to lmlab int4 for "
                  f"{same_prefix(int4['tokens'], lc['tokens'])}/{a.new_tokens}")
        log(f"\n[llama.cpp {gguf_path.name}] decode {spread(lc['all_decode_tps'])} tok/s "
            f"({lc['decode_tps'] / lc['limit']:.0%} of the {lc['limit']:.0f} tok/s limit for "
            f"{gguf_bytes / 1e6:.0f} MB), TTFT {spread(lc['all_ttft'], 1e3, min, 0)} ms = "
            f"{len(long_prompt) / lc['ttft']:.0f} tok/s" + vs)
        log(f"[llama.cpp] text: {tok.decode(lc['tokens'])[:100]!r}")
        llm.close()  # now, not at interpreter exit (where its finalizer finds the library half torn down)

    # one table: a row per library and run; spreads are min–max over the --repeats runs
    log(f"\n| run | decode tok/s: best (min–max, n) | vs peer | % of BW limit | TTFT {len(long_prompt)} ms: best "
        "(min–max, n) | prefill vs peer | old loop tok/s (new/old) | ppl | Δppl |")
    log("|---|---|---|---|---|---|---|---|---|")
    ok = True
    for r in rows:
        o, h = r["o"], r["h"]
        peer, peer_name = (h, "HF") if h is not None else (lc, "llama.cpp") if r["name"] == "int4" else (None, "")
        d = ""
        if r["name"] in ppl and "float32" in ppl:
            rel = ppl[r["name"]] / ppl["float32"] - 1
            lim = PPL_LIMITS.get(r["name"])
            passed = lim is None or rel <= lim
            ok &= passed
            d = f"{rel:+.2%}" + ("" if lim is None else f" (≤ +{lim:.0%}: {'ok' if passed else 'FAIL'})")
        vs_dec = f"{o['decode_tps'] / peer['decode_tps']:.2f}x {peer_name}" if peer else "–"
        pp = f"{ppl[r['name']]:.3f}" if r["name"] in ppl else "–"
        vs_pre = f"{peer['ttft'] / o['ttft']:.2f}x {peer_name}" if peer else "–"
        log(f"| lmlab {r['name']} | {spread(o['all_decode_tps'])} | {vs_dec} | {o['decode_tps'] / r['limit']:.0%} | "
            f"{spread(o['all_ttft'], 1e3, min, 0)} | {vs_pre} | {o['old_tps']:.1f} "
            f"({o['decode_tps'] / o['old_tps']:.2f}x) | {pp} | {d} |")
        if h is not None:
            log(f"| HF {r['name']} | {spread(h['all_decode_tps'])} | | {h['decode_tps'] / r['limit']:.0%} | "
                f"{spread(h['all_ttft'], 1e3, min, 0)} | | | | |")
    if lc is not None:
        log(f"| llama.cpp {gguf_path.suffixes[-2].lstrip('.') if len(gguf_path.suffixes) > 1 else 'GGUF'} | "
            f"{spread(lc['all_decode_tps'])} | | {lc['decode_tps'] / lc['limit']:.0%} | "
            f"{spread(lc['all_ttft'], 1e3, min, 0)} | | | | |")

    log("\ngoals (best of each figure, same run):")
    for line in goal_lines(rows, lc, len(long_prompt)):
        log("  " + line)
    if devices.NOTES:
        log("notices (fallbacks, builds): " + "; ".join(devices.NOTES))
    return 0 if ok else 1


def goal_lines(rows: list[dict], lc: dict | None, prefill_tokens: int) -> list[str]:
    """The issue's goals, one PASS/FAIL (or SKIP) line each, with the figures they compare."""
    def verdict(passed: bool) -> str:
        return "PASS" if passed else "FAIL"

    out = []
    for r in rows:
        o, h, name = r["o"], r["h"], r["name"]
        if h is not None:
            out.append(f"{verdict(o['decode_tps'] >= h['decode_tps'])}  {name} decode ≥ HF: lmlab "
                       f"{o['decode_tps']:.1f} vs HF {h['decode_tps']:.1f} tok/s ({o['decode_tps'] / h['decode_tps']:.2f}x)")
            out.append(f"{verdict(o['ttft'] <= h['ttft'])}  {name} prefill ({prefill_tokens} tokens) ≥ HF: lmlab "
                       f"{prefill_tokens / o['ttft']:.0f} vs HF {prefill_tokens / h['ttft']:.0f} tok/s "
                       f"({h['ttft'] / o['ttft']:.2f}x)")
        goal = BW_GOALS.get(name)
        if goal is not None:
            share = o["decode_tps"] / r["limit"]
            out.append(f"{verdict(share >= goal)}  {name} decode ≥ {goal:.0%} of its bandwidth limit: {share:.0%} "
                       f"({o['decode_tps']:.1f} of {r['limit']:.0f} tok/s for {r['nbytes'] / 1e6:.0f} MB)")
        if name == "int4":
            if lc is None:
                out.append("SKIP  int4 decode ≥ llama.cpp: llama.cpp not run")
            else:
                out.append(f"{verdict(o['decode_tps'] >= lc['decode_tps'])}  int4 decode ≥ llama.cpp (same GGUF): "
                           f"lmlab {o['decode_tps']:.1f} vs llama.cpp {lc['decode_tps']:.1f} tok/s "
                           f"({o['decode_tps'] / lc['decode_tps']:.2f}x)")
    return out

if __name__ == "__main__":
    sys.exit(main())
