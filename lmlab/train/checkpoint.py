"""Training checkpoints: everything needed to continue exactly (model, optimizer, step, data and RNG
states), written atomically; read back with torch.load(weights_only=True)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from lmlab.errors import LmlabError, first_line
from lmlab.utils.atomic import atomic_path

NAME = "ckpt.pt"


def rng_state(data_gen: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "data": data_gen.get_state(),
             "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], data_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    data_gen.set_state(state["data"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, state: dict[str, Any]) -> None:
    """Written beside `path` and renamed over it: a crash leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


KEYS = ("model", "optim", "iter", "rng", "model_cfg")


def load(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises EOFError, RuntimeError, UnpicklingError... (some with no message)
        raise LmlabError(f"{path}: cannot read checkpoint ({first_line(e)}); move it aside or set resume=false") from None
    missing = [k for k in KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise LmlabError(f"{path}: not a training checkpoint (lacks {', '.join(missing)}); "
                         "move it aside or set resume=false")
    if not isinstance(state["iter"], int) or not isinstance(state["rng"], list) or not state["rng"]:
        raise LmlabError(f"{path}: damaged training checkpoint (iter or rng state); move it aside or set resume=false")
    return state


def check_model_state(path: Path, saved: Any, own: dict[str, Any]) -> None:
    """The checkpoint's model tensors are this model's: every name there, none extra, each of its shape."""
    if not isinstance(saved, dict):
        raise LmlabError(f"{path}: damaged training checkpoint (model is not a mapping of tensors); "
                         "move it aside or set resume=false")
    for what, names in (("lacks", [k for k in own if k not in saved]), ("has unknown", [k for k in saved if k not in own]),
                        ("has a different shape for", [k for k in own if k in saved and getattr(saved[k], "shape", None)
                                                       != own[k].shape])):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise LmlabError(f"{path}: model state {what} tensor {str(names[0])!r}{more}; "
                             "move it aside or set resume=false")


def check_shape(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Resuming with a different model shape is an error that names the first differing field."""
    for key in sorted(set(saved) | set(current)):
        if key in ("dropout", "name"):
            continue
        if saved.get(key) != current.get(key):
            raise LmlabError(f"{path}: cannot resume: checkpoint has model {key}={saved.get(key)!r}, "
                             f"config now gives {key}={current.get(key)!r} (use a new out_dir or resume=false)")
