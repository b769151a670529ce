"""Fill in the middle (Bavarian et al. 2022): with probability `rate` a window is cut into
prefix/middle/suffix and reordered so a causal model learns to write the middle last.

PSM: <PRE> prefix <SUF> suffix <MID> middle;  SPM: <SUF> suffix <PRE> prefix <MID> middle.
The loss is the ordinary next-token loss over the whole rearranged sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmlab.objectives.base import Objective, ObjectiveConfig


@dataclass
class FIMConfig(ObjectiveConfig):
    name: str = "fim"
    rate: float = 0.5  # fraction of windows rearranged
    spm_rate: float = 0.5  # of those, fraction in SPM order (the rest PSM)


class FIM(Objective):
    archs = ("decoder",)
    cfg: FIMConfig

    def __init__(self, cfg, tokenizer, seq_len, sep_id):
        super().__init__(cfg, tokenizer, seq_len, sep_id)
        self.pre, self.suf, self.mid = (self.special(t) for t in ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))

    def rearrange(self, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A window of L tokens → L + 3 tokens in PSM or SPM order (or unchanged, without markers)."""
        if float(torch.rand(1, generator=gen)) >= self.cfg.rate:
            return ids
        a, b = torch.randint(len(ids) + 1, (2,), generator=gen).sort().values.tolist()
        prefix, middle, suffix = ids[:a], ids[a:b], ids[b:]
        P, S, M = (torch.tensor([t]) for t in (self.pre, self.suf, self.mid))
        if float(torch.rand(1, generator=gen)) < self.cfg.spm_rate:
            return torch.cat([S, suffix, P, prefix, M, middle])
        return torch.cat([P, prefix, S, suffix, M, middle])

    def batch(self, stream, n, gen):
        w = stream.windows(n, self.seq_len + 1, gen)
        rows = []
        for row in w:
            out = self.rearrange(row[:-3], gen)
            rows.append(out if len(out) == len(row) else row)
        seq = torch.stack(rows)
        return {"input_ids": seq[:, :-1], "labels": seq[:, 1:]}

    def loss(self, model, batch):
        return model(batch["input_ids"], labels=batch["labels"]), {}  # projection fused with the loss
