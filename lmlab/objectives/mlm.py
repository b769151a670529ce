"""Masked language modelling (BERT): 15% of tokens selected; of those 80% → [MASK], 10% → random, 10% kept.

Special tokens are never selected. With whole-word masking a word's tokens are selected together
(a word starts at a token that begins with whitespace or follows one that ends with it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmlab.objectives.base import IGNORE, Objective, ObjectiveConfig, accuracy, cross_entropy, special_ids


@dataclass
class MLMConfig(ObjectiveConfig):
    name: str = "mlm"
    mask_prob: float = 0.15
    mask_frac: float = 0.8  # of selected tokens, replaced by [MASK]
    random_frac: float = 0.1  # of selected tokens, replaced by a random token (the rest are kept)
    whole_word: bool = False


def word_flags(tok) -> tuple[torch.Tensor, torch.Tensor]:
    """Per vocabulary id: does the token begin with whitespace, does it end with whitespace."""
    starts, ends = torch.zeros(tok.vocab_size, dtype=torch.bool), torch.zeros(tok.vocab_size, dtype=torch.bool)
    for i in range(tok.vocab_size):
        s = tok.token(i) or ""
        s = s.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n")
        starts[i], ends[i] = s[:1].isspace(), s[-1:].isspace()
    return starts, ends


def word_starts(ids: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """B×T bool: this token begins a word (specials are words of their own)."""
    prev_ends = torch.ones_like(ids, dtype=torch.bool)
    prev_ends[:, 1:] = ends[ids[:, :-1]] | special[ids[:, :-1]]
    return starts[ids] | prev_ends | special[ids]


def mask_tokens(ids: torch.Tensor, gen: torch.Generator, *, mask_id: int, special: torch.Tensor,
                cfg: MLMConfig, word_start: torch.Tensor | None = None,
                keep_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) for MLM. `special` is a vocabulary-sized bool (never selected, never sampled as
    a random replacement); `keep_out` marks further positions (padding) that must not be selected."""
    B, T = ids.shape
    r = torch.rand(B, T, generator=gen)
    if word_start is not None:  # one draw per word, shared by all its tokens
        pos = torch.arange(T).expand(B, T)
        first = torch.where(word_start, pos, torch.zeros_like(pos)).cummax(1).values
        r = r.gather(1, first)
    selectable = ~special[ids]
    if keep_out is not None:
        selectable &= ~keep_out
    selected = (r < cfg.mask_prob) & selectable
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    u = torch.rand(B, T, generator=gen)
    inputs = ids.clone()
    inputs[selected & (u < cfg.mask_frac)] = mask_id
    use_random = selected & (u >= cfg.mask_frac) & (u < cfg.mask_frac + cfg.random_frac)
    regular = (~special).nonzero().squeeze(1)
    picks = regular[torch.randint(len(regular), (B, T), generator=gen)]
    inputs[use_random] = picks[use_random]
    return inputs, labels


class MLM(Objective):
    archs = ("encoder",)
    cfg: MLMConfig

    def __init__(self, cfg, tokenizer, seq_len, sep_id):
        super().__init__(cfg, tokenizer, seq_len, sep_id)
        self.cls_id, self.sep_tok, self.mask_id = self.special("[CLS]"), self.special("[SEP]"), self.special("[MASK]")
        self.pad_id = self.special("[PAD]")
        self.finalize()

    def finalize(self) -> None:
        """Recompute vocabulary tables (call after other objectives added tokens)."""
        V = self.tok.vocab_size
        self.special_mask = torch.zeros(V, dtype=torch.bool)
        self.special_mask[special_ids(self.tok)] = True
        self.special_mask[self.sep_id] = True
        self.flags = word_flags(self.tok) if self.cfg.whole_word else None

    def mask(self, ids, gen, keep_out=None):
        ws = word_starts(ids, *self.flags, self.special_mask) if self.flags is not None else None
        return mask_tokens(ids, gen, mask_id=self.mask_id, special=self.special_mask, cfg=self.cfg,
                           word_start=ws, keep_out=keep_out)

    def batch(self, stream, n, gen):
        body = stream.windows(n, self.seq_len - 2, gen)
        ids = torch.cat([torch.full((n, 1), self.cls_id), body, torch.full((n, 1), self.sep_tok)], 1)
        inputs, labels = self.mask(ids, gen)
        return {"input_ids": inputs, "labels": labels}

    def loss(self, model, batch):
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       token_type_ids=batch.get("token_type_ids"))
        return cross_entropy(logits, batch["labels"]), {"mlm_acc": accuracy(logits, batch["labels"])}
