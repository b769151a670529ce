"""The training loop: one visible loop in the spirit of nanoGPT's train.py.

    setup → (resume) → for each iteration: lr schedule, periodic eval + checkpoint,
    grad-accumulated micro-steps under autocast, clip, AdamW step, log → final eval, model, plot.

The same function runs alone or under torchrun (one process per device, DDP or FSDP). Every process
builds the same global micro-batch from one seeded generator and keeps its own slice, so N processes
with batch b see exactly the data of one process with batch N·b.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError, first_line
from lmlab.model.layers import residual_outputs
from lmlab.train import checkpoint
from lmlab.train.config import TrainConfig, dump_config
from lmlab.train.distributed import wrap
from lmlab.train.metrics import ExpertLoad, MetricsLog, plot_expert_load, plot_losses
from lmlab.train.model_section import start_model
from lmlab.utils.atomic import check_writable, write_json, write_text
from lmlab.utils.device import bf16_supported, cpu_peak_flops, parse_dtype
from lmlab.utils.dist import Dist, all_mean, setup, teardown
from lmlab.utils.progress import Progress


# ------------------------------------------------------------------ pieces the loop uses
def pick_device(name: str, d: Dist) -> str:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and d.enabled:
        name = f"cuda:{d.local_rank}"
    if name.startswith("cuda"):
        torch.cuda.set_device(name)
    return name


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") and bf16_supported(device) else torch.float32
    if name not in ("float32", "bfloat16"):  # float16 would need loss scaling
        raise LmlabError(f"config: dtype must be auto, float32 or bfloat16, got '{name}'")
    return parse_dtype(name)


def load_data(cfg: TrainConfig, d: Dist):
    """The prepared data folder, preparing it from cfg.data.corpus first when needed (rank 0 only)."""
    from lmlab.data import PrepareConfig, TokenData, prepare

    folder = Path(cfg.data.path or Path(cfg.out_dir) / "data")
    if not (folder / "meta.json").is_file():
        if not cfg.data.corpus:
            raise LmlabError(f"data.path={folder} is not a prepared folder and data.corpus is empty")
        if d.main:
            prepare(PrepareConfig(inputs=cfg.data.corpus, out_dir=str(folder), tokenizer=cfg.tokenizer,
                                  doc_boundary=cfg.data.doc_boundary, val_fraction=cfg.data.val_fraction,
                                  workers=cfg.data.workers, progress=cfg.progress))
        if d.enabled:
            torch.distributed.barrier()
    return TokenData(folder)


def build_model_config(cfg: TrainConfig, vocab_size: int):
    """The model config of a preset recipe for a tokenizer of `vocab_size` ids."""
    return cfg.model.config(vocab_size, cfg.seq_len)


def initial_model(cfg: TrainConfig, start, tokenizer) -> torch.nn.Module:
    """The model training starts from: model.init_from's weights, or the preset's seeded random ones."""
    from lmlab.model import Transformer

    if start is not None:
        model, own = start
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise LmlabError(f"config: the data's tokenizer ({cfg.tokenizer}) has {tokenizer.vocab_size} ids with the "
                             f"objectives' special tokens, more than model.init_from's {model.cfg.vocab_size}")
        if own is not None:
            check_same_tokens(tokenizer, own, cfg)
        return model
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = Transformer(build_model_config(cfg, tokenizer.vocab_size))
    if cfg.scaled_residual_init:
        scale_residual_init(model)
    return model


def check_same_tokens(data_tok, model_tok, cfg: TrainConfig) -> None:
    """The data's ids mean what they meant to the model training starts from (ids both have)."""
    for i in range(min(data_tok.vocab_size, model_tok.vocab_size)):
        if data_tok.token(i) != model_tok.token(i):
            raise LmlabError(f"config: the data's tokenizer ({cfg.tokenizer}) is not model.init_from's: id {i} is "
                             f"{data_tok.token(i)!r} in the data, {model_tok.token(i)!r} in the model (prepare the "
                             "data with the model's tokenizer: leave data.tokenizer empty)")


def scale_residual_init(model: torch.nn.Module) -> None:
    """GPT-2's initialisation: each residual branch's output projection gets std 0.02/sqrt(2·layers), so the
    residual stream's variance does not grow with depth."""
    stacks = [s for s in (model.encoder, model.decoder) if s is not None]
    layers = sum(len(s.blocks) for s in stacks)
    std = 0.02 / math.sqrt(2 * layers)
    with torch.no_grad():
        for stack in stacks:
            for block in stack.blocks:
                for attn in (block.attn, block.cross):
                    if attn is not None:
                        attn.out.weight.normal_(0.0, std)
                for weight in residual_outputs(block.mlp):
                    weight.normal_(0.0, std)


