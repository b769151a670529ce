"""lmlab's own checkpoint folder: lmlab.json (ModelConfig) + model.safetensors + tokenizer files."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError, first_line
from lmlab.utils.atomic import atomic_folder

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "atomic_folder", "check_float", "check_tensors", "expected_shapes",
           "is_native", "read", "read_safetensors", "save", "save_safetensors", "unique_state_dict"]

CONFIG_NAME = "lmlab.json"
WEIGHTS_NAME = "model.safetensors"


def is_native(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file()


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (no pickle); a missing or damaged file is named."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LmlabError(f"{path}: not a valid safetensors file ({first_line(e)})") from None


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """lmlab tensor shapes for a config, without allocating any weights."""
    from lmlab.model import Transformer

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}


def check_float(source: str | Path, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise LmlabError(f"{source}: tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')} "
                         "(allowed: a floating-point dtype)")


def check_tensors(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str | Path) -> None:
    """Every tensor the config implies is present, float and of its shape; nothing else is there."""
    shapes = expected_shapes(cfg)
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = [n for n in shapes if n not in sd and n not in optional]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LmlabError(f"{source}: missing tensors {', '.join(repr(n) for n in missing[:3])}{more} "
                         f"({len(shapes)} expected for this config)")
    for name, t in sd.items():
        if name not in shapes:
            raise LmlabError(f"{source}: unexpected tensor {name!r} for this config")
        check_float(source, name, t)
        if tuple(t.shape) != shapes[name]:
            raise LmlabError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, config expects {shapes[name]}")


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


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file writes a private (0600) temporary and renames it over `path`: give the result an ordinary
    file's permissions (0666 less the umask), like every other file lmlab writes."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save(model, tokenizer, folder: str | Path) -> Path:
    """Write a checkpoint folder atomically (lmlab.utils.atomic.atomic_folder)."""
    with atomic_folder(folder) as tmp:
        model.cfg.save(tmp / CONFIG_NAME)
        save_safetensors(unique_state_dict(model), tmp / WEIGHTS_NAME)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)


def read(folder: str | Path):
    from lmlab.tokenizer import Tokenizer

    folder = Path(folder)
    cfg = ModelConfig.load(folder / CONFIG_NAME)
    sd = read_safetensors(folder / WEIGHTS_NAME)
    check_tensors(cfg, sd, folder / WEIGHTS_NAME)
    tok = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
    return cfg, sd, tok
