"""Merge the results JSONs of `lmlab icl` runs over the same task and test items (e.g. the random grid and
the retrieval grid, run as two processes) into one results JSON, one markdown table and one curve.

    python docs/icl/report.py docs/icl/sst2_random.json docs/icl/sst2_retrieval.json \
        --output docs/icl/sst2.json --plot docs/icl/sst2.png --title "SST-2, SmolLM2-135M"
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's lmlab


def planned(runs: list[dict]) -> set[tuple[str, int, int]]:
    """Every cell the runs' grids asked for: a run stopped part-way and another that ran its missing cells
    merge into a complete grid."""
    from lmlab.icl.experiment import GridConfig

    return {cell for r in runs for cell in GridConfig(**r["config"]["grid"]).plan()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+", help="results JSONs of one task over the same test items")
    ap.add_argument("--output", help="the merged results JSON")
    ap.add_argument("--plot", help="the merged curve (PNG)")
    ap.add_argument("--title", default="")
    a = ap.parse_args()

    from lmlab.errors import LmlabError
    from lmlab.icl.experiment import markdown, summarize
    from lmlab.utils.atomic import write_json

    runs = [json.loads(Path(p).read_text()) for p in a.results]
    first = runs[0]
    for path, r in zip(a.results[1:], runs[1:]):
        if (r["task"], r["model"], r["test_items"]) != (first["task"], first["model"], first["test_items"]):
            raise LmlabError(f"{path}: another task, model or set of test items than {a.results[0]}")
    cells, seen = [], set()
    for r in runs:
        for c in r["cells"]:
            key = (c["retriever"], c["shots"], c["seed"])
            if key not in seen:  # the 0-shot cell is the same prompt in every run: keep the first
                seen.add(key)
                cells.append(c)
    retrievers = list(dict.fromkeys(m for r in runs for m in r["config"]["grid"]["retrievers"]))
    shots = sorted({c["shots"] for c in cells})
    rows = summarize(cells, retrievers, shots)
    missing = sorted(planned(runs) - seen)
    merged = {"task": first["task"], "model": first["model"], "summary": rows, "cells": cells,
              "complete": not missing, "missing_cells": missing, "test_items": first["test_items"],
              "runs": [{"file": p, "config": r["config"], "total_seconds": r["total_seconds"],
                        "complete": r.get("complete", True)} for p, r in zip(a.results, runs)]}
    if a.output:
        write_json(a.output, merged, indent=2)
    if a.plot:
        from lmlab.icl.plot import plot_curve

        plot_curve(rows, a.plot, title=a.title or f"{first['task']}, {first['model']}")
    print(markdown(rows))
    print(f"\nmissing cells (retriever, shots, seed): {missing}" if missing else
          "\nthe merged grid is complete (every cell the runs planned is present)")
    print(f"\n{len(cells)} cells, {len(first['test_items'])} test items; run seconds: "
          + ", ".join(f"{Path(p).name} {r['total_seconds']:.0f}" + ("" if r.get("complete", True) else " (partial)")
                      for p, r in zip(a.results, runs)))


if __name__ == "__main__":
    main()
