"""Next-sentence prediction (BERT): is segment B the text that follows segment A, or from another document?

Half the pairs are true continuations, half take B from a different document (never the same one).
Input: [CLS] A [SEP] B [SEP] with segment ids 0/1; the pooled first token feeds a 2-way classifier
(label 0 = is next, 1 = random). With mask_prob > 0 the pair is also MLM-masked and both losses are
summed, as BERT was pretrained.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.objectives.base import accuracy, cross_entropy
from lmlab.objectives.mlm import MLM, MLMConfig


@dataclass
class NSPConfig(MLMConfig):
    name: str = "nsp"
    mask_prob: float = 0.15  # 0 = NSP alone
    next_prob: float = 0.5


class NSP(MLM):
    cfg: NSPConfig

    def pairs(self, stream, n: int, gen: torch.Generator):
        """n (segment A, segment B, is_random) triples and the source documents of A and B."""
        docs = stream.documents(self.sep_id)
        docs = docs[docs[:, 1] - docs[:, 0] >= 2]
        if len(docs) < 2:
            raise LmlabError("nsp needs a corpus of at least 2 documents of 2+ tokens "
                             "(prepare with doc_boundary=blank_line or line, or a jsonl corpus)")
        budget = self.seq_len - 3
        out = []
        for _ in range(n):
            d = int(torch.randint(len(docs), (1,), generator=gen))
            start, end = (int(x) for x in docs[d])
            cut = start + 1 + int(torch.randint(end - start - 1, (1,), generator=gen))
            a_lo = max(start, cut - budget // 2)
            a = stream.read(a_lo, cut - a_lo)
            room = budget - len(a)
            is_random = bool(torch.rand(1, generator=gen) >= self.cfg.next_prob)
            if is_random:
                o = int(torch.randint(len(docs) - 1, (1,), generator=gen))
                o += o >= d  # any document but d
                o_start, o_end = (int(x) for x in docs[o])
                b_lo = o_start + int(torch.randint(o_end - o_start, (1,), generator=gen))
                b, src_b = stream.read(b_lo, min(room, o_end - b_lo)), o
            else:
                b, src_b = stream.read(cut, min(room, end - cut)), d
            out.append((a, b, is_random, d, src_b))
        return out

    def batch(self, stream, n, gen):
        T = self.seq_len
        ids = torch.full((n, T), self.pad_id)
        types = torch.zeros(n, T, dtype=torch.long)
        valid = torch.zeros(n, T, dtype=torch.long)
        labels_nsp = torch.zeros(n, dtype=torch.long)
        for i, (a, b, is_random, _, _) in enumerate(self.pairs(stream, n, gen)):
            row = np.concatenate([[self.cls_id], a, [self.sep_tok], b, [self.sep_tok]])
            ids[i, :len(row)] = torch.from_numpy(row)
            types[i, len(a) + 2:len(row)] = 1
            valid[i, :len(row)] = 1
            labels_nsp[i] = int(is_random)
        batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": valid, "nsp_labels": labels_nsp}
        if self.cfg.mask_prob > 0:
            batch["input_ids"], batch["labels"] = self.mask(ids, gen, keep_out=valid == 0)
        return batch

    def check_model(self, model):
        super().check_model(model)
        if not model.cfg.pooler or not model.cfg.type_vocab_size:
            raise LmlabError("objective 'nsp' needs a model with pooler=true and type_vocab_size=2")

    def loss(self, model, batch):
        logits, hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch["token_type_ids"], return_hidden=True)
        nsp_logits = model.nsp_logits(hidden) if not hasattr(model, "module") else model.module.nsp_logits(hidden)
        loss = F.cross_entropy(nsp_logits.float(), batch["nsp_labels"])
        metrics = {"nsp_loss": loss.item(), "nsp_acc": accuracy(nsp_logits, batch["nsp_labels"])}
        if "labels" in batch:
            mlm_loss = cross_entropy(logits, batch["labels"])
            loss = loss + mlm_loss
            metrics.update(mlm_loss=mlm_loss.item(), mlm_acc=accuracy(logits, batch["labels"]))
        return loss, metrics
