"""lmlab parameter/module names ↔ HF names, from the same per-family maps that read and export folders.

A fused lmlab linear (attn.qkv, mlp.gate_up, cross.kv) holds several HF linears as row blocks; each
HF piece is returned with the rows of the lmlab weight it is. Adapters (PEFT LoRA) use this to name
their targets: lmlab's `decoder.blocks.0.attn.qkv` is HF's q_proj, k_proj and v_proj.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmlab.checkpoints.hf.families import FAMILIES, export_family
from lmlab.checkpoints.hf.reader import expected_shapes
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.utils.suggest import did_you_mean

SUFFIXES = (".weight", ".bias")


@dataclass(frozen=True)
class NamePiece:
    """HF tensor/module `theirs` is rows [start, stop) of lmlab tensor/module `ours` (out features; of a
    3-D stacked-experts tensor, rows of its first two dimensions flattened)."""

    ours: str
    theirs: str
    start: int
    stop: int
    transpose: bool = False  # HF stores the weight in×out (GPT-2 Conv1D)


def name_pieces(cfg: ModelConfig, family: str | None = None, prefix: str | None = None) -> list[NamePiece]:
    """Every tensor of the model as HF pieces (family: cfg.family or the one it matches; prefix: the
    family's base-model prefix)."""
    fam = FAMILIES[family or export_family(cfg)]
    shapes = expected_shapes(cfg)
    out = []
    for e in fam.names(cfg, fam.prefix if prefix is None else prefix):
        start = 0
        for theirs, rows in zip(e.theirs, e.split or (shapes[e.ours][0],)):
            out.append(NamePiece(e.ours, theirs, start, start + rows, e.transpose))
            start += rows
    return out


def _modules(pieces: list[NamePiece]) -> list[NamePiece]:
    """The pieces of `.weight` tensors as module names (the names adapters target)."""
    return [NamePiece(p.ours[:-7], p.theirs[:-7], p.start, p.stop, p.transpose) for p in pieces
            if p.ours.endswith(".weight") and p.theirs.endswith(".weight")]


def to_hf(cfg: ModelConfig, name: str, family: str | None = None, prefix: str | None = None) -> list[NamePiece]:
    """The HF pieces of an lmlab tensor ('decoder.blocks.0.attn.qkv.weight') or module ('...attn.qkv')."""
    pieces = name_pieces(cfg, family, prefix)
    found = [p for p in pieces if p.ours == name] or [p for p in _modules(pieces) if p.ours == name]
    if not found:
        known = {p.ours for p in pieces} | {p.ours for p in _modules(pieces)}
        raise LmlabError(f"'{name}' is not an lmlab parameter or module with an HF name{did_you_mean(name, known)}")
    return found


def from_hf(cfg: ModelConfig, name: str, family: str | None = None, prefix: str | None = None) -> NamePiece:
    """The lmlab tensor or module (and its rows) that an HF tensor ('model.layers.0.self_attn.k_proj.weight')
    or module ('model.layers.0.self_attn.k_proj') is."""
    pieces = name_pieces(cfg, family, prefix)
    for p in pieces + _modules(pieces):
        if p.theirs == name:
            return p
    known = {p.theirs for p in pieces} | {p.theirs for p in _modules(pieces)}
    raise LmlabError(f"'{name}' is not an HF tensor or module of this model{did_you_mean(name, known)}")
