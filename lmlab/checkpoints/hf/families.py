"""The registry of HF families (one module each) and the choice of family for a config.

Generic code reaches a family only through FAMILIES; adding a family is one module plus one line here.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from lmlab.checkpoints.hf import bert, gpt2, llama, mixtral, qwen2_moe, t5
from lmlab.checkpoints.hf.base import Conf, Family
from lmlab.config import ModelConfig
from lmlab.errors import LmlabError

FAMILIES: dict[str, Family] = {f.model_type: f for f in (llama.LLAMA, llama.QWEN2, llama.MISTRAL, mixtral.MIXTRAL,
                                                          qwen2_moe.QWEN2_MOE, gpt2.GPT2, bert.BERT, t5.T5)}

# fields an HF config cannot carry or that are bookkeeping; everything else must survive the round trip
_NOT_COMPARED = {"name", "family", "dropout", "pad_id", "bos_id", "eos_id", "decoder_start_id",
                 "moe_z_coef", "moe_global_balance"}  # training-only MoE settings


def family_of(conf: dict[str, Any], source: str) -> Family:
    """The family of a config.json (its model_type)."""
    model_type = conf.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise LmlabError(f"{source}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def mismatch(cfg: ModelConfig, fam: Family) -> str | None:
    """Why this config cannot be written as `fam`, or None when it round-trips exactly."""
    if cfg.arch != fam.arch:
        return f"arch={cfg.arch!r} but {fam.model_type} is {fam.arch!r}"
    try:
        hf_conf = fam.config_to_hf(cfg)
        names = {n for e in fam.names(cfg, fam.prefix) for n in e.theirs}
        back = fam.config_from_hf(Conf(hf_conf, f"{fam.model_type} config"), names)
    except (LmlabError, KeyError) as e:
        return str(e)
    for f in fields(ModelConfig):
        if f.name not in _NOT_COMPARED and getattr(back, f.name) != getattr(cfg, f.name):
            return f"{f.name}={getattr(cfg, f.name)!r} but {fam.model_type} has {getattr(back, f.name)!r}"
    return None


def export_family(cfg: ModelConfig) -> str:
    """The HF family this model is written as: cfg.family, or the first family it matches exactly."""
    if cfg.family:
        if cfg.family not in FAMILIES:
            raise LmlabError(f"cannot export family '{cfg.family}' to HF format (supported: {', '.join(FAMILIES)})")
        why = mismatch(cfg, FAMILIES[cfg.family])
        if why:
            raise LmlabError(f"cannot export as HF {cfg.family}: {why}")
        return cfg.family
    for name, fam in FAMILIES.items():
        if mismatch(cfg, fam) is None:
            return name
    raise LmlabError(f"cannot export to HF format: this config matches none of {', '.join(FAMILIES)} "
                     "(set model.cfg.family to see which field differs)")
