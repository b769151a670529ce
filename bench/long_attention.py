"""Long-context attention: dense SDPA with an explicit mask against the sparse kernels, time and peak memory.

Cases, each in its own subprocess (fresh allocator, one thread setting), at every --lengths value:
  dense_fwd       SDPA with the explicit [T, T] sliding-window mask, forward (no grad)
  flex_fwd        compiled flex_attention with lmlab's BlockMask, forward (no grad; compile time shown apart)
  blocked_fwd     lmlab's blocked SDPA (query chunks x their key windows), forward (no grad)
  dense_fwdbwd    dense, forward + backward of q, k, v
  blocked_fwdbwd  blocked, forward + backward of q, k, v
Peak memory = highest resident set size sampled (every 0.5 ms, /proc/self/statm) during the timed call, minus
the resident size just before it; the child runs with MALLOC_MMAP_THRESHOLD_ fixed so freed buffers go back to
the OS and an earlier (warm-up) call cannot hide the next one's allocations. Each case runs once to warm up
(and compile), then --repeats times for the best time, then once more under the memory sampler. A dense case whose score matrices would not fit
in half the available memory is skipped and says so.

    python bench/long_attention.py                       # 1k..16k, 1 thread (a few minutes)
    python bench/long_attention.py --threads 2           # on a quiet machine
    python bench/long_attention.py --lengths 1024,4096   # a quick check
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("dense_fwd", "flex_fwd", "blocked_fwd", "dense_fwdbwd", "blocked_fwdbwd")
PAIRS = (("flex_fwd", "dense_fwd"), ("blocked_fwd", "dense_fwd"), ("blocked_fwdbwd", "dense_fwdbwd"))
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples the resident set size in a thread while the block runs; .extra = peak - size at entry."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra = self.peak - self.start


def child(args) -> dict:
    import torch
    import torch.nn.functional as F

    from lmlab.model.sparse_attention import SlidingWindow, attend

    torch.set_num_threads(args.threads)
    T, case = args.child_length, args.child
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.heads, T, args.head_dim, generator=g)
    k = torch.randn(1, args.kv_heads, T, args.head_dim, generator=g)
    v = torch.randn(1, args.kv_heads, T, args.head_dim, generator=g)
    pattern = SlidingWindow(args.window)
    backward = case.endswith("fwdbwd")
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    rep = args.heads // args.kv_heads

    def dense():
        mask = pattern.dense_mask(T, T)
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                              attn_mask=mask)

    kernel = {"dense": dense,
              "flex": lambda: attend(q, k, v, pattern, backend="flex"),
              "blocked": lambda: attend(q, k, v, pattern, backend="blocked", chunk=args.chunk)}[case.split("_")[0]]

    def run():
        """The output (and gradients) stay alive until the caller drops them, so the sampler sees them."""
        if not backward:
            with torch.no_grad():
                return kernel()
        out = kernel()
        out.sum().backward()
        grads = q.grad, k.grad, v.grad
        q.grad = k.grad = v.grad = None
        return out.detach(), grads

    t0 = time.perf_counter()
    run()  # warm-up (and compile for flex)
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(args.repeats):  # timed without the sampler thread (it would compete for the cores)
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    sys.setswitchinterval(0.0002)  # let the sampler thread in between the kernels' Python steps
    with PeakRSS() as mem:
        kept = run()
    del kept
    peak = mem.extra
    return {"seconds": best, "peak_mb": peak / 2**20, "first_s": first}


def dense_bytes(T: int, heads: int, backward: bool) -> int:
    """Rough size of dense attention's T x T tensors: float scores/probs per head (x4 with backward) + mask."""
    return T * T * (heads * 4 * (4 if backward else 1) + 1)


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(args, case: str, T: int) -> dict:
    if case.startswith("dense") and dense_bytes(T, args.heads, case.endswith("fwdbwd")) > available_bytes() / 2:
        need = dense_bytes(T, args.heads, case.endswith("fwdbwd")) / 2**30
        return {"skipped": f"needs ~{need:.1f} GiB, {available_bytes() / 2**30:.1f} GiB available"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case, "--child-length", str(T)]
    for name in ("heads", "kv_heads", "head_dim", "window", "chunk", "threads", "repeats"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"skipped": f"failed: {(proc.stderr.strip().splitlines() or ['exit ' + str(proc.returncode)])[-1]}"}
    return json.loads(lines[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)  # 2 threads on a busy 2-core box: OpenMP barriers stall
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--child-length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in cases if c not in CASES]
    if bad:
        sys.exit(f"unknown case {bad[0]!r} (known: {', '.join(CASES)})")
    print(f"sliding window {args.window}, heads {args.heads} (kv {args.kv_heads}), head dim {args.head_dim}, "
          f"batch 1, float32, {args.threads} threads, chunk {args.chunk}")
    print(f"{'T':>6} {'case':<15} {'time s':>9} {'peak MiB':>9} {'KiB/token':>9}  note")
    results = {}
    for T in lengths:
        for case in cases:
            r = results[T, case] = run_case(args, case, T)
            if "skipped" in r:
                print(f"{T:>6} {case:<15} {'-':>9} {'-':>9} {'-':>9}  skipped: {r['skipped']}", flush=True)
                continue
            note = f"first call {r['first_s']:.1f} s (compile)" if case == "flex_fwd" else ""
            print(f"{T:>6} {case:<15} {r['seconds']:>9.4f} {r['peak_mb']:>9.1f} "
                  f"{r['peak_mb'] * 1024 / T:>9.2f}  {note}", flush=True)
    print("\nratios dense / sparse (time, memory):")
    for T in lengths:
        parts = []
        for sparse, dense in PAIRS:
            a, b = results.get((T, sparse), {}), results.get((T, dense), {})
            if "seconds" in a and "seconds" in b:
                parts.append(f"{dense}/{sparse} time x{b['seconds'] / a['seconds']:.1f} "
                             f"mem x{b['peak_mb'] / max(a['peak_mb'], 0.1):.1f}")
        print(f"{T:>6}  " + ("; ".join(parts) or "-"))


if __name__ == "__main__":
    main()
