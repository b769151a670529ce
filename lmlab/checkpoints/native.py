"""lmlab's own checkpoint folder: lmlab.json (ModelConfig) + model.safetensors + tokenizer files."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from lmlab.config import ModelConfig

CONFIG_NAME = "lmlab.json"
WEIGHTS_NAME = "model.safetensors"


def is_native(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file()


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, each shared tensor once (a tied head is stored as the embedding)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().contiguous()
    return out


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `folder` in one rename. A crash
    leaves the old folder or none, never half of one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        yield tmp
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(model, tokenizer, folder: str | Path) -> Path:
    """Write a checkpoint folder atomically (see atomic_folder)."""
    with atomic_folder(folder) as tmp:
        model.cfg.save(tmp / CONFIG_NAME)
        save_file(unique_state_dict(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)


def read(folder: str | Path):
    from lmlab.checkpoints.files import read_safetensors
    from lmlab.tokenizer import Tokenizer

    folder = Path(folder)
    cfg = ModelConfig.load(folder / CONFIG_NAME)
    sd = read_safetensors(folder / WEIGHTS_NAME)
    tok = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
    return cfg, sd, tok
