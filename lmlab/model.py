"""The Transformer: decoder-only, encoder-only and encoder-decoder stacks built from the same blocks.

Read top to bottom: norms and positions, attention, MLP, block, stack, and the model that wires
embeddings, stacks and heads together. Every variant is a field of ModelConfig.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.kv_cache import KVCache


# --------------------------------------------------------------------------- norms and positions
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused kernel
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.norm_bias)


class Rotary(nn.Module):
    """Rotary position embedding (half-split layout, as in GPT-NeoX and HF Llama).

    `sin` is stored with the first half negated, so rotating is x*cos + roll(x, D/2)*sin: the same
    products as x*cos + cat(-x2, x1)*sin, in fewer kernels.
    """

    def __init__(self, head_dim: int, max_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        sin = emb.sin()
        sin[:, : head_dim // 2] *= -1
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)  # B×T×1×D


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B×T×heads×D) by per-position cos and half-negated sin (B×T×1×D), in float32."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
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


# --------------------------------------------------------------------------- attention and MLP
class Attention(nn.Module):
    """Multi-head, grouped-query or multi-query attention; self- or cross-attention."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.cross = cross
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        if cross:
            self.q = nn.Linear(cfg.d_model, q_dim, bias=cfg.attn_bias)
            self.kv = nn.Linear(cfg.d_model, 2 * kv_dim, bias=cfg.attn_bias)
        else:
            self.qkv = nn.Linear(cfg.d_model, q_dim + 2 * kv_dim, bias=cfg.attn_bias)
        self.out = nn.Linear(q_dim, cfg.d_model, bias=cfg.out_bias)
        self.scale = cfg.attn_scale
        self.dropout = cfg.dropout

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.head_dim).transpose(1, 2)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self._heads(k, self.n_kv_head), self._heads(v, self.n_kv_head)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, *, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: KVCache | None = None, layer: int = 0, start: int = 0,
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
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale,
            enable_gqa=self.n_kv_head != self.n_head)
        return self.out(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
               "swiglu": F.silu, "geglu": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.mlp in ("swiglu", "geglu")
        self.act = ACTIVATIONS[cfg.mlp]
        if self.gated:  # gate and up projections fused into one matrix
            self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=cfg.out_bias)
        else:
            self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.out_bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.out_bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(self.fc(x))
        return self.proj(self.dropout(h) if self.training else h)


# --------------------------------------------------------------------------- block and stack
class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.cross = Attention(cfg, cross=True) if cross else None
        self.norm_cross = make_norm(cfg) if cross else None
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module, fn, *args, **kw) -> torch.Tensor:
        if self.prenorm:
            y = fn(norm(x), *args, **kw)
            return x + (self.drop(y) if self.training else y)
        y = fn(x, *args, **kw)
        return norm(x + (self.drop(y) if self.training else y))

    def forward(self, x, mask, *, is_causal=False, rope=None, cache=None, layer=0, start=0,
                cross_mask=None, memory_kv=None):
        x = self._residual(x, self.norm1, self.attn, mask, is_causal=is_causal, rope=rope, cache=cache,
                           layer=layer, start=start)
        if self.cross is not None:
            x = self._residual(x, self.norm_cross, self.cross, cross_mask, memory_kv=memory_kv)
        return self._residual(x, self.norm2, self.mlp)


