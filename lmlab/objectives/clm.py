"""Causal language modelling: predict every next token (GPT)."""
from __future__ import annotations

from dataclasses import dataclass

from lmlab.objectives.base import Objective, ObjectiveConfig


@dataclass
class CLMConfig(ObjectiveConfig):
    name: str = "clm"


class CLM(Objective):
    archs = ("decoder",)

    def batch(self, stream, n, gen):
        w = stream.windows(n, self.seq_len + 1, gen)
        return {"input_ids": w[:, :-1], "labels": w[:, 1:]}

    def loss(self, model, batch):
        return model(batch["input_ids"], labels=batch["labels"]), {}  # projection fused with the loss
