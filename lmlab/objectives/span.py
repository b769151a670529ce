"""Span corruption (T5): replace random spans with sentinels; the decoder writes the spans back.

A window of `seq_len` tokens gets round(seq_len·noise_density) noise tokens in
round(noise/mean_span_length) spans, alternating with kept spans (kept first, as T5 does).
Encoder input: kept₀ <s0> kept₁ <s1> ... eos; target: <s0> noise₀ <s1> noise₁ ... eos.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmlab.errors import LmlabError
from lmlab.objectives.base import Objective, ObjectiveConfig, accuracy, cross_entropy


@dataclass
class SpanConfig(ObjectiveConfig):
    name: str = "span"
    noise_density: float = 0.15
    mean_span_length: float = 3.0


def split_lengths(total: int, parts: int, gen: torch.Generator) -> list[int]:
    """`total` items cut into `parts` non-empty runs at uniformly random places."""
    cuts = (torch.randperm(total - 1, generator=gen)[:parts - 1] + 1).sort().values.tolist()
    edges = [0, *cuts, total]
    return [b - a for a, b in zip(edges, edges[1:])]


def noise_layout(length: int, density: float, mean_span: float) -> tuple[int, int]:
    noise = min(max(1, round(length * density)), length - 1)
    spans = min(max(1, round(noise / mean_span)), noise, length - noise)
    return noise, spans


class SpanCorruption(Objective):
    archs = ("encoder-decoder",)
    cfg: SpanConfig

    def __init__(self, cfg, tokenizer, seq_len, sep_id):
        super().__init__(cfg, tokenizer, seq_len, sep_id)
        if seq_len < 2:
            raise LmlabError(f"span: seq_len must be at least 2, got {seq_len}")
        self.noise, self.spans = noise_layout(seq_len, cfg.noise_density, cfg.mean_span_length)
        self.pad_id = self.special("<pad>")
        self.sentinels = [self.special(f"<extra_id_{i}>") for i in range(self.spans)]
        self.eos_id = sep_id

    def corrupt(self, ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One window → (encoder input, target)."""
        noise_runs = split_lengths(self.noise, self.spans, gen)
        keep_runs = split_lengths(len(ids) - self.noise, self.spans, gen)
        src, tgt, pos = [], [], 0
        for i, (k, m) in enumerate(zip(keep_runs, noise_runs)):
            src += [ids[pos:pos + k], torch.tensor([self.sentinels[i]])]
            tgt += [torch.tensor([self.sentinels[i]]), ids[pos + k:pos + k + m]]
            pos += k + m
        eos = torch.tensor([self.eos_id])
        return torch.cat(src + [eos]), torch.cat(tgt + [eos])

    def batch(self, stream, n, gen):
        windows = stream.windows(n, self.seq_len, gen)
        pairs = [self.corrupt(w, gen) for w in windows]
        src = torch.stack([s for s, _ in pairs])  # every row has the same layout sizes, so no padding
        tgt = torch.stack([t for _, t in pairs])
        dec_in = torch.cat([torch.full((n, 1), self.pad_id), tgt[:, :-1]], 1)
        return {"encoder_input_ids": src, "input_ids": dec_in, "labels": tgt}

    def loss(self, model, batch):
        logits = model(batch["input_ids"], encoder_input_ids=batch["encoder_input_ids"])
        return cross_entropy(logits, batch["labels"]), {"span_acc": accuracy(logits, batch["labels"])}
