"""Prefix language modelling: attention is bidirectional over a random prefix and causal after it;
the loss covers only the tokens after the prefix."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmlab.objectives.base import IGNORE, Objective, ObjectiveConfig


@dataclass
class PrefixLMConfig(ObjectiveConfig):
    name: str = "prefix"
    min_prefix: int = 1


def prefix_mask(prefix_len: torch.Tensor, T: int) -> torch.Tensor:
    """B×T×T bool, True = query may attend key: every query sees the prefix, and keys up to itself."""
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    return (k <= q)[None] | (k[None] < prefix_len[:, None, None])


class PrefixLM(Objective):
    archs = ("decoder",)
    cfg: PrefixLMConfig

    def batch(self, stream, n, gen):
        T = self.seq_len
        w = stream.windows(n, T + 1, gen)
        lo = max(1, min(self.cfg.min_prefix, T - 1))
        p = torch.randint(lo, T, (n,), generator=gen)  # prefix length in input positions
        labels = w[:, 1:].clone()
        labels[torch.arange(T)[None, :] < (p[:, None] - 1)] = IGNORE  # inside the prefix the next token is visible
        return {"input_ids": w[:, :-1], "labels": labels, "attn_mask": prefix_mask(p, T), "prefix_len": p}

    def loss(self, model, batch):
        return model(batch["input_ids"], attn_mask=batch["attn_mask"], labels=batch["labels"]), {}
