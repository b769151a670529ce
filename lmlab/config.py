"""Model configuration: one dataclass describes every Transformer lmlab builds, plus named presets."""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmlab.errors import LmlabError, first_line
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
        source = _SOURCE.get()
        for f in dataclasses.fields(self):
            check_field(f.name, getattr(self, f.name), source)
        for name in ("rope_theta", "norm_eps", "attn_scale", "dropout", "moe_aux_coef", "moe_z_coef"):  # 1 → 1.0
            if getattr(self, name) is not None:
                setattr(self, name, float(getattr(self, name)))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise LmlabError(f"{source}: d_model: {self.d_model} is not divisible by n_head={self.n_head} "
                                 "(set head_dim, or a multiple of n_head)")
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise LmlabError(f"{source}: n_kv_head: {self.n_kv_head} does not divide n_head={self.n_head} "
                             "(allowed: a divisor of n_head)")
        if self.arch == "encoder-decoder" and self.n_decoder_layer is None:
            self.n_decoder_layer = self.n_layer
        if self.pos == "rope" and self.head_dim % 2:
            raise LmlabError(f"{source}: head_dim: rotary positions need an even head_dim, got {self.head_dim}")
        self._check_moe(source)
        self._check_window(source)

    def _check_layers(self, name: str, source: str) -> None:
        n = max(self.n_layer, self.n_decoder_layer or 0)
        layers = getattr(self, name)
        if layers is not None and not all(0 <= i < n for i in layers):
            raise LmlabError(f"{source}: {name}: {layers!r} names a layer that does not exist (allowed: 0..{n - 1})")
        if layers is not None:
            setattr(self, name, sorted(set(layers)))

    def _check_moe(self, source: str) -> None:
        if not self.moe_experts:
            return
        if self.moe_top_k > self.moe_experts:
            raise LmlabError(f"{source}: moe_top_k: {self.moe_top_k} is larger than moe_experts={self.moe_experts}")
        if self.moe_d_ff is None:
            self.moe_d_ff = self.d_ff
        if self.mlp not in ("swiglu", "gelu", "relu"):
            raise LmlabError(f"{source}: mlp: {self.mlp!r} has no mixture-of-experts version "
                             "(allowed with moe_experts: swiglu, gelu, relu)")
        self._check_layers("moe_layers", source)

    def _check_window(self, source: str) -> None:
        if self.attn_window is None:
            return
        if self.attn_window > self.max_seq_len:
            raise LmlabError(f"{source}: attn_window: {self.attn_window} is larger than the context "
                             f"max_seq_len={self.max_seq_len}")
        if self.attn_global_tokens and self.arch != "encoder":
            raise LmlabError(f"{source}: attn_global_tokens: {self.attn_global_tokens} needs arch='encoder' "
                             f"(local+global attention is bidirectional), got arch={self.arch!r}")
        if self.pos == "relative":
            raise LmlabError(f"{source}: attn_window: not supported with pos='relative' (the bias is dense)")
        self._check_layers("window_layers", source)

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_experts > 0 and (self.moe_layers is None or i in self.moe_layers)

    def is_window_layer(self, i: int) -> bool:
        return self.attn_window is not None and (self.window_layers is None or i in self.window_layers)

    def check_special_ids(self, source: str) -> None:
        """Readers whose file fixes the vocabulary (GGUF) insist that every special id lies inside it."""
        for name in ("pad_id", "bos_id", "eos_id", "decoder_start_id"):
            value = getattr(self, name)
            if value is not None and value >= self.vocab_size:
                raise LmlabError(f"{source}: {name}: {value} is outside the vocabulary "
                                 f"(allowed: 0..{self.vocab_size - 1})")

    @property
    def causal(self) -> bool:
        return self.arch == "decoder"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        if not isinstance(d, dict):
            raise LmlabError(f"{source}: expected a JSON object of model config fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise LmlabError(f"{source}: unknown model config key {key!r}{did_you_mean(key, known)}")
        with config_source(source):
            return cls(**d)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_json(path), source=str(path))


