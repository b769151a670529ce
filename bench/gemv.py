"""Matrix-vector kernels: lmlab's native ones (lmlab/inference/native/gemv.cpp) against PyTorch's, same run.

For each weight shape of SmolLM2-135M (N×K: 960×576 qkv, 576×576 out, 3072×576 gate_up, 576×1536 down,
49152×576 head) and one row of x (M=1, float32 activations as lmlab decodes), four weight formats:
    int4  lmlab int4 (group 32)   ours: lmlab::int4_gemv      PyTorch: Int4Linear._run (_weight_int4pack_mm_for_cpu)
    int8  int8, scale per row     ours: lmlab::int8_gemv      PyTorch: Int8Linear._run (_weight_int8pack_mm)
    bf16  bfloat16 weights        ours: lmlab::bf16_gemv      PyTorch: F.linear on bfloat16 x and w
    f32   float32 weights         ours: lmlab::f32_gemv       PyTorch: F.linear
Decoding reads every weight from memory once per token, so the weights are not left in the cache: each call
takes the next of enough copies to cover --cold-mb MB (0: one copy, cache-resident for the small shapes).
Timings are the best of --repeats rounds (ours and PyTorch's interleaved), each round the mean over calls
taking about --round-ms ms. Printed: µs per call, G weights/s, GB/s read (the bytes each kernel's own
format reads: codes + scales), the share of the measured memory read bandwidth (x.sum() over 512 MB, best of a
measurement before and one after; on a shared machine it can read lower than what a kernel reaches, so the
share is indicative), and ours/torch: PyTorch's time over ours, measured interleaved, the figure to trust.

    python bench/gemv.py                    # 2 threads, everything (~15 s)
    python bench/gemv.py --formats int4 --shapes 960x576 --repeats 3
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmlab.inference import native  # noqa: E402
from lmlab.inference.quantize import Int4Linear, Int8Linear  # noqa: E402
from lmlab.utils import device as devices  # noqa: E402

SHAPES = {"qkv": (960, 576), "out": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}
FORMATS = ("int4", "int8", "bf16", "f32")


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Best-of-N GB/s of summing a float32 tensor larger than the last-level cache (current thread count)."""
    x = torch.ones(mib * 2**20 // 4)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def contenders(fmt: str, w: torch.Tensor, copies: int):
    """(ours, theirs, ours_bytes, theirs_bytes): each a list of zero-argument-but-x callables, one per copy."""
    if fmt == "int4":
        lin = Int4Linear(w, group_size=32)
        mods = [lin] + [copy.deepcopy(lin) for _ in range(copies - 1)]
        states = [m._prepare(torch.device("cpu"), torch.float32) for m in mods]
        if states[0] is None:
            return None
        ours = [lambda x, m=m: torch.ops.lmlab.int4_gemv(x, m.qweight, m.scale, m.minimum, 32) for m in mods]
        theirs = [lambda x, m=m, s=s: m._run(s, x) for m, s in zip(mods, states)]
        return ours, theirs, nbytes(lin.qweight, lin.scale, lin.minimum), nbytes(*states[0][1:3])
    if fmt == "int8":
        lin = Int8Linear(w)
        mods = [lin] + [copy.deepcopy(lin) for _ in range(copies - 1)]
        states = [m._prepare(torch.device("cpu"), torch.float32) for m in mods]
        if states[0] is None:
            return None
        ours = [lambda x, m=m: torch.ops.lmlab.int8_gemv(x, m.qweight, m.scale) for m in mods]
        theirs = [lambda x, m=m, s=s: m._run(s, x) for m, s in zip(mods, states)]
        return ours, theirs, nbytes(lin.qweight, lin.scale), nbytes(lin.qweight, states[0][1])
    if fmt == "bf16":
        ws = [w.bfloat16() for _ in range(copies)]
        ours = [lambda x, wb=wb: torch.ops.lmlab.bf16_gemv(x.bfloat16(), wb) for wb in ws]
        theirs = [lambda x, wb=wb: F.linear(x.bfloat16(), wb) for wb in ws]
        return ours, theirs, nbytes(ws[0]), nbytes(ws[0])
    ws = [w.clone() for _ in range(copies)]
    ours = [lambda x, wf=wf: torch.ops.lmlab.f32_gemv(x, wf) for wf in ws]
    theirs = [lambda x, wf=wf: F.linear(x, wf) for wf in ws]
    return ours, theirs, nbytes(ws[0]), nbytes(ws[0])


def timed_round(fns, x, calls: int) -> float:
    t = time.perf_counter()
    for i in range(calls):
        fns[i % len(fns)](x)
    return (time.perf_counter() - t) / calls


def bench(fmt: str, name: str, N: int, K: int, args):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen) * 0.05
    x = torch.randn(1, K, generator=gen)
    one = {"int4": N * K // 2 + N * K // 4, "int8": N * K + 4 * N, "bf16": 2 * N * K, "f32": 4 * N * K}[fmt]
    copies = max(1, math.ceil(args.cold_mb * 1e6 / one)) if args.cold_mb else 1
    got = contenders(fmt, w, copies)
    if got is None:
        return f"{fmt:5} {name:8} {N:>5}×{K:<5} PyTorch has no kernel for this shape here"
    ours, theirs, ours_bytes, theirs_bytes = got
    for fns in (ours, theirs):  # warm up (first calls allocate, pack, spin up threads)
        timed_round(fns, x, max(2, len(fns)))
    probe = timed_round(ours, x, 3)
    calls = max(3, min(2000, int(args.round_ms / 1e3 / max(probe, 1e-7))))
    best = {"ours": math.inf, "torch": math.inf}
    for _ in range(args.repeats):
        best["ours"] = min(best["ours"], timed_round(ours, x, calls))
        best["torch"] = min(best["torch"], timed_round(theirs, x, calls))
    return fmt, name, N, K, best, {"ours": ours_bytes, "torch": theirs_bytes}


def report(timing, bw: float) -> list[str]:
    if isinstance(timing, str):
        return [timing]
    fmt, name, N, K, best, nbytes_read = timing
    lines = []
    for who in ("ours", "torch"):
        t = best[who]
        gbs = nbytes_read[who] / t / 1e9
        lines.append(f"{fmt:5} {name:8} {N:>5}×{K:<5} {who:6} {t * 1e6:9.1f} µs {N * K / t / 1e9:7.2f} Gw/s "
                     f"{gbs:7.2f} GB/s {gbs / bw:5.0%} of bw" + (f"   ours/torch {best['torch'] / best['ours']:.2f}x"
                                                             if who == "torch" else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--round-ms", type=float, default=5.0)
    p.add_argument("--cold-mb", type=float, default=256.0, help="rotate over weight copies covering this many MB")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--shapes", default=",".join(SHAPES), help="names (qkv,out,...) or NxK")
    args = p.parse_args(argv)
    if not native.available():
        print("native kernels are not available here: nothing to compare", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    bw = read_bandwidth()
    shapes = []
    for s in args.shapes.split(","):
        if s in SHAPES:
            shapes.append((s, *SHAPES[s]))
        else:
            n, k = (int(v) for v in s.lower().split("x"))
            shapes.append((s, n, k))
    timings = []
    with torch.no_grad():
        for fmt in args.formats.split(","):
            for name, N, K in shapes:
                timings.append(bench(fmt, name, N, K, args))
    bw = max(bw, read_bandwidth())  # measured before and after: other jobs lower it, never raise it
    print(f"{devices.cpu_name()}; torch {torch.__version__}; {args.threads} threads; native path "
          f"{torch.ops.lmlab.isa()}; memory read bandwidth {bw:.1f} GB/s ({args.threads} threads, best of before/after); "
          f"weights cold over {args.cold_mb:.0f} MB; best of {args.repeats} rounds of ~{args.round_ms:.0f} ms")
    for rows in timings:
        for line in report(rows, bw):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
