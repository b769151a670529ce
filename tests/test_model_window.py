"""Sliding-window and local+global attention inside the Transformer: the block-sparse route equals the
explicit-mask route (forward and backward), cached generation past the window equals recomputation, and
the config refuses windows and top-k that cannot be."""
from __future__ import annotations

import pytest
import torch

from lmlab.config import ModelConfig, preset
from lmlab.errors import LmlabError
from lmlab.model import Transformer, masks
from lmlab.model.sparse_attention import LocalGlobal, SlidingWindow


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny-llama", n_layer=2, **kw)).eval()


def dense_route(model, ids, mask=None):
    """The same model through the explicit-mask route: the caller's causal/padding pattern given as attn_mask
    (so masks.windowed ands it with the window instead of taking the Sparse route)."""
    B, T = ids.shape
    allowed = torch.ones(T, T, dtype=torch.bool).tril() if model.cfg.causal else torch.ones(T, T, dtype=torch.bool)
    allowed = allowed[None].expand(B, T, T)
    if mask is not None:
        allowed = (allowed & mask.bool()[:, None, :]) | torch.eye(T, dtype=torch.bool)
    positions = None if mask is None else (mask.cumsum(1) - 1).clamp_min(0)
    if not model.cfg.causal:  # an encoder's stack, fed the embeddings encode() would give it
        positions = torch.arange(T).expand(B, T) if positions is None else positions
        return model.encoder(model._embed(ids, positions), positions, attn_mask=allowed)
    return model.hidden_states(ids, attn_mask=allowed, positions=positions)


@pytest.mark.parametrize("window,T,layers", [(1, 9, None), (4, 23, None), (7, 40, [1]), (64, 50, None)])
def test_sparse_route_equals_explicit_mask_forward_and_backward(window, T, layers):
    model = tiny(attn_window=window, window_layers=layers)
    ids = torch.randint(0, 512, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, T - 3:] = 0  # right padding in one row
    model.train()  # dropout is 0: train mode only switches on the gradient path
    a = model.hidden_states(ids, attention_mask=mask)
    ga = torch.autograd.grad(a[mask.bool()].square().sum(), list(model.parameters()))
    b = dense_route(model, ids, mask)
    gb = torch.autograd.grad(b[mask.bool()].square().sum(), list(model.parameters()))
    assert (a - b)[mask.bool()].abs().max() <= 1e-5
    # gradients sum over every position: float32 rounding grows with their size, so compare relatively
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_window_changes_the_output_and_layers_are_per_layer():
    ids = torch.randint(0, 512, (1, 30))
    full, win, one = tiny(), tiny(attn_window=4), tiny(attn_window=4, window_layers=[1])
    with torch.no_grad():
        h_full, h_win, h_one = full.hidden_states(ids), win.hidden_states(ids), one.hidden_states(ids)
    assert (h_full[:, :4] - h_win[:, :4]).abs().max() <= 1e-5  # the first window positions see everything anyway
    assert (h_full - h_win).abs().max() > 1e-3 and (h_one - h_win).abs().max() > 1e-3
    assert [p is not None for p in one.decoder.patterns] == [False, True]


def test_sparse_route_is_taken_for_a_fresh_sequence():
    pat = SlidingWindow(3)
    got = masks.windowed(None, pat, 2, 5, 0, "cpu", key_valid=None, sparse=True)
    assert isinstance(got, masks.Sparse) and got.pattern == pat
    full = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    dense = masks.windowed(full, pat, 2, 5, 0, "cpu", key_valid=None, sparse=False)
    assert torch.equal(dense[0, 0], pat.dense_mask(5, 5))
    # a decoding step at a tensor slot (the compiled step) gives the same row as an int slot
    row = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    assert torch.equal(masks.windowed(row, pat, 2, 1, torch.tensor([6]), "cpu", key_valid=None, sparse=False),
                       masks.windowed(row, pat, 2, 1, 6, "cpu", key_valid=None, sparse=False))


@pytest.mark.parametrize("left_pad", [False, True])
def test_cached_generation_past_the_window_equals_recomputation(left_pad):
    model = tiny(attn_window=5)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 512, (2, 4), generator=g)
    mask = torch.ones(2, 4, dtype=torch.long)
    if left_pad:
        mask[0, :2] = 0
    cache = model.make_cache(2, 30)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache)
        seq, seq_mask = ids, mask
        for step in range(16):  # 20 tokens: four times the window
            full = model(seq, attention_mask=seq_mask)
            assert (logits[:, -1] - full[:, -1]).abs().max() <= 1e-4, step
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq, seq_mask = torch.cat([seq, nxt], 1), torch.cat([seq_mask, torch.ones_like(nxt)], 1)
            logits = model(nxt, cache=cache)


def test_encoder_local_global_route_equals_explicit_mask():
    torch.manual_seed(0)
    cfg = preset("bert-base", n_layer=2, d_model=32, n_head=2, vocab_size=80, max_seq_len=64, attn_window=6,
                 attn_global_tokens=1)
    model = Transformer(cfg).eval()
    assert model.encoder.patterns[0] == LocalGlobal(6, 1)
    ids = torch.randint(0, 80, (2, 33))
    mask = torch.ones(2, 33, dtype=torch.long)
    mask[0, 30:] = 0
    with torch.no_grad():
        a = model.hidden_states(ids, attention_mask=mask)
        b = dense_route(model, ids, mask)
    assert (a - b)[mask.bool()].abs().max() <= 1e-5


