"""Multi-head, grouped-query or multi-query attention; self- or cross-attention. Masks come from
lmlab.model.masks (a masks.Sparse route: the block-sparse kernel of lmlab.model.sparse_attention, linear
memory); keys/values of earlier tokens come from the cache protocol (lmlab.model.kv_cache)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.model.masks import Sparse
from lmlab.model.positions import apply_rotary
from lmlab.model.sparse_attention import attend

FEW_QUERIES = 16  # compiled steps of at most this many queries per row take the written-out attention


def _native_attention() -> bool:
    """Whether lmlab's native few-query attention (lmlab.inference.native: attend_cached) is built here. A
    compiled CPU step calls it: it reads only the cache slots the mask allows, where the written-out attention
    reads every slot of the static cache (measured for SmolLM2 int4 at 150 slots: 0.6 ms of a 3.5 ms step)."""
    from lmlab.inference import native

    return native.available()


def _native_prompt_attention(q: torch.Tensor) -> bool:
    """Whether a bfloat16 prompt's causal attention goes to lmlab's native kernel (causal_attention: vdpbf16ps for
    both products; SmolLM2's 512-token layer 0.84 ms against 4.5 ms for PyTorch's flash attention on 2 AMD EPYC
    cores). Inference only: the op has no backward."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or (torch.is_grad_enabled() and q.requires_grad):
        return False
    from lmlab.inference import native

    return native.causal_attention_fast(q.shape[-1])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.cross = cross
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        if cross:
            self.q = nn.Linear(cfg.d_model, q_dim, bias=cfg.attn_bias)
            self.kv = nn.Linear(cfg.d_model, 2 * kv_dim, bias=cfg.attn_bias)
        else:  # queries, keys and values in one matrix
            self.qkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.attn_bias)
        self.out = nn.Linear(q_dim, cfg.d_model, bias=cfg.out_bias)
        self.scale = cfg.attn_scale
        self.dropout = cfg.dropout

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values of the encoder's output (computed once per source)."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, *, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, cache=None, layer: int = 0, start=0,
                memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.cross:
            q = self._heads(self.q(x), self.n_head)
            k, v = memory_kv
        else:
            H, KV = self.n_head, self.n_kv_head
            qkv = self.qkv(x).view(B, T, H + 2 * KV, self.head_dim)
            qk = qkv[:, :, : H + KV]
            if rope is not None:  # queries and keys rotated together
                qk = apply_rotary(qk, *rope)
            q, k, v = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), qkv[:, :, H + KV:].transpose(1, 2)
            if cache is not None:
                k, v = cache.update(layer, start, k, v)
        if isinstance(mask, Sparse):
            y = attend(q, k, v, mask.pattern, key_valid=mask.key_valid, scale=self.scale, dropout=self.dropout,
                       training=self.training)
            return self.out(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        if (mask is not None and mask.dtype == torch.bool and T <= FEW_QUERIES and not self.training
                and torch.compiler.is_compiling()):
            y = self._few_queries(q, k, v, mask)
        elif mask is None and is_causal and not self.training and _native_prompt_attention(q):
            y = torch.ops.lmlab.causal_attention(q, k, v, self.scale if self.scale is not None else self.head_dim ** -0.5)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
                enable_gqa=self.n_kv_head != self.n_head)
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def _few_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Attention of a few queries per row (a compiled decoding step or verification pass) written out, so
        the compiler fuses the mask, the softmax and both products into a few loops over the cache instead of
        calling the flash kernel, whose set-up dominates at one query (measured: 55 µs a layer for SmolLM2 on
        2 CPU cores). q B×H×T×D, k/v B×KV×S×D, allowed B×1×T×S (bool) → B×H×T×D."""
        B, H, T, D = q.shape
        KV = k.shape[1]
        scale = self.scale if self.scale is not None else D ** -0.5
        if q.device.type == "cpu" and _native_attention():  # only the allowed slots are read
            return torch.ops.lmlab.attend_cached(q, k, v, allowed.reshape(B, T, -1), scale)
        if T == 1:  # one query per row (a step): the graph the one-token step had before, unchanged
            qg = q.reshape(B, KV, H // KV, D).float()  # the query heads that share each key/value head
            scores = torch.einsum("bkgd,bksd->bkgs", qg, k.float()) * scale
            scores = scores.masked_fill(~allowed.view(B, 1, 1, -1), float("-inf"))
            y = torch.einsum("bkgs,bksd->bkgd", scores.softmax(-1), v.float())
            return y.reshape(B, H, 1, D).to(q.dtype)
        qg = q.reshape(B, KV, H // KV, T, D).float()
        scores = torch.einsum("bkgtd,bksd->bkgts", qg, k.float()) * scale
        scores = scores.masked_fill(~allowed.view(B, 1, 1, T, -1), float("-inf"))
        y = torch.einsum("bkgts,bksd->bkgtd", scores.softmax(-1), v.float())
        return y.reshape(B, H, T, D).to(q.dtype)
