"""Where a run reports: metrics.jsonl (always), TensorBoard (when installed) and a loss-curve PNG at the
end (when matplotlib is installed). The progress display is lmlab.utils.progress."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.utils.atomic import write_jsonl


class MetricsLog:
    """Appends one JSON object per line; on resume, drops lines past the checkpoint's iteration."""

    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = True, truncate_after: int = 0):
        self.path, self.enabled, self.tb = out / "metrics.jsonl", enabled, None
        if not enabled:
            return
        if self.path.is_file():
            keep = [r for r in self.read() if r["iter"] < truncate_after or
                    (r["iter"] == truncate_after and r.get("split") == "train")] if truncate_after else []
            # (rewritten whole: rows past the checkpoint and any torn last line are gone)
            write_jsonl(self.path, keep)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "iter":
                    self.tb.add_scalar(f"{row.get('split', 'train')}/{k}", v, row["iter"])

    def read(self) -> list[dict[str, Any]]:
        """The rows; a torn last line (a run killed mid-write) is dropped, damage elsewhere is named."""
        if not self.path.is_file():
            return []
        lines = self.path.read_bytes().split(b"\n")
        rows = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
                if not isinstance(row, dict) or not isinstance(row.get("iter"), int):
                    raise ValueError("not a metrics row")
            except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if all(not rest.strip() for rest in lines[i + 1:]):
                    break  # the torn last line: truncated when the log is rewritten on resume
                raise LmlabError(f"{self.path}:{i + 1}: not a metrics row (a JSON object with an integer "
                                 "'iter'); move the file aside to resume") from None
            rows.append(row)
        return rows

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_losses(history: list[dict[str, Any]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is optional
        return None
    train = [(r["iter"], r["loss"]) for r in history if r.get("split") == "train"]
    evals = [(r["iter"], r["val_loss"]) for r in history if r.get("split") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train (step)", alpha=0.6)
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
