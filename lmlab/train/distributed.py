"""DDP / FSDP wrapping of the model under torchrun (joining and leaving the group: lmlab.utils.dist)."""
from __future__ import annotations

import torch

from lmlab.utils.dist import Dist


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
