"""`--adapter DIR`: a LoRA adapter applied to the model a command runs (generate, chat, eval, icl).

DIR is a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) written by lmlab
(`lmlab finetune` writes `<out_dir>/adapter`; the run's out_dir itself is accepted too) or by HF
PEFT's `save_pretrained`. The adapter is checked against the model before anything changes, then
merged into the float32 weights, so dtype casts, int8/int4 quantization and the compiled decoding
step all run on plain linears: the model is exactly the merged model.

Which base an adapter belongs to: lmlab records the base's name and a probe of its token embeddings
(a few dozen values at fixed positions) in the safetensors metadata, which PEFT ignores. A model whose
probe points elsewhere (cosine < 0.9) is a different base and a one-line error naming both; the same
weights stored another way (GGUF de-quantized vs HF float32) stay above it. Models that share one
base's embeddings (a base and its own fine-tune) cannot be told apart this way, nor can bases of
adapters PEFT wrote (no probe): then only the shapes and names are checked, as PEFT does.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from lmlab.adapters.lora import lora_modules, unload_lora
from lmlab.adapters.peft import CONFIG_NAME, WEIGHTS_NAME, base_probe, load_peft, read_peft_config, read_probe
from lmlab.errors import LmlabError

MIN_COSINE = 0.9


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder `path` names: itself, or `<path>/adapter` for an `lmlab finetune` out_dir."""
    path = Path(path)
    if not path.exists():
        raise LmlabError(f"--adapter {path}: no such folder")
    if path.is_file():
        path = path.parent
    if not (path / CONFIG_NAME).is_file() and (path / "adapter" / CONFIG_NAME).is_file():
        path = path / "adapter"  # a fine-tuning run's out_dir
    if not (path / CONFIG_NAME).is_file():
        raise LmlabError(f"--adapter {path}: no {CONFIG_NAME} (expected a LoRA adapter folder: lmlab finetune's "
                         f"<out_dir>/adapter or PEFT's save_pretrained output)")
    if not (path / WEIGHTS_NAME).is_file():
        pickled = [n for n in ("adapter_model.bin", "adapter_model.pt") if (path / n).is_file()]
        if pickled:
            raise LmlabError(f"--adapter {path}: {pickled[0]} is a pickle, which lmlab never loads; save the adapter "
                             f"with safetensors (PEFT: save_pretrained(..., safe_serialization=True))")
        raise LmlabError(f"--adapter {path}: no {WEIGHTS_NAME}")
    return path


def check_base(backbone: nn.Module, folder: Path, model_name: str) -> None:
    """An LmlabError naming both models when the adapter's recorded base is not this model."""
    recorded = read_probe(folder / WEIGHTS_NAME)
    if recorded is None:
        return
    base = read_peft_config(folder).get("base_model_name_or_path") or recorded.get("name") or "?"
    mine = base_probe(backbone)
    why = ""
    if (recorded.get("vocab"), recorded.get("d_model")) != (mine["vocab"], mine["d_model"]):
        why = (f"vocabulary × width {recorded.get('vocab')}×{recorded.get('d_model')} there, "
               f"{mine['vocab']}×{mine['d_model']} here")
    else:
        a, b = torch.tensor(recorded["probe"], dtype=torch.float64), torch.tensor(mine["probe"], dtype=torch.float64)
        cos = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-12)) if a.shape == b.shape else 0.0
        if cos < MIN_COSINE:
            why = f"its token embeddings differ (probe cosine {cos:.2f})"
    if why:
        raise LmlabError(f"--adapter {folder}: made for base model '{base}', not for '{model_name}' ({why})")


def _untie(backbone: nn.Module) -> None:
    """Give LoRA layers whose base weight is tied (an adapted lm_head) their own copy, so they can merge."""
    for layer in lora_modules(backbone).values():
        if layer.tied:
            layer.base.weight = nn.Parameter(layer.base.weight.detach().clone(), requires_grad=False)
            layer.tied = False


def attach_adapter(model: nn.Module, path: str | Path, model_name: str) -> list[str]:
    """Load the LoRA adapter at `path` onto `model` (an lmlab Transformer, float32) and merge it in, in
    place; returns the adapted units. Every check runs before the model changes."""
    folder = adapter_folder(path)
    check_base(model, folder, model_name)
    units = load_peft(model, folder, model_name=model_name)
    _untie(model)
    unload_lora(model, merge=True)
    return units
