"""Sparse attention kernels against SDPA with the explicit mask (the reference), forward and backward."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.model.sparse_attention import LocalGlobal, RollingKV, SlidingWindow, attend, flex_available

WINDOWS = (1, 3, 16, 128, 2000)  # 2000 >= every T: plain causal / bidirectional
LENGTHS = (1, 7, 64, 300, 1000)


def qkv(T, S=None, B=1, H=2, Hkv=1, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def dense(q, k, v, pattern, key_valid=None, offset=None):
    """SDPA with the pattern's explicit [T, S] (or [B, 1, T, S]) mask; kv heads repeated for GQA."""
    rep = q.shape[1] // k.shape[1]
    mask = pattern.dense_mask(q.shape[2], k.shape[2], offset, key_valid)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask)


def grads(out, inputs, seed=1):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    weight = weight.to(out.dtype)
    return torch.autograd.grad((out * weight).sum(), inputs)


def assert_same(a, b, atol):
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= atol, (a - b).abs().max().item()


def check_blocked(pattern, T, key_valid=None, H=2, Hkv=1, chunk=128):
    """Blocked == dense in float64 (same algorithm, 1e-10) and float32 blocked vs float64 truth (1e-5)."""
    q, k, v = qkv(T, H=H, Hkv=Hkv, B=1 if key_valid is None else key_valid.shape[0])
    ref = dense(q, k, v, pattern, key_valid)
    ref_grads = grads(ref, (q, k, v))
    out = attend(q, k, v, pattern, key_valid=key_valid, backend="blocked", chunk=chunk)
    assert_same(out, ref, 1e-10)
    for a, b in zip(grads(out, (q, k, v)), ref_grads):
        assert_same(a, b, 1e-10)
    q32, k32, v32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out32 = attend(q32, k32, v32, pattern, key_valid=key_valid, backend="blocked", chunk=chunk)
    assert_same(out32.double(), ref, 1e-5)
    for a, b in zip(grads(out32, (q32, k32, v32)), ref_grads):
        assert_same(a.double(), b, 1e-5 * max(1.0, b.abs().max().item()))  # float32 sums of up to T terms


# ---------------------------------------------------------------- conventions


