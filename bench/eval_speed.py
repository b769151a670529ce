"""lmlab eval vs lm-evaluation-harness (HF backend, best of batch sizes 1/8/32) on the same multiple-choice
items, one run: items/s of both, the ratio, and both accuracies.

    python bench/eval_speed.py [--items 500] [--task piqa] [--data-dir ../shared/data/eval] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "eval"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--task", default="piqa", choices=["piqa", "boolq", "copa"])
    ap.add_argument("--data-dir", default=str(REPO / ".." / "shared" / "data" / "eval"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hf-batch-sizes", default="1,8,32")
    ap.add_argument("--threads", type=int, help="torch threads for both (default: torch's choice)")
    a = ap.parse_args()

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import parity
    from lmlab.checkpoints import load
    from lmlab.checkpoints.hf import export
    from lmlab.eval import evaluate

    data = Path(a.data_dir)
    model, tok = load("smollm2-135m")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        export(model, tok, work / "hf")
        parity.write_lm_eval_tasks(work, data, [])
        t0 = time.perf_counter()
        ours = evaluate(model, tok, [a.task], data_dir=data, limit=a.items, batch_size=a.batch_size, progress=False)
        ours_s = time.perf_counter() - t0
        n = ours["n-samples"][a.task]["effective"]
        print(f"lmlab batch {a.batch_size}: {n / ours_s:.2f} items/s", flush=True)
        hf_model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
        hf_tok = AutoTokenizer.from_pretrained(work / "hf")
        tm = TaskManager(include_path=str(work))
        best = None
        for bs in [int(b) for b in a.hf_batch_sizes.split(",")]:
            lm = HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=bs)
            t0 = time.perf_counter()
            res = simple_evaluate(model=lm, tasks=[f"p_{a.task}"], task_manager=tm, limit=a.items,
                                  bootstrap_iters=0, verbosity="ERROR")
            s = time.perf_counter() - t0
            print(f"lm_eval HF batch {bs}: {n / s:.2f} items/s", flush=True)
            if best is None or s < best[0]:
                best = (s, bs, res["results"][f"p_{a.task}"])
    theirs_s, bs, r = best
    mine = ours["results"][a.task]
    print(f"task {a.task}, {n} items, {torch.get_num_threads()} threads")
    print(f"lmlab   : {n / ours_s:.2f} items/s  acc {mine['acc']:.4f}  acc_norm {mine['acc_norm']:.4f}")
    print(f"lm_eval : {n / theirs_s:.2f} items/s  acc {r['acc,none']:.4f}  acc_norm {r['acc_norm,none']:.4f}"
          f"  (best batch size {bs})")
    print(f"ratio   : {theirs_s / ours_s:.2f}x")
    ours_t, theirs_t = forward_tokens(tok, a.task, data, a.items)
    print(f"tokens through the model: lmlab {ours_t:,} (each context once), lm_eval {theirs_t:,} (context again "
          f"with every multi-token choice): at equal precision, sharing contexts can buy at most "
          f"{theirs_t / ours_t:.2f}x on these items; the rest of any speed-up has to come from kernels")


def forward_tokens(tok, task: str, data: Path, limit: int) -> tuple[int, int]:
    """Tokens each harness runs through the model for the task's multiple-choice items: lmlab computes a
    context once for all its choices; lm_eval 0.4 computes context + choice for each choice, except that
    choices of one token share a single pass (its one-token-continuation grouping)."""
    from lmlab.eval.evaluator import resolve_tasks

    ours = theirs = 0
    for item in resolve_tasks([task], data)[0].items(limit=limit):
        main = item.requests["main"]
        ctx = len(tok.encode(main[0].context))
        conts = [len(tok.encode(r.context + r.continuation)) - ctx for r in main]
        ours += ctx + sum(conts)
        theirs += ctx + 1 if max(conts) == 1 else sum(ctx + c for c in conts)
    return ours, theirs


if __name__ == "__main__":
    main()
