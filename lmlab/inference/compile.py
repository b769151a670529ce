"""A torch.compile'd decoding step (gpt-fast style): static preallocated cache written in place, the
attention mask built from the cache's validity (lmlab.model.masks.decode_step), and no shape that changes
from step to step, so one graph serves every step and every cache length. Inductor fuses norms, rotary,
residuals and activations; the matrix-vector products stay the fastest kernels PyTorch has.

The step is an object the caller holds (a Runner keeps it); nothing is attached to the model.
"""
from __future__ import annotations

import torch

from lmlab.model import masks
from lmlab.model.kv_cache import KVCache, StepView
from lmlab.utils.device import notice


def _step_graph(model, ids, allowed, slot, positions, ks, vs):
    """One token per row through a decoder-only model over its whole static cache: the compiled function."""
    h = model.hidden_states(ids, attn_mask=allowed, cache=StepView(ks, vs, slot, positions))
    return model.logits(h)


def _inductor_keeping_mv(gm, example_inputs):
    """Inductor, except that matrix-vector products stay calls to ATen's kernel: by default inductor turns
    `mv` into its own multiply-and-sum loop, which on CPU reads bfloat16 weights at about half the speed
    (measured for SmolLM2 bf16 decoding: 43 tok/s against 54)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    keep = (torch.ops.aten.mv.default, torch.ops.aten.addmv.default)
    table = {op: fn for op, fn in select_decomp_table().items() if op not in keep}
    return compile_fx(gm, example_inputs, decompositions=table)


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:120] if text else ''}"


class DecodeStep:
    """Logits B×1×V for one new token per row on top of a KVCache. Falls back to the eager forward (for
    good, with a notice) the first time the compiler cannot handle a call."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.fn = torch.compile(_step_graph, fullgraph=True, backend=_inductor_keeping_mv)
        self.failed = False

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        return model.cfg.arch == "decoder" and model.cfg.pos != "relative"

    @torch.inference_mode()  # one graph, whoever calls (decoding never needs gradients)
    def __call__(self, ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        start, positions = cache.append(1, attention_mask)
        allowed = masks.decode_step(cache.valid, start)
        slot = torch.full((1,), start, dtype=torch.long, device=ids.device)
        for t in (allowed, *cache.k, *cache.v):  # one graph for every cache length
            torch._dynamo.maybe_mark_dynamic(t, t.dim() - 2 if t is not allowed else 3)
        try:
            return self.fn(self.model, ids, allowed, slot, positions, cache.k, cache.v)
        except Exception as e:  # a shape the compiler could not handle: undo the claim, decode eagerly
            cache.truncate(start)
            notice(f"compiled decoding step failed ({first_line(e)}); decoding eagerly")
            self.failed = True
            return self.model(ids, cache=cache, attention_mask=attention_mask)


@torch.inference_mode()
def _trial(step: DecodeStep, model: torch.nn.Module, steps: int = 2) -> None:
    """A short prompt and a few compiled steps: compiles the graph and checks it runs."""
    device = model.device
    cache = model.make_cache(1, steps + 2)
    model(torch.zeros(1, 2, dtype=torch.long, device=device), cache=cache, last_logits_only=True)
    for _ in range(steps):
        step(torch.zeros(1, 1, dtype=torch.long, device=device), cache)
    if step.failed:
        raise RuntimeError("the trial step fell back to eager decoding")


def compile_step(model: torch.nn.Module) -> DecodeStep | None:
    """A compiled decoding step for `model`, or None (with a notice) when the compiler is unavailable, the
    model is not covered (decoder-only without relative position bias), or a trial step fails. Prompts and
    scoring stay eager: their matrix products already run at full speed."""
    if not hasattr(torch, "compile"):
        notice("torch.compile is not available in this PyTorch; running eagerly")
        return None
    if not DecodeStep.supports(model):
        notice("compiled decoding covers decoder-only models without relative position bias; running eagerly")
        return None
    try:
        step = DecodeStep(model)
        _trial(step, model)
        return step
    except Exception as e:  # the compiler needs a C++ toolchain (CPU) or Triton (GPU)
        notice(f"torch.compile failed ({first_line(e)}); running eagerly")
        torch._dynamo.reset()
        return None
