"""A preallocated key/value cache for incremental decoding, and the one protocol the model reads it by.

Slots are physical positions shared by every row of the batch; `valid` marks which slots hold a real
token of that row (left padding, finished rows and rolled-back rows leave invalid slots), and `next_pos`
is each row's own logical position, so rows of different lengths decode together.

The protocol (what Transformer.hidden_states calls; the cache alone changes its bookkeeping):
  append(T, mask)            claim T slots for new tokens → (start slot, positions B×T)
  update(layer, start, k, v) write a layer's new keys/values there → all keys/values so far
  key_valid                  which slots a query may see (None: every slot so far is real, causal order
                             is the whole mask)
  memory_kv / memory_valid   encoder-decoder: cross-attention keys/values, computed once (set_memory)
Rolling back: truncate(length) for every row, or truncate([len_0, len_1, ...]) per row (speculative
decoding discards each row's rejected drafts). select(rows) copies rows (a shared prefix, many continuations).
StepView speaks the same protocol over a cache's buffers for the compiled decoding step.
"""
from __future__ import annotations

from typing import Sequence

import torch

from lmlab.errors import LmlabError


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        # one tensor per layer (not one stacked tensor): a compiled decoding step writes each in place
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0  # slots in use (the same for every row)
        self.padded = False  # whether any slot < length is invalid (else causal order is the whole mask)
        self.memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.memory_valid: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def key_valid(self) -> torch.Tensor | None:
        return self.valid if self.padded else None

    def append(self, T: int, mask: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        """Claim slots for T new tokens (mask: B×T, True = real token; None = all real).
        Returns (start slot, each new token's position B×T)."""
        start = self.length
        if start + T > self.max_len:
            raise LmlabError(f"KV cache holds {self.max_len} positions; {start + T} requested")
        if mask is None:
            positions = self.next_pos[:, None] + torch.arange(T, device=self.valid.device)
            self.valid[:, start:start + T] = True
            self.next_pos += T
        else:
            mask = mask.bool()
            positions = (self.next_pos[:, None] + mask.long().cumsum(1) - 1).clamp_min(0)
            self.valid[:, start:start + T] = mask
            self.next_pos += mask.long().sum(1)
            self.padded = True
        self.length = start + T
        return start, positions

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values (B×H×T×D) at `start` and return all keys/values so far."""
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def set_memory(self, kv: list[tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor | None) -> None:
        """Keep an encoder-decoder's cross-attention keys/values (per layer) and the source's padding."""
        self.memory_kv, self.memory_valid = kv, valid

    def truncate(self, length: int | Sequence[int] | torch.Tensor) -> None:
        """Forget every slot from `length` on: one length for every row, or one per row (B lengths; the
        slots a row forgot stay as invalid holes until every row has moved past them)."""
        if isinstance(length, int):
            if not 0 <= length <= self.length:
                raise LmlabError(f"cannot truncate a cache of length {self.length} to {length}")
            self.valid[:, length:] = False
            self.length = length
        else:
            lengths = torch.as_tensor(length, dtype=torch.long, device=self.valid.device)
            if lengths.shape != (self.batch,):
                raise LmlabError(f"truncate: {tuple(lengths.shape)} lengths given for {self.batch} rows")
            top, low = int(lengths.max()), int(lengths.min())
            if low < 0 or top > self.length:
                raise LmlabError(f"cannot truncate a cache of length {self.length} to lengths {lengths.tolist()}")
            slots = torch.arange(self.max_len, device=self.valid.device)
            self.valid &= slots[None, :] < lengths[:, None]
            self.length = top
            self.padded = self.padded or low != top
        self.next_pos = self.valid[:, :self.length].long().sum(1)

    def select(self, rows: torch.Tensor | list[int]) -> "KVCache":
        """A new cache whose row i is a copy of row rows[i] of this one (rows may repeat)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)
        new = KVCache.__new__(KVCache)
        new.k = [k.index_select(0, rows) for k in self.k]
        new.v = [v.index_select(0, rows) for v in self.v]
        new.valid = self.valid.index_select(0, rows)
        new.next_pos = self.next_pos.index_select(0, rows)
        new.length, new.padded = self.length, self.padded
        new.memory_kv = None if self.memory_kv is None else [(k.index_select(0, rows), v.index_select(0, rows))
                                                             for k, v in self.memory_kv]
        new.memory_valid = None if self.memory_valid is None else self.memory_valid.index_select(0, rows)
        return new


class StepView:
    """The cache protocol for one compiled decoding step: slots were claimed outside the graph (append on
    the real cache); inside it, `update` writes each layer's new keys/values into slot `slot` of the whole
    preallocated buffer, in place, and returns the whole buffer (the step's mask says which slots count),
    so every shape is fixed and one graph serves every cache length."""

    key_valid = None
    memory_kv = None
    memory_valid = None

    def __init__(self, ks: list[torch.Tensor], vs: list[torch.Tensor], slot: torch.Tensor, positions: torch.Tensor):
        self.ks, self.vs, self.slot, self.positions = ks, vs, slot, positions

    def append(self, T: int, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slot, self.positions

    def update(self, layer: int, start, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.ks[layer].index_copy_(2, self.slot, k)
        self.vs[layer].index_copy_(2, self.slot, v)
        return self.ks[layer], self.vs[layer]
