"""What every objective shares: its config fields, special tokens, and the cross-entropy it scores with.

An objective is a batch builder (`batch(stream, n, gen) -> dict of tensors`, drawing randomness only
from `gen`) plus a loss (`loss(model, batch) -> (scalar, metrics)`). Objectives that need special
tokens ([MASK], sentinels, FIM markers) add them to the tokenizer when it lacks them, so the model's
vocabulary is the tokenizer's size after every objective is built.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmlab.data.tokenizers import add_special
from lmlab.errors import LmlabError
from lmlab.tokenizer import Tokenizer

IGNORE = -100


@dataclass
class ObjectiveConfig:
    name: str = "clm"
    weight: float = 1.0


class Objective:
    archs: tuple[str, ...] = ("decoder",)

    def __init__(self, cfg: ObjectiveConfig, tokenizer: Tokenizer, seq_len: int, sep_id: int):
        self.cfg, self.tok, self.seq_len, self.sep_id = cfg, tokenizer, seq_len, sep_id

    def special(self, token: str) -> int:
        return add_special(self.tok, token)

    def check_model(self, model) -> None:
        if model.cfg.arch not in self.archs:
            raise LmlabError(f"objective '{self.cfg.name}' needs a model with arch "
                             f"{' or '.join(self.archs)}, got arch={model.cfg.arch}")

    def finalize(self) -> None:
        """Called once every objective has added its special tokens (the vocabulary is final)."""

    def batch(self, stream, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    @staticmethod
    def tokens(batch: dict[str, torch.Tensor]) -> int:
        """Tokens the model processes for this batch (for tokens/s)."""
        return sum(batch[k].numel() for k in ("input_ids", "encoder_input_ids") if k in batch)


def special_ids(tok: Tokenizer) -> list[int]:
    """Ids of every special (added) token of a tokenizer."""
    return sorted(i for i, t in tok.tok.get_added_tokens_decoder().items() if t.special)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    keep = labels != IGNORE
    if not keep.any():
        return 0.0
    return (logits.argmax(-1)[keep] == labels[keep]).float().mean().item()
