"""BERT: post-norm encoder with segment embeddings; optional MLM transform head and pooler + NSP classifier."""
from __future__ import annotations

from typing import Any

from lmlab.checkpoints.hf.base import (Conf, Entry, Family, Tensors, fused, linear, norm, one, special_ids,
                                       special_to_hf)
from lmlab.config import ModelConfig

ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def config_from_hf(c: Conf, names: set[str]) -> ModelConfig:
    act = c.require("hidden_act", tuple(ACT), "gelu")
    c.require("position_embedding_type", ("absolute",), "absolute")
    c.require("is_decoder", (False,), False)
    return ModelConfig(
        arch="encoder", family="bert", vocab_size=c.get("vocab_size"), n_layer=c.get("num_hidden_layers"),
        n_head=c.get("num_attention_heads"), d_model=c.get("hidden_size"), d_ff=c.get("intermediate_size"),
        max_seq_len=c.get("max_position_embeddings", int, 512), pos="learned", norm="layernorm",
        norm_eps=c.get("layer_norm_eps", float, 1e-12), prenorm=False, embed_norm=True, mlp=ACT[act],
        attn_bias=True, out_bias=True, tie_embeddings=bool(c.d.get("tie_word_embeddings", True)),
        type_vocab_size=c.get("type_vocab_size", int, 2),
        # heads are optional in HF (BertModel has none, BertForMaskedLM no pooler): use what is stored
        mlm_head="cls.predictions.transform.dense.weight" in names,
        pooler="cls.seq_relationship.weight" in names, **special_ids(c))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    arch = ("BertForPreTraining" if cfg.pooler else "BertForMaskedLM") if cfg.mlm_head else "BertModel"
    act = {"gelu_tanh": "gelu_new"}.get(cfg.mlp, cfg.mlp)
    return {"architectures": [arch], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": cfg.d_ff, "hidden_act": act, "max_position_embeddings": cfg.max_seq_len,
            "layer_norm_eps": cfg.norm_eps, "type_vocab_size": cfg.type_vocab_size,
            "position_embedding_type": "absolute", "tie_word_embeddings": cfg.tie_embeddings,
            **special_to_hf(cfg)}


def names(cfg: ModelConfig, p: str = "bert.") -> list[Entry]:
    d = cfg.n_head * cfg.head_dim
    e = p + "embeddings."
    out = [one("tok_emb.weight", e + "word_embeddings.weight"),
           one("pos_emb.weight", e + "position_embeddings.weight"),
           one("type_emb.weight", e + "token_type_embeddings.weight"), *norm("emb_norm", e + "LayerNorm", cfg)]
    for i in range(cfg.n_layer):
        o, h = f"encoder.blocks.{i}.", f"{p}encoder.layer.{i}."
        out += fused(o + "attn.qkv", [h + f"attention.self.{x}" for x in ("query", "key", "value")], [d, d, d], True)
        out += linear(o + "attn.out", h + "attention.output.dense", True)
        out += norm(o + "norm1", h + "attention.output.LayerNorm", cfg)
        out += linear(o + "mlp.fc", h + "intermediate.dense", True) + linear(o + "mlp.proj", h + "output.dense", True)
        out += norm(o + "norm2", h + "output.LayerNorm", cfg)
    if cfg.mlm_head:
        out += linear("mlm_dense", "cls.predictions.transform.dense", True)
        out += norm("mlm_norm", "cls.predictions.transform.LayerNorm", cfg)
        out.append(one("lm_bias", "cls.predictions.bias"))
    if not cfg.tie_embeddings:
        out.append(one("lm_head.weight", "cls.predictions.decoder.weight"))
    if cfg.pooler:
        out += linear("pooler", p + "pooler.dense", True) + linear("nsp", "cls.seq_relationship", True)
    return out


def read_fixup(raw: Tensors, where: dict) -> None:
    """The output bias BERT's forward adds is stored as cls.predictions.decoder.bias by newer writers."""
    if "cls.predictions.decoder.bias" in raw:
        raw["cls.predictions.bias"] = raw.pop("cls.predictions.decoder.bias")
        where["cls.predictions.bias"] = where["cls.predictions.decoder.bias"]


def unused(name: str, cfg: ModelConfig, prefix: str) -> bool:
    return not cfg.pooler and name.startswith(prefix + "pooler.")  # BertModel's pooler, no NSP head


def export_extra(cfg: ModelConfig) -> list[Entry]:
    # the decoder's bias is tied to cls.predictions.bias only while the embeddings are tied: write both
    return [one("lm_bias", "cls.predictions.decoder.bias")] if cfg.mlm_head else []


BERT = Family("bert", config_from_hf, config_to_hf, names, arch="encoder", prefix="bert.",
              ignore=r"embeddings\.position_ids$", tied_copies=("cls.predictions.decoder.weight",),
              read_fixup=read_fixup, unused=unused, export_extra=export_extra)
