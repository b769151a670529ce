"""Several objectives trained together: every step sums their weighted losses, each on its own batch
(mode "sum"), or each micro-batch draws one objective with probability proportional to its weight
(mode "sample")."""
from __future__ import annotations

import torch

from lmlab.objectives.base import Objective


class Mixture:
    def __init__(self, objectives: list[Objective], mode: str = "sum"):
        self.objectives, self.mode = objectives, mode
        self.weights = torch.tensor([o.cfg.weight for o in objectives], dtype=torch.float64)

    def batches(self, stream, n: int, gen: torch.Generator) -> list[tuple[int, dict]]:
        """(objective index, batch) pairs for one micro-step."""
        if self.mode == "sample" and len(self.objectives) > 1:
            i = int(torch.multinomial(self.weights, 1, generator=gen))
            return [(i, self.objectives[i].batch(stream, n, gen))]
        return [(i, o.batch(stream, n, gen)) for i, o in enumerate(self.objectives) if o.cfg.weight > 0]

    def loss(self, model, batches: list[tuple[int, dict]]) -> tuple[torch.Tensor, dict[str, float]]:
        total, metrics = 0.0, {}
        for i, batch in batches:
            obj = self.objectives[i]
            loss, m = obj.loss(model, batch)
            w = 1.0 if self.mode == "sample" else obj.cfg.weight
            total = total + w * loss
            if len(self.objectives) > 1:
                metrics[f"{obj.cfg.name}_loss"] = loss.item()
            metrics.update(m)
        return total, metrics

    def tokens(self, batches: list[tuple[int, dict]]) -> int:
        return sum(self.objectives[i].tokens(b) for i, b in batches)
