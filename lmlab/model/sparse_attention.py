"""Sparse attention: sliding-window and local+global patterns, with memory linear in sequence length.

Positions. Keys are positions 0..S-1; the T queries are positions offset..offset+T-1 (default offset = S - T,
the layout of a KV cache). Patterns only ever compare these absolute positions.

Patterns:
  * SlidingWindow(window): causal, query i sees key j when i - window < j <= i (itself and the window - 1 keys
    before it). This is HF transformers' convention (transformers 5.x, masking_utils.py:
    sliding_window_overlay `kv_idx > q_idx - sliding_window` and-ed with causal_mask_function
    `kv_idx <= q_idx`), used by Mistral / Qwen2 `sliding_window`.
  * LocalGlobal(window, global_tokens): bidirectional band |i - j| <= window // 2 (HF Longformer's
    `one_sided_attn_window_size = attention_window // 2`, band inclusive both sides), plus global positions
    that see every key and are seen by every query.
  A window larger than the context is allowed: the pattern is then plain causal / plain bidirectional attention.
  A window < 1 is an LmlabError.

Two kernels, tested equal to SDPA with the explicit mask (`dense_mask`):
  * flex: torch.nn.attention.flex_attention with a BlockMask built block row by block row (never a T x S
    tensor). Compiled (dynamic=False: every new shape compiles, ~20 s on a CPU core). Its backward is not
    implemented on CPU.
  * blocked: queries in chunks of C; each chunk runs SDPA against only the keys its rows can reach (the
    window span, plus global keys), with that chunk's small explicit mask. Memory O(T * (C + window)),
    forward and backward, any device, dropout supported.
`attend` picks flex on CUDA for >= 128 queries without dropout, blocked otherwise; `backend=` forces one.
Rows with no visible key (all their keys padding) give zeros, as SDPA and flex do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError

__all__ = ["SlidingWindow", "LocalGlobal", "attend", "RollingKV", "flex_available", "BLOCK"]

BLOCK = 128  # flex BlockMask tile (query rows x key columns)
BACKENDS = ("auto", "blocked", "flex")


def _check_window(window: object, what: str) -> int:
    if isinstance(window, bool) or not isinstance(window, int):
        raise LmlabError(f"{what}: window must be an integer >= 1, got {window!r}")
    if window < 1:
        raise LmlabError(f"{what}: window must be >= 1, got {window}")
    return window


def _resolve_offset(T: int, S: int, offset: int | None) -> int:
    offset = S - T if offset is None else offset
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset + T > S:
        raise LmlabError(f"sparse attention: query offset {offset!r} with {T} queries does not fit {S} keys "
                         f"(need 0 <= offset <= {S - T})")
    return offset


class _Pattern:
    """Shared mask builders; subclasses give `rule(S, device)`, `key_span` and `extra_keys`."""

    def rule(self, S: int, device):  # pragma: no cover - abstract
        raise NotImplementedError

    def key_span(self, q_lo: int, q_hi: int, S: int) -> tuple[int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_keys(self, q_lo: int, q_hi: int, S: int) -> list[int]:
        """Key positions outside key_span(q_lo, q_hi, S) that queries q_lo..q_hi-1 may see, ascending."""
        return []

    def chunk_keys(self, q_lo: int, q_hi: int, S: int, device) -> tuple[int, int, torch.Tensor]:
        """(lo, hi, extra): the keys absolute queries q_lo..q_hi-1 can reach are lo..hi-1 plus `extra`."""
        lo, hi = self.key_span(q_lo, q_hi, S)
        extra = torch.tensor(self.extra_keys(q_lo, q_hi, S), dtype=torch.long, device=device)
        return lo, hi, extra

    def dense_mask(self, T: int, S: int, offset: int | None = None, key_valid: torch.Tensor | None = None,
                   device=None) -> torch.Tensor:
        """The reference: bool [T, S] (True = attend), or [B, 1, T, S] when key_valid [B, S] is given."""
        offset = _resolve_offset(T, S, offset)
        if key_valid is not None:
            key_valid = _check_key_valid(key_valid, None, S)
            device = key_valid.device if device is None else device
        q = torch.arange(T, device=device) + offset
        k = torch.arange(S, device=device)
        mask = self.rule(S, device)(q[:, None], k[None, :])
        if key_valid is None:
            return mask
        return mask[None, None] & key_valid[:, None, None, :]

    def block_mask(self, T: int, S: int, offset: int | None = None, key_valid: torch.Tensor | None = None,
                   device=None, block: int = BLOCK):
        """A flex_attention BlockMask for this pattern (and padding), built one query block at a time."""
        from torch.nn.attention.flex_attention import BlockMask

        offset = _resolve_offset(T, S, offset)
        if key_valid is not None:
            key_valid = _check_key_valid(key_valid, None, S)
            device = key_valid.device
        rule = self.rule(S, device)
        partial, full = self._classify_blocks(T, S, offset, rule, key_valid, device, block)

        def mask_mod(b, h, q_idx, kv_idx):
            allowed = rule(q_idx + offset, kv_idx)
            return allowed & key_valid[b, kv_idx] if key_valid is not None else allowed

        def ordered(grid):
            counts = grid.sum(-1, dtype=torch.int32)
            order = torch.argsort(grid.to(torch.int8), dim=-1, descending=True, stable=True)
            return counts[None, None].contiguous(), order.to(torch.int32)[None, None].contiguous()

        kv_num, kv_idx = ordered(partial)
        full_num, full_idx = ordered(full)
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(block, block),
                                        mask_mod=mask_mod, seq_lengths=(T, S))

    def _classify_blocks(self, T, S, offset, rule, key_valid, device, block):
        """Block grid [nQ, nK]: partial (mask_mod needed) and full (every pair allowed, all keys valid)."""
        nq, nk = math.ceil(T / block), math.ceil(S / block)
        partial = torch.zeros(nq, nk, dtype=torch.bool, device=device)
        full = torch.zeros(nq, nk, dtype=torch.bool, device=device)
        valid_blocks = None
        if key_valid is not None:
            padded = F.pad(key_valid, (0, nk * block - S), value=False)
            valid_blocks = padded.view(key_valid.shape[0], nk, block).all(-1).all(0)
        for qb in range(nq):
            r0, r1 = qb * block, min(T, (qb + 1) * block)
            lo, hi = self.key_span(r0 + offset, r1 + offset, S)
            if hi > lo:
                kb0, kb1 = lo // block, math.ceil(hi / block)
                keys = torch.arange(kb0 * block, kb1 * block, device=device)
                rows = torch.arange(r0, r1, device=device) + offset
                sub = rule(rows[:, None], keys.clamp(max=S - 1)[None, :]) & (keys < S)[None, :]
                sub = sub.view(r1 - r0, kb1 - kb0, block)
                any_, all_ = sub.any(2).any(0), sub.all(2).all(0) & (r1 - r0 == block)
                if valid_blocks is not None:
                    all_ = all_ & valid_blocks[kb0:kb1]
                full[qb, kb0:kb1] = all_
                partial[qb, kb0:kb1] = any_ & ~all_
            for key in self.extra_keys(r0 + offset, r1 + offset, S):
                if not full[qb, key // block]:
                    partial[qb, key // block] = True
        return partial, full


@dataclass(frozen=True)
class SlidingWindow(_Pattern):
    """Causal sliding window: query i sees keys j with i - window < j <= i (HF Mistral/Qwen2 convention)."""

    window: int

    def __post_init__(self):
        _check_window(self.window, "SlidingWindow")

    def rule(self, S: int, device):
        window = self.window

        def allowed(q, k):
            return (k <= q) & (k > q - window)

        return allowed

    def key_span(self, q_lo: int, q_hi: int, S: int) -> tuple[int, int]:
        return max(0, q_lo - self.window + 1), min(S, q_hi)


@dataclass(frozen=True)
class LocalGlobal(_Pattern):
    """Bidirectional band |i - j| <= window // 2 plus global positions that see and are seen by all.

    global_tokens: an int n (positions 0..n-1, e.g. 1 for a [CLS] token) or a sequence of positions.
    Global positions at or past the sequence length are ignored.
    """

    window: int
    global_tokens: tuple[int, ...] | int = ()

    def __post_init__(self):
        _check_window(self.window, "LocalGlobal")
        g = self.global_tokens
        if isinstance(g, bool) or (isinstance(g, int) and g < 0):
            raise LmlabError(f"LocalGlobal: global_tokens must be a count >= 0 or positions, got {g!r}")
        positions = tuple(range(g)) if isinstance(g, int) else tuple(g) if isinstance(g, (list, tuple, range)) else None
        if positions is None or not all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
            raise LmlabError(f"LocalGlobal: global_tokens must be a count or integer positions, got {g!r}")
        if any(p < 0 for p in positions):
            raise LmlabError(f"LocalGlobal: global position {min(positions)} is negative")
        positions = tuple(sorted(set(positions)))
        object.__setattr__(self, "global_tokens", positions)

    @property
    def radius(self) -> int:
        return self.window // 2

    def _globals(self, S: int) -> list[int]:
        return [p for p in self.global_tokens if p < S]

    def rule(self, S: int, device):
        radius = self.radius
        is_global = torch.zeros(S, dtype=torch.bool, device=device)
        is_global[self._globals(S)] = True

        def allowed(q, k):
            return ((q - k).abs() <= radius) | is_global[q] | is_global[k]

        return allowed

    def key_span(self, q_lo: int, q_hi: int, S: int) -> tuple[int, int]:
        if any(q_lo <= p < q_hi for p in self.global_tokens):
            return 0, S  # a global query sees everything
        return max(0, q_lo - self.radius), min(S, q_hi + self.radius)

    def extra_keys(self, q_lo: int, q_hi: int, S: int) -> list[int]:
        lo, hi = self.key_span(q_lo, q_hi, S)
        return [p for p in self._globals(S) if not lo <= p < hi]


def _check_key_valid(key_valid: torch.Tensor, B: int | None, S: int) -> torch.Tensor:
    """key_valid must be a bool [B, S] tensor (any batch size when B is None)."""
    ok = isinstance(key_valid, torch.Tensor) and key_valid.dtype == torch.bool and key_valid.dim() == 2
    if not ok or key_valid.shape[1] != S or (B is not None and key_valid.shape[0] != B):
        got = tuple(key_valid.shape) if isinstance(key_valid, torch.Tensor) else type(key_valid).__name__
        dtype = getattr(key_valid, "dtype", "")
        raise LmlabError(f"sparse attention: key_valid must be a bool tensor of shape "
                         f"({'batch' if B is None else B}, {S}), got {got} {dtype}")
    return key_valid


def _check_inputs(q, k, v, pattern, key_valid, dropout, backend):
    if not isinstance(pattern, _Pattern):
        raise LmlabError("sparse attention: pattern must be SlidingWindow or LocalGlobal, "
                         f"got {type(pattern).__name__}")
    if backend not in BACKENDS:
        raise LmlabError(f"sparse attention: unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise LmlabError(f"sparse attention: q, k, v must be [batch, heads, length, dim], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or k.shape[1] < 1 or H % k.shape[1]:
        raise LmlabError(f"sparse attention: k/v {tuple(k.shape)}/{tuple(v.shape)} do not fit q {tuple(q.shape)} "
                         f"(kv heads must divide query heads)")
    if not 0.0 <= dropout < 1.0:
        raise LmlabError(f"sparse attention: dropout must be in [0, 1), got {dropout}")
    if key_valid is not None:
        _check_key_valid(key_valid, B, k.shape[2])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: _Pattern,
           key_valid: torch.Tensor | None = None, scale: float | None = None, dropout: float = 0.0,
           training: bool = False, offset: int | None = None, backend: str = "auto",
           chunk: int = BLOCK) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, Hkv, S, D] (Hkv divides H) under `pattern`.

    key_valid [B, S] bool marks real keys (False = padding); offset places the queries (default S - T).
    backend: "auto" (flex on CUDA for >= 128 queries without dropout, else blocked), "blocked" or "flex".
    Compiled flex recompiles for every new (T, S) shape, so short and decoding calls stay on "blocked".
    """
    _check_inputs(q, k, v, pattern, key_valid, dropout, backend)
    offset = _resolve_offset(q.shape[2], k.shape[2], offset)
    p = dropout if training else 0.0
    if backend == "auto":
        long_on_cuda = q.device.type == "cuda" and q.shape[2] >= BLOCK
        backend = "flex" if long_on_cuda and p == 0.0 and flex_available() else "blocked"
    if backend == "flex":
        return _flex(q, k, v, pattern, key_valid, scale, offset, p)
    return _blocked(q, k, v, pattern, key_valid, scale, offset, p, chunk)


