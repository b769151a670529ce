"""Every attention mask, in one place. Boolean masks say True = may attend; a query that may see nothing
(a padding query) is always allowed its own slot, so no softmax row is empty.

  self_attention   padding, causal order and a caller's own pattern (prefix LM), for any slots of a cache
  decode_step      T new tokens per row over a whole static cache (the compiled step: decoding, verifying)
  cross            a decoder's view of the encoder's (padded) output
  packed           eval's packed rows: groups side by side, each continuation sees its context and itself
  add_bias         a float bias (T5's relative positions) with a boolean mask folded in
  pattern          the sparse pattern of a windowed layer (sliding window / local+global)
  windowed         a windowed layer's mask: a Sparse route (no T×S tensor) or the explicit mask

A stack asks for its masks per layer (Stack.layer_masks), so layers that differ (a sliding window on
some layers) get their own mask from here without touching attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmlab.model.sparse_attention import LocalGlobal, SlidingWindow


@dataclass(frozen=True)
class Sparse:
    """The route of a windowed layer over a whole fresh sequence: attention runs the block-sparse kernel
    (lmlab.model.sparse_attention.attend) with this pattern and the keys' validity (B×S or None)."""

    pattern: SlidingWindow | LocalGlobal
    key_valid: torch.Tensor | None


def pattern(window: int, causal: bool, global_tokens: int = 0) -> SlidingWindow | LocalGlobal:
    """A decoder's causal sliding window, or an encoder's local band plus global tokens."""
    return SlidingWindow(window) if causal else LocalGlobal(window, global_tokens)


def windowed(full: torch.Tensor | None, pat: SlidingWindow | LocalGlobal, B: int, T: int, start, device, *,
             key_valid: torch.Tensor | None, sparse: bool) -> torch.Tensor | Sparse:
    """A windowed layer's mask. sparse (a fresh sequence, no caller's pattern, no bias): the Sparse route.
    Else the layer's full mask `full` (from self_attention(need=True) or the caller's attn_mask, over S
    slots) and-ed with the pattern over slots; `start` may be a tensor (the compiled decoding step)."""
    if sparse:
        return Sparse(pat, None if key_valid is None else key_valid[:, :T])
    S = full.shape[-1]
    q_slot = torch.arange(T, device=device)[:, None] + start
    return full & pat.rule(S, device)(q_slot, torch.arange(S, device=device)[None, :])


def self_attention(B: int, T: int, start: int, device: torch.device | str, *, causal: bool,
                   key_valid: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                   need: bool = False) -> torch.Tensor | None:
    """B×1×T×S mask (S = start + T slots) for T new queries at slots start.., or None when plain causal
    (or full) attention is exact: no padding, no caller's pattern, and either no earlier slots or one query.

    key_valid (B×≥S bool): which slots hold a real token of each row. attn_mask (B×T×S or B×1×T×S bool):
    the caller's own pattern, used as given. need: always return a tensor (e.g. to add a bias to)."""
    if attn_mask is not None:
        return attn_mask if attn_mask.dim() == 4 else attn_mask[:, None]
    if key_valid is None and not need and (start == 0 or T == 1):
        return None
    S = start + T
    if T == 1 and key_valid is not None and causal:  # one decoding step: every earlier slot is causal
        return decode_step(key_valid[:, :S], S - 1)
    q_slot = torch.arange(start, S, device=device)[:, None]
    k_slot = torch.arange(S, device=device)[None, :]
    allowed = (k_slot <= q_slot) if causal else torch.ones(T, S, dtype=torch.bool, device=device)
    allowed = allowed[None, None].expand(B, 1, T, S)
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :S]
    return allowed | (k_slot == q_slot)


def decode_step(valid: torch.Tensor, start: int | torch.Tensor, T: int = 1) -> torch.Tensor:
    """B×1×T×S mask for T new queries per row at slots start..start+T-1 (a decoding step, T = 1, or a
    verification pass) over a whole static cache whose validity is `valid` (B×S, the new slots included):
    each query sees the valid slots up to its own, and always its own slot."""
    if T == 1:
        allowed = valid[:, None, None, :].clone()
        allowed[..., start] = True
        return allowed
    k_slot = torch.arange(valid.shape[1], device=valid.device)[None, :]
    q_slot = torch.arange(T, device=valid.device)[:, None] + start
    return ((k_slot <= q_slot) & valid[:, None, None, :]) | (k_slot == q_slot)


def cross(memory_valid: torch.Tensor | None) -> torch.Tensor | None:
    """B×1×1×S mask over the encoder's output (None: no padding there)."""
    return None if memory_valid is None else memory_valid[:, None, None, :]


def packed(segment: torch.Tensor, sub: torch.Tensor) -> torch.Tensor:
    """B×T×T mask for packed rows. segment (B×T): which group a slot belongs to (groups never see each
    other); sub (B×T): 0 for a group's shared context, k for the slots of its k-th continuation, which see
    the context and their own earlier slots only. Causal within a group; pads see themselves."""
    T = segment.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment.device).tril()
    same_group = segment[:, :, None] == segment[:, None, :]
    visible = (sub[:, None, :] == 0) | (sub[:, :, None] == sub[:, None, :])
    return (causal & same_group & visible) | torch.eye(T, dtype=torch.bool, device=segment.device)


def add_bias(bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A float attention bias with the disallowed places of a boolean mask set to -inf."""
    return bias if mask is None else bias.masked_fill(~mask, float("-inf"))
