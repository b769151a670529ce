"""Results: lm-evaluation-harness-shaped JSON (written atomically), a markdown table, per-sample logs."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def _clean(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(results: dict[str, Any], path: str | Path) -> None:
    """Write to a temporary file in the same folder, then rename: the path holds a whole file or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # an ordinary file's permissions, not mkstemp's private 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_clean(results), f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