def param_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Weight decay on the matrices of linear layers only: never on norms, biases, tables such as T5's
    relative-position bias, or (unless decay_embeddings) the token/position embeddings."""
    tables = {name: id(m.weight) for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} - set(tables.values())
    if decay_embeddings:  # token, position and segment embeddings (a tied head is the token embedding)
        decayed |= {i for name, i in tables.items() if name.endswith("_emb")}
    decay, rest, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if id(p) in decayed else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (nanoGPT's schedule)."""
    o = cfg.optim
    if not o.decay_lr:
        return o.lr
    decay_iters = o.lr_decay_iters or cfg.max_iters
    if it < o.warmup_iters:
        return o.lr * (it + 1) / (o.warmup_iters + 1)
    if it > decay_iters:
        return o.min_lr
    ratio = (it - o.warmup_iters) / max(1, decay_iters - o.warmup_iters)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (o.lr - o.min_lr)


def optimizer_impl(device: str, d: Dist, cfg: TrainConfig) -> dict[str, bool]:
    """AdamW's fused kernel (one pass over all parameters: ~4x faster than the per-tensor loop on CPU) on
    CPU and CUDA; FSDP's sharded parameters keep PyTorch's default implementation."""
    if d.enabled and cfg.distributed == "fsdp":
        return {}
    return {"fused": device.startswith(("cuda", "cpu"))}


