"""A preallocated key/value cache for incremental decoding.

Slots are physical positions shared by every row of the batch; `valid` marks which slots hold a real
token of that row (left padding leaves invalid slots), and `next_pos` is each row's own logical
position, so rows of different lengths decode together. `truncate` rolls every row back to an earlier
slot count (speculative decoding discards rejected drafts) and `select` copies rows (a shared prefix
computed once, then repeated for many continuations).
"""
from __future__ import annotations

import torch


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
        self.padded = False  # whether any call brought an attention mask (else every slot < length is valid)
        # encoder-decoder: per-layer cross-attention keys/values and the encoder padding mask
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.cross_mask: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, mask: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Claim slots for T new tokens (mask: B×T, True = real token). Returns (start slot, positions)."""
        B, T = mask.shape
        start = self.length
        if start + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {start + T} requested")
        positions = self.next_pos[:, None] + mask.long().cumsum(1) - 1
        positions = positions.clamp_min(0)
        self.valid[:, start:start + T] = mask
        self.next_pos += mask.long().sum(1)
        return start, positions

    def commit(self, T: int) -> None:
        self.length += T

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values (B×H×T×D) at `start` and return all keys/values so far."""
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.valid[:, length:] = False
        self.length = length
        self.next_pos = self.valid[:, :length].long().sum(1)

    def select(self, rows: torch.Tensor | list[int]) -> "KVCache":
        """A new cache whose row i is a copy of row rows[i] of this one (rows may repeat)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.valid.device)
        new = KVCache.__new__(KVCache)
        new.k = [k.index_select(0, rows) for k in self.k]
        new.v = [v.index_select(0, rows) for v in self.v]
        new.valid = self.valid.index_select(0, rows)
        new.next_pos = self.next_pos.index_select(0, rows)
        new.length = self.length
        new.padded = self.padded
        new.cross = None if self.cross is None else [(k.index_select(0, rows), v.index_select(0, rows))
                                                       for k, v in self.cross]
        new.cross_mask = None if self.cross_mask is None else self.cross_mask.index_select(0, rows)
        return new
