"""Batches of instruction examples: padded one per row, or packed several per row without attention
between them.

Packing puts whole examples one after another in rows of seq_len tokens (first fit, in order), with
positions restarting at 0 for each example and a block-diagonal causal mask (B×T×T bool, True = may
attend), which the Transformer's `attn_mask` takes in place of its causal pattern: a token sees only
earlier tokens of its own example, so packed examples are computed exactly as alone.
"""
from __future__ import annotations

import torch

from lmlab.errors import LmlabError
from lmlab.finetune.instruct import IGNORE, Example


def pad_examples(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """One example per row, right-padded: input_ids, attention_mask, labels (IGNORE on padding)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.ids)
        ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(e.ids), torch.tensor(e.labels), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_rows(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Example indices per row: first fit in order (an example longer than seq_len must be cut first)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise LmlabError(f"example {i} has {n} tokens, more than seq_len={seq_len} (cut examples first)")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(seq_len - n)
    return rows


def pack_examples(examples: list[Example], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of seq_len tokens holding several examples each: input_ids, labels, positions, attn_mask."""
    rows = pack_rows([len(e.ids) for e in examples], seq_len)
    B = len(rows)
    ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    positions = torch.zeros(B, seq_len, dtype=torch.long)
    segment = torch.full((B, seq_len), -1, dtype=torch.long)  # which example each slot holds (-1: padding)
    for r, row in enumerate(rows):
        at = 0
        for j, i in enumerate(row):
            e, n = examples[i], len(examples[i].ids)
            ids[r, at:at + n], labels[r, at:at + n] = torch.tensor(e.ids), torch.tensor(e.labels)
            positions[r, at:at + n] = torch.arange(n)
            segment[r, at:at + n] = j
            at += n
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    eye = torch.eye(seq_len, dtype=torch.bool)
    attn = (same & causal & (segment[:, :, None] >= 0)) | eye  # padding sees only itself
    return {"input_ids": ids, "labels": labels, "positions": positions, "attn_mask": attn}
