"""The Transformer: decoder-only, encoder-only and encoder-decoder stacks built from the same blocks.

Read top to bottom: block, stack, and the model that wires embeddings, stacks and heads together. Every
variant is a field of ModelConfig. Everything outside the model calls its public interface:

    h = model.hidden_states(ids, attention_mask=..., cache=...)   final hidden states B×T×D
    model.logits(h)                  vocabulary logits of every position
    model.logits(h, "last")          of the last position only (B×1×V)
    model.logits(h, index)           of selected positions (index: flat LongTensor into h viewed as N×D)
    model(ids, labels=labels)        mean cross-entropy, the projection fused with the loss (training)
    model(ids, ...)                  logits, as hidden_states + logits
    model.encode(ids, mask)          the bidirectional stack's hidden states (encoder models)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.config import ModelConfig
from lmlab.errors import LmlabError
from lmlab.model import masks
from lmlab.model.attention import Attention
from lmlab.model.kv_cache import KVCache
from lmlab.model.layers import ACTIVATIONS, make_feed_forward, make_norm
from lmlab.model.loss import linear_cross_entropy
from lmlab.model.moe import MoE, RouterStats
from lmlab.model.rolling_cache import RollingCache
from lmlab.model.positions import RelativeBias, Rotary, sinusoidal_table

TABLE_POSITIONS = ("learned", "sinusoidal", "rope")  # position kinds with a table of max_seq_len rows


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, cross: bool = False, layer: int = 0):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.cross = Attention(cfg, cross=True) if cross else None
        self.norm_cross = make_norm(cfg) if cross else None
        self.norm2, self.mlp = make_norm(cfg), make_feed_forward(cfg, layer)
        self.drop = nn.Dropout(cfg.dropout)

    def _feed_forward(self, h: torch.Tensor, valid: torch.Tensor | None, stats: RouterStats | None,
                      name: str) -> torch.Tensor:
        """The MLP, or the MoE block routing only the real tokens (valid) and reporting to stats."""
        if not isinstance(self.mlp, MoE):
            return self.mlp(h)
        out = self.mlp(h, valid)
        if stats is not None:
            stats.add(name, out)
        return out.y

    def _residual(self, x: torch.Tensor, norm: nn.Module, fn, *args, **kw) -> torch.Tensor:
        if self.prenorm:
            y = fn(norm(x), *args, **kw)
            return x + (self.drop(y) if self.training else y)
        y = fn(x, *args, **kw)
        return norm(x + (self.drop(y) if self.training else y))

    def forward(self, x, mask, *, is_causal=False, rope=None, cache=None, layer=0, start=0,
                cross_mask=None, memory_kv=None, valid=None, stats=None, name=""):
        """valid (B×T bool or None): the real tokens among x's, for the MoE router; stats: its report."""
        x = self._residual(x, self.norm1, self.attn, mask, is_causal=is_causal, rope=rope, cache=cache,
                           layer=layer, start=start)
        if self.cross is not None:
            x = self._residual(x, self.norm_cross, self.cross, cross_mask, memory_kv=memory_kv)
        return self._residual(x, self.norm2, self._feed_forward, valid, stats, name)


