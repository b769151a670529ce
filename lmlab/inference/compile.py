"""A compiled decoding step (gpt-fast style): static preallocated cache written in place, the attention mask
built from the cache's validity (lmlab.model.masks.decode_step), and no shape that changes from step to
step, so one graph serves every step and every cache length. The same step takes a few tokens per row
(T <= FEW_QUERIES: a speculative verification pass, a draft catching up) as a second graph, used for the
token counts where it was measured faster than the eager forward. Inductor fuses norms, rotary, residuals
and activations; the matrix-vector products stay the kernels chosen for each layer.

Two compilers serve the one step function:
  torch.compile    any batch; its Python wrapper and guard checks cost ~3 ms a step for a 30-layer model
  AOTInductor      batch 1 (generation, chat, drafting): the step exported once and compiled ahead of time
                   into a C++ wrapper with no guards, cached under $LMLAB_HOME/compiled by a hash of the
                   exported graph; it holds no weights (it reads the model's own tensors). One package for
                   one token, and with `few=True` (speculative decoding) one for 2..FEW_QUERIES tokens

The step is an object the caller holds (a Runner keeps it); nothing is attached to the model.
"""
from __future__ import annotations

import hashlib
import os
import time

import torch

from lmlab.model import masks
from lmlab.model.attention import FEW_QUERIES
from lmlab.model.kv_cache import KVCache, StepView
from lmlab.inference.quantize import QuantLinear
from lmlab.utils.atomic import atomic_path
from lmlab.utils.device import cpu_flags, notice, synchronize


# 16-bit values are rounded wherever the eager forward rounds them, also inside fused code: without it the
# one-token graph fed a residual sum it kept in float32 to the next norm while the few-token graph re-read the
# rounded one, so a verification pass and plain steps disagreed in bfloat16 (logits by up to 0.4)
INDUCTOR_CONFIG = {"emulate_precision_casts": True}


def _step_graph(model, ids, allowed, slot, positions, ks, vs):
    """T tokens per row (written at slots `slot`) through a decoder-only model over its whole static cache:
    the compiled function."""
    h = model.hidden_states(ids, attn_mask=allowed, cache=StepView(ks, vs, slot, positions))
    return model.logits(h)


def _inductor_keeping_mv(gm, example_inputs):
    """Inductor, except that matrix-vector products stay calls to ATen's kernel: by default inductor turns
    `mv` into its own multiply-and-sum loop, which on CPU reads bfloat16 weights at about half the speed
    (measured for SmolLM2 bf16 decoding: 43 tok/s against 54)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    keep = (torch.ops.aten.mv.default, torch.ops.aten.addmv.default)
    table = {op: fn for op, fn in select_decomp_table().items() if op not in keep}
    return compile_fx(gm, example_inputs, decompositions=table, config_patches=INDUCTOR_CONFIG)


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:120] if text else ''}"


class _Step(torch.nn.Module):
    """_step_graph as a module (what torch.export takes)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, ids, allowed, slot, positions, ks, vs):
        return _step_graph(self.m, ids, allowed, slot, positions, ks, vs)


AOT_ENV = "LMLAB_AOT"  # off: batch-1 steps take torch.compile too
AOT_MIN_SLOTS = 2  # caches of fewer slots take torch.compile (export needs a size above 1)


def min_slots(T: int) -> int:
    """The fewest cache slots an ahead-of-time package for T tokens takes (smaller caches: torch.compile)."""
    return AOT_MIN_SLOTS if T == 1 else FEW_QUERIES + 1


def aot_enabled() -> bool:
    return os.environ.get(AOT_ENV, "").strip().lower() not in ("off", "0", "false", "no")


def cache_dir():
    from lmlab.hub import home

    return home() / "compiled"


def _inputs(cache, T: int, attention_mask=None):
    """Claim T slots of `cache` and return the step's inputs after ids: (mask, slots, positions, keys, values)."""
    start, positions = cache.append(T, attention_mask)
    allowed = masks.decode_step(cache.valid, start, T)
    slot = torch.arange(start, start + T, dtype=torch.long, device=cache.valid.device)
    return allowed, slot, positions, list(cache.k), list(cache.v)


