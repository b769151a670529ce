"""Mixtral: Mistral's attention with a routed mixture of experts on every layer (top-k renormalised)."""
from __future__ import annotations

from typing import Any

from lmlab.checkpoints.hf import llama
from lmlab.checkpoints.hf.base import Conf, Entry, Family
from lmlab.checkpoints.hf.experts import moe_entries
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError


def config_from_hf(c: Conf, names: set[str]) -> ModelConfig:
    ff = c.get("intermediate_size")
    return llama.config_from_hf(c, names, family="mixtral", moe_experts=c.get("num_local_experts"),
                                moe_top_k=c.get("num_experts_per_tok"), moe_d_ff=ff, moe_renormalize=True,
                                moe_aux_coef=c.get("router_aux_loss_coef", float, 0.001))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    why = [f"{k}={v!r}" for k, v, ok in (
        ("moe_experts", cfg.moe_experts, cfg.moe_experts > 0), ("moe_layers", cfg.moe_layers, cfg.moe_layers is None),
        ("moe_shared_d_ff", cfg.moe_shared_d_ff, not cfg.moe_shared_d_ff),
        ("moe_renormalize", cfg.moe_renormalize, cfg.moe_renormalize),
        ("moe_d_ff", cfg.moe_d_ff, cfg.moe_d_ff == cfg.d_ff)) if not ok]
    if why:
        raise LmlabError(f"mixtral has a routed MoE of d_ff-sized experts on every layer, renormalised, "
                         f"no shared expert; this config has {', '.join(why)}")
    d = llama.config_to_hf(cfg, family="mixtral")
    d.update(num_local_experts=cfg.moe_experts, num_experts_per_tok=cfg.moe_top_k,
             router_aux_loss_coef=cfg.moe_aux_coef, output_router_logits=False)
    return d


def names(cfg: ModelConfig, p: str = "model.") -> list[Entry]:
    return llama.names(cfg, p, mlp=lambda cfg, o, h, i: moe_entries(cfg, o, h, "mixtral"))


MIXTRAL = Family("mixtral", config_from_hf, config_to_hf, names, arch="decoder", prefix="model.",
                 ignore=r"rotary_emb\.inv_freq$")
