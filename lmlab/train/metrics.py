"""Where a run reports: metrics.jsonl (always), TensorBoard (when installed) and a loss-curve PNG at the
end (when matplotlib is installed); for a mixture-of-experts model also tokens per expert (ExpertLoad)
and the expert-load histogram PNG. The progress display is lmlab.utils.progress."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError
from lmlab.model.moe import load_balance_report
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


class ExpertLoad:
    """Tokens per expert of every MoE layer (from Transformer.moe_stats()), over the log interval and the
    whole run, with the auxiliary losses: what the trainer logs for a mixture-of-experts model."""

    def __init__(self) -> None:
        self.interval: dict[str, torch.Tensor] = {}
        self.run: dict[str, torch.Tensor] = {}
        self.aux, self.figures, self.calls = 0.0, {}, 0

    def add(self, stats, aux: float | torch.Tensor) -> None:
        for layer, counts in stats.counts.items():
            self.interval[layer] = self.interval.get(layer, 0) + counts
        self.aux = self.aux + aux
        for k, v in stats.figures().items():
            self.figures[k] = self.figures.get(k, 0.0) + v
        self.calls += 1

    def row(self, reduce=None) -> dict[str, Any]:
        """The interval's figures as metrics.jsonl fields (empty without MoE layers); reduce: sums the
        stacked counts over processes (in place), for distributed runs. Starts the next interval."""
        if not self.interval:
            return {}
        layers = sorted(self.interval)
        counts = torch.stack([self.interval[k] for k in layers]).long()
        if reduce is not None:
            reduce(counts)
        for layer, c in zip(layers, counts):
            self.run[layer] = self.run.get(layer, 0) + c.cpu()
        report = load_balance_report(counts.sum(0))
        n = max(self.calls, 1)
        row = {"moe_aux_loss": float(self.aux) / n, **{k: v / n for k, v in self.figures.items()},
               "moe_max_over_mean": report.max_over_mean, "moe_cv": report.cv, "moe_idle": report.idle,
               "moe_tokens": counts.sum(0).tolist(),
               "moe_tokens_per_layer": {k: c.tolist() for k, c in zip(layers, counts)}}
        self.interval, self.aux, self.figures, self.calls = {}, 0.0, {}, 0
        return row

    def line(self) -> str:
        """One line on the whole run's load (all layers together)."""
        return load_balance_report(sum(self.run.values())).line if self.run else ""


def plot_expert_load(per_layer: dict[str, list[int]], path: Path, title: str = "") -> Path | None:
    """A bar chart of each MoE layer's share of the tokens per expert (the expert-load histogram)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is optional
        return None
    layers = sorted(per_layer)
    n_exp = len(per_layer[layers[0]])
    width = 0.8 / len(layers)
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, layer in enumerate(layers):
        counts = per_layer[layer]
        total = max(sum(counts), 1)
        ax.bar([e + (j - (len(layers) - 1) / 2) * width for e in range(n_exp)], [c / total for c in counts],
               width=width, label=layer)
    ax.axhline(1 / n_exp, color="black", linestyle="--", linewidth=1, label="even load")
    ax.set_xticks(range(n_exp))
    ax.set_xlabel("expert")
    ax.set_ylabel("share of routed tokens")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
