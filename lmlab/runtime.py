"""Running a model fast on this machine: threads, dtype and quantization chosen at load time, chunked
prefill with time to first token, and an optional torch.compile'd decoding step.

Everything here degrades with a one-line notice instead of failing: a dtype the hardware cannot run
falls back to float32, a missing fast kernel falls back to the reference route, a compiler that is not
there leaves the eager model. Nothing assumes a CPU: the same calls run on CUDA.

    model, tok = runtime.load("smollm2-135m", dtype="bfloat16", quantize="int8")
    logits, cache, seconds = runtime.prefill(model, ids, max_new_tokens=128)
"""
from __future__ import annotations

import functools
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch

from lmlab.errors import LmlabError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NOTES: list[str] = []  # every fallback taken in this process, in order


def notice(message: str) -> None:
    """Tell the user (stderr, once per message) which fallback was taken."""
    if message not in NOTES:
        NOTES.append(message)
        print(f"lmlab: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- the machine
def machine_threads() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def idle_threads() -> int:
    """Usable cores minus those other processes keep busy (1-minute load average), at least 1.

    On a shared machine this matters more than anything else: an intra-op thread whose core is taken
    makes every parallel kernel wait for it at the barrier (measured here: a 128-token forward took
    9.2 s with 2 threads and 2.6 s with 1 while other jobs kept both cores busy).
    """
    cores = machine_threads()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores
    return max(1, min(cores, round(cores - busy)))


def set_threads(n: int | None = None) -> int:
    """Intra-op threads: `n`, or one per idle usable core. More threads than free cores only adds waiting."""
    n = n or idle_threads()
    if n < 1:
        raise LmlabError(f"threads must be >= 1, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_peak_flops(threads: int) -> float:
    """Rough float32 peak of `threads` CPU cores: FMA lanes per cycle (AVX-512 / AVX2 / other, two FMA
    units) times the clock /proc/cpuinfo reports (2.5 GHz when it says nothing). For MFU, not for claims."""
    flags = _cpu_flags()
    per_cycle = 64 if "avx512f" in flags else 32 if "avx2" in flags else 16
    ghz = 2.5
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":", 1)[1]) for line in f if line.startswith("cpu MHz")]
        ghz = max(mhz) / 1000 if mhz else ghz
    except (OSError, ValueError):
        pass
    return per_cycle * ghz * 1e9 * threads


