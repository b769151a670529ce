"""Pretraining: typed configs, one training loop (alone or under torchrun), and a small demo."""
from __future__ import annotations

from typing import Any


def train(cfg) -> dict[str, Any]:
    from lmlab.train.trainer import train as _train

    return _train(cfg)


def load_config(path=None, overrides=None):
    from lmlab.train.config import load_config as _load

    return _load(path, overrides)


def demo_pretrain(out_dir, max_iters: int = 300, **kw) -> dict[str, Any]:
    from lmlab.train.demo import demo_pretrain as _demo

    return _demo(out_dir, max_iters=max_iters, **kw)


__all__ = ["demo_pretrain", "load_config", "train"]