def read_json(path: str | Path) -> Any:
    """A JSON file's value; unreadable, non-UTF-8 or invalid JSON is a one-line LmlabError naming the file."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise LmlabError(f"{path}: file not found") from None
    except OSError as e:
        raise LmlabError(f"{path}: cannot read ({first_line(e)})") from None
    except UnicodeDecodeError as e:
        raise LmlabError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise LmlabError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except RecursionError:
        raise LmlabError(f"{path}: not valid JSON (nested too deeply)") from None


# Which file a ModelConfig being built comes from (named in every validation message).
_SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar("lmlab_config_source", default="config")

MAX_DIM = 2**31 - 1  # every size must index a tensor
MAX_LAYERS = 10_000
MAX_SEQ_LEN = 1 << 20  # position tables are built whole: 2^20 positions is about 1 GB of rotary table
_SIZES = {"vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "head_dim", "n_decoder_layer",
          "max_seq_len", "rel_buckets", "rel_max_distance"}
_IDS = {"pad_id", "bos_id", "eos_id", "decoder_start_id"}
# mixture-of-experts and window sizes → their lowest allowed value
_COUNTS = {"moe_experts": 0, "moe_top_k": 1, "moe_d_ff": 1, "moe_shared_d_ff": 0, "attn_window": 1,
           "attn_global_tokens": 0}


@contextlib.contextmanager
def config_source(source: str):
    """Name `source` in the messages of every ModelConfig built inside (readers wrap their construction)."""
    token = _SOURCE.set(source)
    try:
        yield
    finally:
        _SOURCE.reset(token)


def _choices(name: str) -> tuple | None:
    hint = typing.get_type_hints(ModelConfig)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def check_field(name: str, value: Any, source: str) -> None:
    """The one type and range check of a ModelConfig field: `SOURCE: FIELD: what is wrong (allowed)`."""
    def bad(what: str, allowed: str) -> LmlabError:
        return LmlabError(f"{source}: {name}: {what} ({allowed})")

    choices = _choices(name)
    optional = name in {"n_kv_head", "d_ff", "head_dim", "n_decoder_layer", "attn_scale",
                        "bos_id", "eos_id", "decoder_start_id", "moe_d_ff", "moe_layers", "attn_window",
                        "window_layers"}
    if value is None and optional:
        return
    if choices is not None:
        if not isinstance(value, str) or value not in choices:
            raise bad(f"{value!r} is not supported", "allowed: " + ", ".join(choices))
    elif name in _SIZES or name in _IDS or name == "type_vocab_size":
        low = 1 if name in _SIZES else 0
        high = {"n_layer": MAX_LAYERS, "n_decoder_layer": MAX_LAYERS, "max_seq_len": MAX_SEQ_LEN}.get(name, MAX_DIM)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(f"{value!r} is not an integer", f"allowed: an integer {low}..{high}")
        if not low <= value <= high:
            raise bad(f"{value} is out of range", f"allowed: {low}..{high}")
    elif name in ("rope_theta", "norm_eps", "attn_scale", "dropout", "moe_aux_coef", "moe_z_coef"):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad(f"{value!r} is not a number", "allowed: a finite number")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        low_ok = number > 0 if name in ("rope_theta", "attn_scale") else number >= 0
        high_ok = number < 1 if name == "dropout" else True
        if not math.isfinite(number) or not low_ok or not high_ok:
            allowed = {"dropout": "0 <= dropout < 1", "rope_theta": "a finite number > 0",
                       "attn_scale": "a finite number > 0"}.get(name, "a finite number >= 0")
            raise bad(f"{value!r} is out of range", f"allowed: {allowed}")
    elif name in _COUNTS:
        if not isinstance(value, int) or isinstance(value, bool) or not _COUNTS[name] <= value <= MAX_DIM:
            raise bad(f"{value!r} is not an integer >= {_COUNTS[name]}", f"allowed: {_COUNTS[name]}..{MAX_DIM}")
    elif name in ("moe_layers", "window_layers"):
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise bad(f"{value!r} is not a list of layer indices", "allowed: a list of integers, or null")
    elif name in ("family", "name"):
        if not isinstance(value, str):
            raise bad(f"{value!r} is not a string", "allowed: a string")
    elif not isinstance(value, bool):
        raise bad(f"{value!r} is not a boolean", "allowed: true or false")


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
