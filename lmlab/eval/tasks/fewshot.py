"""Few-shot examples: a seeded choice from the few-shot split that never contains the scored item.

Each scored item gets its own generator seeded by (seed, item index), so the examples an item sees do
not depend on which other items run, on `--limit`, on the batch size or on the number of processes.

Samplers are named (a YAML task's `fewshot_config: {sampler: NAME}`); add one with
`register_sampler(name, fn)` where `fn(candidates, k, rng)` returns k of the candidates.
"""
from __future__ import annotations

import random
from typing import Any, Callable

from lmlab.errors import LmlabError
from lmlab.utils.suggest import unknown

Doc = dict[str, Any]
Sampler = Callable[[list[Doc], int, random.Random], list[Doc]]


def _random(candidates: list[Doc], k: int, rng: random.Random) -> list[Doc]:
    return rng.sample(candidates, min(k, len(candidates)))


def _first_n(candidates: list[Doc], k: int, rng: random.Random) -> list[Doc]:
    return candidates[:k]


# "default" is lm-evaluation-harness's name for its random sampler
SAMPLERS: dict[str, Sampler] = {"random": _random, "default": _random, "first_n": _first_n}


def register_sampler(name: str, fn: Sampler) -> None:
    if name in SAMPLERS:
        raise LmlabError(f"few-shot sampler '{name}' is already registered")
    SAMPLERS[name] = fn


def sampler(name: str, where: str = "") -> Sampler:
    """The sampler called `name`; an unknown name is an error naming the known ones."""
    if name not in SAMPLERS:
        raise LmlabError((f"{where}: " if where else "") + unknown("few-shot sampler", name, SAMPLERS))
    return SAMPLERS[name]


def choose(pool: list[Doc], k: int, *, item: Doc, item_index: int, seed: int = 1234,
           sampler_name: str = "random") -> list[Doc]:
    """k examples from `pool`; no example equal to `item` is ever chosen."""
    if k <= 0:
        return []
    pick = sampler(sampler_name)
    candidates = [d for d in pool if d != item]
    return pick(candidates, k, random.Random(f"{seed}:{item_index}"))
