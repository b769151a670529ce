"""The shared-prefix KV cache in an in-context learning run: 16-shot SST-2 dev with demonstrations fixed
per seed (Zhao et al. 2021), scored with and without the cache in one run. Prints both times (wall clock,
and this process's CPU time, which other jobs on a shared machine do not inflate), the ratios, and whether
the predictions (plain and contextually calibrated) are identical.

    python bench/icl_speed.py [--limit 872] [--shots 16] [--seeds 1] [--model smollm2-135m]
                              [--data-dir ../shared/data/icl] [--batch-size 32] [--threads N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's lmlab


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=str(REPO / ".." / "shared" / "data" / "icl"))
    ap.add_argument("--limit", type=int, help="test items (default: all 872 of SST-2 dev)")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, help="torch threads (default: one per idle core)")
    a = ap.parse_args()

    from lmlab.eval.engine import Engine
    from lmlab.icl.experiment import Grid, GridConfig
    from lmlab.icl.tasks import load_task
    from lmlab.inference.load import RunConfig, load

    model, tok = load(a.model, RunConfig(threads=a.threads))
    task = load_task("sst2", a.data_dir)
    runs = {}
    for share in (False, True):
        cfg = GridConfig(shots=[a.shots], seeds=a.seeds, retrievers=["random"], calibrate=True, limit=a.limit,
                         share_prefix=share, log_demos=True)
        grid = Grid(Engine(model, tok, batch_size=a.batch_size, progress=False), task, cfg, progress=False)
        started, cpu = time.perf_counter(), time.process_time()
        cells = grid.run()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        preds = [(r["prediction"], r["prediction_calibrated"]) for r in grid.demo_log]
        runs[share] = (seconds, cells, preds, cpu)
        name = "shared prefix" if share else "plain        "
        accs = ", ".join(f"seed {c['seed']}: acc {c['acc']:.3f} calibrated {c['acc_calibrated']:.3f}" for c in cells)
        print(f"{name}: {seconds:8.2f} s ({cpu:8.2f} s CPU) for {cells[0]['n'] * len(cells)} items ({accs})",
              flush=True)
    same = runs[True][2] == runs[False][2]
    ratio, cpu_ratio = runs[False][0] / runs[True][0], runs[False][3] / runs[True][3]
    print(f"identical predictions: {same}; speed-up {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU time (goal >= 3x)")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
