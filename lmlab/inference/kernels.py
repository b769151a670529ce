"""Which matmul kernel each linear layer of the decoding path uses on this machine, chosen by measuring.

Decoding multiplies every weight by one row (a step) or a few rows (a speculative verification pass).
On CPU the fastest way to do that depends on the CPU, the PyTorch build, the dtype, the thread count and
the weight's shape, and the plain GEMM (`F.linear`) is often not it. So for each weight shape of the
model, in its real dtype and with the threads in use, `choose(model)` times the candidates

    1 row         linear (F.linear)   mv (torch.mv)      packed (oneDNN, weight reordered once)   native
    few rows      linear              W@xT (W @ xᵀ)      packed                                   native
    prompt rows   linear                                 packed

and each RowLinear takes the fastest, but leaves `linear` only for a kernel at least 10% faster
(MARGIN), so that noise cannot flip a choice. Prompt passes (more than FEW_ROWS rows; timed at PROMPT
rows) matter for prefill and for scoring (evaluation): F.linear's float32 GEMM is MKL's, which on some CPUs
(measured: AMD EPYC) runs at 0.4x of oneDNN's on the same product.
`native` is lmlab's own matrix-vector kernel (lmlab.inference.native: float32 FMA or bfloat16 dot-product
instructions, rows split over PyTorch's threads), a candidate where it could be built; like every candidate
it must give F.linear's result on the weight (checked before timing) before it may be chosen.
A packed route keeps a second, reordered copy of the weight (the plain one stays: the state dict, tied
embeddings, adapters and export read it); when the copies would take more than PACK_SHARE of the free
memory, the copies only prompt passes want are dropped first, then every copy.

The timings are kept in `$LMLAB_HOME/kernels/<dtype>-<threads>t-<key>.json`, one file per machine
(CPU model, flags, cores), PyTorch version, thread count and dtype, one entry per weight shape. A file is
trusted only when it parses and its schema, machine, PyTorch version, threads and dtype all match; else it
is measured again and rewritten (atomically), with a notice. Shapes a file lacks are measured and added.
`LMLAB_KERNELS=remeasure` measures again whatever the file says; `nocache` measures without reading or
writing a file; `off` measures nothing and keeps F.linear everywhere.

Quantized layers (lmlab.inference.quantize) choose their own kernel (the weight-only kernel where it exists
and agrees with the reference, else de-quantize + F.linear); `quantized_choices` reports what they chose.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.utils.device import cpu_flags, cpu_name, dtype_name, free_memory, notice

FEW_ROWS = 16  # products with at most this many rows (decoding steps, verification passes) may be rerouted
FEW = 4  # the row count the "few rows" kernels are timed at (a verification pass of 3 drafts + 1)
PROMPT = 128  # the row count prompt-pass kernels are timed at (prefill runs chunks of up to 512)
MARGIN = 0.9  # a kernel replaces linear only when it takes at most this fraction of linear's time
SCHEMA = 1
ROWS = {"1": 1, "few": FEW, "prompt": PROMPT}
ENV = "LMLAB_KERNELS"  # remeasure | nocache | off
PACK_SHARE = 0.25  # packed copies (a second copy of each packed weight) may take at most this share of free memory


# --------------------------------------------------------------------------- the candidates
def packed_available(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """oneDNN's prepacked linear (mkldnn._reorder_linear_weight + _linear_pointwise) for this dtype here."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    try:
        return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")
    except (RuntimeError, AttributeError):
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight reordered into oneDNN's blocked layout (a copy: it costs the weight's size again)."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), FEW)


def packed_linear(x2d: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2d, packed, bias, "none", [], "")


