"""The fine-tuning run: model.init_from → task model → LoRA or full → a short visible training loop.

The loop has the pretraining trainer's shape and uses its pieces (lmlab.train): the model section
(init_from), the optimizer (AdamW over weight-decay groups, fused kernel), the warmup + cosine
schedule, the metrics log, and the atomic checkpoint with exact resume (trained parameters, optimizer,
step, data generator and RNG): rerunning the same command continues from ckpt.pt. It writes to out_dir:

    metrics.jsonl  config.yaml  summary.json  ckpt.pt
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
from lmlab.adapters.peft import backbone_of, peft_slices, save_peft
from lmlab.errors import LmlabError
from lmlab.finetune.config import FinetuneConfig, dump_finetune_config
from lmlab.finetune.tasks import ClassifyTask, InstructTask
from lmlab.train import checkpoint
from lmlab.train.metrics import MetricsLog
from lmlab.train.model_section import start_model
from lmlab.train.trainer import build_optimizer, lr_at
from lmlab.utils.atomic import check_writable, write_json, write_jsonl, write_text
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
    """Run the recipe (or continue it from out_dir/ckpt.pt); returns (and writes to out_dir/summary.json) its summary."""
    threads_before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads_before)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: the parameters being trained (LoRA A/B and heads, or all);
    the frozen rest is model.init_from's and is rebuilt from it on resume."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    own = dict(model.named_parameters())
    want = {n for n, p in own.items() if p.requires_grad}
    if set(sd) != want:
        diff = sorted(set(sd) ^ want)
        raise LmlabError(f"{path}: cannot resume: the checkpoint's trainable parameters differ from the config's "
                         f"(e.g. {diff[0]}); use a new out_dir or resume=false")
    with torch.no_grad():
        for n, t in sd.items():
            own[n].copy_(t)


def run_shape(cfg: FinetuneConfig, backbone) -> dict[str, Any]:
    """What must not change across a resume: the model's shape and what is trained."""
    L = cfg.lora
    return {**backbone.cfg.to_dict(), "task": cfg.task, "method": cfg.method,
            **({"lora_r": L.r, "lora_targets": list(L.targets), "lora_rslora": L.rslora} if cfg.method == "lora" else {}),
            "freeze": [*cfg.freeze, f"blocks<{cfg.freeze_blocks}"]}


def _run(cfg: FinetuneConfig) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    check_writable(out / "config.yaml")  # before any work: an unwritable out_dir fails now
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", dump_finetune_config(cfg))
    torch.manual_seed(cfg.seed)
    device = str(resolve_device(cfg.device))
    task, model, tok = build(cfg)
    model.to(device)
    counts = param_counts(model)
    print(f"finetune: {cfg.task} with {cfg.method}, {counts.trainable:,} of {counts.total:,} parameters trainable; "
          f"{task.describe()}; device {device}", file=sys.stderr)
    optimizer = build_optimizer(model, cfg.optim, {"fused": device.startswith(("cuda", "cpu"))})
    shape = run_shape(cfg, backbone_of(model))

    # state: step, data position (the generator), RNG — fresh or from the last checkpoint (lmlab.train.checkpoint)
    start_iter, gen = 0, torch.Generator().manual_seed(cfg.seed)
    ckpt_path = out / checkpoint.NAME
    if cfg.resume and ckpt_path.is_file():
        state = checkpoint.load(ckpt_path)
        checkpoint.check_shape(ckpt_path, state["model_cfg"], shape)
        load_trainable_state(model, state["model"], ckpt_path)
        optimizer.load_state_dict(state["optim"])
        start_iter = state["iter"]
        checkpoint.set_rng_state(state["rng"][0], gen)
        print(f"resuming from {ckpt_path} at iteration {start_iter}", file=sys.stderr)

    log = MetricsLog(out, tensorboard=False, truncate_after=start_iter)
    progress = Progress(cfg.max_iters, "finetune", initial=start_iter, enabled=cfg.progress)
    t0, tokens, it, trained = time.time(), 0, start_iter, 0.0
    last: dict[str, float] = {}
    model.train()
    while True:
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            last = task.evaluate(model, device)
            log.write({"iter": it, "split": "eval", **last})
            progress.note(f"iter {it}: {_fmt(last)}")
            model.train()
        if it > start_iter and (it % cfg.eval_interval == 0 or it == cfg.max_iters):
            checkpoint.save(ckpt_path, {"model": trainable_state(model), "optim": optimizer.state_dict(), "iter": it,
                                        "rng": [checkpoint.rng_state(gen)], "model_cfg": shape,
                                        "config": cfg.to_dict()})
        if it >= cfg.max_iters:
            break
        lr = lr_at(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        started, loss_sum = time.time(), 0.0
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device) for k, v in task.train_batch(gen).items()}
            loss = task.loss(model, batch)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            tokens += task.tokens(batch)
        if not math.isfinite(loss_sum):
            raise LmlabError(f"iteration {it + 1}: the loss is {loss_sum} (lower optim.lr?)")
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        trained += time.time() - started  # throughput counts training steps only, not evaluation
        it += 1
        if it % cfg.log_interval == 0 or it == cfg.max_iters:
            log.write({"iter": it, "split": "train", "loss": loss_sum, "lr": lr,
                       "tokens_per_s": tokens / max(trained, 1e-9)})
            progress.set(loss=f"{loss_sum:.4f}")
        progress.goto(it)
    progress.close()
    seconds = time.time() - t0
    model.eval().cpu()
    if cfg.eval_icl.task:
        from lmlab.finetune.icl_eval import icl_task_accuracy

        e = cfg.eval_icl
        last["eval_icl"] = [icl_task_accuracy(model, tok, e.task, e.data_dir or None, e.split or None, limit=n,
                                              labels=e.labels, batch_size=cfg.batch_size, max_len=cfg.seq_len)
                            for n in e.limits]
        for r in last["eval_icl"]:
            items = r.pop("items")
            write_jsonl(out / f"eval_icl_{r['task']}_{r['n']}.jsonl", items)  # per item: origin, label, prediction
            print(f"finetune: {r['task']} ({r['n']} test items, as lmlab icl scores them): acc {r['acc']:.4f}",
                  file=sys.stderr)
    evals = [r for r in log.read() if r.get("split") == "eval"]
    first = {k: v for k, v in (evals[0] if evals else last).items() if k not in ("iter", "split")}
    summary = {"task": cfg.task, "method": cfg.method, "iters": cfg.max_iters, "seconds": round(seconds, 1),
               "trained_from": start_iter, "trainable_params": counts.trainable, "params": counts.total,
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