def _aot_package(model: torch.nn.Module, T: int = 1):
    """The batch-1 step of `model` for one token (T = 1) or 2..FEW_QUERIES tokens (T > 1: an example count),
    exported and compiled by AOTInductor (or read from the cache), with the model's own tensors loaded into
    it. Raises when any tensor the graph reads has no name in the model."""
    cache = model.make_cache(1, min_slots(T) + T)
    example = (torch.zeros(1, T, dtype=torch.long, device=model.device), *_inputs(cache, T))
    slots = torch.export.Dim("slots", min=min_slots(T), max=1 << 20)
    layers = len(cache.k)
    dims = {"ids": None, "allowed": {3: slots}, "slot": None, "positions": None,
            "ks": [{2: slots}] * layers, "vs": [{2: slots}] * layers}
    if T > 1:
        tokens = torch.export.Dim("tokens", min=2, max=FEW_QUERIES)
        dims.update(ids={1: tokens}, allowed={2: tokens, 3: slots}, slot={0: tokens}, positions={1: tokens})
    with torch.inference_mode():
        ep = torch.export.export(_Step(model), example, dynamic_shapes=dims, strict=False)
    tensors = {**ep.state_dict, **ep.constants}
    key = "\n".join([ep.graph_module.print_readable(print_output=False), str(ep.graph_signature), torch.__version__,
                     str(sorted(INDUCTOR_CONFIG.items())),
                     " ".join(sorted(cpu_flags())), str(model.device)])
    path = cache_dir() / f"step-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt2"
    if not path.is_file():
        notice("compiling the decoding step ahead of time (once per model, dtype and machine; a minute or two)")
        with atomic_path(path, suffix=".pt2") as tmp, torch.inference_mode():
            torch._inductor.aoti_compile_and_package(
                ep, package_path=str(tmp),
                inductor_configs={**INDUCTOR_CONFIG, "aot_inductor.package_constants_in_so": False})
    package = torch._inductor.aoti_load_package(str(path))
    names = package.get_constant_fqns()
    missing = [n for n in names if n not in tensors]
    if missing:
        raise RuntimeError(f"the compiled step reads {len(missing)} unnamed tensor(s), e.g. {missing[0]}")
    held = {n: tensors[n] for n in names}
    package.load_constants(held, check_full_update=True, user_managed=True)
    package.lmlab_tensors = held  # the package reads these by pointer: they live as long as it does
    return package


