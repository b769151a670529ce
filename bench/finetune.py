"""Fine-tuning memory and speed: lmlab LoRA vs lmlab full fine-tuning, and lmlab LoRA vs HF PEFT LoRA, on
SmolLM2-135M with the same batch, in one run.

Each configuration trains in its own fresh process (so one's memory never counts for another) and reports:
  - peak RSS (resource.getrusage ru_maxrss: the process's high-water mark, all of torch's CPU allocations
    included) and the RSS once the model is loaded, so the training overhead shows on its own;
  - tokens/s over the timed steps (after one warm-up step), by default per second of the process's own CPU
    time (time.process_time): on a machine shared with other jobs, wall time measures how much of the CPU
    the scheduler gave each process, not the code; with --threads 1 CPU time is one core's time.
    `--wall` uses wall-clock time instead (both are printed);
  - the first step's loss (LoRA starts with B = 0, so lmlab and PEFT must agree with each other).
Memory is measured in a separate process per configuration (warm-up step + one step, so AdamW's state
exists), with glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_): large tensors then go back
to the system when freed, so peak RSS is the peak of live memory. Under glibc's default (a threshold that
grows as large blocks are freed) freed activations stay resident in the heap and peak RSS says more about
the order of allocations than about what a method needs: measured at 4 × 256 tokens, lmlab LoRA's first
forward left RSS 470 MiB above full fine-tuning's under the default and 195 MiB below it with the fixed
threshold, while the tensors autograd saved were 1299 vs 1512 MiB. The speed runs keep glibc's default,
because a fixed threshold makes every large allocation a fresh mmap (page faults: it halved tokens/s here).
Every process loads the same weights: lmlab's HF export of SmolLM2-135M (safetensors), which lmlab reads
as an HF folder and transformers reads natively; the batch is the same seeded token ids everywhere, the
optimizer the same AdamW (fused kernel, lr 1e-4, no weight decay), float32. LoRA: r 16, alpha 32, no
dropout, on every projection (q, k, v, o, gate, up, down): the same trainable parameters on both sides.

    python bench/finetune.py                          # batch 4 × 128 tokens, 3 timed steps, 1 thread
    python bench/finetune.py --batch 8 --seq 256 --steps 5 --rounds 2 --threads 2

Rounds repeat the configurations in turn (A B C A B C) and keep each one's fastest round, so a burst
of load from other jobs on a shared machine hits every configuration alike.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("peft-lora", "lmlab-lora", "lmlab-full")
LMLAB_TARGETS = ["q", "k", "v", "out", "gate", "up", "proj"]
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, LR = 16, 32, 1e-4


def rss_mb() -> float:
    """Resident set size now (MiB), from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --------------------------------------------------------------------------- one configuration (a worker)
def lmlab_step(hf_dir: str, lora: bool):
    import torch

    from lmlab.adapters import inject_lora
    from lmlab.adapters.peft import peft_slices
    from lmlab.checkpoints import load
    from lmlab.train.config import OptimConfig
    from lmlab.train.trainer import build_optimizer

    model, _ = load(hf_dir)
    model.train()
    if lora:
        inject_lora(model, LMLAB_TARGETS, r=R, alpha=ALPHA, dropout=0.0, slices_of=peft_slices(model.cfg))
    opt = build_optimizer(model, OptimConfig(lr=LR, weight_decay=0.0), {"fused": True})

    def step(ids, labels):
        loss = model(ids, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def peft_step(hf_dir: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0, fused=True)

    def step(ids, labels):
        loss = model(input_ids=ids, labels=ids).loss  # HF shifts the labels itself
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def worker(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, step = peft_step(a.hf) if a.worker == "peft-lora" else lmlab_step(a.hf, a.worker == "lmlab-lora")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loaded = rss_mb()
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((a.batch, 1), -100)], dim=1)  # lmlab: the target of each position
    first = step(ids, labels)  # warm-up (and optimizer state allocation)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(1 if a.memory else a.steps):
        step(ids, labels)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = a.batch * (a.seq - 1) * (1 if a.memory else a.steps)
    print(json.dumps({"config": a.worker, "trainable": trainable, "first_loss": first, "rss_loaded_mb": loaded,
                      "peak_rss_mb": peak_rss_mb(), "wall_tokens_per_s": tokens / seconds,
                      "tokens_per_s": tokens / cpu if a.cpu_time else tokens / seconds, "seconds": seconds,
                      "cpu_seconds": cpu}))


