"""Norms and feed-forward blocks. The feed-forward block comes from a small registry keyed by cfg.mlp, so
another kind (a mixture of experts, say) is one more entry: `FEED_FORWARD["moe"] = MoE`."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused kernel
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.norm_bias)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
    "swiglu": F.silu, "geglu": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    """Two-layer feed-forward block; gated (SwiGLU/GeGLU) kinds fuse the gate and up projections."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp in ("swiglu", "geglu")
        self.act = ACTIVATIONS[cfg.mlp]
        if self.gated:
            self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=cfg.out_bias)
        else:
            self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.out_bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.out_bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(self.fc(x))
        return self.proj(self.dropout(h) if self.training else h)


# cfg.mlp kind → feed-forward module class (constructor takes the ModelConfig)
FEED_FORWARD: dict[str, Callable[[ModelConfig], nn.Module]] = {kind: MLP for kind in ACTIVATIONS}


def make_feed_forward(cfg: ModelConfig) -> nn.Module:
    try:
        return FEED_FORWARD[cfg.mlp](cfg)
    except KeyError:
        raise LmlabError(f"model config: mlp={cfg.mlp!r} is not a known feed-forward kind "
                         f"(known: {', '.join(FEED_FORWARD)})") from None
