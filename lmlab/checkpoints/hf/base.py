"""What every HF family module is made of: name-map entries, typed config.json access, the Family record.

A family module (llama.py, gpt2.py, ...) holds three plain pieces, litgpt-style:
  config_from_hf  config.json dict → ModelConfig (decisions that depend on which heads are stored
                  look at the tensor names),
  config_to_hf    ModelConfig → config.json dict,
  names           an explicit map: each lmlab tensor ← one or more HF tensors (concatenated along
                  rows, e.g. q, k, v → attn.qkv), optionally transposed (GPT-2's Conv1D stores in×out),
plus any family-specific step as a hook of its Family. Reading, export and adapter names all walk
the same map, so they cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError


@dataclass(frozen=True)
class Entry:
    """lmlab tensor `ours` = rows of the HF tensors `theirs`, in order (split: rows of each)."""

    ours: str
    theirs: tuple[str, ...]
    split: tuple[int, ...] | None = None
    transpose: bool = False  # HF stores this weight as in×out (GPT-2 Conv1D)


def one(ours: str, theirs: str, transpose: bool = False) -> Entry:
    return Entry(ours, (theirs,), None, transpose)


def linear(ours: str, theirs: str, bias: bool) -> list[Entry]:
    out = [one(ours + ".weight", theirs + ".weight")]
    return out + [one(ours + ".bias", theirs + ".bias")] if bias else out


def fused(ours: str, theirs: list[str], split: list[int], bias: bool) -> list[Entry]:
    """One lmlab linear whose output rows are several HF linears, stacked (q|k|v, gate|up)."""
    out = [Entry(ours + ".weight", tuple(t + ".weight" for t in theirs), tuple(split))]
    if bias:
        out.append(Entry(ours + ".bias", tuple(t + ".bias" for t in theirs), tuple(split)))
    return out


def norm(ours: str, theirs: str, cfg: ModelConfig) -> list[Entry]:
    return linear(ours, theirs, bias=cfg.norm == "layernorm")


class Conf:
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


def special_ids(c: Conf) -> dict[str, Any]:
    return dict(bos_id=c.get("bos_token_id", int, None), eos_id=c.get("eos_token_id", int, None),
                pad_id=c.get("pad_token_id", int, 0))


def special_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {"bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id, "pad_token_id": cfg.pad_id}


Tensors = dict[str, torch.Tensor]


def _no_fixup(raw: Tensors, where: dict) -> None:
    return None


def _nothing_unused(name: str, cfg: ModelConfig, prefix: str) -> bool:
    return False


def _no_extra(cfg: ModelConfig) -> list[Entry]:
    return []


@dataclass(frozen=True)
class Family:
    """One HF `model_type` and everything lmlab needs to read and write it."""

    model_type: str
    config_from_hf: Callable[[Conf, set[str]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    names: Callable[[ModelConfig, str], list[Entry]]  # (cfg, base-model prefix) → the name map
    arch: str  # the ModelConfig.arch of every model of this family
    prefix: str  # base-model prefix; a bare base model (e.g. BertModel) is stored without it
    ignore: str  # regex: HF tensors that carry nothing lmlab needs (buffers, copies)
    tied_copies: tuple[str, ...] = ("lm_head.weight",)  # stored copies of a tied embedding
    # hooks for what only some families need (defaults: nothing to do)
    read_fixup: Callable[[Tensors, dict], None] = field(default=_no_fixup)  # rename/drop raw tensors
    unused: Callable[[str, ModelConfig, str], bool] = field(default=_nothing_unused)  # stored, not needed
    export_extra: Callable[[ModelConfig], list[Entry]] = field(default=_no_extra)  # written, never read
