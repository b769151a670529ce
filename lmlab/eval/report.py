"""Results: lm-evaluation-harness-shaped JSON and per-sample logs (written atomically), a markdown table."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmlab.utils import atomic


def clean(x: Any) -> Any:
    """NaN and infinities (a standard error of one item) become null: the file stays valid JSON."""
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    """The results JSON at `path`: the whole file or, if anything fails, nothing."""
    return atomic.write_json(path, clean(results))


def write_samples(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """Per-item records, one JSON object a line (values JSON cannot hold are written as text)."""
    return atomic.write_jsonl(path, (clean(r) for r in records), default=str)


def markdown_table(results: dict[str, Any]) -> str:
    rows = ["| Task | n | Metric | Value | Stderr |", "|---|---:|---|---:|---:|"]
    n_samples = results.get("n-samples", {})
    for task, scores in results["results"].items():
        n = n_samples.get(task, {}).get("effective", "")
        for metric, value in scores.items():
            if metric.endswith("_stderr") or metric in ("alias", "n"):
                continue
            err = scores.get(f"{metric}_stderr")
            err_s = f"{err:.4f}" if isinstance(err, float) and not math.isnan(err) else ""
            val_s = f"{value:.4f}" if isinstance(value, float) else str(value)
            rows.append(f"| {task} | {n} | {metric} | {val_s} | {err_s} |")
    return "\n".join(rows)
