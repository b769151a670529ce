"""HF-format folders (config.json + safetensors + tokenizer.json): read and export.

One family per HF `model_type`, each with three plain pieces, litgpt-style:
  config_from_hf  config.json dict → ModelConfig (decisions that depend on which heads are stored
                  look at the tensor names),
  config_to_hf    ModelConfig → config.json dict,
  names           an explicit map: each lmlab tensor ← one or more HF tensors (concatenated along
                  rows, e.g. q, k, v → attn.qkv), optionally transposed (GPT-2's Conv1D stores in×out).
Reading and export walk the same map in opposite directions, so they cannot drift apart.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    """lmlab tensor `ours` = rows of the HF tensors `theirs`, in order (split: rows of each)."""

    ours: str
    theirs: tuple[str, ...]
    split: tuple[int, ...] | None = None
    transpose: bool = False  # HF stores this weight as in×out (GPT-2 Conv1D)


def _one(ours: str, theirs: str, transpose: bool = False) -> Entry:
    return Entry(ours, (theirs,), None, transpose)


def _linear(ours: str, theirs: str, bias: bool) -> list[Entry]:
    out = [_one(ours + ".weight", theirs + ".weight")]
    return out + [_one(ours + ".bias", theirs + ".bias")] if bias else out


def _fused(ours: str, theirs: list[str], split: list[int], bias: bool) -> list[Entry]:
    out = [Entry(ours + ".weight", tuple(t + ".weight" for t in theirs), tuple(split))]
    if bias:
        out.append(Entry(ours + ".bias", tuple(t + ".bias" for t in theirs), tuple(split)))
    return out


def _norm(ours: str, theirs: str, cfg: ModelConfig) -> list[Entry]:
    return _linear(ours, theirs, bias=cfg.norm == "layernorm")


class _Conf:
    """Typed access to config.json that names the key when it is missing or of the wrong type."""

    def __init__(self, d: dict[str, Any], source: str):
        self.d, self.source = d, source

    def get(self, key: str, kind: type = int, default: Any = ...) -> Any:
        value = self.d.get(key)
        if value is None:
            if default is ...:
                raise LmlabError(f"{self.source}: missing key '{key}'")
            return default
        if kind is int and isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            value = value[0]  # e.g. several eos_token_id: the first is the main one
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind in (int, float) else \
            isinstance(value, kind)
        if not ok or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise LmlabError(f"{self.source}: key '{key}' should be {kind.__name__}, got {value!r}")
        return kind(value)

    def require(self, key: str, allowed: tuple, default: Any) -> Any:
        value = self.d.get(key, default)
        if value not in allowed:
            raise LmlabError(f"{self.source}: {key}={value!r} is not supported by lmlab "
                             f"(supported: {', '.join(repr(a) for a in allowed)})")
        return value


def _special_ids(c: _Conf) -> dict[str, Any]:
    return dict(bos_id=c.get("bos_token_id", int, None), eos_id=c.get("eos_token_id", int, None),
                pad_id=c.get("pad_token_id", int, 0))


def _special_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id}


# --------------------------------------------------------------------------- llama and qwen2
def _rope_theta(c: _Conf) -> float:
    rope = c.d.get("rope_parameters") or c.d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise LmlabError(f"{c.source}: rope_parameters should be an object, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise LmlabError(f"{c.source}: rope type '{kind}' is not supported by lmlab (supported: 'default')")
    theta = rope.get("rope_theta", c.d.get("rope_theta", 10000.0))
    return float(theta)


def llama_config(c: _Conf, names: set[str], qwen2: bool = False) -> ModelConfig:
    c.require("hidden_act", ("silu",), "silu")
    if qwen2:
        if c.d.get("use_sliding_window"):
            raise LmlabError(f"{c.source}: use_sliding_window=true is not supported by lmlab")
        attn_bias, out_bias = True, False
    else:
        attn_bias, mlp_bias = bool(c.d.get("attention_bias", False)), bool(c.d.get("mlp_bias", False))
        if attn_bias != mlp_bias:
            raise LmlabError(f"{c.source}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
                             "by lmlab (its out_bias covers both the attention output and the MLP)")
        out_bias = attn_bias
    n_head = c.get("num_attention_heads")
    d_model = c.get("hidden_size")
    return ModelConfig(
        arch="decoder", family="qwen2" if qwen2 else "llama", vocab_size=c.get("vocab_size"),
        n_layer=c.get("num_hidden_layers"), n_head=n_head, n_kv_head=c.get("num_key_value_heads", int, n_head),
        d_model=d_model, d_ff=c.get("intermediate_size"), head_dim=c.get("head_dim", int, None),
        max_seq_len=c.get("max_position_embeddings", int, 2048), pos="rope", rope_theta=_rope_theta(c),
        norm="rmsnorm", norm_eps=c.get("rms_norm_eps", float, 1e-6), mlp="swiglu", attn_bias=attn_bias,
        out_bias=out_bias, tie_embeddings=bool(c.d.get("tie_word_embeddings", False)), **_special_ids(c))


def llama_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    qwen2 = cfg.family == "qwen2"
    d = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers 5.x
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if qwen2:
        d.update(use_sliding_window=False, sliding_window=None)
    else:
        d.update(attention_bias=cfg.attn_bias, mlp_bias=cfg.out_bias)
    return {**d, **_special_to_hf(cfg)}


def llama_names(cfg: ModelConfig, p: str = "model.") -> list[Entry]:
    q, kv, ff = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_ff
    out = [_one("tok_emb.weight", p + "embed_tokens.weight"), _one("decoder.norm.weight", p + "norm.weight")]
    if not cfg.tie_embeddings:
        out.append(_one("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.n_layer):
        o, h = f"decoder.blocks.{i}.", f"{p}layers.{i}."
        out += _fused(o + "attn.qkv", [h + f"self_attn.{x}_proj" for x in "qkv"], [q, kv, kv], cfg.attn_bias)
        out += _linear(o + "attn.out", h + "self_attn.o_proj", cfg.out_bias)
        out += _norm(o + "norm1", h + "input_layernorm", cfg) + _norm(o + "norm2", h + "post_attention_layernorm", cfg)
        out += _fused(o + "mlp.gate_up", [h + "mlp.gate_proj", h + "mlp.up_proj"], [ff, ff], cfg.out_bias)
        out += _linear(o + "mlp.proj", h + "mlp.down_proj", cfg.out_bias)
    return out


# --------------------------------------------------------------------------- gpt2
GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def gpt2_config(c: _Conf, names: set[str]) -> ModelConfig:
    act = c.require("activation_function", tuple(GPT2_ACT), "gelu_new")
    c.require("scale_attn_weights", (True,), True)
    c.require("scale_attn_by_inverse_layer_idx", (False,), False)
    c.require("add_cross_attention", (False,), False)
    d_model = c.get("n_embd")
    return ModelConfig(
        arch="decoder", family="gpt2", vocab_size=c.get("vocab_size"), n_layer=c.get("n_layer"),
        n_head=c.get("n_head"), d_model=d_model, d_ff=c.get("n_inner", int, 4 * d_model),
        max_seq_len=c.get("n_positions", int, 1024), pos="learned", norm="layernorm",
        norm_eps=c.get("layer_norm_epsilon", float, 1e-5), mlp=GPT2_ACT[act], attn_bias=True, out_bias=True,
        tie_embeddings=bool(c.d.get("tie_word_embeddings", True)), **_special_ids(c))


def gpt2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}.get(cfg.mlp, cfg.mlp)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "activation_function": act,
            "layer_norm_epsilon": cfg.norm_eps, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": cfg.tie_embeddings, **_special_to_hf(cfg)}


def gpt2_names(cfg: ModelConfig, p: str = "transformer.") -> list[Entry]:
    out = [_one("tok_emb.weight", p + "wte.weight"), _one("pos_emb.weight", p + "wpe.weight"),
           *_norm("decoder.norm", p + "ln_f", cfg)]
    if not cfg.tie_embeddings:
        out.append(_one("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.n_layer):
        o, h = f"decoder.blocks.{i}.", f"{p}h.{i}."
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                             ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out += [_one(o + ours + ".weight", h + theirs + ".weight", transpose=True),
                    _one(o + ours + ".bias", h + theirs + ".bias")]
        out += _norm(o + "norm1", h + "ln_1", cfg) + _norm(o + "norm2", h + "ln_2", cfg)
    return out


# --------------------------------------------------------------------------- bert
BERT_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def bert_config(c: _Conf, names: set[str]) -> ModelConfig:
    act = c.require("hidden_act", tuple(BERT_ACT), "gelu")
    c.require("position_embedding_type", ("absolute",), "absolute")
    c.require("is_decoder", (False,), False)
    return ModelConfig(
        arch="encoder", family="bert", vocab_size=c.get("vocab_size"), n_layer=c.get("num_hidden_layers"),
        n_head=c.get("num_attention_heads"), d_model=c.get("hidden_size"), d_ff=c.get("intermediate_size"),
        max_seq_len=c.get("max_position_embeddings", int, 512), pos="learned", norm="layernorm",
        norm_eps=c.get("layer_norm_eps", float, 1e-12), prenorm=False, embed_norm=True, mlp=BERT_ACT[act],
        attn_bias=True, out_bias=True, tie_embeddings=bool(c.d.get("tie_word_embeddings", True)),
        type_vocab_size=c.get("type_vocab_size", int, 2),
        # heads are optional in HF (BertModel has none, BertForMaskedLM no pooler): use what is stored
        mlm_head="cls.predictions.transform.dense.weight" in names,
        pooler="cls.seq_relationship.weight" in names, **_special_ids(c))


def bert_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    arch = ("BertForPreTraining" if cfg.pooler else "BertForMaskedLM") if cfg.mlm_head else "BertModel"
    act = {"gelu_tanh": "gelu_new"}.get(cfg.mlp, cfg.mlp)
    return {"architectures": [arch], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "intermediate_size": cfg.d_ff, "hidden_act": act, "max_position_embeddings": cfg.max_seq_len,
            "layer_norm_eps": cfg.norm_eps, "type_vocab_size": cfg.type_vocab_size,
            "position_embedding_type": "absolute", "tie_word_embeddings": cfg.tie_embeddings,
            **_special_to_hf(cfg)}


def bert_names(cfg: ModelConfig, p: str = "bert.") -> list[Entry]:
    d = cfg.n_head * cfg.head_dim
    e = p + "embeddings."
    out = [_one("tok_emb.weight", e + "word_embeddings.weight"),
           _one("pos_emb.weight", e + "position_embeddings.weight"),
           _one("type_emb.weight", e + "token_type_embeddings.weight"), *_norm("emb_norm", e + "LayerNorm", cfg)]
    for i in range(cfg.n_layer):
        o, h = f"encoder.blocks.{i}.", f"{p}encoder.layer.{i}."
        out += _fused(o + "attn.qkv", [h + f"attention.self.{x}" for x in ("query", "key", "value")], [d, d, d], True)
        out += _linear(o + "attn.out", h + "attention.output.dense", True)
        out += _norm(o + "norm1", h + "attention.output.LayerNorm", cfg)
        out += _linear(o + "mlp.fc", h + "intermediate.dense", True) + _linear(o + "mlp.proj", h + "output.dense", True)
        out += _norm(o + "norm2", h + "output.LayerNorm", cfg)
    if cfg.mlm_head:
        out += _linear("mlm_dense", "cls.predictions.transform.dense", True)
        out += _norm("mlm_norm", "cls.predictions.transform.LayerNorm", cfg)
        out.append(_one("lm_bias", "cls.predictions.bias"))
    if not cfg.tie_embeddings:
        out.append(_one("lm_head.weight", "cls.predictions.decoder.weight"))
    if cfg.pooler:
        out += _linear("pooler", p + "pooler.dense", True) + _linear("nsp", "cls.seq_relationship", True)
    return out


# --------------------------------------------------------------------------- t5
T5_MLP = {"relu": "relu", "gated-gelu": "geglu", "gated-silu": "swiglu"}


def t5_config(c: _Conf, names: set[str]) -> ModelConfig:
    mlp = T5_MLP[c.require("feed_forward_proj", tuple(T5_MLP), "relu")]
    tie_flag = c.d.get("tie_word_embeddings", True) is not False
    # transformers 5.x writes scale_decoder_outputs and always ties; 4.x scales exactly when tied.
    scale = bool(c.d.get("scale_decoder_outputs", tie_flag))
    tied = "lm_head.weight" not in names  # (read() drops a stored copy of the shared embedding)
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


def t5_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    scale = cfg.tie_embeddings and cfg.tied_logit_scale
    proj = {v: k for k, v in T5_MLP.items()}.get(cfg.mlp, cfg.mlp)
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
            "d_model": cfg.d_model, "d_kv": cfg.head_dim, "d_ff": cfg.d_ff, "num_layers": cfg.n_layer,
            "num_decoder_layers": cfg.n_decoder_layer, "num_heads": cfg.n_head, "n_positions": cfg.max_seq_len,
            "relative_attention_num_buckets": cfg.rel_buckets,
            "relative_attention_max_distance": cfg.rel_max_distance, "layer_norm_epsilon": cfg.norm_eps,
            "feed_forward_proj": proj, "is_encoder_decoder": True,
            # 4.x: tie_word_embeddings means "tied and scaled"; 5.x reads the scaling from it as well
            "tie_word_embeddings": scale, "scale_decoder_outputs": scale,
            "decoder_start_token_id": cfg.decoder_start_id, **_special_to_hf(cfg)}


def t5_names(cfg: ModelConfig, p: str = "") -> list[Entry]:
    q, kv, ff = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.d_ff
    out = [_one("tok_emb.weight", "shared.weight")]
    if not cfg.tie_embeddings:
        out.append(_one("lm_head.weight", "lm_head.weight"))
    for stack, n in (("encoder", cfg.n_layer), ("decoder", cfg.n_decoder_layer)):
        rel = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"  # first layer only
        out.append(_one(f"{stack}.rel_bias.weight", rel))
        out.append(_one(f"{stack}.norm.weight", f"{stack}.final_layer_norm.weight"))
        for i in range(n):
            o, h = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            out += _fused(o + "attn.qkv", [f"{h}0.SelfAttention.{x}" for x in "qkv"], [q, kv, kv], False)
            out += _linear(o + "attn.out", h + "0.SelfAttention.o", False) + _norm(o + "norm1", h + "0.layer_norm", cfg)
            m = 1
            if stack == "decoder":
                out += _linear(o + "cross.q", h + "1.EncDecAttention.q", False)
                out += _fused(o + "cross.kv", [h + "1.EncDecAttention.k", h + "1.EncDecAttention.v"], [kv, kv], False)
                out += _linear(o + "cross.out", h + "1.EncDecAttention.o", False)
                out += _norm(o + "norm_cross", h + "1.layer_norm", cfg)
                m = 2
            f = f"{h}{m}.DenseReluDense."
            if cfg.mlp in ("geglu", "swiglu"):
                out += _fused(o + "mlp.gate_up", [f + "wi_0", f + "wi_1"], [ff, ff], False)
            else:
                out += _linear(o + "mlp.fc", f + "wi", False)
            out += _linear(o + "mlp.proj", f + "wo", False) + _norm(o + "norm2", f"{h}{m}.layer_norm", cfg)
    return out


# --------------------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    config_from_hf: Callable[[_Conf, set[str]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    names: Callable[..., list[Entry]]
    arch: str  # the ModelConfig.arch of every model of this family
    prefix: str  # base-model prefix; a bare base model (e.g. BertModel) is stored without it
    ignore: str  # HF tensors that carry nothing lmlab needs (buffers, tied copies)


FAMILIES: dict[str, Family] = {
    "llama": Family(llama_config, llama_to_hf, llama_names, "decoder", "model.", r"rotary_emb\.inv_freq$"),
    "qwen2": Family(lambda c, n: llama_config(c, n, qwen2=True), llama_to_hf, llama_names, "decoder", "model.",
                    r"rotary_emb\.inv_freq$"),
    "gpt2": Family(gpt2_config, gpt2_to_hf, gpt2_names, "decoder", "transformer.", r"\.attn\.(masked_)?bias$"),
    "bert": Family(bert_config, bert_to_hf, bert_names, "encoder", "bert.",
                   r"embeddings\.position_ids$"),
    "t5": Family(t5_config, t5_to_hf, t5_names, "encoder-decoder", "",
                 r"^(encoder|decoder)\.embed_tokens\.weight$|EncDecAttention\.relative_attention_bias"),
}
# tensors that duplicate a tied one when the embeddings are tied
TIED_COPIES = ("lm_head.weight", "cls.predictions.decoder.weight")


# --------------------------------------------------------------------------- reading
def _load_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LmlabError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(d, dict):
        raise LmlabError(f"{path}: expected a JSON object")
    return d


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = _load_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LmlabError(f"{index}: missing or empty 'weight_map'")
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    if (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        raise LmlabError(f"{folder}: only pytorch_model.bin (pickle) weights; lmlab reads safetensors only "
                         "(convert them once, e.g. with transformers: model.save_pretrained(dir, "
                         "safe_serialization=True))")
    raise LmlabError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def _read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    from lmlab.checkpoints.files import read_safetensors

    tensors, where = {}, {}
    for path in _weight_files(folder):
        for name, t in read_safetensors(path).items():
            tensors[name], where[name] = t, path
    return tensors, where


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """lmlab tensor shapes for a config, without allocating any weights."""
    from lmlab.model import Transformer

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}


def _piece_shapes(e: Entry, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    rows = e.split or (shape[0],)
    out = [(r, *shape[1:]) for r in rows]
    return [s[::-1] for s in out] if e.transpose else out


def family_of(conf: dict[str, Any], source: str) -> str:
    model_type = conf.get("model_type")
    if model_type not in FAMILIES:
        raise LmlabError(f"{source}: model_type '{model_type}' is not supported "
                         f"(supported: {', '.join(FAMILIES)})")
    return model_type


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)


def read(folder: str | Path):
    """(ModelConfig, state dict with lmlab names, Tokenizer or None) from an HF-format folder."""
    from lmlab.tokenizer import Tokenizer

    folder = Path(folder)
    source = str(folder / "config.json")
    conf = _load_json(folder / "config.json")
    fam_name = family_of(conf, source)
    fam = FAMILIES[fam_name]
    raw, where = _read_tensors(folder)
    names = set(raw)
    prefix = fam.prefix if any(n.startswith(fam.prefix) for n in names) else ""
    if fam_name == "t5" and _same(raw.get("lm_head.weight"), raw.get("shared.weight")):
        names.discard("lm_head.weight")  # the tied head written out for transformers 4.x (see t5_to_hf)
    try:
        cfg = fam.config_from_hf(_Conf(conf, source), names)
    except LmlabError as e:  # ModelConfig's own checks do not know the file
        raise LmlabError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None
    if fam_name == "bert" and "cls.predictions.decoder.bias" in raw:  # the bias BERT's forward adds
        raw["cls.predictions.bias"] = raw.pop("cls.predictions.decoder.bias")
        where["cls.predictions.bias"] = where["cls.predictions.decoder.bias"]
    sd = _gather(raw, where, fam.names(cfg, prefix), expected_shapes(cfg), folder)
    leftover = [n for n in raw if not re.search(fam.ignore, n)
                and not (cfg.tie_embeddings and n in TIED_COPIES)
                and not (fam_name == "bert" and not cfg.pooler and n.startswith(prefix + "pooler."))]
    if leftover:
        raise LmlabError(f"{where[leftover[0]]}: unexpected tensor '{leftover[0]}' for {fam_name} "
                         f"as configured in config.json")
    tok = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
    _fill_special_ids(cfg, folder, tok)
    cfg.name = cfg.name or folder.resolve().name
    return cfg, sd, tok


def _fill_special_ids(cfg: ModelConfig, folder: Path, tok) -> None:
    """bos/eos from generation_config.json, then the tokenizer, where config.json has none."""
    gen_path = folder / "generation_config.json"
    gen = _Conf(_load_json(gen_path) if gen_path.is_file() else {}, str(gen_path))
    for field, key, tok_attr in (("bos_id", "bos_token_id", "bos_id"), ("eos_id", "eos_token_id", "eos_id")):
        if getattr(cfg, field) is None:
            setattr(cfg, field, gen.get(key, int, None))
        if getattr(cfg, field) is None and tok is not None:
            setattr(cfg, field, getattr(tok, tok_attr))


def _gather(raw: dict[str, torch.Tensor], where: dict[str, Path], entries: list[Entry],
            shapes: dict[str, tuple[int, ...]], folder: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for e in entries:
        pieces = []
        for name, want in zip(e.theirs, _piece_shapes(e, shapes[e.ours])):
            if name not in raw:
                raise LmlabError(f"{folder}: missing tensor '{name}' (needed for {e.ours})")
            t = raw.pop(name)
            if tuple(t.shape) != want:
                raise LmlabError(f"{where[name]}: tensor '{name}' has shape {tuple(t.shape)}, "
                                 f"config.json implies {want}")
            pieces.append(t.t() if e.transpose else t)
        sd[e.ours] = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).contiguous()
    return sd


# --------------------------------------------------------------------------- export
# fields an HF config cannot carry or that are bookkeeping; everything else must survive the round trip
_NOT_COMPARED = {"name", "family", "dropout", "pad_id", "bos_id", "eos_id", "decoder_start_id"}


def _mismatch(cfg: ModelConfig, family: str) -> str | None:
    """Why this config cannot be written as `family`, or None when it round-trips exactly."""
    fam = FAMILIES[family]
    if cfg.arch != fam.arch:
        return f"arch={cfg.arch!r} but {family} is {fam.arch!r}"
    try:
        hf_conf = fam.config_to_hf(cfg)
        names = {n for e in fam.names(cfg, fam.prefix) for n in e.theirs}
        back = fam.config_from_hf(_Conf(hf_conf, f"{family} config"), names)
    except (LmlabError, KeyError) as e:
        return str(e)
    for f in fields(ModelConfig):
        if f.name not in _NOT_COMPARED and getattr(back, f.name) != getattr(cfg, f.name):
            return f"{f.name}={getattr(cfg, f.name)!r} but {family} has {getattr(back, f.name)!r}"
    return None


def export_family(cfg: ModelConfig) -> str:
    """The HF family this model is written as: cfg.family, or the first family it matches exactly."""
    if cfg.family:
        if cfg.family not in FAMILIES:
            raise LmlabError(f"cannot export family '{cfg.family}' to HF format (supported: {', '.join(FAMILIES)})")
        why = _mismatch(cfg, cfg.family)
        if why:
            raise LmlabError(f"cannot export as HF {cfg.family}: {why}")
        return cfg.family
    for family in FAMILIES:
        if _mismatch(cfg, family) is None:
            return family
    raise LmlabError(f"cannot export to HF format: this config matches none of {', '.join(FAMILIES)} "
                     "(set model.cfg.family to see which field differs)")


def _export_entries(cfg: ModelConfig, family: str) -> list[Entry]:
    fam = FAMILIES[family]
    entries = fam.names(cfg, fam.prefix)
    if family == "t5" and cfg.tie_embeddings and not cfg.tied_logit_scale:
        # a tied head without the d_model**-0.5 scaling: transformers 4.x can only say so with
        # tie_word_embeddings=false and a stored lm_head (5.x ties it again as the values are equal)
        entries.append(_one("tok_emb.weight", "lm_head.weight"))
    if family == "bert" and cfg.mlm_head:  # tied to cls.predictions.bias only while the embeddings are tied
        entries.append(_one("lm_bias", "cls.predictions.decoder.bias"))
    return entries


def hf_state_dict(model: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    """The model's weights under HF names, as the HF class of `family` stores them."""
    sd = model.state_dict()
    out = {}
    for e in _export_entries(model.cfg, family):
        t = sd[e.ours].detach()
        pieces = t.split(list(e.split)) if e.split else [t]
        for name, piece in zip(e.theirs, pieces):
            out[name] = (piece.t() if e.transpose else piece).to("cpu", copy=True).contiguous()
    return out


def export(model, tokenizer, folder: str | Path) -> Path:
    """Write an HF-format folder that transformers' AutoModelFor* loads with the same logits (atomically)."""
    from safetensors.torch import save_file

    cfg = model.cfg
    family = export_family(cfg)
    hf_conf = FAMILIES[family].config_to_hf(cfg)
    for key, tok_value in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"), ("pad_token_id", "pad_id")):
        if hf_conf.get(key) is None and tokenizer is not None:
            hf_conf[key] = getattr(tokenizer, tok_value)
    dtype = next(model.parameters()).dtype
    hf_conf["dtype"] = hf_conf["torch_dtype"] = str(dtype).removeprefix("torch.")
    gen = {k: hf_conf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
           if hf_conf.get(k) is not None}
    from lmlab.checkpoints.native import atomic_folder

    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_conf, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        save_file(hf_state_dict(model, family), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)
