"""The two fine-tuning tasks behind one small interface the runner drives:

    model(backbone)         the module to train (the Transformer itself, or a SequenceClassifier)
    train_batch(generator)  a random training batch (dict of tensors)
    loss(model, batch)      the mean loss of a batch
    tokens(batch)           real tokens in a batch (throughput)
    evaluate(model, device) held-out metrics (val_loss, val_accuracy for classification)
    export / export_base    HF folders of the fine-tuned (LoRA merged) and of the base model
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from lmlab.adapters import lora_modules, unload_lora
from lmlab.adapters.peft import backbone_of
from lmlab.checkpoints.hf import export
from lmlab.errors import LmlabError
from lmlab.finetune.export import export_classifier, merged_copy
from lmlab.finetune.heads import SequenceClassifier
from lmlab.finetune.instruct import IGNORE, encode_all, load_conversations
from lmlab.finetune.labeled import Labeled, encode_labeled, load_labeled, pad_batch
from lmlab.finetune.packing import pack_examples, pad_examples


def split(n: int, fraction: float, seed: int, what: str) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded shuffle, the last `fraction` held out (at least one of each)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, round(n * fraction))
    if n - k < 1:
        raise LmlabError(f"{what}: {n} record(s) cannot be split into train and held-out parts")
    return sorted(order[:n - k]), sorted(order[n - k:])


def base_copy(model):
    """The Transformer without its adapters (for exporting the base model)."""
    backbone = backbone_of(model)
    if not lora_modules(backbone):
        return backbone
    backbone = copy.deepcopy(backbone)
    unload_lora(backbone, merge=False)
    return backbone


class InstructTask:
    def __init__(self, cfg, tok):
        self.cfg, self.tok, d = cfg, tok, cfg.data
        convs = load_conversations(d.train, d.format, d.system)
        convs = convs[:d.limit] if d.limit else convs
        if d.val:
            val = load_conversations(d.val, d.format, d.system)
        else:
            tr, va = split(len(convs), d.val_fraction, cfg.seed, d.train)
            convs, val = [convs[i] for i in tr], [convs[i] for i in va]
        val = val[:d.val_limit] if d.val_limit else val
        self.train = encode_all(tok, convs, cfg.seq_len, d.train, drop_unsupervised=True)
        self.val = encode_all(tok, val, cfg.seq_len, d.val or d.train, drop_unsupervised=True)
        self.dropped = len(convs) + len(val) - len(self.train) - len(self.val)

    def describe(self) -> str:
        dropped = f" ({self.dropped} left out: no response within seq_len)" if self.dropped else ""
        return f"{len(self.train)} training / {len(self.val)} held-out conversations{dropped}"

    def model(self, backbone):
        if backbone.cfg.arch != "decoder":
            raise LmlabError(f"task instruct needs a decoder model, not an {backbone.cfg.arch}")
        return backbone

    def batch(self, examples):
        if self.cfg.data.packing:
            return pack_examples(examples, self.cfg.seq_len, self.tok.pad_id)
        return pad_examples(examples, self.tok.pad_id)

    def train_batch(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(len(self.train), (self.cfg.batch_size,), generator=gen).tolist()
        return self.batch([self.train[i] for i in idx])

    @staticmethod
    def loss(model, batch) -> torch.Tensor:
        if "attn_mask" in batch:
            return model(batch["input_ids"], positions=batch["positions"], attn_mask=batch["attn_mask"],
                         labels=batch["labels"])
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])

    @staticmethod
    def tokens(batch) -> int:
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        return int(batch["attn_mask"].diagonal(dim1=1, dim2=2).sum())

    @torch.no_grad()
    def evaluate(self, model, device) -> dict[str, float]:
        """Mean loss per response token over the held-out conversations."""
        model.eval()
        total = count = 0.0
        for i in range(0, len(self.val), self.cfg.batch_size):
            batch = {k: v.to(device) for k, v in pad_examples(self.val[i:i + self.cfg.batch_size],
                                                              self.tok.pad_id).items()}
            n = int((batch["labels"] != IGNORE).sum())
            total += self.loss(model, batch).item() * n
            count += n
        return {"val_loss": total / max(count, 1)}

    def export(self, model, tok, folder: Path) -> Path:
        return export(backbone_of(merged_copy(model)), tok, folder)

    def export_base(self, model, tok, folder: Path) -> Path:
        return export(base_copy(model), tok, folder)


class ClassifyTask:
    def __init__(self, cfg, tok):
        self.cfg, self.tok, d = cfg, tok, cfg.data
        data = load_labeled(d.train, d.labels or None, d.text_field, d.label_field, d.limit, d.format)
        self.labels = data.label_names
        if d.val:
            val = load_labeled(d.val, self.labels, d.text_field, d.label_field, d.val_limit, d.format)
            train = data
        else:
            tr, va = split(len(data), d.val_fraction, cfg.seed, d.train)
            train = Labeled([data.texts[i] for i in tr], [data.labels[i] for i in tr], self.labels)
            val = Labeled([data.texts[i] for i in va][:d.val_limit or None],
                          [data.labels[i] for i in va][:d.val_limit or None], self.labels)
        self.train_ids, self.train_labels = encode_labeled(train, tok, cfg.seq_len), train.labels
        self.val_ids, self.val_labels = encode_labeled(val, tok, cfg.seq_len), val.labels

    def describe(self) -> str:
        return (f"{len(self.train_ids)} training / {len(self.val_ids)} held-out texts, "
                f"labels {', '.join(self.labels)}")

    def model(self, backbone):
        c = self.cfg.classify
        return SequenceClassifier(backbone, self.labels, c.pooling or None, c.dropout)

    def batch(self, idx: list[int], ids, labels) -> dict[str, torch.Tensor]:
        input_ids, mask = pad_batch([ids[i] for i in idx], self.tok.pad_id)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([labels[i] for i in idx])}

    def train_batch(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(len(self.train_ids), (self.cfg.batch_size,), generator=gen).tolist()
        return self.batch(idx, self.train_ids, self.train_labels)

    @staticmethod
    def loss(model, batch) -> torch.Tensor:
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])

    @staticmethod
    def tokens(batch) -> int:
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def evaluate(self, model, device) -> dict[str, float]:
        """Held-out mean loss and accuracy."""
        model.eval()
        loss = correct = 0.0
        n = len(self.val_ids)
        for i in range(0, n, self.cfg.batch_size):
            idx = list(range(i, min(n, i + self.cfg.batch_size)))
            batch = {k: v.to(device) for k, v in self.batch(idx, self.val_ids, self.val_labels).items()}
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])
            loss += torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        return {"val_loss": loss / n, "val_accuracy": correct / n}

    def export(self, model, tok, folder: Path) -> Path:
        return export_classifier(model, tok, folder)

    def export_base(self, model, tok, folder: Path) -> Path:
        return export(base_copy(model), tok, folder)