def build_optimizer(model: torch.nn.Module, o, impl: dict[str, bool] | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups` (trainable parameters only) with OptimConfig `o`'s settings; `impl`: the
    kernel choice of optimizer_impl. Pretraining and fine-tuning both build their optimizer here."""
    return torch.optim.AdamW(param_groups(model, o.weight_decay, o.decay_embeddings), lr=o.lr,
                             betas=(o.beta1, o.beta2), eps=o.eps, **(impl or {}))


def flops_per_token(model_cfg, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N plus attention (the PaLM appendix estimate nanoGPT uses)."""
    layers = model_cfg.n_layer + (model_cfg.n_decoder_layer or 0 if model_cfg.arch == "encoder-decoder" else 0)
    return 6 * n_params + 12 * layers * model_cfg.d_model * seq_len


def peak_flops(cfg: TrainConfig, device: str, dtype: torch.dtype) -> float:
    """Per-device peak for MFU: the config's value, or a rough guess (GPU tables; CPU from its vector width)."""
    if cfg.peak_flops:
        return cfg.peak_flops
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, tf in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10", 125e12),
                        ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)):
            if key in name:
                return tf if dtype == torch.bfloat16 else tf / 8
        return 100e12
    return cpu_peak_flops(torch.get_num_threads())


def slice_batch(batch: dict[str, torch.Tensor], d: Dist, device: str) -> dict[str, torch.Tensor]:
    """This process's rows of a global batch, on its device."""
    out = {}
    for k, v in batch.items():
        if d.enabled:
            n = v.shape[0] // d.world
            v = v[d.rank * n:(d.rank + 1) * n]
        out[k] = v.to(device, non_blocking=True)
    return out


@torch.no_grad()
def evaluate(model, mixture, data, cfg: TrainConfig, device: str, autocast) -> dict[str, float]:
    """Mean loss (and objective metrics) over eval_iters batches of each split, from a fixed seed."""
    model.eval()
    out: dict[str, float] = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        sums: dict[str, float] = {}
        for _ in range(cfg.eval_iters):
            batches = mixture.batches(data.split(split), cfg.batch_size, gen)
            batches = [(i, {k: v.to(device) for k, v in b.items()}) for i, b in batches]
            with autocast:
                loss, metrics = mixture.loss(model, batches)
            for k, v in {"loss": loss.item(), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.eval_iters
        out.update({f"{split}_{k}": v for k, v in sums.items()})
    model.train()
    return out


def state_dicts(model, optimizer, d: Dist, cfg: TrainConfig) -> tuple[dict, dict]:
    if d.enabled and cfg.distributed == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), optimizer.state_dict()


def load_state_dicts(model, optimizer, state: dict, d: Dist, cfg: TrainConfig) -> None:
    if d.enabled and cfg.distributed == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        return
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])


# ------------------------------------------------------------------ the loop
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or continue training) the model cfg describes; returns a summary of the run."""
    from lmlab.model import Transformer
    from lmlab.objectives import build_objectives

    threads_before = torch.get_num_threads()
    d = setup(device="cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
              else "cpu")
    try:
        device = pick_device(cfg.device, d)
        dtype = pick_dtype(cfg.dtype, device)
        out = Path(cfg.out_dir)
        if d.main:
            check_writable(out / "config.yaml")  # before any work: an unwritable out_dir fails now
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise LmlabError(f"{out}: cannot create out_dir ({first_line(e)})") from None
            write_text(out / "config.yaml", dump_config(cfg))
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        global_batch = cfg.batch_size * d.world

        # the model to start from (read before any data work, so a bad init_from fails fast),
        # data, objectives (they may add special tokens), model, optimizer
        start = start_model(cfg.model, cfg.seq_len) if cfg.model.init_from else None
        data = load_data(cfg, d)
        tokenizer = data.tokenizer
        mixture = build_objectives(cfg.objectives, tokenizer, cfg.seq_len, data.sep_id, cfg.mixture)
        raw = initial_model(cfg, start, tokenizer).to(device)
        model_cfg = raw.cfg
        for obj in mixture.objectives:
            obj.check_model(raw)
        n_params, n_active = raw.num_params(), raw.num_active_params()  # active: what one token uses (MoE)
        # a BERT trained without NSP leaves its pooler unused; DDP must be told
        unused = model_cfg.pooler and not any(o.cfg.name == "nsp" for o in mixture.objectives)
        model = wrap(raw, d, cfg.distributed, device, find_unused=unused)
        optimizer = build_optimizer(raw, cfg.optim, optimizer_impl(device, d, cfg))
        if cfg.compile:
            model = torch.compile(model)
        autocast = (torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if dtype == torch.bfloat16
                    else nullcontext())

        # state: step, data position (the generator), RNG — fresh or from the last checkpoint
        start_iter = 0
        data_gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed + d.rank)  # dropout differs per process
        random.seed(cfg.seed + d.rank)
        ckpt_path = out / checkpoint.NAME
        if cfg.resume and ckpt_path.is_file():
            state = checkpoint.load(ckpt_path)
            checkpoint.check_shape(ckpt_path, state["model_cfg"], model_cfg.to_dict())
            checkpoint.check_model_state(ckpt_path, state["model"], raw.state_dict())
            try:
                load_state_dicts(model if cfg.distributed == "fsdp" else raw, optimizer, state, d, cfg)
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
                raise LmlabError(f"{ckpt_path}: cannot restore the training state ({first_line(e)}); "
                                 "move it aside or set resume=false") from None
            start_iter = state["iter"]
            checkpoint.set_rng_state(state["rng"][min(d.rank, len(state["rng"]) - 1)], data_gen)
            if d.main:
                print(f"resuming from {ckpt_path} at iteration {start_iter}", file=sys.stderr)

        log = MetricsLog(out, enabled=d.main, tensorboard=cfg.tensorboard, truncate_after=start_iter)
        fpt = flops_per_token(model_cfg, n_active, cfg.seq_len)
        experts = ExpertLoad()
        peak = peak_flops(cfg, device, dtype)
        progress = Progress(cfg.max_iters, "pretrain", initial=start_iter, enabled=d.main and cfg.progress)
        ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
        if d.main:
            active = f" ({n_active / 1e6:.2f}M active per token)" if n_active != n_params else ""
            print(f"model: {model_cfg.arch} {n_params / 1e6:.2f}M parameters{active}, vocab {model_cfg.vocab_size}; "
                  f"device {device} ({dtype}), {d.world} process(es), global batch {global_batch}×"
                  f"{cfg.grad_accum} of {cfg.seq_len} tokens", file=sys.stderr)

        def save_checkpoint(it: int) -> None:
            sd, osd = state_dicts(model if cfg.distributed == "fsdp" else raw, optimizer, d, cfg)
            rngs = [checkpoint.rng_state(data_gen)]
            if d.enabled:  # every process's RNG, gathered to rank 0
                gathered = [None] * d.world
                torch.distributed.all_gather_object(gathered, rngs[0])
                rngs = gathered
            if d.main:
                checkpoint.save(ckpt_path, {"model": sd, "optim": osd, "iter": it, "rng": rngs,
                                            "model_cfg": model_cfg.to_dict(), "config": cfg.to_dict()})

        model.train()
        t_last, tokens_since, it = time.time(), 0, start_iter
        last_eval: dict[str, float] = {}
        while True:
            lr = lr_at(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                last_eval = evaluate(model, mixture, data, cfg, device, autocast)
                log.write({"iter": it, "split": "eval", **last_eval})
                progress.note(f"iter {it}: train loss {last_eval['train_loss']:.4f}, "
                              f"val loss {last_eval['val_loss']:.4f}")
            if it > start_iter and (it % ckpt_every == 0 or it == cfg.max_iters):
                save_checkpoint(it)
            if it % cfg.eval_interval == 0 or it % ckpt_every == 0:
                t_last, tokens_since = time.time(), 0  # throughput counts training time only
            if it >= cfg.max_iters:
                break

            # one optimizer step = grad_accum micro-steps
            loss_sum, metrics = torch.zeros((), device=device), {}  # a tensor: no host sync per step
            for micro in range(cfg.grad_accum):
                batches = mixture.batches(data.train, global_batch, data_gen)
                batches = [(i, slice_batch(b, d, device)) for i, b in batches]
                sync = micro == cfg.grad_accum - 1 or not d.enabled or cfg.distributed == "fsdp"
                with (nullcontext() if sync else model.no_sync()):
                    with autocast, raw.moe_stats() as moe:  # MoE layers' auxiliary loss and expert load
                        loss, metrics = mixture.loss(model, batches)
                    ((loss + moe.loss) / cfg.grad_accum).backward()
                experts.add(moe, torch.as_tensor(moe.loss).detach().float())
                loss_sum += loss.detach().float() / cfg.grad_accum
                tokens_since += mixture.tokens(batches) * d.world
            if cfg.optim.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            else:
                grad_norm = torch.zeros(())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            it += 1

            if it % cfg.log_interval == 0 or it == cfg.max_iters:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                now = time.time()
                tok_s = tokens_since / max(now - t_last, 1e-9)
                mfu = tok_s * fpt / (peak * d.world)
                loss_avg = all_mean(loss_sum.item())
                reduce = torch.distributed.all_reduce if d.enabled else None
                log.write({"iter": it, "split": "train", "loss": loss_avg, "lr": lr, "grad_norm": float(grad_norm),
                           "tokens_per_s": tok_s, "mfu": mfu, **metrics, **experts.row(reduce)})
                progress.set(loss=f"{loss_avg:.4f}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}")
                progress.goto(it)
                t_last, tokens_since = now, 0

        progress.close()
        history = log.read()
        evals = [r for r in history if r.get("split") == "eval"]
        trains = [r for r in history if r.get("split") == "train"]
        summary = {"iters": cfg.max_iters, "params": n_params, "active_params": n_active, "out_dir": str(out),
                   "val_loss_start": evals[0]["val_loss"] if evals else None,
                   "val_loss": last_eval.get("val_loss"), "train_loss": last_eval.get("train_loss"),
                   "tokens_per_s": (sum(r["tokens_per_s"] for r in trains[1:]) / max(1, len(trains) - 1)
                                    if len(trains) > 1 else (trains[0]["tokens_per_s"] if trains else None)),
                   **{k: v for k, v in last_eval.items() if k.startswith("val_") and k != "val_loss"}}
        if experts.run:
            summary["moe_tokens_per_layer"] = {k: v.tolist() for k, v in experts.run.items()}
            summary["moe_load"] = experts.line()
        if cfg.save_model:
            sd, _ = state_dicts(model if cfg.distributed == "fsdp" else raw, optimizer, d, cfg)
            if d.main:
                from lmlab.checkpoints import native

                final = Transformer(model_cfg)
                final.load_state_dict({k: v.float().cpu() for k, v in sd.items()})
                native.save(final, tokenizer, out / "model")
                summary["model_dir"] = str(out / "model")
        if d.main:
            if cfg.plot:
                png = plot_losses(history, out / "loss.png")
                if png:
                    summary["plot"] = str(png)
                if experts.run:
                    png = plot_expert_load(summary["moe_tokens_per_layer"], out / "expert_load.png",
                                           f"{model_cfg.name or 'MoE'}: tokens per expert over the run")
                    if png:
                        summary["expert_load_plot"] = str(png)
            write_json(out / "summary.json", summary)
        log.close()
        return summary
    finally:
        torch.set_num_threads(threads_before)
        teardown(d)