def native_available(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """lmlab's own float32 / bfloat16 matrix-vector kernel (built on first use) for this dtype here."""
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    from lmlab.inference import native

    return native.available()


def native_linear(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    op = torch.ops.lmlab.f32_gemv if weight.dtype == torch.float32 else torch.ops.lmlab.bf16_gemv
    return op(x2d, weight)


def candidates(dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, tuple[str, ...]]:
    """Kernel names per row kind ("1", "few", "prompt") that exist for this dtype and device; "prompt" only
    where there is something besides linear to time."""
    packed = ("packed",) if packed_available(dtype, device) else ()
    extra = packed + (("native",) if native_available(dtype, device) else ())
    kinds = {"1": ("linear", "mv") + extra, "few": ("linear", "W@xT") + extra}
    return {**kinds, "prompt": ("linear",) + packed} if packed else kinds


# --------------------------------------------------------------------------- the layer
class RowLinear(torch.nn.Linear):
    """nn.Linear whose one-row, few-row and prompt products (decoding, verification passes, prefill) take
    the kernel named by `one_row`, `few_rows` and `prompt_rows` (see the module docstring).

    The weight stays the layer's Parameter (tied weights stay tied, the state dict is unchanged); the
    `packed` route adds a oneDNN copy of it, made by `set_route`, held as a plain attribute (not in the
    state dict) and dropped by .to()/.float()/... A weight changed in place after packing needs set_route
    again. Where the packed route cannot run (torch.compile traces no oneDNN packed op, no copy, another
    dtype or device) the layer takes `unpacked`, the fastest measured kernel of the rest (for prompt rows,
    F.linear); under autograd, F.linear."""

    one_row = "mv"
    few_rows = "linear"
    prompt_rows = "linear"  # "linear" or "packed"
    unpacked = ("linear", "linear")  # (one row, few rows) kernels standing in for a packed route
    packed: torch.Tensor | None = None

    @classmethod
    def sharing(cls, lin: torch.nn.Linear) -> "RowLinear":
        """A RowLinear holding the very Parameters of `lin` (tied weights stay tied; same state dict)."""
        with torch.device("meta"):
            new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None)
        new.weight = lin.weight
        new.bias = lin.bias
        new.train(lin.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        route = self.one_row if rows == 1 else self.few_rows if rows <= FEW_ROWS else self.prompt_rows
        if route == "packed" and (self.packed is None or self.packed.dtype != x.dtype or x.device.type != "cpu"
                                  or torch.compiler.is_compiling()):  # (rows > 1 is symbolic when compiling)
            route = self.unpacked[0] if rows == 1 else self.unpacked[1] if rows <= FEW_ROWS else "linear"
        if route == "packed" and torch.is_grad_enabled() and self.weight.requires_grad:
            route = "linear"
        if route == "native" and (x.dtype != self.weight.dtype or x.device.type != "cpu"
                                  or (torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad))):
            route = "linear"  # no backward: autograd takes F.linear
        if route == "linear":
            return super().forward(x)
        x2 = x.reshape(rows, self.in_features)
        if route == "packed":
            return packed_linear(x2, self.packed, self.bias).reshape(*x.shape[:-1], self.out_features)
        if route == "native":
            y = native_linear(x2, self.weight)
        elif route == "mv":
            y = torch.mv(self.weight, x2[0])
        else:  # "W@xT"
            y = (self.weight @ x2.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def set_route(self, one_row: str | None = None, few_rows: str | None = None,
                  unpacked: tuple[str, str] | None = None, prompt_rows: str | None = None) -> None:
        """Take these kernels (None: keep); packs the weight when a route needs it, drops the copy when none does.
        `unpacked`: the (one row, few rows) kernels to take where a packed route cannot run."""
        self.one_row = one_row or self.one_row
        self.few_rows = few_rows or self.few_rows
        self.prompt_rows = prompt_rows or self.prompt_rows
        self.unpacked = unpacked or self.unpacked
        if "packed" in (self.one_row, self.few_rows, self.prompt_rows):
            if self.packed is None or self.packed.dtype != self.weight.dtype:
                self.packed = pack(self.weight)
        else:
            self.packed = None

    def _apply(self, fn, recurse=True):  # a moved or cast weight: the packed copy no longer matches it
        self.packed = None
        return super()._apply(fn, recurse)


def use_row_linears(model: torch.nn.Module) -> int:
    """Swap every plain nn.Linear for a RowLinear sharing its Parameters, in place. Returns how many."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    for name, lin in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, RowLinear.sharing(lin))
    return len(targets)


# --------------------------------------------------------------------------- measuring
REPEATS = 9  # timed runs per kernel (after one warm-up), interleaved; the best counts
MIN_REPEATS = 5  # ... at least this many, then stop once BUDGET_S has passed for this (shape, rows): the
BUDGET_S = 1.0  # result is cached, so a second spent on a large weight on a busy machine is well spent


@torch.inference_mode()
def measure(weight: torch.Tensor, rows: int, kernels: tuple[str, ...]) -> dict[str, float]:
    """Milliseconds of a `rows`-row product with `weight` through each kernel: one warm-up each, then
    rounds in which every kernel runs once (so a burst of load from elsewhere hits all of them), best
    of the rounds."""
    w = weight.detach()
    x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.dtype)
    packed = pack(w) if "packed" in kernels else None
    fns = {"linear": lambda: F.linear(x, w), "mv": lambda: torch.mv(w, x[0]), "W@xT": lambda: (w @ x.t()).t(),
           "packed": lambda: packed_linear(x, packed, None), "native": lambda: native_linear(x, w)}
    want = fns["linear"]().float()
    wrong = [k for k in kernels if k != "linear" and not _agrees(fns[k]().float().reshape(want.shape), want, w.dtype)]
    kernels = tuple(k for k in kernels if k not in wrong)
    best = {k: float("inf") for k in kernels}
    start = time.perf_counter()
    for r in range(REPEATS):
        for k in kernels:
            t = time.perf_counter()
            fns[k]()
            best[k] = min(best[k], time.perf_counter() - t)
        if r + 1 >= MIN_REPEATS and time.perf_counter() - start > BUDGET_S:
            break
    return {**{k: round(v * 1e3, 4) for k, v in best.items()}, **{k: float("inf") for k in wrong}}


def _agrees(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """A candidate's product against F.linear's: relative error within float32's or bfloat16's rounding."""
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return bool(torch.isfinite(got).all() and (got - want).norm() <= tol * want.norm() + 1e-6)


def pick(timings: dict[str, float]) -> str:
    """The fastest kernel, if it beats linear by the margin; else linear."""
    best = min(timings, key=timings.get)
    return best if best != "linear" and timings[best] <= MARGIN * timings["linear"] else "linear"


# --------------------------------------------------------------------------- the cache
def fingerprint() -> dict:
    """What makes timings from one machine (or one version of lmlab's native kernels) meaningless on another."""
    from lmlab.inference import native

    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    return {"cpu": cpu_name(), "flags": flags, "cores": os.cpu_count() or 1, "machine": platform.machine(),
            "native": native.source_hash()}


def cache_dir() -> Path:
    from lmlab.hub import home

    return home() / "kernels"


def cache_path(dtype: torch.dtype, threads: int) -> Path:
    key = hashlib.sha256(json.dumps([fingerprint(), torch.__version__], sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"{dtype_name(dtype)}-{threads}t-{key}.json"


def _header(dtype: torch.dtype, threads: int) -> dict:
    return {"schema": SCHEMA, "fingerprint": fingerprint(), "torch": torch.__version__, "threads": threads,
            "dtype": dtype_name(dtype), "rows": ROWS}


def read_cache(path: Path, dtype: torch.dtype, threads: int) -> tuple[dict, str | None]:
    """(shape entries, None) from a trustworthy file; ({}, why not) otherwise; ({}, None) when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, None
    except OSError as e:
        return {}, f"unreadable: {e.strerror or e}"
    try:
        data = json.loads(text)
    except ValueError:
        return {}, "not valid JSON"
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), dict):
        return {}, "wrong layout"
    want = _header(dtype, threads)
    for k in ("schema", "fingerprint", "torch", "threads", "dtype", "rows"):
        if data.get(k) != want[k]:
            return {}, f"different {k}"
    return data["shapes"], None


def _valid_entry(entry, kinds: dict[str, tuple[str, ...]]) -> bool:
    if not isinstance(entry, dict):
        return False
    for kind, names in kinds.items():
        t = entry.get(kind)
        if not isinstance(t, dict) or any(not isinstance(t.get(n), (int, float)) or not t[n] > 0 for n in names):
            return False
    return True


def mode() -> str:
    """LMLAB_KERNELS: '' (use the cache), 'remeasure', 'nocache' or 'off'."""
    value = os.environ.get(ENV, "").strip().lower()
    if value not in ("", "remeasure", "nocache", "off"):
        notice(f"{ENV}={value!r} is not one of remeasure, nocache, off: ignored")
        return ""
    return value


# --------------------------------------------------------------------------- choosing for a model
@dataclass
class KernelChoice:
    """What a model's layers run on: per weight shape ("OUTxIN") and row kind, the timings and the kernel."""

    dtype: str
    threads: int
    source: str  # "cache hit", "measured", "re-measured (why)", "cache hit + measured N shapes", "off", ...
    path: str | None = None
    timings: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    chosen: dict[str, dict[str, str]] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)  # shape → its timings came from the file
    packed_bytes: int = 0
    quantized: dict[str, dict[str, str]] = field(default_factory=dict)  # "OUTxIN scheme" → row kind → kernel

    def summary(self) -> str:
        """One line for --stats: 'kernels (1 row/4 rows/prompt): 576x576 mv/W@xT/packed, ... (float32, 2 threads,
        cache hit)'; quantized layers name the prompt kernel in `table` only."""
        parts = [f"{s} {c['1']}/{c['few']}/{c.get('prompt', 'linear')}" for s, c in self.chosen.items()]
        parts += [f"{s} {c['1']}/{c['few']}" for s, c in self.quantized.items()]
        extra = f", packed copies {self.packed_bytes / 2**20:.1f} MiB" if self.packed_bytes else ""
        return (f"kernels (1 row/{FEW} rows/prompt): {', '.join(parts)} ({self.dtype}, {self.threads} threads, "
                f"{self.source}{extra})")

    def table(self) -> str:
        """The per-shape table `lmlab info --kernels` prints."""
        lines = [f"kernels for {self.dtype}, {self.threads} threads: {self.source}"
                 + (f"\ncache file: {self.path}" if self.path else "")]
        if self.timings:
            names = sorted({n for t in self.timings.values() for k in t.values() for n in k},
                           key=["linear", "mv", "W@xT", "packed", "native"].index)
            head = f"{'shape':>12} {'rows':>5} " + " ".join(f"{n + ' ms':>10}" for n in names) + f" {'chosen':>8} {'from':>6}"
            lines.append(head)
            for shape, kinds in self.timings.items():
                for kind, t in kinds.items():
                    cells = " ".join(f"{'-':>10}" if n not in t else f"{'wrong':>10}" if t[n] == float("inf")
                                     else f"{t[n]:>10.3f}" for n in names)
                    lines.append(f"{shape:>12} {ROWS[kind]:>5} {cells} {self.chosen[shape][kind]:>8} "
                                 f"{'cache' if self.cached.get(shape) else 'run':>6}")
            lines.append(f"(a kernel other than linear is chosen only at <= {MARGIN:.0%} of linear's time; "
                         f"the {PROMPT}-row timings choose for every pass of more than {FEW_ROWS} rows)")
        if self.packed_bytes:
            lines.append(f"packed weight copies: {self.packed_bytes / 2**20:.1f} MiB")
        for shape, c in self.quantized.items():
            lines.append(f"{shape:>17}  1 row: {c['1']}, {FEW} rows: {c['few']}, prompt passes: {c['prompt']}")
        return "\n".join(lines)


def _shape(lin) -> str:
    return f"{lin.out_features}x{lin.in_features}"


def _shape_of(weight: torch.Tensor) -> str:
    return f"{weight.shape[0]}x{weight.shape[1]}"


def choose(model: torch.nn.Module, threads: int | None = None, force: dict | None = None) -> KernelChoice:
    """Time (or read from the cache) the kernels for every RowLinear weight shape of `model` and set each
    layer's routes. `force`: {"1": kernel, "few": kernel} for every layer, or {"OUTxIN": {...}} per shape
    (tests: every route must give the same logits); forcing measures nothing."""
    lins = [m for m in model.modules() if isinstance(m, RowLinear)]
    threads = threads or torch.get_num_threads()
    first = lins[0].weight if lins else next(model.parameters())
    dtype, device = first.dtype, first.device
    choice = KernelChoice(dtype=dtype_name(dtype), threads=threads, source="measured")
    how = mode()
    kinds = candidates(dtype, device)
    if force is not None or how == "off" or device.type != "cpu":
        choice.source = "forced" if force is not None else "off" if how == "off" else f"not measured ({device.type})"
        for lin in lins:
            f = force.get(_shape(lin), force) if force is not None else {}
            lin.set_route(f.get("1", "linear"), f.get("few", "linear"), prompt_rows=f.get("prompt", "linear"))
            choice.chosen[_shape(lin)] = {"1": lin.one_row, "few": lin.few_rows, "prompt": lin.prompt_rows}
        choice.packed_bytes = _packed_bytes(lins)
        return choice

    path = cache_path(dtype, threads) if how != "nocache" else None
    stored, why = read_cache(path, dtype, threads) if path is not None and how != "remeasure" else ({}, None)
    if why:
        notice(f"kernel cache: re-measured ({why}: {path})")
    shapes = {}
    for lin in lins:
        shapes.setdefault(_shape(lin), lin.weight)
    measured = 0
    for s, w in shapes.items():
        if _valid_entry(stored.get(s), kinds):
            choice.timings[s] = {k: {n: float(stored[s][k][n]) for n in names} for k, names in kinds.items()}
            choice.cached[s] = True
        else:
            choice.timings[s] = {k: measure(w, ROWS[k], names) for k, names in kinds.items()}
            choice.cached[s] = False
            measured += 1
    if path is not None and measured:
        entries = {k: v for k, v in stored.items() if k not in choice.timings and _valid_entry(v, kinds)}
        entries.update(choice.timings)
        try:
            from lmlab.utils.atomic import write_json

            write_json(path, {**_header(dtype, threads), "shapes": entries})
        except OSError as e:
            notice(f"kernel cache: not saved ({e.strerror or e}: {path})")
            path = None
    choice.path = str(path) if path is not None else None
    if how == "nocache":
        choice.source = f"measured ({ENV}=nocache)"
    elif how == "remeasure":
        choice.source = f"re-measured ({ENV}=remeasure)"
    elif why:
        choice.source = f"re-measured ({why})"
    elif measured == 0 and shapes:
        choice.source = "cache hit"
    elif measured < len(shapes):
        choice.source = f"cache hit + measured {measured} new shape(s)"
    unpacked = {s: tuple(pick({n: v for n, v in kt[k].items() if n != "packed"}) for k in ("1", "few"))
                for s, kt in choice.timings.items()}
    for s, kt in choice.timings.items():
        choice.chosen[s] = {k: pick(t) for k, t in kt.items()}
    weights = list({id(m.weight): m.weight for m in lins}.values())

    def extra() -> int:  # bytes of the packed copies the choice asks for
        return sum(w.numel() * w.element_size() for w in weights if "packed" in choice.chosen[_shape_of(w)].values())

    free, wanted = free_memory(device), extra()
    if free is not None and wanted > free * PACK_SHARE:  # prompt passes give up their copies first
        for c in choice.chosen.values():
            if "prompt" in c:
                c["prompt"] = "linear"
        what = "prompt passes unpacked"
        if extra() > free * PACK_SHARE:
            what = "packing skipped"
            for s, (one, few) in unpacked.items():
                choice.chosen[s] = {"1": one, "few": few, "prompt": "linear"}
        notice(f"kernel choice: {what} (the packed copies would take {wanted / 2**20:.0f} MiB of "
               f"{free / 2**20:.0f} MiB free)")
        choice.source += f", {what} (memory)"
    for lin in lins:
        c = choice.chosen[_shape(lin)]
        lin.set_route(c["1"], c["few"], unpacked[_shape(lin)], c.get("prompt", "linear"))
    choice.packed_bytes = _packed_bytes(lins)
    return choice


def _packed_bytes(lins) -> int:
    seen, total = set(), 0
    for lin in lins:
        if lin.packed is not None and id(lin.packed) not in seen:
            seen.add(id(lin.packed))
            total += lin.packed.numel() * lin.packed.element_size()
    return total


def quantized_choices(model: torch.nn.Module, threads: int | None = None) -> KernelChoice:
    """What the quantized layers chose (after Runner.warm()): per shape and scheme, the kernel for one row,
    a few rows and prompt passes."""
    from lmlab.inference.quantize import Int4Linear, QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    floats = [p for p in model.parameters() if p.is_floating_point()]
    choice = KernelChoice(dtype=dtype_name(floats[0].dtype) if floats else "?",
                          threads=threads or torch.get_num_threads(), source="chosen by the quantized layers")
    for m in layers:
        scheme = "int4" if isinstance(m, Int4Linear) else "int8"
        route = m.route()
        kernel = {"native": f"native {scheme}", "pytorch": f"{scheme}pack"}.get(route, "dequant+linear")
        few = kernel if FEW < m.gemm_rows and (route != "native" or FEW <= m.native_rows) else "dequant+linear"
        choice.quantized[f"{_shape(m)} {scheme}"] = {"1": kernel, "few": few,
                                                     "prompt": f"dequant+linear from {m.gemm_rows} rows"}
    return choice
