"""torchrun support: process-group setup (gloo on CPU, NCCL on GPU) and DDP / FSDP wrapping."""
from __future__ import annotations

import os
from dataclasses import dataclass

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


def setup(device: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE set), else a 1-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, world, local)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, d: Dist, mode: str, device: str, find_unused: bool = False) -> torch.nn.Module:
    """DDP (every process holds the whole model) or FSDP2 (parameters sharded by block)."""
    if not d.enabled:
        return model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for stack in (model.encoder, model.decoder):
            if stack is not None:
                for block in stack.blocks:
                    fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.local_rank] if device.startswith("cuda") else None,
               find_unused_parameters=find_unused)


def all_mean(x: float, d: Dist) -> float:
    if not d.enabled:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / d.world
