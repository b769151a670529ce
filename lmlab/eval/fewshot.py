"""Few-shot examples: a fixed-seed sample from the few-shot split that never contains the scored item.

Each scored item gets its own generator seeded by (seed, item index), so the examples an item sees do
not depend on which other items run, on `--limit`, on the batch size or on the number of processes.
"""
from __future__ import annotations

import random
from typing import Any


def choose(pool: list[dict[str, Any]], k: int, *, item: dict[str, Any], item_index: int, seed: int = 1234,
           sampler: str = "random") -> list[dict[str, Any]]:
    """k examples from `pool`; any example equal to `item` is never chosen."""
    if k <= 0:
        return []
    candidates = [d for d in pool if d != item]
    if sampler == "first_n":
        return candidates[:k]
    rng = random.Random(f"{seed}:{item_index}")
    return rng.sample(candidates, min(k, len(candidates)))