class Stack(nn.Module):
    """A run of blocks with its own position handling and final norm (pre-norm stacks only)."""

    def __init__(self, cfg: ModelConfig, n_layer: int, causal: bool, cross: bool = False, name: str = "decoder"):
        super().__init__()
        self.causal, self.name = causal, name
        self.blocks = nn.ModuleList(Block(cfg, cross=cross, layer=i) for i in range(n_layer))
        pat = masks.pattern(cfg.attn_window, causal, cfg.attn_global_tokens) if cfg.attn_window else None
        self.patterns = [pat if cfg.is_window_layer(i) else None for i in range(n_layer)]
        self.norm = make_norm(cfg) if cfg.prenorm else None
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta) if cfg.pos == "rope" else None
        self.rel_bias = RelativeBias(cfg, bidirectional=not causal) if cfg.pos == "relative" else None
        self.drop = nn.Dropout(cfg.dropout)

    def project_memory(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's cross-attention keys/values of the encoder's output."""
        return [block.cross.project_kv(memory) for block in self.blocks]

    def layer_masks(self, B: int, T: int, start, device, *, key_valid, attn_mask, dtype, cache=None) -> list:
        """One self-attention mask per layer: one shared by the full-attention layers, and one for the
        windowed layers (cfg.window_layers): their pattern's Sparse route over a fresh sequence, else the
        full mask and-ed with the pattern (cut to the keys a RollingCache kept). See masks.windowed."""
        bias = None
        if self.rel_bias is not None:
            slots = torch.arange(start + T, device=device)
            bias = self.rel_bias(slots[start:], slots).to(dtype)
        mask = masks.self_attention(B, T, start, device, causal=self.causal, key_valid=key_valid,
                                    attn_mask=attn_mask, need=bias is not None)
        shared = mask if bias is None else masks.add_bias(bias, mask)
        pattern = next((p for p in self.patterns if p is not None), None)
        if pattern is None:
            return [shared] * len(self.blocks)
        fresh = attn_mask is None and bias is None and isinstance(start, int) and start == 0
        if not fresh and mask is None:  # plain causal so far: the window needs the explicit mask
            mask = masks.self_attention(B, T, start, device, causal=self.causal, key_valid=key_valid, need=True)
        windowed = masks.windowed(mask, pattern, B, T, start, device, key_valid=key_valid, sparse=fresh)
        if isinstance(cache, RollingCache) and not fresh:
            return [windowed[..., cache.first_key(i, start):] if p is not None else shared
                    for i, p in enumerate(self.patterns)]
        return [shared if p is None else windowed for p in self.patterns]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, *, key_valid=None, attn_mask=None,
                cache=None, start=0, memory_kv=None, memory_valid=None, stats=None) -> torch.Tensor:
        B, T, _ = x.shape
        layer_masks = self.layer_masks(B, T, start, x.device, key_valid=key_valid, attn_mask=attn_mask,
                                       dtype=x.dtype, cache=cache)
        rope = self.rotary(positions) if self.rotary is not None else None
        cross_mask = masks.cross(memory_valid)
        memory_kv = memory_kv or [None] * len(self.blocks)
        x = self.drop(x) if self.training else x
        valid = None if key_valid is None or not isinstance(start, int) else key_valid[:, start:start + T]
        for i, block in enumerate(self.blocks):
            x = block(x, layer_masks[i], is_causal=self.causal and T > 1, rope=rope, cache=cache, layer=i,
                      start=start, cross_mask=cross_mask, memory_kv=memory_kv[i], valid=valid, stats=stats,
                      name=f"{self.name}.{i}")
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x) if self.training else x


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
            self.encoder = Stack(cfg, cfg.n_layer, causal=False, name="encoder")
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
        self._stats: RouterStats | None = None  # open while moe_stats() is

    @contextmanager
    def moe_stats(self) -> Iterator[RouterStats]:
        """Collect what the MoE layers report during the block (every forward, every stack): the weighted
        auxiliary loss to add to the training loss and tokens per expert of each layer.

            with model.moe_stats() as stats:
                loss = model(ids, labels=labels)
            (loss + stats.loss).backward()
        """
        outer, self._stats = self._stats, RouterStats()
        try:
            yield self._stats
        finally:
            self._stats = outer

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the position tables, which are derived from the config, not stored in checkpoints."""
        if self.cfg.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(self.cfg.max_seq_len, self.cfg.d_model, device),
                                 persistent=False)
        for stack in (self.encoder, self.decoder):
            if stack is not None and stack.rotary is not None:
                stack.rotary.reset_buffers(device)

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_active_params(self) -> int:
        """Parameters one token uses: all but the experts its router does not pick (for MFU)."""
        moes = [m for m in self.modules() if isinstance(m, MoE)]
        return self.num_params() - sum(m.num_params() - m.num_active_params() for m in moes)

    # -- pieces
    def _embed(self, ids: torch.Tensor, positions: torch.Tensor, token_type_ids=None) -> torch.Tensor:
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

    def _check_length(self, end: int) -> None:
        if self.cfg.pos in TABLE_POSITIONS and end > self.cfg.max_seq_len:
            raise LmlabError(f"{end} positions requested; the model's context window is {self.cfg.max_seq_len}")

    @staticmethod
    def _positions(mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
        if mask is None:
            return torch.arange(T, device=device).expand(B, T)
        return (mask.long().cumsum(1) - 1).clamp_min(0)

    # -- the public interface
    def logits(self, h: torch.Tensor, positions: torch.Tensor | Literal["last"] | None = None) -> torch.Tensor:
        """Vocabulary logits from final hidden states h (…×D): of every position (None), of the last
        position ("last": h is B×T×D, result B×1×V), or of the positions `positions` selects (a LongTensor
        of flat indices into h viewed as N×D; result len(positions)×V). Only the chosen rows are projected."""
        if isinstance(positions, str):
            if positions != "last":
                raise LmlabError(f"logits: positions={positions!r} (give None, 'last' or an index tensor)")
            h = h[:, -1:]
        elif positions is not None:
            h = h.reshape(-1, h.shape[-1]).index_select(0, positions)
        if self.cfg.mlm_head:
            h = self.mlm_norm(ACTIVATIONS[self.cfg.mlp](self.mlm_dense(h)))
            return self.lm_head(h) + self.lm_bias
        if self.cfg.tied_logit_scale and self.cfg.tie_embeddings:
            h = h * self.cfg.d_model ** -0.5
        return self.lm_head(h)

    def lm_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of logits(h) against labels (-100 = ignored); a plain projection head is fused
        with the loss chunk by chunk, so the full logits and their gradient are never held."""
        if self.cfg.mlm_head:
            return F.cross_entropy(self.logits(h).flatten(0, -2).float(), labels.flatten(), ignore_index=-100)
        if self.cfg.tied_logit_scale and self.cfg.tie_embeddings:
            h = h * self.cfg.d_model ** -0.5
        return linear_cross_entropy(h, self.lm_head.weight, labels)

    def nsp_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-sentence logits (is-next = 0, random = 1) from the first token's hidden state."""
        return self.nsp(torch.tanh(self.pooler(h[:, 0])))

    def encode(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the bidirectional stack (encoder-only or the encoder half of an encoder-decoder)."""
        B, T = ids.shape
        self._check_length(T)
        positions = self._positions(attention_mask, B, T, ids.device)
        x = self._embed(ids, positions, token_type_ids)
        valid = attention_mask.bool() if attention_mask is not None else None
        return self.encoder(x, positions, key_valid=valid, stats=self._stats)

    def make_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                   rolling: bool = False) -> KVCache | RollingCache:
        """An empty KV cache for `batch` rows of up to `max_len` tokens (default: the context window).
        rolling: sliding-window layers keep only their window (RollingCache; no rollback). Without it,
        windowed layers keep every key and their mask applies the window (any cache operation works)."""
        if self.decoder is None:
            raise LmlabError(f"an encoder-only model ({self.cfg.name or self.cfg.arch}) has no decoder to keep a "
                             "KV cache for; caches serve decoder and encoder-decoder models")
        cfg, p = self.cfg, self.tok_emb.weight
        if rolling:
            if cfg.arch != "decoder" or cfg.attn_window is None:
                raise LmlabError(f"a rolling KV cache needs a decoder-only model with attn_window set "
                                 f"(this is arch={cfg.arch!r}, attn_window={cfg.attn_window})")
            windows = [pat.window if pat is not None else None for pat in self.decoder.patterns]
            return RollingCache(windows, batch, cfg.n_kv_head, max_len or cfg.max_seq_len, cfg.head_dim,
                                dtype or p.dtype, p.device)
        return KVCache(len(self.decoder.blocks), batch, cfg.n_kv_head, max_len or cfg.max_seq_len,
                       cfg.head_dim, dtype or p.dtype, p.device)

    def _memory(self, cache, encoder_out, encoder_mask, encoder_input_ids):
        """Cross-attention keys/values and source validity of an encoder-decoder (from the cache if there)."""
        if cache is not None and cache.memory_kv is not None:
            return cache.memory_kv, cache.memory_valid
        if encoder_mask is None and encoder_input_ids is not None:
            encoder_mask = torch.ones_like(encoder_input_ids)
        memory = encoder_out if encoder_out is not None else self.encode(encoder_input_ids, encoder_mask)
        kv, valid = self.decoder.project_memory(memory), encoder_mask.bool() if encoder_mask is not None else None
        if cache is not None:
            cache.set_memory(kv, valid)
        return kv, valid

    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None, cache=None, encoder_out: torch.Tensor | None = None,
                      encoder_mask: torch.Tensor | None = None,
                      encoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states B×T×D (of the decoder; of the encoder for encoder-only models).

        attention_mask (B×T, 1 = token, 0 = padding) covers the new tokens; with a cache, earlier tokens keep
        their own validity (the cache's). positions (B×T) overrides the positions the mask implies.
        attn_mask (B×T×S bool, True = may attend, see lmlab.model.masks) replaces the default causal/padding
        pattern (prefix LM, packed rows). An encoder-decoder takes the source as encoder_input_ids (or a
        precomputed encoder_out); with a cache, only on the first call.
        """
        if self.decoder is None:
            return self.encode(input_ids, attention_mask, token_type_ids)
        B, T = input_ids.shape
        memory_kv = memory_valid = None
        if self.encoder is not None:
            memory_kv, memory_valid = self._memory(cache, encoder_out, encoder_mask, encoder_input_ids)
        if cache is not None:
            if positions is None and isinstance(cache, KVCache) and attention_mask is None and not cache.padded:
                self._check_length(cache.length + T)  # no padding: positions are slots (else positions < slots)
            start, cache_positions = cache.append(T, attention_mask)
            positions = cache_positions if positions is None else positions
            key_valid = cache.key_valid
        else:
            start, key_valid = 0, attention_mask.bool() if attention_mask is not None else None
            if positions is None:
                self._check_length(T)
                positions = self._positions(attention_mask, B, T, input_ids.device)
        x = self._embed(input_ids, positions, token_type_ids)
        return self.decoder(x, positions, key_valid=key_valid, attn_mask=attn_mask, cache=cache, start=start,
                            memory_kv=memory_kv, memory_valid=memory_valid, stats=self._stats)

    def forward(self, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None, return_hidden: bool = False,
                last_logits_only: bool = False, **kw):
        """Logits B×T×V (hidden_states, then logits; keyword arguments as hidden_states).

        last_logits_only: logits B×1×V of the last position only. labels (B×T, -100 = ignored): return the
        mean cross-entropy instead, without materialising the B×T×V logits (training's fast path).
        return_hidden: (logits, hidden states)."""
        h = self.hidden_states(input_ids, **kw)
        if labels is not None:
            return self.lm_loss(h, labels)
        logits = self.logits(h, "last" if last_logits_only else None)
        return (logits, h) if return_hidden else logits
