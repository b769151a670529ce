"""Progress for long work: a tqdm bar (rate, ETA, optional figures) on a terminal, plain log lines at
most every `every_s` seconds otherwise (so logs of non-interactive runs stay readable)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, *, unit: str = "it", initial: int = 0, enabled: bool = True,
                 every_s: float = 15.0, unit_scale: bool = False):
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.enabled = enabled and total > 0
        self.bar = None
        self.start = self.last = time.perf_counter()
        self.initial, self.every_s = initial, every_s
        self.postfix: dict[str, str] = {}
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                            dynamic_ncols=True, file=sys.stderr)

    def set(self, **figures: object) -> None:
        """Figures shown beside the bar (loss=..., tok_s=...), strings or numbers."""
        self.postfix = {k: (f"{v:,.4g}" if isinstance(v, float) else str(v)) for k, v in figures.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)

    def update(self, n: int = 1) -> None:
        self.goto(self.done + n)

    def goto(self, done: int, *, force: bool = False) -> None:
        self.done = done
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
            return
        now = time.perf_counter()
        if force or now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            rate = (self.done - self.initial) / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({rate:,.1f} {self.unit}/s, "
                  f"ETA {eta:.0f}s{extra})", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        """A line of text that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
