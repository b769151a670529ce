"""T5: encoder-decoder with a shared relative-position bias per stack, RMSNorm, ReLU or gated MLP."""
from __future__ import annotations

from typing import Any

import torch

from lmlab.checkpoints.hf.base import Conf, Entry, Family, Tensors, fused, linear, norm, one, special_to_hf
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError

MLP = {"relu": "relu", "gated-gelu": "geglu", "gated-silu": "swiglu"}


def config_from_hf(c: Conf, names: set[str]) -> ModelConfig:
    mlp = MLP[c.require("feed_forward_proj", tuple(MLP), "relu")]
    tie_flag = c.d.get("tie_word_embeddings", True) is not False
    # transformers 5.x writes scale_decoder_outputs and always ties; 4.x scales exactly when tied.
    scale = bool(c.d.get("scale_decoder_outputs", tie_flag))
    tied = "lm_head.weight" not in names  # (read_fixup drops a stored copy of the shared embedding)
    if scale and not tied:
        raise LmlabError(f"{c.source}: a separate lm_head with scaled decoder outputs is not supported by lmlab")
    pad = c.get("pad_token_id", int, 0)
    return ModelConfig(
        arch="encoder-decoder", family="t5", vocab_size=c.get("vocab_size"), n_layer=c.get("num_layers"),
        n_decoder_layer=c.get("num_decoder_layers", int, None), n_head=c.get("num_heads"),
        d_model=c.get("d_model"), d_ff=c.get("d_ff"), head_dim=c.get("d_kv"),
        max_seq_len=c.get("n_positions", int, 512), pos="relative",
        rel_buckets=c.get("relative_attention_num_buckets", int, 32),
        rel_max_distance=c.get("relative_attention_max_distance", int, 128), norm="rmsnorm",
        norm_eps=c.get("layer_norm_epsilon", float, 1e-6), mlp=mlp, attn_bias=False, out_bias=False,
        attn_scale=1.0, tie_embeddings=tied, tied_logit_scale=tied and scale, pad_id=pad,
        bos_id=c.get("bos_token_id", int, None), eos_id=c.get("eos_token_id", int, 1),
        decoder_start_id=c.get("decoder_start_token_id", int, pad))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    scale = cfg.tie_embeddings and cfg.tied_logit_scale
    proj = {v: k for k, v in MLP.items()}.get(cfg.mlp, cfg.mlp)
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.d_ff, "num_layers": cfg.n_layer,
            "num_decoder_layers": cfg.n_decoder_layer, "num_heads": cfg.n_head, "n_positions": cfg.max_seq_len,
            "relative_attention_num_buckets": cfg.rel_buckets,
            "relative_attention_max_distance": cfg.rel_max_distance, "layer_norm_epsilon": cfg.norm_eps,
            "feed_forward_proj": proj, "is_encoder_decoder": True,
            # 4.x: tie_word_embeddings means "tied and scaled"; 5.x reads the scaling from it as well
            "tie_word_embeddings": scale, "scale_decoder_outputs": scale,
            "decoder_start_token_id": cfg.decoder_start_id, **special_to_hf(cfg)}


def names(cfg: ModelConfig, p: str = "") -> list[Entry]:
    q, kv, ff = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_ff
    out = [one("tok_emb.weight", "shared.weight")]
    if not cfg.tie_embeddings:
        out.append(one("lm_head.weight", "lm_head.weight"))
    for stack, n in (("encoder", cfg.n_layer), ("decoder", cfg.n_decoder_layer)):
        rel = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"  # first layer only
        out.append(one(f"{stack}.rel_bias.weight", rel))
        out.append(one(f"{stack}.norm.weight", f"{stack}.final_layer_norm.weight"))
        for i in range(n):
            o, h = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            out += fused(o + "attn.qkv", [f"{h}0.SelfAttention.{x}" for x in "qkv"], [q, kv, kv], False)
            out += linear(o + "attn.out", h + "0.SelfAttention.o", False) + norm(o + "norm1", h + "0.layer_norm", cfg)
            m = 1
            if stack == "decoder":
                out += linear(o + "cross.q", h + "1.EncDecAttention.q", False)
                out += fused(o + "cross.kv", [h + "1.EncDecAttention.k", h + "1.EncDecAttention.v"], [kv, kv], False)
                out += linear(o + "cross.out", h + "1.EncDecAttention.o", False)
                out += norm(o + "norm_cross", h + "1.layer_norm", cfg)
                m = 2
            f = f"{h}{m}.DenseReluDense."
            if cfg.mlp in ("geglu", "swiglu"):
                out += fused(o + "mlp.gate_up", [f + "wi_0", f + "wi_1"], [ff, ff], False)
            else:
                out += linear(o + "mlp.fc", f + "wi", False)
            out += linear(o + "mlp.proj", f + "wo", False) + norm(o + "norm2", f"{h}{m}.layer_norm", cfg)
    return out


def read_fixup(raw: Tensors, where: dict) -> None:
    """Drop the tied head that exports for transformers 4.x write out (a copy of the shared embedding)."""
    head, shared = raw.get("lm_head.weight"), raw.get("shared.weight")
    if head is not None and shared is not None and head.shape == shared.shape and torch.equal(head, shared):
        del raw["lm_head.weight"]


def export_extra(cfg: ModelConfig) -> list[Entry]:
    if cfg.tie_embeddings and not cfg.tied_logit_scale:
        # a tied head without the d_model**-0.5 scaling: transformers 4.x can only say so with
        # tie_word_embeddings=false and a stored lm_head (5.x ties it again as the values are equal)
        return [one("tok_emb.weight", "lm_head.weight")]
    return []


T5 = Family("t5", config_from_hf, config_to_hf, names, arch="encoder-decoder", prefix="",
            ignore=r"^(encoder|decoder)\.embed_tokens\.weight$|EncDecAttention\.relative_attention_bias",
            read_fixup=read_fixup, export_extra=export_extra)
