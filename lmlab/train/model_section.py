"""The `model:` section of a training recipe, checked before any data is prepared.

    model: {preset: baby-gpt, n_layer: 6}        a named architecture from random weights, any
                                                 lmlab.config.ModelConfig field over it
    model: {init_from: out/model, dropout: 0.1}  start from weights lmlab.checkpoints.load accepts
                                                 (a downloadable preset, a .gguf, an HF folder, an
                                                 lmlab checkpoint); fields that keep every shape may change
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmlab.config import PRESETS, ModelConfig, preset
from lmlab.errors import LmlabError
from lmlab.train.fields import check_value
from lmlab.utils.suggest import did_you_mean, unknown

OWN_KEYS = ("preset", "init_from")


@dataclass
class ModelSection:
    preset: str = ""  # a named architecture (lmlab.config.PRESETS), trained from random weights
    init_from: str = ""  # or: a model spec whose weights training starts from
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields over the preset / start

    def __post_init__(self) -> None:
        if bool(self.preset) == bool(self.init_from):
            raise LmlabError("config: model needs exactly one of preset (random weights, e.g. {preset: baby-gpt}) "
                             f"and init_from (a model to start from); got preset={self.preset!r}, "
                             f"init_from={self.init_from!r}")
        if self.preset and self.preset not in PRESETS:
            raise LmlabError(f"config: model.preset: {unknown('preset', self.preset, PRESETS)}")
        if self.init_from:
            _check_spec(self.init_from)
        else:
            # consistency (d_model % n_head, ...); the context long enough for a window (train checks seq_len)
            self.config(vocab_size=self.overrides.get("vocab_size", 1), seq_len=self.overrides.get("attn_window") or 1)

    @classmethod
    def from_dict(cls, d: Any, source: str = "config") -> "ModelSection":
        if not isinstance(d, dict):
            raise LmlabError(f"{source}: model: expected a mapping such as {{preset: baby-gpt, n_layer: 4}}")
        hints = typing.get_type_hints(ModelConfig)
        overrides = {}
        for key, value in d.items():
            if key in OWN_KEYS:
                continue
            if key not in hints:
                raise LmlabError(f"{source}: model: unknown model config key '{key}'"
                                 f"{did_you_mean(key, [*hints, *OWN_KEYS])}")
            overrides[key] = check_value(f"{source}: model.{key}", hints[key], value)
        own = {k: check_value(f"{source}: model.{k}", str, d[k]) for k in OWN_KEYS if d.get(k) is not None}
        return cls(**own, overrides=overrides)

    def to_dict(self) -> dict[str, Any]:
        """The recipe's flat form: {preset or init_from, then the fields over it}."""
        own = {k: getattr(self, k) for k in OWN_KEYS if getattr(self, k)}
        return {**own, **self.overrides}

    def check(self, seq_len: int) -> None:
        given = self.overrides.get("max_seq_len")
        if given is not None and given < seq_len:
            raise LmlabError(f"config: model.max_seq_len={given} is shorter than seq_len={seq_len}")

    def config(self, vocab_size: int, seq_len: int) -> ModelConfig:
        """The preset's config for a tokenizer of `vocab_size` ids and windows of `seq_len` tokens."""
        spec = dict(self.overrides)
        given = spec.get("vocab_size")
        if given is not None and given < vocab_size:
            raise LmlabError(f"config: model.vocab_size={given} is smaller than the tokenizer's {vocab_size} ids")
        spec.setdefault("vocab_size", vocab_size)
        spec.setdefault("max_seq_len", seq_len)
        try:
            return preset(self.preset, **spec)
        except LmlabError as e:
            why = str(e).removeprefix("config: ").removeprefix(f"preset {self.preset}: ")
            raise LmlabError(f"config: model (preset {self.preset}): {why}") from None


def _check_spec(spec: str) -> None:
    from lmlab import hub

    if spec not in hub.SOURCES and not Path(spec).expanduser().exists():
        raise LmlabError(f"config: model.init_from={spec!r} is not a file or folder, nor a downloadable preset "
                         f"({', '.join(hub.SOURCES)}){did_you_mean(spec, hub.SOURCES)}")


def start_model(section: ModelSection, seq_len: int):
    """(model in float32 on the CPU, its tokenizer or None) that training starts from (init_from)."""
    from lmlab.checkpoints import load
    from lmlab.model import Transformer

    model, tok = load(section.init_from)
    if section.overrides:
        cfg = ModelConfig.from_dict({**model.cfg.to_dict(), **section.overrides},
                                    source=f"model.init_from={section.init_from}")
        with torch.device("meta"):
            new_shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
        old_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for k in sorted(old_shapes.keys() | new_shapes.keys()):
            if new_shapes.get(k) != old_shapes.get(k):
                keys = ", ".join(f"{k}={v!r}" for k, v in section.overrides.items())
                raise LmlabError(f"config: model: {keys} over init_from={section.init_from} changes tensor '{k}' "
                                 f"from {old_shapes.get(k)} to {new_shapes.get(k)}; only fields that keep every "
                                 "shape (e.g. dropout) may change")
        fresh = Transformer(cfg)
        fresh.load_state_dict(model.state_dict())
        model = fresh
    if model.cfg.max_seq_len < seq_len:
        raise LmlabError(f"config: model.init_from={section.init_from} has max_seq_len={model.cfg.max_seq_len}, "
                         f"shorter than seq_len={seq_len}")
    return model.train(), tok


__all__ = ["ModelSection", "start_model"]