class DecodeStep:
    """Logits B×T×V for T new tokens per row (1, or up to FEW_QUERIES for a verification pass) on top of a
    KVCache. Falls back to the eager forward (for good, with a notice) the first time the compiler cannot
    handle a call. `aot`: the AOTInductor packages for batch 1 by token count ("one", "few"); a call no
    package covers takes torch.compile."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.fn = torch.compile(_step_graph, fullgraph=True, backend=_inductor_keeping_mv)
        self.failed = False
        self.aot: dict = {}
        self.few_rows = FEW_QUERIES  # most rows (batch × tokens) a few-token call takes compiled (add_few measures it)
        self.few_timings: dict[int, tuple[float, float]] = {}  # tokens → (compiled ms, eager ms), batch 1

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        return model.cfg.arch == "decoder" and model.cfg.pos != "relative"

    def covers(self, B: int, T: int) -> bool:
        """Whether a call of B rows × T tokens takes the compiled step (else the caller runs it eagerly)."""
        return T == 1 or (2 <= T <= FEW_QUERIES and B * T <= self.few_rows)

    def add_few(self) -> None:
        """The ahead-of-time package for 2..FEW_QUERIES tokens per row (speculative verification passes, a
        draft catching up), once; without it (or batch > 1) such calls take torch.compile."""
        if "few" in self.aot or not aot_enabled():
            return
        try:
            self.aot["few"] = _checked_aot(self.model, 4)
        except Exception as e:  # noqa: BLE001 - any failure leaves torch.compile in charge
            self.aot["few"] = None
            notice(f"ahead-of-time compiled verification step unavailable ({first_line(e)}); "
                   "it takes torch.compile")
            return
        self.few_rows, self.few_timings = _faster_compiled(self.model, self.aot["few"])

    def _few_note(self) -> str:
        if not self.few_timings:
            return ""
        cells = ", ".join(f"{t}: {c:.1f}/{e:.1f}" for t, (c, e) in self.few_timings.items())
        scope = f"up to {self.few_rows} tokens, eager above" if self.few_rows >= 2 else "never (eager is faster)"
        return f"; few-token passes compiled {scope} (measured ms compiled/eager by tokens {cells})"

    def describe(self) -> str:
        """Which compiler runs which steps (for --stats)."""
        done = [kind for kind in ("one", "few") if self.aot.get(kind) is not None]
        if not done:
            return "decoding step compiled by torch.compile"
        what = {"one": "one-token", "few": "few-token"}
        return (f"{' and '.join(what[k] for k in done)} step{'s' if len(done) > 1 else ''} compiled ahead of time "
                f"for batch 1, others by torch.compile{self._few_note()}")

    @torch.inference_mode()  # one graph, whoever calls (decoding never needs gradients)
    def __call__(self, ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T = ids.shape
        start = cache.length
        inputs = _inputs(cache, T, attention_mask)
        package = self.aot.get("one" if T == 1 else "few") if B == 1 and cache.max_len >= min_slots(T) else None
        if package is not None:
            return package(ids, *inputs)
        allowed, slot, positions, ks, vs = inputs
        for t in (allowed, *ks, *vs):  # one graph for every cache length
            torch._dynamo.maybe_mark_dynamic(t, t.dim() - 2 if t is not allowed else 3)
        if T > 1:  # and one for every count of tokens above 1
            for t, dim in ((ids, 1), (allowed, 2), (slot, 0), (positions, 1)):
                torch._dynamo.maybe_mark_dynamic(t, dim)
        try:
            return self.fn(self.model, ids, *inputs)
        except Exception as e:  # a shape the compiler could not handle: undo the claim, decode eagerly
            cache.truncate(start)
            notice(f"compiled decoding step failed ({first_line(e)}); decoding eagerly")
            self.failed = True
            return self.model(ids, cache=cache, attention_mask=attention_mask)


@torch.inference_mode()
def _faster_compiled(model: torch.nn.Module, package, context: int = 64, reps: int = 5) -> tuple[int, dict]:
    """The most tokens per batch-1 call for which the few-token package beats the eager forward, measured
    at 2, 4, 8 and 16 tokens over a cache of `context` tokens (median of `reps`), and the timings. A compiled
    graph cannot call the oneDNN-packed kernels an eager few-row product may take, and one-row kernels
    slow down with rows, so on some models and machines eager wins from some count on (measured: the
    Qwen2.5-Coder 1.5B target in bfloat16 on a 2-core AMD EPYC, 5 tokens: 211 ms compiled, 157 ms eager)."""
    def median_ms(run, T):
        cache = model.make_cache(1, context + T)
        model(torch.zeros(1, context, dtype=torch.long, device=model.device), cache=cache, last_logits_only=True)
        ids = torch.zeros(1, T, dtype=torch.long, device=model.device)
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            run(ids, cache)
            synchronize(model.device)
            times.append(time.perf_counter() - t0)
            cache.truncate(context)
        return 1000 * sorted(times[1:])[reps // 2]

    timings, best = {}, 1
    for T in (2, 4, 8, 16):
        compiled = median_ms(lambda ids, cache: package(ids, *_inputs(cache, ids.shape[1])), T)
        eager = median_ms(lambda ids, cache: model(ids, cache=cache), T)
        timings[T] = (compiled, eager)
        if compiled > eager:
            break
        best = T
    return best, timings


@torch.inference_mode()
def _trial(step: DecodeStep, model: torch.nn.Module, steps: int = 2) -> None:
    """A short prompt and a few compiled steps: compiles the graph and checks it runs."""
    device = model.device
    cache = model.make_cache(1, steps + 2)
    model(torch.zeros(1, 2, dtype=torch.long, device=device), cache=cache, last_logits_only=True)
    for _ in range(steps):
        step(torch.zeros(1, 1, dtype=torch.long, device=device), cache)
    if step.failed:
        raise RuntimeError("the trial step fell back to eager decoding")


def compile_step(model: torch.nn.Module, few: bool = False) -> DecodeStep | None:
    """A compiled decoding step for `model`, or None (with a notice) when the compiler is unavailable, the
    model is not covered (decoder-only without relative position bias), or a trial step fails. few: also
    the ahead-of-time package for 2..FEW_QUERIES tokens (speculative decoding; see DecodeStep.add_few).
    Prompts and scoring stay eager: their matrix products already run at full speed."""
    if not hasattr(torch, "compile"):
        notice("torch.compile is not available in this PyTorch; running eagerly")
        return None
    if not DecodeStep.supports(model):
        notice("compiled decoding covers decoder-only models without relative position bias; running eagerly")
        return None
    step = DecodeStep(model)
    if aot_enabled():
        try:
            step.aot["one"] = _checked_aot(model, 1)
        except Exception as e:  # noqa: BLE001 - any failure leaves torch.compile in charge
            notice(f"ahead-of-time compiled step unavailable ({first_line(e)}); batch 1 takes torch.compile")
    if few:
        step.add_few()
    if any(package is not None for package in step.aot.values()):
        return step  # torch.compile compiles on the first call of another batch size
    try:
        _trial(step, model)
        return step
    except Exception as e:  # the compiler needs a C++ toolchain (CPU) or Triton (GPU)
        notice(f"torch.compile failed ({first_line(e)}); running eagerly")
        torch._dynamo.reset()
        return None


@torch.inference_mode()
def _checked_aot(model: torch.nn.Module, T: int = 1):
    """The AOTInductor package for T tokens (T > 1: the few-token package), used only when a few greedy
    steps through it agree with the eager forward at every position: for dense float32 weights the same
    tokens and logits within 0.1% of their norm; otherwise logits within 25% of their norm, since fused
    16-bit reductions sum in another order than eager ops (a last-bit difference then grows over the layers),
    and int8 kernels quantize activations whose rounding then flips (measured: 11% for SmolLM2 bfloat16
    before INDUCTOR_CONFIG, 0.9% for int8, whose compiled tokens equal torch.compile's; unrelated logits are
    ~100% off)."""
    package = _aot_package(model, T)
    device = model.device
    prompt = torch.tensor([[1, 2]], device=device)
    size = 2 + 4 * T + min_slots(T)
    eager_cache, cache = model.make_cache(1, size), model.make_cache(1, size)
    model(prompt, cache=eager_cache, last_logits_only=True)
    model(prompt, cache=cache, last_logits_only=True)
    tok = torch.ones(1, 1, dtype=torch.long, device=device)
    exact = next(model.parameters()).dtype == torch.float32 and not any(
        isinstance(m, QuantLinear) for m in model.modules())
    for _ in range(4):
        feed = torch.cat([tok, torch.arange(2, T + 1, device=device)[None]], 1)
        want = model(feed, cache=eager_cache).float()
        got = package(feed, *_inputs(cache, T)).float()
        if (got - want).norm() > (1e-3 if exact else 0.25) * want.norm() \
                or (exact and not torch.equal(got.argmax(-1), want.argmax(-1))):
            raise RuntimeError(f"its logits differ from the eager forward's (relative error "
                               f"{((got - want).norm() / want.norm()).item():.2g})")
        tok = want[:, -1].argmax(-1, keepdim=True)
    return package
