"""Norms and feed-forward blocks. The feed-forward block comes from a small registry keyed by cfg.mlp;
the layers cfg.moe_layers names (all, when moe_experts > 0 and moe_layers is None) take the "moe" entry."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model.moe import MoE, MoEConfig


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


def moe_config(cfg: ModelConfig) -> MoEConfig:
    """The MoE block's own config from the model config's moe_* fields."""
    return MoEConfig(n_experts=cfg.moe_experts, top_k=cfg.moe_top_k, d_model=cfg.d_model,
                     d_ff=cfg.moe_d_ff or cfg.d_ff, renormalize=cfg.moe_renormalize,
                     shared_expert_d_ff=cfg.moe_shared_d_ff, activation=cfg.mlp, aux_loss_coef=cfg.moe_aux_coef,
                     z_loss_coef=cfg.moe_z_coef, global_balance=cfg.moe_global_balance)


# feed-forward kind (cfg.mlp, or "moe" for the layers cfg.moe_layers names) → module (takes the ModelConfig)
FEED_FORWARD: dict[str, Callable[[ModelConfig], nn.Module]] = {kind: MLP for kind in ACTIVATIONS}
FEED_FORWARD["moe"] = lambda cfg: MoE(moe_config(cfg))


def make_feed_forward(cfg: ModelConfig, layer: int = 0) -> nn.Module:
    """Layer `layer`'s feed-forward block: a mixture of experts where the config says so, else cfg.mlp's."""
    kind = "moe" if cfg.is_moe_layer(layer) else cfg.mlp
    try:
        return FEED_FORWARD[kind](cfg)
    except KeyError:
        raise LmlabError(f"model config: mlp={cfg.mlp!r} is not a known feed-forward kind "
                         f"(known: {', '.join(FEED_FORWARD)})") from None


def residual_outputs(ff: nn.Module) -> list[torch.Tensor]:
    """The weights that write a feed-forward block's output into the residual stream (GPT-2's scaled init)."""
    if isinstance(ff, MoE):
        return [ff.w_out] + ([ff.shared.w_out.weight] if ff.shared is not None else [])
    return [ff.proj.weight]
