"""Model configuration: one dataclass describes every Transformer lmlab builds, plus named presets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmlab.errors import LmlabError
from lmlab.utils.atomic import write_json
from lmlab.utils.suggest import did_you_mean

Arch = Literal["decoder", "encoder", "encoder-decoder"]
Positions = Literal["learned", "sinusoidal", "rope", "relative", "none"]


@dataclass
class ModelConfig:
    """Shape and flavour of a Transformer. Field names follow the paper-level vocabulary."""

    arch: Arch = "decoder"
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None = n_head (multi-head); 1 = multi-query; else grouped-query
    d_model: int = 768
    d_ff: int | None = None  # None = 4 * d_model
    head_dim: int | None = None  # None = d_model // n_head
    n_decoder_layer: int | None = None  # encoder-decoder only; None = n_layer
    max_seq_len: int = 1024
    # positions
    pos: Positions = "learned"
    rope_theta: float = 10000.0
    rel_buckets: int = 32  # T5-style relative position bias
    rel_max_distance: int = 128
    # norms and blocks
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm with a bias (False: weight only, as nanoGPT's bias=False)
    prenorm: bool = True
    embed_norm: bool = False  # BERT: LayerNorm right after the embedding sum
    mlp: Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu"] = "gelu"
    attn_bias: bool = True  # q/k/v projection bias
    out_bias: bool = True  # attention output and MLP biases
    attn_scale: float | None = None  # None = 1/sqrt(head_dim); T5 uses 1.0
    tie_embeddings: bool = True
    tied_logit_scale: bool = False  # T5: scale hidden by d_model**-0.5 before a tied LM head
    dropout: float = 0.0
    # mixture of experts (lmlab.model.moe); moe_experts = 0: every feed-forward block is dense
    moe_experts: int = 0
    moe_top_k: int = 2  # experts per token
    moe_d_ff: int | None = None  # hidden size of each routed expert; None = d_ff
    moe_shared_d_ff: int = 0  # always-on shared expert with a sigmoid gate (Qwen2-MoE); 0 = none
    moe_renormalize: bool = True  # top-k weights rescaled to sum to 1 (Mixtral) or kept (Qwen2-MoE)
    moe_layers: list[int] | None = None  # layers (of each stack) that are MoE; None = all of them
    moe_aux_coef: float = 0.01  # weight of the Switch/Mixtral load-balancing loss
    moe_z_coef: float = 0.0  # weight of the router z-loss
    moe_global_balance: bool = False  # balance loss over the global batch (counts all-reduced, Qwen)
    # sparse attention (lmlab.model.sparse_attention); None = full attention
    attn_window: int | None = None  # decoder: causal sliding window (Mistral); encoder: local band width
    attn_global_tokens: int = 0  # encoder local+global: the first n positions see and are seen by all
    window_layers: list[int] | None = None  # layers (of each stack) with the window; None = all of them
    # encoder extras
    type_vocab_size: int = 0  # BERT segment embeddings (0 = none)
    mlm_head: bool = False  # BERT MLM transform (dense + act + norm) before the vocabulary projection
    pooler: bool = False  # BERT pooler + 2-way next-sentence classifier
    # special ids (informational; the tokenizer is the source of truth)
    pad_id: int = 0
    bos_id: int | None = None
    eos_id: int | None = None
    decoder_start_id: int | None = None  # encoder-decoder: first decoder token
    family: str = ""  # checkpoint family for HF export: llama, qwen2, gpt2, bert, t5
    name: str = ""

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise LmlabError(f"config: d_model={self.d_model} is not divisible by n_head={self.n_head}")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise LmlabError(f"config: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.arch == "encoder-decoder" and self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        if self.pos == "rope" and self.head_dim % 2:
            raise LmlabError(f"config: rotary positions need an even head_dim, got {self.head_dim}")
        self._check_moe()
        self._check_window()

    def _check_layers(self, name: str) -> None:
        layers = getattr(self, name)
        n = max(self.n_layer, self.n_decoder_layer or 0)
        if layers is None:
            return
        if not isinstance(layers, (list, tuple)) or not all(type(i) is int and 0 <= i < n for i in layers):
            raise LmlabError(f"config: {name}={layers!r} must be a list of layer indices in 0..{n - 1}")
        setattr(self, name, sorted(set(layers)))

    def _check_moe(self) -> None:
        if type(self.moe_experts) is not int or self.moe_experts < 0:
            raise LmlabError(f"config: moe_experts must be an integer >= 0, got {self.moe_experts!r}")
        if not self.moe_experts:
            return
        if type(self.moe_top_k) is not int or not 1 <= self.moe_top_k:
            raise LmlabError(f"config: moe_top_k must be an integer >= 1, got {self.moe_top_k!r}")
        if self.moe_top_k > self.moe_experts:
            raise LmlabError(f"config: moe_top_k={self.moe_top_k} is larger than moe_experts={self.moe_experts}")
        if self.moe_d_ff is None:
            self.moe_d_ff = self.d_ff
        if self.mlp not in ("swiglu", "gelu", "relu"):
            raise LmlabError(f"config: mlp={self.mlp!r} has no mixture-of-experts version (swiglu, gelu, relu)")
        self._check_layers("moe_layers")

    def _check_window(self) -> None:
        w = self.attn_window
        if w is None:
            return
        if type(w) is not int or w < 1:
            raise LmlabError(f"config: attn_window must be an integer >= 1 or null, got {w!r}")
        if w > self.max_seq_len:
            raise LmlabError(f"config: attn_window={w} is larger than the context max_seq_len={self.max_seq_len}")
        if type(self.attn_global_tokens) is not int or not 0 <= self.attn_global_tokens <= self.max_seq_len:
            raise LmlabError(f"config: attn_global_tokens must be an integer in 0..max_seq_len, "
                             f"got {self.attn_global_tokens!r}")
        if self.attn_global_tokens and self.arch != "encoder":
            raise LmlabError(f"config: attn_global_tokens={self.attn_global_tokens} needs arch='encoder' "
                             f"(local+global attention is bidirectional), got arch={self.arch!r}")
        if self.pos == "relative":
            raise LmlabError("config: attn_window with pos='relative' is not supported (the bias is dense)")
        self._check_layers("window_layers")

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_experts > 0 and (self.moe_layers is None or i in self.moe_layers)

    def is_window_layer(self, i: int) -> bool:
        return self.attn_window is not None and (self.window_layers is None or i in self.window_layers)

    @property
    def causal(self) -> bool:
        return self.arch == "decoder"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise LmlabError(f"{source}: unknown model config key '{key}'{did_you_mean(key, known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise LmlabError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return cls.from_dict(d, source=str(path))


def _llama(**kw: Any) -> dict[str, Any]:
    return dict(arch="decoder", pos="rope", norm="rmsnorm", mlp="swiglu", attn_bias=False,
                out_bias=False, prenorm=True, family="llama", **kw)


# Named architectures as the keyword arguments of ModelConfig, so overrides re-derive dependent
# sizes. A preset whose weights can be downloaded also appears in lmlab.hub.
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": _llama(name="smollm2-135m", vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3,
                           d_model=576, d_ff=1536, max_seq_len=8192, rope_theta=100000.0,
                           norm_eps=1e-5, tie_embeddings=True, bos_id=1, eos_id=2, pad_id=2),
    "gpt2": dict(name="gpt2", family="gpt2", vocab_size=50257, n_layer=12, n_head=12, d_model=768,
                        max_seq_len=1024, pos="learned", mlp="gelu_tanh", bos_id=50256, eos_id=50256),
    "baby-gpt": dict(name="baby-gpt", vocab_size=65, n_layer=4, n_head=4, d_model=128,
                            max_seq_len=64, pos="learned", mlp="gelu", out_bias=False, attn_bias=False),
    "bert-base": dict(name="bert-base", family="bert", arch="encoder", vocab_size=30522, n_layer=12, n_head=12,
                             d_model=768, max_seq_len=512, pos="learned", prenorm=False, embed_norm=True,
                             norm_eps=1e-12, type_vocab_size=2, mlm_head=True, pooler=True),
    "t5-small": dict(name="t5-small", family="t5", arch="encoder-decoder", vocab_size=32128, n_layer=6,
                            n_head=8, d_model=512, d_ff=2048, head_dim=64, max_seq_len=512, pos="relative",
                            norm="rmsnorm", norm_eps=1e-6, mlp="relu", attn_bias=False, out_bias=False,
                            attn_scale=1.0, tied_logit_scale=True, pad_id=0, eos_id=1, decoder_start_id=0),
    "tiny-llama": _llama(name="tiny-llama", vocab_size=512, n_layer=2, n_head=4, n_kv_head=2,
                         d_model=64, d_ff=128, max_seq_len=256),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named architecture, with any field overridden (dependent sizes are derived again)."""
    if name not in PRESETS:
        raise LmlabError(f"unknown preset '{name}'{did_you_mean(name, PRESETS)}; "
                         f"known presets: {', '.join(sorted(PRESETS))}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides}, source=f"preset {name}")