def _blocked(q, k, v, pattern, key_valid, scale, offset, dropout_p, chunk):
    """SDPA per query chunk over only the keys it can reach: no T x S tensor, forward or backward."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise LmlabError(f"sparse attention: chunk must be an integer >= 1, got {chunk!r}")
    B, H, T, _ = q.shape
    S, rep = k.shape[2], H // k.shape[1]
    rule = pattern.rule(S, q.device)
    outs = []
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        lo, hi, extra = pattern.chunk_keys(c0 + offset, c1 + offset, S, q.device)
        kpos = torch.cat([torch.arange(lo, hi, device=q.device), extra])
        ks, vs = _gather(k, lo, hi, extra), _gather(v, lo, hi, extra)
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, dim=1), vs.repeat_interleave(rep, dim=1)
        rows = torch.arange(c0, c1, device=q.device) + offset
        mask = rule(rows[:, None], kpos[None, :])[None, None]
        if key_valid is not None:
            mask = mask & key_valid[:, kpos][:, None, None, :]
        out = F.scaled_dot_product_attention(q[:, :, c0:c1], ks, vs, attn_mask=mask, dropout_p=dropout_p,
                                             scale=scale)
        if key_valid is not None:  # only padding can leave a row without keys (every query sees itself)
            out = torch.where(mask.any(-1, keepdim=True), out, 0.0)  # such rows: zeros, as SDPA and flex give
        outs.append(out)
    return torch.cat(outs, dim=2)


def _gather(x: torch.Tensor, lo: int, hi: int, extra: torch.Tensor) -> torch.Tensor:
    span = x[:, :, lo:hi]
    return torch.cat([span, x.index_select(2, extra)], dim=2) if extra.numel() else span


_FLEX: dict[str, object] = {}


def flex_available() -> bool:
    """True when torch has flex_attention (torch >= 2.5)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flex_fn():
    """flex_attention compiled once (dynamic=False: the dynamic CPU kernel fails on odd lengths in torch 2.13)."""
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _flex(q, k, v, pattern, key_valid, scale, offset, dropout_p):
    if not flex_available():
        raise LmlabError(f"sparse attention: backend 'flex' needs torch >= 2.5 (this is torch {torch.__version__})")
    if dropout_p:
        raise LmlabError("sparse attention: backend 'flex' has no attention dropout; use backend 'blocked'")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise LmlabError("sparse attention: flex_attention has no backward on CPU; use backend 'blocked' "
                         "(or torch.no_grad() for inference)")
    mask = pattern.block_mask(q.shape[2], k.shape[2], offset, key_valid, device=q.device)
    return _flex_fn()(q, k, v, block_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class RollingKV:
    """A sliding-window KV cache of fixed capacity `window`: a ring buffer of keys/values with absolute positions.

    Keys go in already rotated at their absolute position (`next_position` is the next token's), so rotary
    stays correct however many tokens have rolled out. `update(k, v, valid)` appends L new tokens and returns
    (keys, values, key_valid, offset) to attend to with SlidingWindow(window): the retained window - 1 keys
    before the new ones, then the new ones, in order, with the new queries at `offset`. Memory: window + L.
    """

    def __init__(self, window: int, batch: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        self.window = _check_window(window, "RollingKV")
        self.keys = torch.zeros(batch, kv_heads, window, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.valid = torch.zeros(batch, window, dtype=torch.bool, device=device)
        self.positions = torch.full((window,), -1, dtype=torch.long, device=device)  # -1: empty slot
        self.next_position = 0

    def update(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None):
        B, Hkv, _, D = self.keys.shape
        if k.shape != v.shape or k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (B, Hkv, D):
            raise LmlabError(f"RollingKV: k/v {tuple(k.shape)}/{tuple(v.shape)} do not fit the cache "
                             f"[{B}, {Hkv}, L, {D}]")
        L, p0 = k.shape[2], self.next_position
        valid = torch.ones(B, L, dtype=torch.bool, device=k.device) if valid is None else \
            _check_key_valid(valid, B, L)
        kept = min(self.window - 1, p0)
        slots = torch.arange(p0 - kept, p0, device=self.keys.device) % self.window
        keys = torch.cat([self.keys[:, :, slots], k], dim=2)
        values = torch.cat([self.values[:, :, slots], v], dim=2)
        key_valid = torch.cat([self.valid[:, slots], valid], dim=1)
        n = min(L, self.window)
        new_pos = torch.arange(p0 + L - n, p0 + L, device=self.keys.device)
        self.keys[:, :, new_pos % self.window] = k[:, :, L - n:].to(self.keys.dtype)
        self.values[:, :, new_pos % self.window] = v[:, :, L - n:].to(self.values.dtype)
        self.valid[:, new_pos % self.window] = valid[:, L - n:]
        self.positions[new_pos % self.window] = new_pos
        self.next_position = p0 + L
        return keys, values, key_valid, kept