def test_sliding_window_matches_hf_convention():
    # transformers masking_utils docstring, sliding_window=3, 5 tokens
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [0, 1, 1, 1, 0],
                             [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(SlidingWindow(3).dense_mask(5, 5), expected)


def test_sliding_window_against_transformers_mask_function():
    masking_utils = pytest.importorskip("transformers.masking_utils")
    fn = masking_utils.sliding_window_causal_mask_function(4)
    i = torch.arange(9)
    theirs = fn(0, 0, i[:, None], i[None, :])
    assert torch.equal(SlidingWindow(4).dense_mask(9, 9), theirs)


def test_sliding_window_with_offset_is_the_tail_of_the_full_mask():
    full = SlidingWindow(4).dense_mask(10, 10)
    assert torch.equal(SlidingWindow(4).dense_mask(3, 10), full[7:])
    assert torch.equal(SlidingWindow(4).dense_mask(3, 10, offset=2), full[2:5])


def test_local_global_band_and_globals():
    mask = LocalGlobal(4, global_tokens=(0, 6)).dense_mask(8, 8)
    i = torch.arange(8)
    band = (i[:, None] - i[None, :]).abs() <= 2
    g = torch.zeros(8, dtype=torch.bool)
    g[[0, 6]] = True
    assert torch.equal(mask, band | g[:, None] | g[None, :])
    assert LocalGlobal(3, 2).global_tokens == (0, 1)
    assert torch.equal(LocalGlobal(1).dense_mask(5, 5), torch.eye(5, dtype=torch.bool))


def test_window_larger_than_context_is_full_attention():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(SlidingWindow(100).dense_mask(6, 6), causal)
    assert LocalGlobal(100).dense_mask(6, 6).all()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8", None])
def test_bad_window_is_an_error(bad):
    with pytest.raises(LmlabError, match="window"):
        SlidingWindow(bad)
    with pytest.raises(LmlabError, match="window"):
        LocalGlobal(bad)
    with pytest.raises(LmlabError, match="window"):
        RollingKV(bad, 1, 1, 4)


@pytest.mark.parametrize("bad", [-1, (0, -2), ("a",), (1.5,), 3.0])
def test_bad_global_tokens_are_an_error(bad):
    with pytest.raises(LmlabError, match="global"):
        LocalGlobal(4, bad)


def test_bad_inputs_are_errors():
    q, k, v = qkv(8, H=3, Hkv=2)
    with pytest.raises(LmlabError, match="kv heads"):
        attend(q, k, v, SlidingWindow(2))
    q, k, v = qkv(8)
    with pytest.raises(LmlabError, match="key_valid"):
        attend(q, k, v, SlidingWindow(2), key_valid=torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(LmlabError, match="key_valid"):
        SlidingWindow(2).dense_mask(8, 8, key_valid=[[True] * 8])
    with pytest.raises(LmlabError, match="key_valid"):
        SlidingWindow(2).dense_mask(8, 8, key_valid=torch.ones(1, 8))  # not bool
    with pytest.raises(LmlabError, match="backend"):
        attend(q, k, v, SlidingWindow(2), backend="flash")
    with pytest.raises(LmlabError, match="offset"):
        attend(q, k, v, SlidingWindow(2), offset=1)
    with pytest.raises(LmlabError, match="pattern"):
        attend(q, k, v, "sliding")
    with pytest.raises(LmlabError, match="dropout"):
        attend(q, k, v, SlidingWindow(2), dropout=1.0, training=True)


# ---------------------------------------------------------------- blocked kernel == dense


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("window", WINDOWS)
def test_blocked_sliding_window_forward_backward(window, T):
    check_blocked(SlidingWindow(window), T)


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("window", WINDOWS)
def test_blocked_local_global_forward_backward(window, T):
    check_blocked(LocalGlobal(window, global_tokens=(0, 5, 257)), T)


@pytest.mark.parametrize("pattern", [SlidingWindow(16), LocalGlobal(16, 2)], ids=repr)
def test_blocked_with_padding_and_gqa(pattern):
    T = 300
    key_valid = torch.ones(3, T, dtype=torch.bool)
    key_valid[0, :37] = False  # left padding: early queries see no key at all -> zeros
    key_valid[1, 250:] = False  # right padding
    key_valid[2] = torch.rand(T, generator=torch.Generator().manual_seed(3)) > 0.3
    check_blocked(pattern, T, key_valid=key_valid, H=4, Hkv=2, chunk=64)


def test_rows_without_keys_are_zero_with_finite_gradients():
    q, k, v = [t.detach().float().requires_grad_() for t in qkv(20, B=2)]
    key_valid = torch.ones(2, 20, dtype=torch.bool)
    key_valid[0, :10] = False
    out = attend(q, k, v, SlidingWindow(4), key_valid=key_valid)
    assert out[0, :, :10].abs().max() == 0
    assert all(torch.isfinite(g).all() for g in grads(out, (q, k, v)))


def test_blocked_with_query_offset_and_small_chunks():
    q, k, v = qkv(50, S=90)
    for offset in (0, 17, 40):
        ref = dense(q, k, v, SlidingWindow(9), offset=offset)
        out = attend(q, k, v, SlidingWindow(9), offset=offset, chunk=7)
        assert_same(out, ref, 1e-10)


def test_blocked_dropout_only_in_training():
    q, k, v = [t.detach().float() for t in qkv(40)]
    pattern = SlidingWindow(8)
    plain = attend(q, k, v, pattern)
    assert torch.equal(attend(q, k, v, pattern, dropout=0.5, training=False), plain)
    torch.manual_seed(0)
    dropped = attend(q, k, v, pattern, dropout=0.5, training=True)
    assert not torch.allclose(dropped, plain)


def test_blocked_memory_never_builds_a_full_score_matrix(monkeypatch):
    """Every SDPA call sees at most chunk + window - 1 keys (no T x S tensor)."""
    import lmlab.model.sparse_attention as sa

    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[2], k.shape[2], kw["attn_mask"].shape[-1]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(sa.F, "scaled_dot_product_attention", spy)
    q, k, v = qkv(1000)
    attend(q, k, v, SlidingWindow(50), chunk=64)
    assert len(seen) == 16 and max(s[1] for s in seen) <= 64 + 50 - 1
    seen.clear()
    attend(q, k, v, LocalGlobal(50, (500,)), chunk=64)
    widest_local = max(s[1] for s in seen if s[0] == 64 and s[1] < 1000)
    assert widest_local <= 64 + 2 * 25 + 1 and sum(s[1] == 1000 for s in seen) == 1  # one chunk holds the global row


# ---------------------------------------------------------------- flex block masks and kernel


needs_flex = pytest.mark.skipif(not flex_available(), reason="torch has no flex_attention (needs torch >= 2.5)")


@needs_flex
@pytest.mark.parametrize("T,S,offset", [(1, 1, 0), (7, 7, 0), (300, 300, 0), (129, 400, 200), (256, 256, 0)])
@pytest.mark.parametrize("pattern", [SlidingWindow(1), SlidingWindow(16), SlidingWindow(130), SlidingWindow(300),
                                     LocalGlobal(3, (0,)), LocalGlobal(40, (5, 250)),
                                     LocalGlobal(1000, (3,))], ids=repr)
def test_block_mask_matches_create_block_mask(pattern, T, S, offset):
    from torch.nn.attention.flex_attention import create_block_mask

    mine = pattern.block_mask(T, S, offset)
    theirs = create_block_mask(mine.mask_mod, None, None, T, S, device="cpu")
    assert torch.equal(mine.to_dense(), theirs.to_dense())  # same non-empty blocks
    dense_mask = pattern.dense_mask(T, S, offset)
    full_num = mine.full_kv_num_blocks[0, 0]
    for qb in range(len(full_num)):  # every block called full (mask_mod skipped there) really is full
        for kb in mine.full_kv_indices[0, 0, qb, : int(full_num[qb])].tolist():
            tile = dense_mask[qb * 128:(qb + 1) * 128, kb * 128:(kb + 1) * 128]
            assert tile.shape == (128, 128) and tile.all()


@needs_flex
def test_block_mask_with_padding_never_calls_padded_blocks_full():
    T = 384
    key_valid = torch.ones(2, T, dtype=torch.bool)
    key_valid[1, 130] = False
    mask = LocalGlobal(1000).block_mask(T, T, key_valid=key_valid)
    full = {int(i) for i in mask.full_kv_indices[0, 0, 0, : int(mask.full_kv_num_blocks[0, 0, 0])]}
    assert full == {0, 2}


@needs_flex
@pytest.mark.parametrize("pattern", [SlidingWindow(16), LocalGlobal(16, (0, 200))], ids=repr)
def test_flex_eager_mask_mod_matches_dense(pattern):
    """flex_attention uncompiled (mask_mod on every pair) with our BlockMask, padding and GQA."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = [t.detach().float() for t in qkv(300, B=2, H=4, Hkv=2)]
    key_valid = torch.ones(2, 300, dtype=torch.bool)
    key_valid[1, :20] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile()": that is the point here
        out = flex_attention(q, k, v, block_mask=pattern.block_mask(300, 300, key_valid=key_valid), enable_gqa=True)
    assert_same(out, dense(q, k, v, pattern, key_valid), 1e-5)


@needs_flex
@pytest.mark.slow  # compiles flex_attention (~20-30 s per shape on one CPU core)
@pytest.mark.parametrize("pattern", [SlidingWindow(300), LocalGlobal(16, (0, 200))], ids=repr)
def test_flex_compiled_forward_matches_dense(pattern):
    T = 384  # SlidingWindow(300) then has full blocks (mask_mod skipped) as well as partial ones
    q, k, v = [t.detach().float() for t in qkv(T, B=2, H=4, Hkv=2)]
    key_valid = torch.ones(2, T, dtype=torch.bool)
    key_valid[1, 370:] = False
    if isinstance(pattern, SlidingWindow):
        assert pattern.block_mask(T, T, key_valid=key_valid).full_kv_num_blocks.sum() > 0
    with torch.no_grad():
        out = attend(q, k, v, pattern, key_valid=key_valid, backend="flex")
    assert_same(out, dense(q, k, v, pattern, key_valid), 1e-5)


@needs_flex
def test_flex_refuses_cpu_backward_and_dropout():
    q, k, v = [t.float() for t in qkv(16)]
    with pytest.raises(LmlabError, match="backward"):
        attend(q, k, v, SlidingWindow(4), backend="flex")
    with pytest.raises(LmlabError, match="dropout"):
        attend(q, k, v, SlidingWindow(4), backend="flex", dropout=0.1, training=True)


def test_auto_on_cpu_uses_blocked_and_has_gradients():
    q, k, v = [t.detach().float().requires_grad_() for t in qkv(64)]
    out = attend(q, k, v, SlidingWindow(8))
    assert all(g is not None for g in grads(out, (q, k, v)))


# ---------------------------------------------------------------- rolling KV cache


def rotate(x, positions):
    """Rotary embedding at absolute positions (pairs of dims rotated by position * theta_i)."""
    half = x.shape[-1] // 2
    theta = 1.0 / (10000 ** (torch.arange(half, dtype=x.dtype) / half))
    angle = positions.to(x.dtype)[:, None] * theta[None, :]
    cos, sin = angle.cos(), angle.sin()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


@pytest.mark.parametrize("window", [1, 2, 5])
def test_rolling_kv_token_by_token_equals_full_recompute(window):
    T = 3 * window + 1
    q, k, v = [t.detach() for t in qkv(T, B=2, H=4, Hkv=2)]
    pos = torch.arange(T)
    q, k = rotate(q, pos), rotate(k, pos)
    full = dense(q, k, v, SlidingWindow(window))
    cache = RollingKV(window, batch=2, kv_heads=2, head_dim=8, dtype=q.dtype)
    steps = []
    for t in range(T):
        keys, values, key_valid, offset = cache.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        assert keys.shape[2] <= window and cache.keys.shape[2] == window
        steps.append(attend(q[:, :, t:t + 1], keys, values, SlidingWindow(window), key_valid=key_valid,
                            offset=offset))
    assert_same(torch.cat(steps, dim=2), full, 1e-10)
    assert cache.next_position == T
    assert sorted(cache.positions.tolist()) == list(range(T - window, T))


def test_rolling_kv_prefill_longer_than_window_then_decode_with_padding():
    window, T = 4, 15
    q, k, v = [t.detach() for t in qkv(T, B=2, H=2, Hkv=1)]
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[0, :6] = False  # left padding in the first row
    full = dense(q, k, v, SlidingWindow(window), key_valid=valid)
    cache = RollingKV(window, batch=2, kv_heads=1, head_dim=8, dtype=q.dtype)
    outs = []
    for lo, hi in [(0, 9), (9, 10), (10, 12), (12, 15)]:
        keys, values, key_valid, offset = cache.update(k[:, :, lo:hi], v[:, :, lo:hi], valid[:, lo:hi])
        outs.append(attend(q[:, :, lo:hi], keys, values, SlidingWindow(window), key_valid=key_valid, offset=offset))
    assert_same(torch.cat(outs, dim=2), full, 1e-10)


def test_rolling_kv_rejects_wrong_shapes():
    cache = RollingKV(4, batch=1, kv_heads=2, head_dim=8)
    with pytest.raises(LmlabError, match="RollingKV"):
        cache.update(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8))
    with pytest.raises(LmlabError, match="key_valid"):
        cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), torch.ones(1, 2, dtype=torch.bool))
