"""Pretraining objectives, each a batch builder plus a loss: CLM, MLM, NSP, span corruption, prefix LM, FIM."""
from __future__ import annotations

import dataclasses
from typing import Any

from lmlab.errors import LmlabError
from lmlab.objectives.base import Objective, ObjectiveConfig
from lmlab.objectives.clm import CLM, CLMConfig
from lmlab.objectives.fim import FIM, FIMConfig
from lmlab.objectives.mixture import Mixture
from lmlab.objectives.mlm import MLM, MLMConfig
from lmlab.objectives.nsp import NSP, NSPConfig
from lmlab.objectives.prefix import PrefixLM, PrefixLMConfig
from lmlab.objectives.span import SpanConfig, SpanCorruption
from lmlab.utils.suggest import did_you_mean, unknown

REGISTRY: dict[str, tuple[type, type]] = {
    "clm": (CLMConfig, CLM), "mlm": (MLMConfig, MLM), "nsp": (NSPConfig, NSP),
    "span": (SpanConfig, SpanCorruption), "prefix": (PrefixLMConfig, PrefixLM), "fim": (FIMConfig, FIM),
}


def objective_config(d: dict[str, Any], source: str = "objectives") -> ObjectiveConfig:
    """The typed config of one objective from a dict such as {name: mlm, weight: 1, mask_prob: 0.15}."""
    name = d.get("name", "clm")
    if name not in REGISTRY:
        raise LmlabError(f"{source}: {unknown('objective', name, REGISTRY)}")
    cls = REGISTRY[name][0]
    known = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in known:
            raise LmlabError(f"{source}: unknown key '{key}' for objective '{name}'{did_you_mean(key, known)}")
    weight = d.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise LmlabError(f"{source}: weight: {weight!r} is out of range (allowed: a number >= 0)")
    return cls(**d)


def build_objectives(configs: list[ObjectiveConfig], tokenizer, seq_len: int, sep_id: int,
                     mode: str = "sum") -> Mixture:
    objs = [REGISTRY[c.name][1](c, tokenizer, seq_len, sep_id) for c in configs]
    for o in objs:
        o.finalize()
    return Mixture(objs, mode)


__all__ = ["REGISTRY", "Mixture", "Objective", "ObjectiveConfig", "build_objectives", "objective_config",
           "CLM", "MLM", "NSP", "SpanCorruption", "PrefixLM", "FIM"]
