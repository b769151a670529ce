"""A KV cache whose sliding-window layers keep only their last window - 1 keys: generation past the window
in memory bounded by the window (full-attention layers of the same model keep every key, up to max_len).

It speaks the cache protocol of lmlab.model.kv_cache (append, update, key_valid) with the same slot
numbering: slot s is the s-th token fed; a windowed layer's update returns the keys of slots
first_key(layer, start).. only (lmlab.model.sparse_attention.RollingKV ring buffers, keys stored already
rotated), and the stack cuts that layer's mask to the same columns. Per-slot validity (one bool per
token and row) is kept for the whole sequence, so left padding works as with KVCache.
Rolling back (truncate, select) is not possible: the keys that rolled out are gone.
"""
from __future__ import annotations

import torch

from lmlab.errors import LmlabError
from lmlab.model.sparse_attention import RollingKV


class RollingCache:
    memory_kv = None
    memory_valid = None

    def __init__(self, windows: list[int | None], batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        """windows: each layer's sliding window (None: full attention, a buffer of max_len slots)."""
        self.windows, self.max_len = list(windows), max_len
        shape = (batch, n_kv_head, max_len, head_dim)
        self.rolling = [RollingKV(w, batch, n_kv_head, head_dim, dtype, device) if w else None for w in windows]
        self.full = [None if w else (torch.zeros(shape, dtype=dtype, device=device),
                                     torch.zeros(shape, dtype=dtype, device=device)) for w in windows]
        self.valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length, self.padded = 0, False

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def key_valid(self) -> torch.Tensor | None:
        return self.valid if self.padded else None

    def rolls(self, layer: int) -> bool:
        return self.rolling[layer] is not None

    def first_key(self, layer: int, start: int) -> int:
        """The first slot of the keys layer `layer` returns for queries from slot `start` on."""
        return max(0, start - self.windows[layer] + 1) if self.rolls(layer) else 0

    def append(self, T: int, mask: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        start = self.length
        if start + T > self.max_len and not all(self.windows):
            raise LmlabError(f"KV cache holds {self.max_len} positions in its full-attention layers; "
                             f"{start + T} requested")
        new = torch.ones(self.batch, T, dtype=torch.bool, device=self.valid.device) if mask is None else mask.bool()
        positions = (self.next_pos[:, None] + new.long().cumsum(1) - 1).clamp_min(0)
        self.valid = torch.cat([self.valid, new], 1)
        self.next_pos += new.long().sum(1)
        self.padded = self.padded or mask is not None and not bool(new.all())
        self.length = start + T
        return start, positions

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if self.rolls(layer):
            keys, values, _, _ = self.rolling[layer].update(k, v, self.valid[:, start:end])
            return keys, values
        K, V = self.full[layer]
        K[:, :, start:end], V[:, :, start:end] = k, v
        return K[:, :, :end], V[:, :, :end]

    def truncate(self, length) -> None:
        if length != self.length:
            raise LmlabError(f"a rolling KV cache cannot roll back (from {self.length} to {length} tokens): "
                             "the keys that left the window are gone; use make_cache(..., rolling=False)")

    def select(self, rows) -> "RollingCache":
        raise LmlabError("a rolling KV cache cannot copy rows; use make_cache(..., rolling=False)")
