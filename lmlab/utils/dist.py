"""torchrun process groups: joining (gloo on CPU, NCCL on GPU), rank/world, gathering, leaving.
DDP/FSDP wrapping of a model stays with the trainer (lmlab.train.distributed)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Dist:
    """This process's place in an already-joined group (a 1-process Dist when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def setup(backend: str | None = None, device: str = "cpu") -> Dist:
    """Join the process group when launched by torchrun, else a 1-process Dist. `backend` defaults to
    NCCL for a CUDA device and gloo otherwise."""
    if not launched():
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if str(device).startswith("cuda") else "gloo"))
    return current()


def teardown(d: Dist) -> None:
    """Wait for every process, then leave the group (no gloo thread may outlive the interpreter: it
    aborts the process at exit)."""
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def group(backend: str | None = None, device: str = "cpu") -> Iterator[Dist]:
    """`with group() as d:` joins under torchrun and always leaves, together, on the way out."""
    owned = launched() and not dist.is_initialized()
    d = setup(backend, device)
    try:
        yield d
    finally:
        if owned:
            teardown(d)


def gather_dict(local: dict[Any, Any]) -> dict[Any, Any]:
    """Merge every process's dict (keys disjoint) on every process."""
    d = current()
    if not d.enabled:
        return local
    parts: list[Any] = [None] * d.world
    dist.all_gather_object(parts, local)
    merged: dict[Any, Any] = {}
    for part in parts:
        merged.update(part)
    return merged


def all_mean(x: float) -> float:
    d = current()
    if not d.enabled:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / d.world
