"""Position information: rotary embeddings, the sinusoidal table and T5's bucketed relative bias."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from lmlab.config import ModelConfig


class Rotary(nn.Module):
    """Rotary position embedding (half-split layout, as in GPT-NeoX and HF Llama).

    `sin` is stored with the first half negated, so rotating is x*cos + roll(x, D/2)*sin: the same
    products as x*cos + cat(-x2, x1)*sin, in fewer kernels. The tables are computed, not stored:
    `reset_buffers` (re)builds them, e.g. after building the model on the meta device.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_len, self.theta = head_dim, max_len, theta
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
        freqs = torch.outer(torch.arange(self.max_len, dtype=torch.float32, device=device), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        sin = emb.sin()
        sin[:, : d // 2] *= -1
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)  # B×T×1×D


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B×T×heads×D) by per-position cos and half-negated sin (B×T×1×D), in float32."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


def sinusoidal_table(max_len: int, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    pos = torch.arange(max_len, dtype=torch.float32, device=device)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim, device=device)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return table


class RelativeBias(nn.Module):
    """T5's bucketed relative position bias, one scalar per head and bucket."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = cfg.rel_buckets, cfg.rel_max_distance
        self.weight = nn.Parameter(torch.zeros(cfg.rel_buckets, cfg.n_head))

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        n = self.buckets
        out = torch.zeros_like(rel)
        if self.bidirectional:
            n //= 2
            out += (rel > 0).long() * n
            rel = rel.abs()
        else:
            rel = -torch.clamp(rel, max=0)
        exact = n // 2
        large = exact + (torch.log(rel.float().clamp_min(1) / exact) / math.log(self.max_distance / exact)
                         * (n - exact)).long()
        large = torch.clamp(large, max=n - 1)
        return out + torch.where(rel < exact, rel, large)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        rel = k_pos[None, :] - q_pos[:, None]
        return self.weight[self.bucket(rel)].permute(2, 0, 1).unsqueeze(0)  # 1×H×Tq×Tk
