"""GPT-2: learned positions, LayerNorm, GELU; HF's Conv1D stores every linear weight transposed (in×out)."""
from __future__ import annotations

from typing import Any

from lmlab.checkpoints.hf.base import Conf, Entry, Family, norm, one, special_ids, special_to_hf
from lmlab.config import ModelConfig

ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def config_from_hf(c: Conf, names: set[str]) -> ModelConfig:
    act = c.require("activation_function", tuple(ACT), "gelu_new")
    c.require("scale_attn_weights", (True,), True)
    c.require("scale_attn_by_inverse_layer_idx", (False,), False)
    c.require("add_cross_attention", (False,), False)
    d_model = c.get("n_embd")
    return ModelConfig(
        arch="decoder", family="gpt2", vocab_size=c.get("vocab_size"), n_layer=c.get("n_layer"),
        n_head=c.get("n_head"), d_model=d_model, d_ff=c.get("n_inner", int, 4 * d_model),
        max_seq_len=c.get("n_positions", int, 1024), pos="learned", norm="layernorm",
        norm_eps=c.get("layer_norm_epsilon", float, 1e-5), mlp=ACT[act], attn_bias=True, out_bias=True,
        tie_embeddings=bool(c.d.get("tie_word_embeddings", True)), **special_ids(c))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}.get(cfg.mlp, cfg.mlp)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "activation_function": act,
            "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": cfg.tie_embeddings, **special_to_hf(cfg)}


def names(cfg: ModelConfig, p: str = "transformer.") -> list[Entry]:
    out = [one("tok_emb.weight", p + "wte.weight"), one("pos_emb.weight", p + "wpe.weight"),
           *norm("decoder.norm", p + "ln_f", cfg)]
    if not cfg.tie_embeddings:
        out.append(one("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.n_layer):
        o, h = f"decoder.blocks.{i}.", f"{p}h.{i}."
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                             ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out += [one(o + ours + ".weight", h + theirs + ".weight", transpose=True),
                    one(o + ours + ".bias", h + theirs + ".bias")]
        out += norm(o + "norm1", h + "ln_1", cfg) + norm(o + "norm2", h + "ln_2", cfg)
    return out


GPT2 = Family("gpt2", config_from_hf, config_to_hf, names, arch="decoder", prefix="transformer.",
              ignore=r"\.attn\.(masked_)?bias$")