def test_bad_window_and_top_k_are_one_line_errors():
    with pytest.raises(LmlabError, match=r"attn_window: 300 is larger than the context max_seq_len=256"):
        preset("tiny-llama", attn_window=300)
    with pytest.raises(LmlabError, match=r"moe_top_k: 5 is larger than moe_experts=4"):
        ModelConfig(moe_experts=4, moe_top_k=5)
    with pytest.raises(LmlabError, match=r"window_layers: \[7\] names a layer that does not exist \(allowed: 0..1\)"):
        preset("tiny-llama", attn_window=4, window_layers=[7])
    with pytest.raises(LmlabError, match="attn_window: 0 is not an integer >= 1"):
        preset("tiny-llama", attn_window=0)
    with pytest.raises(LmlabError, match="needs arch='encoder'"):
        preset("tiny-llama", attn_window=4, attn_global_tokens=2)


@pytest.mark.parametrize("left_pad,layers", [(False, None), (True, None), (True, [0])])
def test_rolling_cache_generation_equals_recomputation(left_pad, layers):
    model = tiny(attn_window=4, window_layers=layers)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 512, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    if left_pad:
        mask[1, :3] = 0
    cache = model.make_cache(2, 40, rolling=True)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache)
        seq, seq_mask = ids, mask
        for step in range(14):
            full = model(seq, attention_mask=seq_mask)
            assert (logits[:, -1] - full[:, -1]).abs().max() <= 1e-4, step
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq, seq_mask = torch.cat([seq, nxt], 1), torch.cat([seq_mask, torch.ones_like(nxt)], 1)
            logits = model(nxt, cache=cache)
    windowed = [r for r in cache.rolling if r is not None]
    assert windowed and all(r.keys.shape[2] == 4 for r in windowed)  # memory: the window, not the sequence
    with pytest.raises(LmlabError, match="cannot roll back"):
        cache.truncate(3)


def test_rolling_cache_chunked_prompt():
    model = tiny(attn_window=3)
    ids = torch.randint(3, 512, (1, 11))
    cache = model.make_cache(1, rolling=True)
    with torch.no_grad():
        parts = [model(ids[:, a:b], cache=cache) for a, b in ((0, 4), (4, 9), (9, 11))]
        assert (torch.cat(parts, 1) - model(ids)).abs().max() <= 1e-4
    with pytest.raises(LmlabError, match="needs a decoder-only model with attn_window"):
        tiny().make_cache(1, rolling=True)


@pytest.mark.slow
def test_compiled_decoding_step_applies_the_window():
    """lmlab.inference's compiled step passes the whole static cache and a slot tensor: the window still holds."""
    from lmlab.inference.compile import DecodeStep

    model = tiny(attn_window=4, window_layers=[1])
    step, cache = DecodeStep(model), model.make_cache(1, 20)
    seq = torch.randint(3, 512, (1, 3))
    with torch.no_grad():
        logits = model(seq, cache=cache)
        for _ in range(8):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            logits = step(nxt, cache)
            assert (logits[:, -1] - model(seq)[:, -1]).abs().max() <= 1e-4
    assert not step.failed


@pytest.mark.parametrize("field,value,message", [
    ("moe_experts", -1, r"moe_experts: -1 is not an integer >= 0"),
    ("moe_top_k", 0, r"moe_top_k: 0 is not an integer >= 1"),
    ("moe_d_ff", "big", r"moe_d_ff: 'big' is not an integer >= 1"),
    ("moe_layers", [0, "x"], r"moe_layers: \[0, 'x'\] is not a list of layer indices"),
    ("moe_aux_coef", -0.1, r"moe_aux_coef: -0.1 is out of range \(allowed: a finite number >= 0\)"),
    ("moe_renormalize", 1, r"moe_renormalize: 1 is not a boolean"),
    ("attn_window", 2.5, r"attn_window: 2.5 is not an integer >= 1"),
    ("attn_global_tokens", -2, r"attn_global_tokens: -2 is not an integer >= 0"),
])
def test_moe_and_window_fields_are_checked_naming_the_source(field, value, message):
    with pytest.raises(LmlabError, match=r"^model.json: " + message):
        ModelConfig.from_dict({"moe_experts": 4, field: value}, source="model.json")


def test_moe_config_derives_and_normalises():
    cfg = ModelConfig(d_model=64, n_head=4, n_layer=3, moe_experts=4, moe_layers=[2, 0, 2], moe_aux_coef=1)
    assert cfg.moe_d_ff == cfg.d_ff == 256 and cfg.moe_layers == [0, 2] and cfg.moe_aux_coef == 1.0
    assert [cfg.is_moe_layer(i) for i in range(3)] == [True, False, True]
    with pytest.raises(LmlabError, match=r"mlp: 'geglu' has no mixture-of-experts version"):
        ModelConfig(moe_experts=4, mlp="geglu")
