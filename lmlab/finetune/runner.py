"""The fine-tuning run: model.init_from → task model → LoRA or full → a short visible training loop.

It uses lmlab.train's pieces (the model section, weight-decay groups, the warmup + cosine schedule,
the metrics log) and writes to out_dir:

    metrics.jsonl  config.yaml  summary.json
    adapter/       LoRA in PEFT's layout (PeftModel.from_pretrained loads it on hf-base/)
    hf-base/       the base model as an HF folder (LoRA runs)
    hf/            the fine-tuned model as an HF folder, LoRA merged (export_merged)
    model/         full fine-tuning of an LM: lmlab's native checkpoint
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lmlab.adapters import first_blocks, freeze, inject_lora, param_counts
from lmlab.adapters.peft import peft_slices, save_peft
from lmlab.errors import LmlabError
from lmlab.finetune.config import FinetuneConfig, dump_finetune_config
from lmlab.finetune.tasks import ClassifyTask, InstructTask
from lmlab.train.metrics import MetricsLog
from lmlab.train.model_section import start_model
from lmlab.train.trainer import lr_at, param_groups
from lmlab.utils.atomic import write_json, write_text
from lmlab.utils.device import resolve_device
from lmlab.utils.progress import Progress


def build(cfg: FinetuneConfig):
    """(task, model to train, tokenizer): the start model, its task wrapper, LoRA or full, freezing."""
    backbone, tok = start_model(cfg.model, cfg.seq_len)
    if tok is None:
        raise LmlabError(f"config: model.init_from={cfg.model.init_from} has no tokenizer")
    backbone = backbone.float()
    task = (InstructTask if cfg.task == "instruct" else ClassifyTask)(cfg, tok)
    model = task.model(backbone)
    if cfg.method == "lora":
        L = cfg.lora
        inject_lora(backbone, L.targets, r=L.r, alpha=L.alpha, dropout=L.dropout, rslora=L.rslora,
                    slices_of=peft_slices(backbone.cfg))
    stack = "decoder" if backbone.decoder is not None else "encoder"
    patterns = [*cfg.freeze, *first_blocks(cfg.freeze_blocks, stack)]
    if patterns:  # names inside the Transformer, whatever the task (a head is never frozen)
        freeze(backbone, patterns)
    return task, model, tok


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run the recipe; returns (and writes to out_dir/summary.json) its summary."""
    threads_before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: FinetuneConfig) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", dump_finetune_config(cfg))
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    task, model, tok = build(cfg)
    model.to(device)
    counts = param_counts(model)
    print(f"finetune: {cfg.task} with {cfg.method}, {counts.trainable:,} of {counts.total:,} parameters trainable; "
          f"{task.describe()}; device {device}", file=sys.stderr)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    log = MetricsLog(out, tensorboard=False)
    gen = torch.Generator().manual_seed(cfg.seed)
    progress = Progress(cfg.max_iters, "finetune", enabled=cfg.progress)
    first = task.evaluate(model, device)
    log.write({"iter": 0, "split": "eval", **first})
    progress.note(f"iter 0: {_fmt(first)}")
    last, t0, tokens = first, time.time(), 0
    model.train()
    for it in range(1, cfg.max_iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it - 1, cfg)
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device) for k, v in task.train_batch(gen).items()}
            loss = task.loss(model, batch)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            tokens += task.tokens(batch)
        if not math.isfinite(loss_sum):
            raise LmlabError(f"iteration {it}: the loss is {loss_sum} (lower optim.lr?)")
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it % cfg.log_interval == 0 or it == cfg.max_iters:
            log.write({"iter": it, "split": "train", "loss": loss_sum, "lr": lr_at(it - 1, cfg),
                       "tokens_per_s": tokens / max(time.time() - t0, 1e-9)})
            progress.set(loss=f"{loss_sum:.4f}")
        progress.goto(it)
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            last = task.evaluate(model, device)
            log.write({"iter": it, "split": "eval", **last})
            progress.note(f"iter {it}: {_fmt(last)}")
            model.train()
    progress.close()
    seconds = time.time() - t0
    model.eval().cpu()
    summary = {"task": cfg.task, "method": cfg.method, "iters": cfg.max_iters, "seconds": round(seconds, 1),
               "trainable_params": counts.trainable, "params": counts.total,
               **{f"start_{k}": v for k, v in first.items()}, **last, **save_outputs(cfg, task, model, tok, out)}
    write_json(out / "summary.json", summary)
    log.close()
    return summary


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def save_outputs(cfg: FinetuneConfig, task, model, tok, out: Path) -> dict[str, str]:
    """The adapter (LoRA), the HF base and merged folders, or the full model; returns their paths."""
    from lmlab.checkpoints.native import save

    paths = {}
    if cfg.method == "lora":
        paths["adapter_dir"] = str(save_peft(model, out / "adapter", base_name=cfg.model.init_from))
        if cfg.export_base:
            paths["hf_base_dir"] = str(task.export_base(model, tok, out / "hf-base"))
    elif cfg.task == "instruct":
        paths["model_dir"] = str(save(model, tok, out / "model"))
    if cfg.export_merged:
        paths["hf_dir"] = str(task.export(model, tok, out / "hf"))
    return paths
