"""Sequence classification on a Transformer: pooling, a linear head, and their HF names.

    decoder  pooling 'last' (the last real token, as HF's *ForSequenceClassification) or 'mean';
             head `score` = Linear(d_model, n_labels, bias=False)              (HF: score)
    encoder  pooling 'cls' ([CLS] → pooler dense + tanh, as BertForSequenceClassification) or 'mean';
             head `classifier` = Linear(d_model, n_labels)                     (HF: classifier,
             the pooler: bert.pooler.dense)

The HF names make PEFT's SEQ_CLS layout work: save_peft writes the head in full and lists it in
modules_to_save, so PEFT loads it on the HF export instead of leaving it random.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.errors import LmlabError

POOLINGS = {"decoder": ("last", "mean"), "encoder": ("cls", "mean")}


def last_token(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Hidden state of each row's last real token (the rightmost position where mask is 1)."""
    if mask is None:
        return h[:, -1]
    at = (torch.arange(h.shape[1], device=h.device) * mask.long()).argmax(1)
    return h[torch.arange(h.shape[0], device=h.device), at]


def mean_pool(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return h.mean(1)
    m = mask.to(h.dtype)[..., None]
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class SequenceClassifier(nn.Module):
    """A Transformer (`backbone`) with a pooled linear head: forward gives logits B×n_labels, or the mean
    cross-entropy when labels are given."""

    peft_task_type = "SEQ_CLS"

    def __init__(self, backbone: nn.Module, labels: list[str], pooling: str | None = None, dropout: float = 0.0):
        super().__init__()
        arch = backbone.cfg.arch
        if arch not in POOLINGS:
            raise LmlabError(f"sequence classification needs a decoder or an encoder, not '{arch}'")
        pooling = pooling or POOLINGS[arch][0]
        if pooling not in POOLINGS[arch]:
            raise LmlabError(f"pooling '{pooling}' is not available for an {arch} "
                             f"(choose {' or '.join(POOLINGS[arch])})")
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise LmlabError(f"a classifier needs at least two distinct labels, got {labels}")
        self.backbone, self.labels, self.pooling = backbone, list(labels), pooling
        d, n = backbone.cfg.d_model, len(labels)
        self.drop = nn.Dropout(dropout)
        self.pooler = None
        if arch == "encoder" and pooling == "cls":
            self.pooler = nn.Linear(d, d)
            if getattr(backbone, "pooler", None) is not None:  # a pretrained NSP pooler: start from it
                self.pooler.load_state_dict(backbone.pooler.state_dict())
        self.head = nn.Linear(d, n, bias=arch == "encoder")
        nn.init.normal_(self.head.weight, std=0.02)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)
        dev = backbone.tok_emb.weight.device
        self.to(dev)

    @property
    def cfg(self):
        return self.backbone.cfg

    def hidden(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        if self.backbone.cfg.arch == "encoder":
            return self.backbone.encode(input_ids, attention_mask, token_type_ids)
        _, h = self.backbone(input_ids, attention_mask=attention_mask, return_hidden=True, last_logits_only=True)
        return h

    def pool(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "last":
            return last_token(h, mask)
        if self.pooling == "mean":
            return mean_pool(h, mask)
        return torch.tanh(self.pooler(h[:, 0]))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        pooled = self.pool(self.hidden(input_ids, attention_mask, token_type_ids), attention_mask)
        logits = self.head(self.drop(pooled))
        if labels is None:
            return logits
        return F.cross_entropy(logits.float(), labels)

    # -- HF / PEFT names
    def hf_head_names(self) -> dict[str, nn.Module]:
        """{HF module name: module} of what the base model does not hold (PEFT's modules_to_save)."""
        from lmlab.checkpoints.hf import FAMILIES, export_family

        if self.pooling == "mean":
            raise LmlabError("mean pooling has no HF *ForSequenceClassification equivalent; "
                             f"use pooling '{POOLINGS[self.cfg.arch][0]}' to save or export in HF layout")
        if self.cfg.arch == "decoder":
            return {"score": self.head}
        prefix = FAMILIES[export_family(self.cfg)].prefix
        return {"classifier": self.head, f"{prefix}pooler.dense": self.pooler}

    def peft_heads(self) -> dict[str, nn.Module]:
        return self.hf_head_names()

    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))
