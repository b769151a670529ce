"""Sliding-window attention in HF configs ↔ lmlab's attn_window / window_layers.

Mistral (and Mixtral): `sliding_window` applies to every layer; null = full attention.
Qwen2: only when `use_sliding_window` is true; then the layers `layer_types` marks "sliding_attention",
or, without layer_types, the layers with index >= `max_window_layers`. The window counts the same as
lmlab's SlidingWindow (query i sees keys i - window < j <= i): no ±1 shift either way.
"""
from __future__ import annotations

from typing import Any

from lmlab.checkpoints.hf.base import Conf
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError


def every_layer(c: Conf) -> dict[str, Any]:
    """Mistral/Mixtral: the window (if any) on every layer."""
    return dict(attn_window=c.get("sliding_window", int, None), window_layers=None)


def every_layer_to_hf(cfg: ModelConfig, family: str) -> dict[str, Any]:
    if cfg.window_layers is not None:
        raise LmlabError(f"{family} applies sliding_window to every layer; window_layers={cfg.window_layers} "
                         "cannot be written")
    return {"sliding_window": cfg.attn_window}


def qwen2(c: Conf, n_layer: int) -> dict[str, Any]:
    """Qwen2: use_sliding_window gates it; layer_types, else max_window_layers, picks the layers."""
    window = c.get("sliding_window", int, None) if c.d.get("use_sliding_window") else None
    if window is None:
        return dict(attn_window=None, window_layers=None)
    types = c.d.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layer:
            raise LmlabError(f"{c.source}: layer_types should list {n_layer} layer kinds, got {types!r}")
        layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    else:
        layers = list(range(c.get("max_window_layers", int, n_layer), n_layer))
    if not layers:
        return dict(attn_window=None, window_layers=None)
    return dict(attn_window=window, window_layers=None if len(layers) == n_layer else layers)


def qwen2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.attn_window is None:
        return {"use_sliding_window": False, "sliding_window": None}
    layers = range(cfg.n_layer) if cfg.window_layers is None else cfg.window_layers
    return {"use_sliding_window": True, "sliding_window": cfg.attn_window, "max_window_layers": cfg.n_layer,
            "layer_types": ["sliding_attention" if i in layers else "full_attention" for i in range(cfg.n_layer)]}
