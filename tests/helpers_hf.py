"""Shared pieces for the HF-parity tests: random weights, padded batches, greedy loops on both sides."""
from __future__ import annotations

import torch

TOL = 1e-4


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every weight by noise of a sensible scale, so norms, biases and heads all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / min(p.shape) ** 0.5)
    return model.eval()


def batch(vocab: int, lengths: list[int], left_pad: bool, seed: int = 1, low: int = 3):
    """ids and attention_mask (B×T) for rows of the given lengths, padded on the left or right with 0."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for r, n in enumerate(lengths):
        cols = slice(T - n, T) if left_pad else slice(0, n)
        ids[r, cols] = torch.randint(low, vocab, (n,), generator=g)
        mask[r, cols] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (what HF generate passes, and what lmlab derives itself)."""
    return (mask.cumsum(1) - 1).clamp_min(0)


def max_diff_at(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Largest |a - b| over the positions where mask is 1 (all positions without a mask)."""
    d = (a.float() - b.float()).abs()
    if mask is not None:
        d = d[mask.bool()]
    return d.max().item()


@torch.no_grad()
def greedy_hf(hf, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Argmax decoding with an HF causal LM, recomputing the whole sequence each step (no cache)."""
    for _ in range(n):
        logits = hf(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids[:, -n:]


@torch.no_grad()
def greedy_lmlab(model, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Argmax decoding with lmlab's KV cache: the prompt once, then one token per step."""
    cache = model.make_cache(ids.shape[0], ids.shape[1] + n)
    logits = model(ids, attention_mask=mask, cache=cache)
    out = []
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, cache=cache)
    return torch.cat(out, 1)


@torch.no_grad()
def greedy_hf_seq2seq(hf, src: torch.Tensor, src_mask: torch.Tensor, start: int, n: int) -> torch.Tensor:
    dec = torch.full((src.shape[0], 1), start, dtype=torch.long)
    for _ in range(n):
        logits = hf(input_ids=src, attention_mask=src_mask, decoder_input_ids=dec).logits
        dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return dec[:, 1:]


@torch.no_grad()
def greedy_lmlab_seq2seq(model, src: torch.Tensor, src_mask: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Encoder once, then the decoder one token per step with self- and cross-attention cached."""
    cache = model.make_cache(src.shape[0], n + 1)
    nxt = torch.full((src.shape[0], 1), start, dtype=torch.long)
    logits = model(nxt, encoder_input_ids=src, encoder_mask=src_mask, cache=cache)
    out = []
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        logits = model(nxt, cache=cache)
    return torch.cat(out, 1)
