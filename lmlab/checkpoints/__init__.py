"""Loading any model spec: a preset name, a .gguf file, an HF-format folder or an lmlab checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from lmlab import hub
from lmlab.config import PRESETS, ModelConfig
from lmlab.errors import LmlabError
from lmlab.model import Transformer
from lmlab.tokenizer import Tokenizer
from lmlab.utils.device import parse_dtype


def resolve(spec: str) -> Path:
    """Turn a model spec into a local file or folder (downloading a preset's weights on first use)."""
    if spec in hub.SOURCES:
        return hub.resolve(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec in PRESETS:
        raise LmlabError(f"preset '{spec}' is an architecture without downloadable weights; "
                         f"downloadable: {', '.join(hub.SOURCES)}")
    known = sorted(set(hub.SOURCES))
    raise LmlabError(f"unknown model '{spec}': not a file or folder, and not a known preset "
                     f"(known presets: {', '.join(known)})")


def read(spec: str) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer | None]:
    """Config, float state dict (lmlab names) and tokenizer for any model spec."""
    from lmlab.checkpoints import gguf, hf, native

    path = resolve(spec)
    if path.is_file():
        if path.suffix == ".gguf" or is_gguf(path):
            return gguf.read(path)
        raise LmlabError(f"{path}: not a GGUF file (a model is a .gguf file or a checkpoint folder)")
    if native.is_native(path):
        return native.read(path)
    if (path / "config.json").is_file():
        return hf.read(path)
    raise LmlabError(f"{path}: not a model folder (expected lmlab.json or config.json inside)")


def is_gguf(path: Path) -> bool:
    """A file that starts with the GGUF magic."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def build(cfg: ModelConfig, sd: dict[str, torch.Tensor], source: str) -> Transformer:
    """A model with exactly these weights; a missing, unexpected, non-float or mis-shaped tensor is named."""
    from lmlab.checkpoints import native

    with torch.device("meta"):  # every parameter is taken from sd below: no memory, no random init
        model = Transformer(cfg)
    native.check_tensors(cfg, sd, source)
    model.load_state_dict(sd, strict=False, assign=True)  # take the tensors as they are: no copy
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    model.reset_buffers("cpu")  # position tables are computed, not stored
    return model


def load(spec: str, dtype: str | torch.dtype = "float32", device: str = "cpu") -> tuple[Transformer, Tokenizer | None]:
    """Load a model and its tokenizer, ready for inference (eval mode)."""
    dtype = parse_dtype(dtype)
    cfg, sd, tok = read(spec)
    model = build(cfg, sd, str(spec))
    return model.to(device=device, dtype=dtype).eval(), tok