def bf16_supported(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matmuls run natively (not emulated) on this device."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # other accelerators: let the backend decide
    flags = _cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16", "bf16"} & flags)  # x86 AVX-512 BF16 / AMX; Arm BF16
    return platform.machine().lower() in ("arm64",) and platform.system() == "Darwin"


def fp16_supported(device: torch.device | str = "cpu") -> bool:
    device = torch.device(device)
    if device.type != "cpu":
        return True
    flags = _cpu_flags()
    return bool({"avx512_fp16", "amx_fp16", "fphp", "asimdhp"} & flags)


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmlabError(f"unknown device '{name}' (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        notice(f"device '{name}' is not available here; falling back to cpu")
        return torch.device("cpu")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to run in: the one asked for, or float32 where the hardware cannot run it natively."""
    if isinstance(name, torch.dtype):
        name = str(name).replace("torch.", "")
    if name not in DTYPES:
        raise LmlabError(f"unknown dtype '{name}' (choose from {', '.join(DTYPES)})")
    where = "CPU" if device.type == "cpu" else f"device {device}"
    if name == "bfloat16" and not bf16_supported(device):
        notice(f"bfloat16 is not supported on this {where}; falling back to float32")
        return torch.float32
    if name == "float16" and not fp16_supported(device):
        notice(f"float16 is not supported on this {where}; falling back to float32")
        return torch.float32
    return DTYPES[name]


def quantization_route(scheme: str, device: torch.device) -> str:
    """'kernel' when PyTorch has a fast weight-only kernel for `scheme` on this device, else 'reference'."""
    op = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm_for_cpu"}[scheme]
    if scheme == "int4" and device.type != "cpu":
        return "reference"
    return "kernel" if hasattr(torch.ops.aten, op) else "reference"


# --------------------------------------------------------------------------- half-precision rows on CPU
class RowLinear(torch.nn.Linear):
    """nn.Linear whose one-row products (batch-1 decoding) go through torch.mv.

    On CPU the half-precision GEMM path is slow for a single row (measured: bf16 3072×576 0.79 ms as a
    GEMM, 0.45 ms as mv; the 49152×576 LM head 21.9 ms vs 8.0 ms). Same parameters, same state dict.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != self.in_features:
            return super().forward(x)
        y = torch.mv(self.weight, x.reshape(-1))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def use_row_linears(model: torch.nn.Module) -> int:
    """Turn every plain nn.Linear into a RowLinear in place (tied weights stay tied). Returns how many."""
    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            m.__class__ = RowLinear
            n += 1
    return n


# --------------------------------------------------------------------------- loading
@dataclass
class RunConfig:
    """How to run a model: what `--dtype`, `--quantize`, `--compile`, `--threads`, `--device` ask for."""

    dtype: str = "float32"
    quantize: str | None = None  # None, "int8" or "int4"
    group_size: int = 32  # int4 only
    device: str | None = None  # None = cuda when present, else cpu
    compile: bool = False
    threads: int | None = None  # None = one per usable core (CPU only)


def add_run_args(p, dtype_default: str = "float32") -> None:
    """The options every command that runs a model shares (argparse)."""
    p.add_argument("--dtype", default=dtype_default, choices=list(DTYPES),
                   help="weights/activations dtype (falls back to float32 where unsupported)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"], help="weight-only quantization")
    p.add_argument("--group-size", type=int, default=32, help="int4 group size (32, 64, 128, 256 are fast on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward (slow start, faster steps)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per idle usable core)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when present)")


def run_config(args) -> RunConfig:
    """RunConfig from parsed add_run_args options."""
    return RunConfig(dtype=args.dtype, quantize=args.quantize, group_size=args.group_size, device=args.device,
                     compile=args.compile, threads=args.threads)


def prepare(model: torch.nn.Module, run: RunConfig) -> torch.nn.Module:
    """Move, cast, quantize and (optionally) compile a loaded model according to `run`. Returns the model."""
    from lmlab.quantize import SCHEMES, quantize_model

    device = resolve_device(run.device)
    if device.type == "cpu":
        set_threads(run.threads)
    dtype = resolve_dtype(run.dtype, device)
    model = model.to(device=device, dtype=dtype).eval()
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        use_row_linears(model)
    if run.quantize:
        if run.quantize not in SCHEMES:
            raise LmlabError(f"unknown quantization '{run.quantize}' (choose from {', '.join(SCHEMES)})")
        if quantization_route(run.quantize, device) == "reference":
            notice(f"{run.quantize}: no fast {run.quantize} kernel for {device.type} in this PyTorch; "
                   "falling back to de-quantizing weights on the fly (correct, slower)")
        quantize_model(model, run.quantize, group_size=run.group_size)
        warm(model)  # pick and check each layer's kernel eagerly, before any compiling
    if run.compile:
        model = compile_model(model)
    return model


def load(spec: str, run: RunConfig | None = None, **kw):
    """checkpoints.load + prepare: `runtime.load("smollm2-135m", dtype="bfloat16", quantize="int8")`."""
    from lmlab.checkpoints import load as load_checkpoint

    run = run or RunConfig(**kw)
    model, tok = load_checkpoint(spec, dtype="float32", device="cpu")
    return prepare(model, run), tok


@torch.inference_mode()
def warm(model: torch.nn.Module, steps: int = 2) -> None:
    """A couple of tiny forward passes: fast kernels chosen and checked, lazy buffers built."""
    base = model._orig_mod if hasattr(model, "_orig_mod") else model
    device = base.tok_emb.weight.device
    if base.decoder is None:
        model(torch.zeros(1, 2, dtype=torch.long, device=device))
        return
    cache = base.make_cache(1, steps + 2)
    kw = {}
    if base.encoder is not None:
        kw["encoder_input_ids"] = torch.zeros(1, 2, dtype=torch.long, device=device)
    model(torch.zeros(1, 2, dtype=torch.long, device=device), cache=cache, **kw)
    for _ in range(steps):
        step(model, torch.zeros(1, 1, dtype=torch.long, device=device), cache, **kw)


# --------------------------------------------------------------------------- compiling
class _SlotWriter:
    """What a compiled step hands the attention layers as their cache: writes this step's keys/values into
    slot `slot` of each layer's preallocated buffer, in place, and returns the whole buffer (the mask says
    which slots count). Same `update` signature as KVCache."""

    def __init__(self, ks: list[torch.Tensor], vs: list[torch.Tensor], slot: torch.Tensor):
        self.ks, self.vs, self.slot = ks, vs, slot

    def update(self, layer: int, start, k: torch.Tensor, v: torch.Tensor):
        self.ks[layer].index_copy_(2, self.slot, k)
        self.vs[layer].index_copy_(2, self.slot, v)
        return self.ks[layer], self.vs[layer]


def _step_graph(model, ids, positions, allowed, slot, ks, vs):
    """One token per row through a decoder-only model over its whole static cache: the compiled function.
    Every shape is fixed by the cache, so one graph serves every step (and the cache length is dynamic)."""
    x = model.embed(ids, positions)
    h = model.decoder(x, positions, attn_mask=allowed, cache=_SlotWriter(ks, vs, slot))
    return model.head(h)


def _inductor_keeping_mv(gm, example_inputs):
    """Inductor, except that matrix-vector products stay calls to ATen's kernel: by default inductor turns
    `mv` into its own multiply-and-sum loop, which on CPU reads bfloat16 weights at about half the speed
    (measured for SmolLM2 bf16 decoding: 43 tok/s against 54)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    keep = (torch.ops.aten.mv.default, torch.ops.aten.addmv.default)
    table = {op: fn for op, fn in select_decomp_table().items() if op not in keep}
    return compile_fx(gm, example_inputs, decompositions=table)


class DecodeStep:
    """A torch.compile'd decoding step (gpt-fast style): static preallocated cache written in place, the
    attention mask computed from the cache's validity, and no shape that changes from step to step.
    Inductor fuses norms, rotary, residuals and activations; the matrix-vector products stay the fastest
    kernels PyTorch has. Falls back to the eager forward for what it does not cover."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.fn = torch.compile(_step_graph, fullgraph=True, backend=_inductor_keeping_mv)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        dec = model.decoder
        return model.encoder is None and dec is not None and dec.rel_bias is None

    @torch.inference_mode()  # one graph, whoever calls (decoding never needs gradients)
    def __call__(self, ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        start, positions = cache.reserve(mask)
        if attention_mask is not None:
            cache.padded = True
        allowed = cache.valid[:, None, None, :].clone()
        allowed[..., start] = True  # a padding query still sees itself
        slot = torch.full((1,), start, dtype=torch.long, device=ids.device)
        for t in (allowed, *cache.k, *cache.v):  # one graph for every cache length
            torch._dynamo.maybe_mark_dynamic(t, t.dim() - 2 if t is not allowed else 3)
        try:
            logits = self.fn(self.model, ids, positions, allowed, slot, cache.k, cache.v)
        except Exception as e:  # a new shape the compiler could not handle: undo the reservation, run eagerly
            cache.valid[:, start] = False
            cache.next_pos -= mask.long().sum(1)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            notice(f"compiled decoding step failed ({type(e).__name__}: {first[:120]}); decoding eagerly")
            self.model.__dict__.pop("_lmlab_step", None)
            return self.model(ids, cache=cache, attention_mask=attention_mask)
        cache.commit(1)
        return logits


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """Attach a compiled decoding step to `model` (used by `step`, hence by generation and `greedy`);
    prompts and scoring stay eager (their matrix products already run at full speed). The model unchanged
    with a notice when the compiler is unavailable or fails on a first trial step."""
    if not hasattr(torch, "compile"):
        notice("torch.compile is not available in this PyTorch; running eagerly")
        return model
    if not DecodeStep.supports(model):
        notice("compiled decoding covers decoder-only models without relative position bias; running eagerly")
        return model
    try:
        model._lmlab_step = DecodeStep(model)
        warm(model)
    except Exception as e:  # the compiler needs a C++ toolchain (CPU) or Triton (GPU)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        notice(f"torch.compile failed ({type(e).__name__}: {first[:120]}); running eagerly")
        model.__dict__.pop("_lmlab_step", None)
        torch._dynamo.reset()
    return model


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Transformer behind a compiled wrapper (for attributes such as cfg and make_cache)."""
    return model._orig_mod if hasattr(model, "_orig_mod") else model


# --------------------------------------------------------------------------- prefill and decoding
def synchronize(device: torch.device) -> None:
    """Wait for the device (CUDA runs asynchronously; CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, *, max_new_tokens: int = 0, chunk: int = 512, cache=None,
            attention_mask: torch.Tensor | None = None):
    """Run a (B×T) prompt through a fresh KV cache in chunks of at most `chunk` tokens.

    Returns (logits of the last prompt position B×V, cache, seconds to those logits: time to first token).
    Chunks bound activation memory and run at full matrix-multiply speed; the cache makes them exact.
    """
    base = base_model(model)
    device = base.tok_emb.weight.device
    B, T = ids.shape
    if cache is None:
        cache = base.make_cache(B, T + max_new_tokens)
    synchronize(device)
    t0 = time.perf_counter()
    logits = None
    for s in range(0, T, chunk):
        part = ids[:, s:s + chunk]
        mask = attention_mask[:, s:s + chunk] if attention_mask is not None else None
        logits = model(part, cache=cache, attention_mask=mask, last_logits_only=True)
    last = logits[:, -1]
    synchronize(device)
    return last, cache, time.perf_counter() - t0


def step(model, ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
    """Logits B×T×V for new tokens ids (B×T) on top of `cache`: the compiled step when the model has one
    (see compile_model) and T = 1, else the eager forward. Every decoding loop goes through here."""
    fast = getattr(base_model(model), "_lmlab_step", None)
    if fast is not None and not kw and ids.shape[1] == 1:
        return fast(ids, cache, attention_mask)
    return model(ids, cache=cache, attention_mask=attention_mask, **kw)


@dataclass
class DecodeResult:
    tokens: list[int]
    prefill_s: float  # time to first token
    decode_s: float  # the remaining tokens
    decode_steps: int

    @property
    def tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


@torch.inference_mode()
def greedy(model, prompt: list[int], max_new_tokens: int, *, chunk: int = 512) -> DecodeResult:
    """Batch-1 greedy decoding: chunked prefill, then one cached step per token, no per-step host work
    beyond reading the chosen token. The loop the benchmark times; generation.py runs the same steps."""
    base = base_model(model)
    device = base.tok_emb.weight.device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    last, cache, ttft = prefill(model, ids, max_new_tokens=max_new_tokens, chunk=chunk)
    nxt = last.argmax(-1, keepdim=True)
    out = [nxt]
    t0 = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        nxt = step(model, nxt, cache)[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
    tokens = torch.cat(out, 1)[0].tolist()  # one host sync for the whole run
    synchronize(device)
    return DecodeResult(tokens, ttft, time.perf_counter() - t0, max_new_tokens - 1)
