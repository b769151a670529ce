"""LoRA adapters in HF PEFT's layout: adapter_config.json + adapter_model.safetensors.

Names go through the same per-family maps that export HF folders (lmlab.checkpoints.hf), so an
adapter saved here loads with `PeftModel.from_pretrained` on lmlab's HF export of the base model,
and an adapter PEFT saved loads here:

  lmlab unit `decoder.blocks.0.attn.qkv:q`  ↔  `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
  (A is r×in, B is out×r on both sides; GPT-2's fused c_attn is one PEFT module, so lmlab's LoRA on
  it must be unsliced: inject with `slices_of=peft_slices(cfg)`; its fan_in_fan_out concerns only
  the base weight, A and B are stored untransposed).

A model with a task head (e.g. lmlab.finetune's SequenceClassifier) offers it through three
attributes: `backbone` (the Transformer), `peft_task_type` ('SEQ_CLS') and `peft_heads()` →
{HF module name: module} (written in full, listed in `modules_to_save`, as PEFT does).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from lmlab.adapters.lora import (LoRALinear, SlicesOf, check_slices, fused_slices, inject_lora,
                                 load_lora_state_dict, lora_modules, lora_settings, unit_name)
from lmlab.adapters.patterns import listing
from lmlab.checkpoints.hf import export_family, from_hf, name_pieces, to_hf
from lmlab.checkpoints.native import read_safetensors
from lmlab.errors import LmlabError
from lmlab.utils.atomic import atomic_folder, write_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"  # the layout written (the fields PEFT of this version writes and reads)
SEQ_CLS_HEADS = ["classifier", "score"]  # what PEFT puts in modules_to_save for task_type SEQ_CLS
# the base an adapter was made for, in the safetensors metadata (PEFT ignores it; lmlab.adapters.attach checks it)
PROBE_KEY = "lmlab.base"  # safetensors metadata: {"name": ..., "vocab": n, "d_model": d, "probe": [...]}
PROBE_SIZE = 64


def base_probe(backbone: nn.Module) -> dict:
    """The base's identity as recorded next to an adapter: name, embedding shape and PROBE_SIZE values of
    the token embedding at fixed, evenly spread positions (the embedding never carries LoRA)."""
    w = backbone.tok_emb.weight.detach().reshape(-1)
    at = torch.arange(PROBE_SIZE, dtype=torch.int64) * (w.numel() - 1) // (PROBE_SIZE - 1)  # exact integers
    return {"name": backbone.cfg.name or "", "vocab": backbone.cfg.vocab_size, "d_model": backbone.cfg.d_model,
            "probe": [round(float(x), 7) for x in w[at].cpu()]}


def read_probe(weights: Path) -> dict | None:
    """The base identity lmlab stored in an adapter's safetensors metadata (None: not there)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # a damaged file is reported, with its reason, when the tensors are read
        return None
    try:
        probe = json.loads(meta[PROBE_KEY])
        return probe if isinstance(probe, dict) and isinstance(probe.get("probe"), list) else None
    except (KeyError, ValueError):
        return None


# --------------------------------------------------------------------------- names
def backbone_of(model: nn.Module) -> nn.Module:
    """The Transformer inside a task model (its `backbone`), or the model itself."""
    inner = getattr(model, "backbone", model)
    if not hasattr(inner, "cfg"):
        raise LmlabError(f"{type(model).__name__} is not an lmlab Transformer (no cfg) nor wraps one as .backbone")
    return inner


def _heads(model: nn.Module) -> dict[str, nn.Module]:
    return model.peft_heads() if hasattr(model, "peft_heads") else {}


def peft_slices(cfg) -> SlicesOf:
    """Slices of the fused linears as PEFT sees them: q/k/v and gate/up where the HF model has separate
    modules (llama, BERT, T5), none where HF fuses them too (GPT-2's c_attn)."""
    fused, family = fused_slices(cfg), export_family(cfg)

    def slices_of(name: str, linear: nn.Linear):
        slices = fused(name, linear)
        if slices is None:
            return None
        try:
            pieces = to_hf(cfg, name, family)
        except LmlabError:
            return slices
        return slices if len(pieces) > 1 else None

    return slices_of


def _hf_module(cfg, family: str, module: str, layer: LoRALinear, s: str) -> tuple[str, bool]:
    """The HF module (and whether HF stores its weight transposed) that slice s of an lmlab linear is."""
    try:
        pieces = to_hf(cfg, module, family)
    except LmlabError as e:
        raise LmlabError(f"LoRA on '{module}' has no HF PEFT equivalent: {e}") from None
    a, b = layer.slices[s]
    for p in pieces:
        if (p.start, p.stop) == (a, b):
            return p.theirs, p.transpose
    theirs = ", ".join(p.theirs for p in pieces)
    raise LmlabError(f"LoRA on '{unit_name(module, s)}' (rows {a}..{b}) is not one HF module (HF has {theirs}); "
                     "inject it with slices_of=peft_slices(cfg) to save in PEFT layout")


