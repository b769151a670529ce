"""Exporting an lmlab model as an HF-format folder that transformers' AutoModelFor* loads."""
from __future__ import annotations

from pathlib import Path

import torch

from lmlab.checkpoints.hf.base import Entry
from lmlab.checkpoints.hf.families import FAMILIES, export_family
from lmlab.checkpoints.hf.reader import WEIGHTS_NAME
from lmlab.config import ModelConfig
from lmlab.utils.atomic import atomic_folder, write_json
from lmlab.utils.device import dtype_name


def export_entries(cfg: ModelConfig, family: str) -> list[Entry]:
    fam = FAMILIES[family]
    return fam.names(cfg, fam.prefix) + fam.export_extra(cfg)


def hf_state_dict(model: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    """The model's weights under HF names, as the HF class of `family` stores them."""
    sd = model.state_dict()
    out = {}
    for e in export_entries(model.cfg, family):
        t = sd[e.ours].detach()
        t = t.flatten(0, 1) if t.dim() == 3 else t  # stacked experts: rows of every expert in turn
        pieces = t.split(list(e.split)) if e.split else [t]
        for name, piece in zip(e.theirs, pieces):
            out[name] = (piece.t() if e.transpose else piece).to("cpu", copy=True).contiguous()
    return out


def export(model, tokenizer, folder: str | Path) -> Path:
    """Write an HF-format folder that transformers' AutoModelFor* loads with the same logits (atomically)."""
    from lmlab.checkpoints.native import save_safetensors

    cfg = model.cfg
    family = export_family(cfg)
    hf_conf = FAMILIES[family].config_to_hf(cfg)
    for key, tok_value in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"), ("pad_token_id", "pad_id")):
        if hf_conf.get(key) is None and tokenizer is not None:
            hf_conf[key] = getattr(tokenizer, tok_value)
    hf_conf["dtype"] = hf_conf["torch_dtype"] = dtype_name(next(model.parameters()).dtype)
    gen = {k: hf_conf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
           if hf_conf.get(k) is not None}
    with atomic_folder(folder) as tmp:
        write_json(tmp / "config.json", hf_conf, ensure_ascii=True)
        write_json(tmp / "generation_config.json", gen, ensure_ascii=True)
        save_safetensors(hf_state_dict(model, family), tmp / WEIGHTS_NAME)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(folder)