# --------------------------------------------------------------------------- the comparison (the parent)
def prepare(work: Path, model: str) -> tuple[str, int]:
    """lmlab's HF export of the model (written once), and its vocabulary size."""
    hf_dir = work / "hf"
    if not (hf_dir / "config.json").is_file():
        from lmlab.checkpoints import load
        from lmlab.checkpoints.hf import export

        m, tok = load(model)
        export(m, tok, hf_dir)
    return str(hf_dir), json.loads((hf_dir / "config.json").read_text())["vocab_size"]


def run_one(a, config: str, hf_dir: str, vocab: int, memory: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, *(["--memory"] if memory else []), *([] if a.cpu_time else ["--wall"]), "--hf", hf_dir, "--vocab", str(vocab), "--batch", str(a.batch),
           "--seq", str(a.seq), "--steps", str(a.steps), "--threads", str(a.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)} if memory else dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{config}: worker failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="runs/bench-finetune", help="where the HF export is kept")
    p.add_argument("--wall", dest="cpu_time", action="store_false",
                   help="tokens/s over wall-clock time (default: over the process's CPU time, see above)")
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--hf", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    hf_dir, vocab = prepare(Path(a.work), a.model)
    print(f"{a.model} (lmlab's HF export: {hf_dir}); batch {a.batch} × {a.seq} tokens, {a.steps} timed steps, "
          f"{a.threads} thread(s), float32, each configuration in its own process; tokens/s per "
          f"{'CPU' if a.cpu_time else 'wall-clock'} second; peak RSS from a separate 2-step run per configuration "
          "with glibc's mmap threshold fixed at 128 KiB")
    best: dict[str, dict] = {}
    for r in range(a.rounds):
        for config in CONFIGS:
            res = run_one(a, config, hf_dir, vocab)
            print(f"  round {r + 1} {config:<11} {res['tokens_per_s']:8.1f} tok/s ({res['wall_tokens_per_s']:.1f} by wall "
                  f"clock, {res['cpu_seconds']:.0f} CPU s in {res['seconds']:.0f} s)  trainable {res['trainable']:,}  "
                  f"first loss {res['first_loss']:.5f}", flush=True)
            if config not in best or res["tokens_per_s"] > best[config]["tokens_per_s"]:
                best[config] = res
    for config in CONFIGS:
        mem = run_one(a, config, hf_dir, vocab, memory=True)
        best[config].update(peak_rss_mb=mem["peak_rss_mb"], rss_loaded_mb=mem["rss_loaded_mb"])
        print(f"  memory  {config:<11} peak RSS {mem['peak_rss_mb']:7.0f} MiB (loaded {mem['rss_loaded_mb']:.0f})", flush=True)
    full, lora, peft = best["lmlab-full"], best["lmlab-lora"], best["peft-lora"]
    print()
    print("| config | tokens/s | peak RSS (MiB) | training overhead over the loaded model (MiB) | trainable params |")
    print("|---|---|---|---|---|")
    for name, res in best.items():
        print(f"| {name} | {res['tokens_per_s']:.1f} | {res['peak_rss_mb']:.0f} | "
              f"{res['peak_rss_mb'] - res['rss_loaded_mb']:.0f} | {res['trainable']:,} |")
    print()
    print(f"lmlab LoRA / lmlab full: peak memory {lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}×, "
          f"training overhead {(lora['peak_rss_mb'] - lora['rss_loaded_mb']) / (full['peak_rss_mb'] - full['rss_loaded_mb']):.2f}×, "
          f"speed {lora['tokens_per_s'] / full['tokens_per_s']:.2f}×")
    print(f"lmlab LoRA / PEFT LoRA:  speed {lora['tokens_per_s'] / peft['tokens_per_s']:.2f}×, "
          f"peak memory {lora['peak_rss_mb'] / peft['peak_rss_mb']:.2f}×; first-step loss "
          f"{lora['first_loss']:.5f} vs {peft['first_loss']:.5f} (same weights, B = 0: should agree)")


if __name__ == "__main__":
    main()