def _hf_linears(cfg, family: str) -> list[str]:
    """Every HF module name of the model's linears (targets PEFT could match)."""
    return [p.theirs[:-7] for p in name_pieces(cfg, family)
            if p.theirs.endswith(".weight") and p.ours.endswith(".weight")]


def _target_modules(hf_modules: list[str], all_modules: list[str]) -> list[str]:
    """PEFT's target_modules: the suffixes when they select exactly these modules, else the full names."""
    suffixes = sorted({m.rpartition(".")[2] for m in hf_modules})
    selected = {m for m in all_modules if m.rpartition(".")[2] in suffixes}
    return suffixes if selected == set(hf_modules) else sorted(hf_modules)


# --------------------------------------------------------------------------- save
def peft_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors under PEFT names, facts for the config: hf modules, fan_in_fan_out)."""
    backbone = backbone_of(model)
    cfg, family = backbone.cfg, export_family(backbone.cfg)
    layers = lora_modules(backbone)
    if not layers:
        raise LmlabError("the model has no LoRA adapters to save (inject_lora first)")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise LmlabError(f"cannot save while LoRA is merged ({listing(merged)}); unmerge first")
    out, modules, transposed = {}, [], False
    for name, layer in layers.items():
        for s in layer.targets:
            hf, tr = _hf_module(cfg, family, name, layer, s)
            out[f"{PREFIX}{hf}.lora_A.weight"] = layer.lora_A[s]
            out[f"{PREFIX}{hf}.lora_B.weight"] = layer.lora_B[s]
            modules.append(hf)
            transposed |= tr
    for hf_name, module in _heads(model).items():
        for key, t in module.state_dict().items():
            out[f"{PREFIX}{hf_name}.{key}"] = t
    out = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}
    return out, {"modules": modules, "fan_in_fan_out": transposed, "all": _hf_linears(cfg, family)}


def save_peft(model: nn.Module, folder: str | Path, base_name: str | None = None) -> Path:
    """Write the model's LoRA adapter (and task head) as a PEFT adapter folder, atomically.
    base_name: what `base_model_name_or_path` records (default: the config's name)."""
    from safetensors.torch import save_file

    backbone = backbone_of(model)
    settings = lora_settings(backbone)
    tensors, facts = peft_state_dict(model)
    task = getattr(model, "peft_task_type", None) or ("CAUSAL_LM" if backbone.cfg.arch == "decoder" else None)
    extra_heads = sorted(n for n in _heads(model) if n.rpartition(".")[2] not in SEQ_CLS_HEADS)
    conf = {
        "peft_type": "LORA", "task_type": task, "base_model_name_or_path": base_name or backbone.cfg.name or None,
        "r": settings["r"], "lora_alpha": _number(settings["alpha"]), "lora_dropout": settings["dropout"],
        "use_rslora": settings["rslora"], "target_modules": _target_modules(facts["modules"], facts["all"]),
        "bias": "none", "fan_in_fan_out": facts["fan_in_fan_out"],
        "modules_to_save": (SEQ_CLS_HEADS + extra_heads) if task == "SEQ_CLS" else (extra_heads or None),
        "init_lora_weights": True, "inference_mode": True, "use_dora": False, "lora_bias": False,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "exclude_modules": None, "revision": None, "peft_version": PEFT_VERSION,
    }
    with atomic_folder(folder) as tmp:
        write_json(tmp / CONFIG_NAME, conf)
        meta = {"format": "pt", PROBE_KEY: json.dumps({**base_probe(backbone), "name": conf["base_model_name_or_path"]})}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
    return Path(folder)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


# --------------------------------------------------------------------------- load
def read_peft_config(folder: str | Path) -> dict:
    """adapter_config.json, checked: a plain LoRA adapter (no DoRA, rank/alpha patterns, bias, LoRA bias)."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise LmlabError(f"{folder}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    try:
        conf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LmlabError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(conf, dict):
        raise LmlabError(f"{path}: expected a JSON object")
    refuse = [("peft_type", lambda v: v == "LORA", "only LORA adapters are supported"),
              ("use_dora", lambda v: not v, "DoRA is not supported"),
              ("rank_pattern", lambda v: not v, "per-module ranks are not supported"),
              ("alpha_pattern", lambda v: not v, "per-module alphas are not supported"),
              ("bias", lambda v: v in (None, "none"), "trained biases are not supported"),
              ("lora_bias", lambda v: not v, "LoRA biases are not supported"),
              ("r", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "r must be a positive integer"),
              ("lora_alpha", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
               and math.isfinite(v), "lora_alpha must be a positive number")]
    for key, ok, why in refuse:
        if not ok(conf.get(key)):
            raise LmlabError(f"{path}: {key}={conf.get(key)!r}: {why}")
    if conf.get("layer_replication") or conf.get("target_parameters"):
        raise LmlabError(f"{path}: layer_replication/target_parameters are not supported")
    return conf


def _check_targets(conf: dict, all_modules: list[str], source: str) -> None:
    """Each target_modules entry must name a linear of this model (as PEFT would refuse it too)."""
    targets = conf.get("target_modules")
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, m) for m in all_modules):
            raise LmlabError(f"{source}: target_modules regex '{targets}' matches no module of this model; "
                             f"modules: {listing(all_modules)}")
        return
    for t in targets or []:
        if not any(m == t or m.endswith("." + t) for m in all_modules):
            shorts = ", ".join(dict.fromkeys(m.rpartition(".")[2] for m in all_modules))
            raise LmlabError(f"{source}: target_modules entry '{t}' matches no linear of this model; "
                             f"linears: {shorts}")


def _split_keys(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    """{hf module: {'A': t, 'B': t}} and {head key: t} from PEFT's names."""
    lora, heads = {}, {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise LmlabError(f"{source}: tensor '{key}' does not start with '{PREFIX}' (not PEFT's layout)")
        name = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = t
        elif ".lora_" in name:
            raise LmlabError(f"{source}: tensor '{key}' is not a plain LoRA weight (LoRA biases, embeddings "
                             "and magnitude vectors are not supported)")
        else:
            heads[name] = t
    for hf, pair in lora.items():
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise LmlabError(f"{source}: missing tensor '{PREFIX}{hf}.lora_{missing}.weight'")
    return lora, heads


def _units_of(backbone, family: str, lora: dict, slices_of: SlicesOf, source: str, base: str,
              name: str) -> dict[str, tuple]:
    """{lmlab unit: (module, slice, hf module)} for the adapter's HF modules."""
    cfg, units = backbone.cfg, {}
    for hf in lora:
        try:
            piece = from_hf(cfg, hf, family)
        except LmlabError as e:
            raise LmlabError(f"{source}: adapter for base '{base}' does not fit this model "
                             f"('{name}'): {e}") from None
        rows = (piece.start, piece.stop)
        linear = backbone.get_submodule(piece.ours)
        slices = check_slices(piece.ours, slices_of(piece.ours, linear), linear.out_features)
        s = next((s for s, r in slices.items() if r == rows), None)
        if s is None:
            raise LmlabError(f"{source}: '{hf}' is rows {rows[0]}..{rows[1]} of '{piece.ours}', which lmlab's "
                             f"LoRA cannot adapt alone (slices: {', '.join(slices)})")
        units[unit_name(piece.ours, s)] = (piece.ours, s, hf)
    return units


def load_peft(model: nn.Module, folder: str | Path, base_name: str | None = None,
              model_name: str | None = None) -> list[str]:
    """Inject the PEFT adapter in `folder` into the model (which must have no LoRA yet) and load its
    weights and task head; returns the adapted lmlab units. base_name, when given, must equal the
    adapter's base_model_name_or_path; model_name is what errors call the model (default: its config's
    name). Everything is checked before the model changes: a tensor missing for a module that
    target_modules selects, or one this model has no place for, is an error that names it."""
    folder = Path(folder)
    conf = read_peft_config(folder)
    source = str(folder / WEIGHTS_NAME)
    backbone = backbone_of(model)
    cfg, family = backbone.cfg, export_family(backbone.cfg)
    base = conf.get("base_model_name_or_path") or "?"
    name = model_name or cfg.name or "?"
    if base_name is not None and base != base_name:
        raise LmlabError(f"{folder / CONFIG_NAME}: adapter made for base model '{base}', not '{base_name}'")
    if lora_modules(backbone):
        raise LmlabError(f"the model already has LoRA adapters ({listing(lora_modules(backbone))}); unload them first")
    if conf.get("task_type") == "SEQ_CLS" and not _heads(model):
        raise LmlabError(f"{folder}: a sequence-classification adapter (task_type SEQ_CLS, with its head); "
                         "load it on a classifier (lmlab.finetune.heads.SequenceClassifier), not a language model")
    lora, head_tensors = _split_keys(read_safetensors(folder / WEIGHTS_NAME), source)
    if not lora:
        raise LmlabError(f"{source}: no LoRA tensors")
    _check_targets(conf, _hf_linears(cfg, family), str(folder / CONFIG_NAME))
    slices_of = peft_slices(cfg)
    units = _units_of(backbone, family, lora, slices_of, source, base, name)
    _check_complete(conf, _hf_linears(cfg, family), lora, source)
    heads = _heads(model)
    head_sd = _head_state(heads, head_tensors, source, base, name)
    _check_shapes(cfg, backbone, units, lora, conf["r"], source, base, name)
    inject_lora(backbone, list(units), r=conf["r"], alpha=conf["lora_alpha"],
                dropout=float(conf.get("lora_dropout") or 0.0), rslora=bool(conf.get("use_rslora")),
                slices_of=slices_of)
    for layer in lora_modules(backbone).values():  # new layers take the model's mode (dropout off in eval)
        layer.train(backbone.training)
    sd = {}
    for module, s, hf in units.values():
        sd[f"{module}.lora_A.{s}"], sd[f"{module}.lora_B.{s}"] = lora[hf]["A"], lora[hf]["B"]
    load_lora_state_dict(backbone, sd, source)
    with torch.no_grad():
        for hf_name, module in heads.items():
            module.load_state_dict(head_sd[hf_name])
    return list(units)


def _selected(conf: dict, all_modules: list[str]) -> list[str]:
    """The HF modules the adapter's target_modules (and layers_to_transform) select, as PEFT matches them."""
    targets = conf.get("target_modules") or []
    if isinstance(targets, str):
        chosen = [m for m in all_modules if re.fullmatch(targets, m)]
    else:
        chosen = [m for m in all_modules if any(m == t or m.endswith("." + t) for t in targets)]
    layers = conf.get("layers_to_transform")
    if layers is not None and not isinstance(targets, str):
        keep = {layers} if isinstance(layers, int) else set(layers)
        chosen = [m for m in chosen if (n := re.search(r"\.(\d+)\.", m)) and int(n.group(1)) in keep]
    return chosen


def _check_complete(conf: dict, all_modules: list[str], lora: dict, source: str) -> None:
    """Every module target_modules selects has its A and B (PEFT would leave a missing one at its init),
    and no other module has any."""
    selected = _selected(conf, all_modules)
    extra = [m for m in lora if m not in selected]
    if extra:
        raise LmlabError(f"{source}: {len(extra)} unexpected LoRA tensor pair(s) for module(s) target_modules does not "
                         f"select: {', '.join(PREFIX + m + '.lora_A.weight' for m in extra[:4])}"
                         f"{' …' if len(extra) > 4 else ''}")
    missing = [m for m in selected if m not in lora]
    if missing:
        names = [f"{PREFIX}{m}.lora_A.weight" for m in missing]
        raise LmlabError(f"{source}: missing LoRA tensors for {len(missing)} module(s) that target_modules selects: "
                         f"{', '.join(names[:4])}{' …' if len(names) > 4 else ''}")


def _check_shapes(cfg, backbone, units: dict, lora: dict, r: int, source: str, base: str, name: str) -> None:
    for module, s, hf in units.values():
        linear = backbone.get_submodule(module)
        rows = check_slices(module, peft_slices(cfg)(module, linear), linear.out_features)[s]
        want = {"A": (r, linear.in_features), "B": (rows[1] - rows[0], r)}
        for k in "AB":
            got = tuple(lora[hf][k].shape)
            if got != want[k]:
                raise LmlabError(f"{source}: tensor '{PREFIX}{hf}.lora_{k}.weight' has shape {got}, this model "
                                 f"('{name}') expects {want[k]} with r={r}: adapter for base '{base}'?")


def _head_state(heads: dict[str, nn.Module], tensors: dict, source: str, base: str, name: str) -> dict:
    """Each head's state dict from the adapter's full-weight tensors; missing or extra ones are named."""
    out, used = {}, set()
    for hf_name, module in heads.items():
        sd = {}
        for key, p in module.state_dict().items():
            full = f"{hf_name}.{key}"
            if full not in tensors:
                raise LmlabError(f"{source}: missing tensor '{PREFIX}{full}' (the task head; an adapter saved "
                                 "without it in modules_to_save would leave the head random)")
            if tuple(tensors[full].shape) != tuple(p.shape):
                raise LmlabError(f"{source}: tensor '{PREFIX}{full}' has shape {tuple(tensors[full].shape)}, "
                                 f"this model ('{name}') expects {tuple(p.shape)} (adapter for base '{base}')")
            sd[key] = tensors[full]
            used.add(full)
        out[hf_name] = sd
    extra = [k for k in tensors if k not in used]
    if extra:
        raise LmlabError(f"{source}: unexpected tensor(s) for this model: "
                         f"{', '.join(PREFIX + k for k in extra[:6])}{' …' if len(extra) > 6 else ''}")
    return out


__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "backbone_of", "load_peft", "peft_slices", "peft_state_dict",
           "read_peft_config", "save_peft"]
