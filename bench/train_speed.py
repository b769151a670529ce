"""Training throughput: lmlab's Transformer vs HF transformers' GPT2LMHeadModel of the same shape.

Both train with the same loop (forward, cross-entropy, backward, AdamW step) on the same batches, in
the same dtype, steps interleaved so machine load affects both alike. Prints tokens/s of each and
the ratio lmlab / HF (goal ≥ 1.2).

    python bench/train_speed.py                       # CPU-sized GPT-2 shape
    python bench/train_speed.py --layers 12 --width 768 --heads 12 --seq 1024 --batch 8   # GPT-2 small (GPU)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def lmlab_model(a, vocab):
    from lmlab.config import preset
    from lmlab.model import Transformer

    return Transformer(preset("gpt2", n_layer=a.layers, n_head=a.heads, d_model=a.width, vocab_size=vocab,
                              max_seq_len=a.seq, dropout=0.0))


def hf_model(a, vocab):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=a.seq, n_embd=a.width, n_layer=a.layers, n_head=a.heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg)


def make_optimizer(model, device: str, kind: str) -> torch.optim.Optimizer:
    """The same AdamW for every model: `fused` (one kernel per step; CPU and CUDA), `foreach` or `loop`."""
    opts = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **opts)


def make_step(model, kind: str, device: str, dtype: torch.dtype, optim: str):
    """One training step. kind: 'hf' (logits, then cross-entropy over them: what GPT2LMHeadModel's own
    loss does, minus its label-shift copy), 'lmlab' (lmlab's training path: model(x, labels=y), the
    projection fused with the loss) or 'lmlab-logits' (lmlab's logits + the same cross-entropy as HF)."""
    opt = make_optimizer(model, device, optim)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    def step(x, y):
        with autocast:
            if kind == "lmlab":
                loss = model(x, labels=y)
            else:
                logits = model(input_ids=x).logits if kind == "hf" else model(x)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--optim", default="fused", choices=["fused", "foreach", "loop"],
                   help="AdamW implementation, the same for both (default fused: fastest on CPU and GPU)")
    p.add_argument("--plain-loss", action="store_true",
                   help="also time lmlab's model through logits + F.cross_entropy (an extra line)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(a.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if a.device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    torch.manual_seed(0)
    lm = lmlab_model(a, a.vocab).to(a.device)
    models = {"lmlab": lm, "hf": hf_model(a, a.vocab).to(a.device)}
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    assert n["lmlab"] == n["hf"], f"shapes differ: {n}"
    if a.plain_loss:  # an extra line: lmlab's model with the plain logits + cross-entropy route
        models["lmlab-logits"] = lmlab_model(a, a.vocab).to(a.device)
    steps = {}
    for k, m in models.items():
        m.train()
        steps[k] = make_step(torch.compile(m) if a.compile else m, k, a.device, dtype, a.optim)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(a.vocab, (a.warmup + a.steps, a.batch, a.seq + 1), generator=gen).to(a.device)
    batches = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]  # built before timing
    times: dict[str, list[float]] = {k: [] for k in models}
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    order = list(models)
    for i in range(a.warmup + a.steps):
        x, y = batches[i]
        for k in order[i % len(order):] + order[:i % len(order)]:  # rotate who goes first
            sync()
            t = time.perf_counter()
            steps[k](x, y)
            sync()
            if i >= a.warmup:
                times[k].append(time.perf_counter() - t)
    tokens = a.batch * a.seq
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"shape: {a.layers} layers, {a.heads} heads, width {a.width}, seq {a.seq}, batch {a.batch}, vocab {a.vocab} "
          f"({n['lmlab'] / 1e6:.1f}M params); device {a.device}, dtype {str(dtype).replace('torch.', '')}, "
          f"threads {torch.get_num_threads()}, compile {a.compile}; median of {a.steps} steps")
    print(f"optimizer: torch.optim.AdamW({a.optim}) for both; both eager" + (" + torch.compile" if a.compile else ""))
    print(f"lmlab           {tps['lmlab']:12,.0f} tokens/s   (model(x, labels=y): projection fused with the loss)")
    if "lmlab-logits" in tps:
        print(f"lmlab, logits   {tps['lmlab-logits']:12,.0f} tokens/s   (extra line: logits + F.cross_entropy, "
              f"ratio {tps['lmlab-logits'] / tps['hf']:.2f})")
    print(f"HF transformers {tps['hf']:12,.0f} tokens/s   (GPT2LMHeadModel logits + F.cross_entropy)")
    print(f"ratio lmlab/HF  {tps['lmlab'] / tps['hf']:12.2f}  (goal >= 1.2)")


if __name__ == "__main__":
    main()
