"""Exporting a fine-tuned classifier as an HF folder (*ForSequenceClassification), LoRA merged in."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from lmlab.adapters import lora_modules, unload_lora
from lmlab.checkpoints.hf import FAMILIES, export, export_family
from lmlab.checkpoints.native import read_safetensors
from lmlab.errors import LmlabError
from lmlab.utils.atomic import atomic_folder, write_json

CLASSES = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
           "gpt2": "GPT2ForSequenceClassification", "bert": "BertForSequenceClassification"}


def merged_copy(model):
    """A copy of the model with any LoRA merged into plain linears (the original keeps its adapters)."""
    from lmlab.adapters.peft import backbone_of

    if not lora_modules(backbone_of(model)):
        return model
    model = copy.deepcopy(model)
    unload_lora(backbone_of(model), merge=True)
    return model


def export_classifier(model, tokenizer, folder: str | Path) -> Path:
    """Write `model` (a SequenceClassifier) as an HF folder that AutoModelForSequenceClassification loads
    with the same logits; LoRA adapters are merged into the weights written."""
    from safetensors.torch import save_file

    model = merged_copy(model)
    cfg = model.backbone.cfg
    family = export_family(cfg)
    if family not in CLASSES:
        raise LmlabError(f"no HF sequence-classification class for family '{family}' "
                         f"(supported: {', '.join(CLASSES)})")
    heads = model.hf_head_names()
    with atomic_folder(folder) as tmp:
        export(model.backbone, tokenizer, tmp / "base")
        for f in (tmp / "base").iterdir():
            shutil.move(str(f), str(tmp / f.name))
        (tmp / "base").rmdir()
        conf = json.loads((tmp / "config.json").read_text())
        conf.update(architectures=[CLASSES[family]], num_labels=len(model.labels),
                    id2label={str(i): lab for i, lab in enumerate(model.labels)},
                    label2id={lab: i for i, lab in enumerate(model.labels)}, problem_type="single_label_classification")
        write_json(tmp / "config.json", conf, ensure_ascii=True)
        tensors = read_safetensors(tmp / "model.safetensors")
        for name in ("lm_head.weight", *FAMILIES[family].tied_copies):
            tensors.pop(name, None)  # the classifier has no language-model head
        tensors = {k: v for k, v in tensors.items() if not k.startswith("cls.")}
        for hf_name, module in heads.items():
            for key, t in module.state_dict().items():
                tensors[f"{hf_name}.{key}"] = t.detach().cpu().contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(folder)
