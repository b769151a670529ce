"""Llama (SmolLM, TinyLlama, ...), Mistral and Qwen2: RoPE, RMSNorm, SwiGLU; q/k/v and gate/up fused in
lmlab. Mistral is Llama without biases plus a sliding window on every layer; Qwen2's window is per layer
(lmlab.checkpoints.hf.window). The attention/norm part of the map is shared with the MoE families."""
from __future__ import annotations

from typing import Any

from lmlab.checkpoints.hf import window
from lmlab.checkpoints.hf.base import Conf, Entry, Family, fused, linear, norm, one, special_ids, special_to_hf
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError


def rope_theta(c: Conf) -> float:
    rope = c.d.get("rope_parameters") or c.d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise LmlabError(f"{c.source}: rope_parameters should be an object, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise LmlabError(f"{c.source}: rope type {kind!r} is not supported by lmlab (supported: 'default')")
    theta = rope.get("rope_theta", c.d.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise LmlabError(f"{c.source}: rope_theta: {theta!r} is not a number (allowed: a finite number > 0)")
    return float(theta)


def config_from_hf(c: Conf, names: set[str], qwen2: bool = False, family: str = "", **extra) -> ModelConfig:
    """A Llama-like config.json → ModelConfig (extra: fields the caller's family adds, e.g. its MoE)."""
    c.require("hidden_act", ("silu",), "silu")
    n_layer = c.get("num_hidden_layers")
    if qwen2:
        attn_bias, out_bias = True, False
        extra = {**window.qwen2(c, n_layer), **extra}
    elif family in ("mistral", "mixtral"):
        attn_bias = out_bias = False
        extra = {**window.every_layer(c), **extra}
    else:
        attn_bias, mlp_bias = bool(c.d.get("attention_bias", False)), bool(c.d.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise LmlabError(f"{c.source}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
                             "by lmlab (its out_bias covers both the attention output and the MLP)")
        out_bias = attn_bias
    n_head = c.get("num_attention_heads")
    d_model = c.get("hidden_size")
    return ModelConfig(
        arch="decoder", family=family or ("qwen2" if qwen2 else "llama"), vocab_size=c.get("vocab_size"),
        n_layer=n_layer, n_head=n_head, n_kv_head=c.get("num_key_value_heads", int, n_head),
        d_model=d_model, d_ff=c.get("intermediate_size"), head_dim=c.get("head_dim", int, None),
        max_seq_len=c.get("max_position_embeddings", int, 2048), pos="rope", rope_theta=rope_theta(c),
        norm="rmsnorm", norm_eps=c.get("rms_norm_eps", float, 1e-6), mlp="swiglu", attn_bias=attn_bias,
        out_bias=out_bias, tie_embeddings=bool(c.d.get("tie_word_embeddings", False)), **special_ids(c), **extra)


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def config_to_hf(cfg: ModelConfig, qwen2: bool = False, family: str = "") -> dict[str, Any]:
    family = family or ("qwen2" if qwen2 else "llama")
    if cfg.moe_experts and family not in ("mixtral", "qwen2_moe"):
        raise LmlabError(f"moe_experts={cfg.moe_experts}: {family} has no mixture of experts")
    if cfg.attn_window is not None and family == "llama":
        raise LmlabError(f"attn_window={cfg.attn_window}: llama has no sliding window (mistral or qwen2 do)")
    d = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if qwen2:
        d.update(window.qwen2_to_hf(cfg))
    elif family in ("mistral", "mixtral"):
        if cfg.attn_bias or cfg.out_bias:
            raise LmlabError(f"{family} has no biases (attn_bias={cfg.attn_bias}, out_bias={cfg.out_bias})")
        d.update(window.every_layer_to_hf(cfg, family))
    else:
        d.update(attention_bias=cfg.attn_bias, mlp_bias=cfg.out_bias)
    return {**d, **special_to_hf(cfg)}


def dense_mlp(cfg: ModelConfig, o: str, h: str, layer: int = 0) -> list[Entry]:
    ff = cfg.d_ff
    out = fused(o + "mlp.gate_up", [h + "mlp.gate_proj", h + "mlp.up_proj"], [ff, ff], cfg.out_bias)
    return out + linear(o + "mlp.proj", h + "mlp.down_proj", cfg.out_bias)


def names(cfg: ModelConfig, p: str = "model.", mlp=dense_mlp) -> list[Entry]:
    """The whole map; mlp(cfg, lmlab layer prefix, HF layer prefix, layer) gives each layer's feed-forward."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = [one("tok_emb.weight", p + "embed_tokens.weight"), one("decoder.norm.weight", p + "norm.weight")]
    if not cfg.tie_embeddings:
        out.append(one("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.n_layer):
        o, h = f"decoder.blocks.{i}.", f"{p}layers.{i}."
        out += fused(o + "attn.qkv", [h + f"self_attn.{x}_proj" for x in "qkv"], [q, kv, kv], cfg.attn_bias)
        out += linear(o + "attn.out", h + "self_attn.o_proj", cfg.out_bias)
        out += norm(o + "norm1", h + "input_layernorm", cfg) + norm(o + "norm2", h + "post_attention_layernorm", cfg)
        out += mlp(cfg, o, h, i)
    return out


LLAMA = Family("llama", config_from_hf, config_to_hf, names, arch="decoder", prefix="model.",
               ignore=r"rotary_emb\.inv_freq$")
MISTRAL = Family("mistral", lambda c, n: config_from_hf(c, n, family="mistral"),
                 lambda cfg: config_to_hf(cfg, family="mistral"), names, arch="decoder", prefix="model.",
                 ignore=r"rotary_emb\.inv_freq$")
QWEN2 = Family("qwen2", lambda c, n: config_from_hf(c, n, qwen2=True), lambda cfg: config_to_hf(cfg, qwen2=True),
               names, arch="decoder", prefix="model.", ignore=r"rotary_emb\.inv_freq$")
