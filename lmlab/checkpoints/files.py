"""Reading tensor files (safetensors only: nothing on a load path unpickles)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmlab.errors import LmlabError


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LmlabError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LmlabError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0]})") from None
