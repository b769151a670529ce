"""Progress for long runs: a tqdm bar (items/s, ETA) on a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, every_s: float = 15.0):
        self.total, self.desc, self.done = total, desc, 0
        self.enabled = enabled and total > 0
        self.bar = None
        self.start = self.last = time.perf_counter()
        self.every_s = every_s
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.desc}: {self.done}/{self.total} ({rate:.1f} it/s, ETA {eta:.0f}s)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