class Stack(nn.Module):
    """A run of blocks with its own position handling and final norm (pre-norm stacks only)."""

    def __init__(self, cfg: ModelConfig, n_layer: int, causal: bool, cross: bool = False):
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList(Block(cfg, cross=cross) for _ in range(n_layer))
        self.norm = make_norm(cfg) if cfg.prenorm else None
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta) if cfg.pos == "rope" else None
        self.rel_bias = RelativeBias(cfg, bidirectional=not causal) if cfg.pos == "relative" else None
        self.drop = nn.Dropout(cfg.dropout)

    def self_mask(self, B: int, T: int, device, *, key_valid: torch.Tensor | None, start: int,
                  attn_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean B×1×T×S mask (True = may attend), or None when plain causal/full attention will do."""
        if attn_mask is not None:
            return attn_mask if attn_mask.dim() == 4 else attn_mask[:, None]
        if key_valid is None and self.rel_bias is None and (start == 0 or T == 1):
            return None  # plain causal (is_causal), or one new query that may see every cached slot
        S = start + T
        if T == 1 and key_valid is not None and self.causal:  # one decoding step: every earlier slot is causal
            allowed = key_valid[:, None, None, :S].clone()
            allowed[..., -1] = True  # a padding query still sees itself (its slot is the last one)
            return allowed
        q_slot = torch.arange(start, S, device=device)[:, None]
        k_slot = torch.arange(S, device=device)[None, :]
        allowed = (k_slot <= q_slot) if self.causal else torch.ones(T, S, dtype=torch.bool, device=device)
        allowed = allowed[None, None].expand(B, 1, T, S)
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, None, :S]
        return allowed | (k_slot == q_slot)  # a padding query still sees itself, so no row is empty

    def forward(self, x: torch.Tensor, positions: torch.Tensor, *, key_valid=None, attn_mask=None,
                cache: KVCache | None = None, start: int = 0, memory: torch.Tensor | None = None,
                memory_valid: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        mask = self.self_mask(B, T, x.device, key_valid=key_valid, start=start, attn_mask=attn_mask)
        if self.rel_bias is not None:
            slots = torch.arange(start + T, device=x.device)
            bias = self.rel_bias(slots[start:], slots).to(x.dtype)
            mask = bias.masked_fill(~mask, float("-inf")) if mask is not None else bias
        rope = self.rotary(positions) if self.rotary is not None else None
        cross_mask = None
        if memory_valid is not None:
            cross_mask = memory_valid[:, None, None, :]
        memory_kv = [None] * len(self.blocks)
        if self.blocks[0].cross is not None:  # cross-attention keys/values: once per source
            if cache is not None and cache.cross is not None:
                memory_kv = cache.cross
            else:
                memory_kv = [block.cross.project_kv(memory) for block in self.blocks]
                if cache is not None:
                    cache.cross = memory_kv
        x = self.drop(x) if self.training else x
        for i, block in enumerate(self.blocks):
            x = block(x, mask, is_causal=self.causal and T > 1, rope=rope, cache=cache, layer=i, start=start,
                      cross_mask=cross_mask, memory_kv=memory_kv[i])
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x) if self.training else x


# --------------------------------------------------------------------------- the model
class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        if cfg.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.emb_norm = make_norm(cfg) if cfg.embed_norm else None
        self.encoder = self.decoder = None
        if cfg.arch in ("encoder", "encoder-decoder"):
            self.encoder = Stack(cfg, cfg.n_layer, causal=False)
        if cfg.arch in ("decoder", "encoder-decoder"):
            n = cfg.n_decoder_layer if cfg.arch == "encoder-decoder" else cfg.n_layer
            self.decoder = Stack(cfg, n, causal=True, cross=cfg.arch == "encoder-decoder")
        if cfg.mlm_head:
            self.mlm_dense, self.mlm_norm = nn.Linear(cfg.d_model, cfg.d_model), make_norm(cfg)
            self.lm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        if cfg.pooler:
            self.pooler, self.nsp = nn.Linear(cfg.d_model, cfg.d_model), nn.Linear(cfg.d_model, 2)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- pieces
    def embed(self, ids: torch.Tensor, positions: torch.Tensor, token_type_ids=None) -> torch.Tensor:
        x = self.tok_emb(ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        elif self.cfg.pos == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        if self.type_emb is not None:
            x = x + self.type_emb(token_type_ids if token_type_ids is not None else torch.zeros_like(ids))
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        return x

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from final hidden states."""
        if self.cfg.mlm_head:
            h = self.mlm_norm(ACTIVATIONS[self.cfg.mlp](self.mlm_dense(h)))
            return self.lm_head(h) + self.lm_bias
        if self.cfg.tied_logit_scale and self.cfg.tie_embeddings:
            h = h * self.cfg.d_model ** -0.5
        return self.lm_head(h)

    def lm_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of head(h) against labels (-100 = ignored); a plain projection head is fused
        with the loss chunk by chunk, so the full logits and their gradient are never held."""
        from lmlab.objectives.loss import linear_cross_entropy

        if self.cfg.mlm_head:
            return F.cross_entropy(self.head(h).flatten(0, -2).float(), labels.flatten(), ignore_index=-100)
        if self.cfg.tied_logit_scale and self.cfg.tie_embeddings:
            h = h * self.cfg.d_model ** -0.5
        return linear_cross_entropy(h, self.lm_head.weight, labels)

    def nsp_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-sentence logits (is-next = 0, random = 1) from the first token's hidden state."""
        return self.nsp(torch.tanh(self.pooler(h[:, 0])))

    @staticmethod
    def _positions(mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
        if mask is None:
            return torch.arange(T, device=device).expand(B, T)
        return (mask.long().cumsum(1) - 1).clamp_min(0)

    def encode(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the bidirectional stack (encoder-only or the encoder half of an encoder-decoder)."""
        B, T = ids.shape
        positions = self._positions(attention_mask, B, T, ids.device)
        x = self.embed(ids, positions, token_type_ids)
        valid = attention_mask.bool() if attention_mask is not None else None
        return self.encoder(x, positions, key_valid=valid)

    def make_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        p = self.tok_emb.weight
        cfg = self.cfg
        return KVCache(len(self.decoder.blocks), batch, cfg.n_kv_head, max_len or cfg.max_seq_len,
                       cfg.head_dim, dtype or p.dtype, p.device)

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                encoder_out: torch.Tensor | None = None, encoder_mask: torch.Tensor | None = None,
                encoder_input_ids: torch.Tensor | None = None, return_hidden: bool = False,
                last_logits_only: bool = False, labels: torch.Tensor | None = None):
        """Logits B×T×V.

        attention_mask (B×T, 1 = token, 0 = padding) covers the new tokens; with a cache, earlier
        tokens keep their own validity. attn_mask (B×T×T bool, True = may attend) replaces the default
        causal/full pattern, e.g. for prefix LM. Encoder-only models return MLM logits; an
        encoder-decoder takes the source as encoder_input_ids (or a precomputed encoder_out).
        last_logits_only: logits B×1×V of the last position only (a prompt pass that only needs the next
        token skips the vocabulary projection of every other position).
        labels (B×T, -100 = ignored): return the mean cross-entropy instead of logits, computed by
        `lm_loss` without materialising the B×T×V logits (training's fast path).
        """
        if self.decoder is None:
            h = self.encode(input_ids, attention_mask, token_type_ids)
            if labels is not None:
                return self.lm_loss(h, labels)
            return (self.head(h), h) if return_hidden else self.head(h)
        B, T = input_ids.shape
        memory = memory_valid = None
        if self.encoder is not None:
            if encoder_mask is None and encoder_input_ids is not None:
                encoder_mask = torch.ones_like(encoder_input_ids)
            if cache is None or cache.cross is None:
                memory = encoder_out if encoder_out is not None else self.encode(encoder_input_ids, encoder_mask)
            if cache is not None and cache.cross_mask is None and encoder_mask is not None:
                cache.cross_mask = encoder_mask.bool()
            memory_valid = cache.cross_mask if cache is not None else (
                encoder_mask.bool() if encoder_mask is not None else None)
        if cache is not None:
            mask = attention_mask.bool() if attention_mask is not None else torch.ones(
                B, T, dtype=torch.bool, device=input_ids.device)
            start, cache_positions = cache.reserve(mask)
            positions = cache_positions if positions is None else positions
            if attention_mask is not None:
                cache.padded = True
            key_valid = cache.valid if getattr(cache, "padded", True) else None  # no padding: causal order is the mask
        else:
            start, key_valid = 0, attention_mask.bool() if attention_mask is not None else None
            if positions is None:
                positions = self._positions(attention_mask, B, T, input_ids.device)
        x = self.embed(input_ids, positions, token_type_ids)
        h = self.decoder(x, positions, key_valid=key_valid, attn_mask=attn_mask, cache=cache, start=start,
                         memory=memory, memory_valid=memory_valid)
        if cache is not None:
            cache.commit(T)
        if labels is not None:
            return self.lm_loss(h, labels)
        logits = self.head(h[:, -1:] if last_logits_only else h)
        return (logits, h) if return_hidden else logits
