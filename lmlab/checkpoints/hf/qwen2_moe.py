"""Qwen2-MoE: Qwen2's attention; routed experts (top-k, renormalised only with norm_topk_prob) plus a
sigmoid-gated shared expert on the layers decoder_sparse_step and mlp_only_layers pick, dense MLPs of
intermediate_size elsewhere."""
from __future__ import annotations

from typing import Any

from lmlab.checkpoints.hf import llama
from lmlab.checkpoints.hf.base import Conf, Entry, Family
from lmlab.checkpoints.hf.experts import moe_entries
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError


def sparse_layers(c: Conf, n_layer: int) -> list[int] | None:
    """HF's rule: layer i is MoE unless listed in mlp_only_layers, and when (i + 1) % decoder_sparse_step == 0."""
    step, only = c.get("decoder_sparse_step", int, 1), c.d.get("mlp_only_layers") or []
    if not isinstance(only, list) or step < 1:
        raise LmlabError(f"{c.source}: decoder_sparse_step={step!r} / mlp_only_layers={only!r} not understood")
    layers = [i for i in range(n_layer) if i not in only and (i + 1) % step == 0]
    return None if len(layers) == n_layer else layers


def config_from_hf(c: Conf, names: set[str]) -> ModelConfig:
    if c.d.get("use_sliding_window"):
        raise LmlabError(f"{c.source}: use_sliding_window=true is not supported for qwen2_moe by lmlab")
    shared = c.get("shared_expert_intermediate_size")
    if shared < 1:
        raise LmlabError(f"{c.source}: shared_expert_intermediate_size={shared} (lmlab needs the shared expert)")
    cfg = llama.config_from_hf(
        c, names, qwen2=True, moe_experts=c.get("num_experts"), moe_top_k=c.get("num_experts_per_tok"),
        moe_d_ff=c.get("moe_intermediate_size"), moe_shared_d_ff=shared,
        moe_renormalize=bool(c.d.get("norm_topk_prob", False)),
        moe_layers=sparse_layers(c, c.get("num_hidden_layers")),
        moe_aux_coef=c.get("router_aux_loss_coef", float, 0.001))
    cfg.family = "qwen2_moe"
    return cfg


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.moe_experts or not cfg.moe_shared_d_ff:
        raise LmlabError(f"qwen2_moe needs routed experts and a shared expert; this config has "
                         f"moe_experts={cfg.moe_experts}, moe_shared_d_ff={cfg.moe_shared_d_ff}")
    if cfg.attn_window is not None:
        raise LmlabError(f"attn_window={cfg.attn_window}: lmlab writes qwen2_moe without a sliding window")
    d = llama.config_to_hf(cfg, qwen2=True, family="qwen2_moe")
    moe = range(cfg.n_layer) if cfg.moe_layers is None else cfg.moe_layers
    d.update(num_experts=cfg.moe_experts, num_experts_per_tok=cfg.moe_top_k, moe_intermediate_size=cfg.moe_d_ff,
             shared_expert_intermediate_size=cfg.moe_shared_d_ff, norm_topk_prob=cfg.moe_renormalize,
             decoder_sparse_step=1, mlp_only_layers=[i for i in range(cfg.n_layer) if i not in moe],
             router_aux_loss_coef=cfg.moe_aux_coef, output_router_logits=False)
    return d


def names(cfg: ModelConfig, p: str = "model.") -> list[Entry]:
    def mlp(cfg: ModelConfig, o: str, h: str, i: int) -> list[Entry]:
        return moe_entries(cfg, o, h, "qwen2_moe") if cfg.is_moe_layer(i) else llama.dense_mlp(cfg, o, h)

    return llama.names(cfg, p, mlp=mlp)


QWEN2_MOE = Family("qwen2_moe", config_from_hf, config_to_hf, names, arch="decoder", prefix="model.",
                   ignore=r"rotary_emb\.inv_freq$")
