"""Freezing and unfreezing parameters by name pattern.

A pattern (a glob, or a regular expression after `re:`, matched against the whole name; see
lmlab.adapters.patterns) selects a parameter when it matches the parameter's name or the name of any
module holding it: `tok_emb` (the embedding), `decoder.blocks.[0-3]` (the first four blocks, whole),
`*.norm*` (every norm), `re:decoder\\.blocks\\.([0-9]|1[01])\\..*` (the first twelve blocks). A tied
weight is one parameter: freezing `lm_head` also freezes a tied `tok_emb`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch.nn as nn

from lmlab.adapters.patterns import check_patterns, listing, matches
from lmlab.errors import LmlabError


@dataclass(frozen=True)
class ParamCounts:
    """Numbers of parameter elements (a tied weight counted once)."""

    frozen: int
    trainable: int

    @property
    def total(self) -> int:
        return self.frozen + self.trainable


def param_counts(model: nn.Module) -> ParamCounts:
    frozen = trainable = 0
    for p in model.parameters():  # each shared parameter once
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return ParamCounts(frozen, trainable)


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def select_params(model: nn.Module, patterns: str | Iterable[str], what: str = "freeze") -> list[nn.Parameter]:
    """The parameters the patterns select (each once; no pattern, none); a pattern selecting none is an LmlabError
    listing the parameter names that exist (layer numbers folded into '*')."""
    patterns = check_patterns(patterns, what, allow_empty=True)
    named = list(model.named_parameters(remove_duplicate=False))
    chosen: dict[int, nn.Parameter] = {}
    for pattern in patterns:
        hits = [p for name, p in named if any(matches(pattern, n) for n in _prefixes(name))]
        if not hits:
            raise LmlabError(f"{what} pattern '{pattern}' matches no parameter; parameters: "
                             f"{listing(name for name, _ in named)}")
        chosen.update((id(p), p) for p in hits)
    return list(chosen.values())


def freeze(model: nn.Module, patterns: str | Iterable[str]) -> ParamCounts:
    """Stop gradients for the selected parameters; returns the model's counts afterwards."""
    for p in select_params(model, patterns, "freeze"):
        p.requires_grad_(False)
    return param_counts(model)


def unfreeze(model: nn.Module, patterns: str | Iterable[str]) -> ParamCounts:
    """Make the selected parameters trainable again (e.g. a task head next to LoRA adapters)."""
    for p in select_params(model, patterns, "unfreeze"):
        p.requires_grad_(True)
    return param_counts(model)


def first_blocks(n: int, stack: str = "decoder") -> list[str]:
    """Patterns for the first n blocks of a stack ('decoder.blocks.0', …), for freeze()."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise LmlabError(f"first_blocks: n must be a non-negative integer, got {n!r}")
    return [f"{stack}.blocks.{i}" for i in range(n)]
