"""Reading an HF-format folder (config.json + safetensors + tokenizer.json) into lmlab names."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from lmlab.checkpoints.hf.base import Conf, Entry
from lmlab.checkpoints.hf.families import family_of
from lmlab.checkpoints.native import check_float, expected_shapes, read_safetensors
from lmlab.config import ModelConfig, config_source, read_json
from lmlab.errors import LmlabError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def load_json(path: Path) -> dict[str, Any]:
    d = read_json(path)
    if not isinstance(d, dict):
        raise LmlabError(f"{path}: expected a JSON object")
    return d


def weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = load_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LmlabError(f"{index}: missing or empty 'weight_map'")
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    if (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        raise LmlabError(f"{folder}: only pytorch_model.bin (pickle) weights; lmlab reads safetensors only "
                         "(convert them once, e.g. with transformers: model.save_pretrained(dir, "
                         "safe_serialization=True))")
    raise LmlabError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def read_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    tensors, where = {}, {}
    for path in weight_files(folder):
        for name, t in read_safetensors(path).items():
            tensors[name], where[name] = t, path
    return tensors, where


def piece_shapes(e: Entry, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Each HF piece's shape; a 3-D lmlab tensor (stacked experts) is matched as its first two dims flat."""
    if len(shape) == 3:
        shape = (shape[0] * shape[1], shape[2])
    rows = e.split or (shape[0],)
    out = [(r, *shape[1:]) for r in rows]
    return [s[::-1] for s in out] if e.transpose else out


def read(folder: str | Path):
    """(ModelConfig, state dict with lmlab names, Tokenizer or None) from an HF-format folder."""
    from lmlab.tokenizer import Tokenizer

    folder = Path(folder)
    source = str(folder / "config.json")
    conf = load_json(folder / "config.json")
    fam = family_of(conf, source)
    raw, where = read_tensors(folder)
    fam.read_fixup(raw, where)
    prefix = fam.prefix if any(n.startswith(fam.prefix) for n in raw) else ""
    with config_source(source):  # ModelConfig's own checks name the file
        cfg = fam.config_from_hf(Conf(conf, source), set(raw))
    sd = gather(raw, where, fam.names(cfg, prefix), expected_shapes(cfg), folder)
    leftover = [n for n in raw if not re.search(fam.ignore, n)
                and not (cfg.tie_embeddings and n in fam.tied_copies) and not fam.unused(n, cfg, prefix)]
    if leftover:
        raise LmlabError(f"{where[leftover[0]]}: unexpected tensor {leftover[0]!r} for {fam.model_type} "
                         f"as configured in config.json")
    tok = Tokenizer.from_folder(folder) if (folder / "tokenizer.json").is_file() else None
    fill_special_ids(cfg, folder, tok)
    cfg.name = cfg.name or folder.resolve().name
    return cfg, sd, tok


def fill_special_ids(cfg: ModelConfig, folder: Path, tok) -> None:
    """bos/eos from generation_config.json, then the tokenizer, where config.json has none."""
    gen_path = folder / "generation_config.json"
    gen = Conf(load_json(gen_path) if gen_path.is_file() else {}, str(gen_path))
    for field, key, tok_attr in (("bos_id", "bos_token_id", "bos_id"), ("eos_id", "eos_token_id", "eos_id")):
        if getattr(cfg, field) is None:
            setattr(cfg, field, gen.get(key, int, None))
        if getattr(cfg, field) is None and tok is not None:
            setattr(cfg, field, getattr(tok, tok_attr))


def gather(raw: dict[str, torch.Tensor], where: dict[str, Path], entries: list[Entry],
           shapes: dict[str, tuple[int, ...]], folder: Path) -> dict[str, torch.Tensor]:
    """Each lmlab tensor from its HF pieces (checked against the shapes the config implies)."""
    sd = {}
    for e in entries:
        pieces = []
        for name, want in zip(e.theirs, piece_shapes(e, shapes[e.ours])):
            if name not in raw:
                raise LmlabError(f"{folder}: missing tensor {name!r} (needed for {e.ours})")
            t = raw.pop(name)
            check_float(where[name], name, t)
            if tuple(t.shape) != want:
                raise LmlabError(f"{where[name]}: tensor {name!r} has shape {tuple(t.shape)}, "
                                 f"config.json implies {want}")
            pieces.append(t.t() if e.transpose else t)
        sd[e.ours] = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).reshape(shapes[e.ours]).contiguous()
    return sd
