"""The one Transformer: every variant builds, and KV-cached decoding equals a full forward pass."""
import pytest
import torch

from lmlab.config import ModelConfig, preset
from lmlab.errors import LmlabError
from lmlab.model import Transformer

SMALL = dict(vocab_size=97, n_layer=2, d_model=32, n_head=4, d_ff=64, max_seq_len=64)
DECODERS = {
    "mha-learned-layernorm-gelu": dict(pos="learned", norm="layernorm", mlp="gelu"),
    "gqa-rope-rmsnorm-swiglu": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, attn_bias=False),
    "mqa-sinusoidal-geglu": dict(pos="sinusoidal", mlp="geglu", n_kv_head=1),
    "nopos-postnorm-relu-untied": dict(pos="none", prenorm=False, mlp="relu", tie_embeddings=False),
    "relative-bias": dict(pos="relative", norm="rmsnorm", attn_scale=1.0),
}


def make(arch="decoder", seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(arch=arch, **{**SMALL, **kw})).eval()


def incremental(model, ids, chunks, **kw):
    cache = model.make_cache(ids.shape[0], 64)
    out, t = [], 0
    for n in chunks:
        out.append(model(ids[:, t:t + n], cache=cache, **kw))
        t += n
    return torch.cat(out, 1), cache


@pytest.mark.parametrize("variant", DECODERS)
def test_decoder_cache_equals_full_forward(variant):
    model = make(**DECODERS[variant])
    ids = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = model(ids)
        inc, cache = incremental(model, ids, [7, 1, 1, 5, 1, 1, 1, 3])
    assert cache.length == 20
    assert (full - inc).abs().max().item() < 1e-5


def test_encoder_decoder_cache_equals_full_forward():
    model = make("encoder-decoder", pos="relative", norm="rmsnorm", mlp="relu", attn_scale=1.0, n_decoder_layer=3)
    src = torch.randint(0, 97, (2, 11))
    src_mask = torch.ones_like(src)
    src_mask[1, 8:] = 0
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full = model(ids, encoder_input_ids=src, encoder_mask=src_mask)
        inc, cache = incremental(model, ids, [1] * 9, encoder_input_ids=src, encoder_mask=src_mask)
        assert cache.memory_kv is not None and len(cache.memory_kv) == 3  # cross keys/values computed once
        # padding of the source changes nothing for the row that has it
        alone = model(ids[1:], encoder_input_ids=src[1:, :8])
    assert (full - inc).abs().max().item() < 1e-5
    assert (full[1:] - alone).abs().max().item() < 1e-5


@pytest.mark.parametrize("variant", ["mha-learned-layernorm-gelu", "gqa-rope-rmsnorm-swiglu"])
def test_left_padded_rows_equal_unpadded(variant):
    model = make(**DECODERS[variant])
    lengths = [4, 13, 9]
    rows = [torch.randint(0, 97, (n,)) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    nxt = torch.randint(0, 97, (3, 4))
    with torch.no_grad():
        cache = model.make_cache(3, 64)
        batched = [model(ids, attention_mask=mask, cache=cache)[:, -1]]
        for t in range(4):
            batched.append(model(nxt[:, t:t + 1], cache=cache)[:, -1])
        for i, r in enumerate(rows):
            alone = model(torch.cat([r, nxt[i]])[None])[0]
            ref = alone[len(r) - 1:]
            got = torch.stack([b[i] for b in batched])
            assert (ref - got).abs().max().item() < 1e-5
    assert cache.next_pos.tolist() == [n + 4 for n in lengths]


def test_full_forward_with_padding_mask_matches_unpadded():
    model = make(**DECODERS["gqa-rope-rmsnorm-swiglu"])
    row = torch.randint(0, 97, (10,))
    ids = torch.cat([torch.zeros(5, dtype=torch.long), row])[None]
    mask = torch.cat([torch.zeros(5), torch.ones(10)]).long()[None]
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)[0, 5:]
        alone = model(row[None])[0]
    assert (padded - alone).abs().max().item() < 1e-5


def test_truncate_rolls_back_exactly():
    model = make(**DECODERS["gqa-rope-rmsnorm-swiglu"])
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        cache = model.make_cache(2, 64)
        model(ids[:, :8], cache=cache)
        model(torch.randint(0, 97, (2, 3)), cache=cache)  # a rejected draft
        cache.truncate(8)
        assert cache.length == 8 and cache.next_pos.tolist() == [8, 8]
        after = model(ids[:, 8:], cache=cache)
        full = model(ids)[:, 8:]
    assert (after - full).abs().max().item() < 1e-5
    with pytest.raises(LmlabError):
        cache.truncate(20)


def test_truncate_per_row_rolls_each_row_back_to_its_own_length():
    """Batched speculative decoding: each row keeps its own accepted drafts; the forgotten slots stay
    behind as holes that no later token sees, and positions continue from each row's own length."""
    model = make(**DECODERS["gqa-rope-rmsnorm-swiglu"])
    ids = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        cache = model.make_cache(2, 64)
        model(ids[:, :8], cache=cache)
        model(ids[:, 8:11], cache=cache)  # three drafts: row 0 rejects all, row 1 accepts all
        cache.truncate([8, 11])
        assert cache.length == 11 and cache.next_pos.tolist() == [8, 11]
        nxt = torch.stack([ids[0, 8:10], ids[1, 11:13]])
        after = model(nxt, cache=cache)
        assert (after[0] - model(ids[:1, :10])[0, 8:]).abs().max().item() < 1e-5
        assert (after[1] - model(ids[1:, :13])[0, 11:]).abs().max().item() < 1e-5
    with pytest.raises(LmlabError, match="lengths"):
        cache.truncate([3, 40])


def test_select_shares_a_prefix_across_continuations():
    model = make(**DECODERS["gqa-rope-rmsnorm-swiglu"])
    ctx = torch.randint(0, 97, (1, 10))
    conts = torch.randint(0, 97, (3, 4))
    with torch.no_grad():
        cache = model.make_cache(1, 64)
        model(ctx, cache=cache)
        many = cache.select([0, 0, 0])
        scored = model(conts, cache=many)
        for i in range(3):
            ref = model(torch.cat([ctx[0], conts[i]])[None])[0, 10:]
            assert (scored[i] - ref).abs().max().item() < 1e-5
    assert cache.length == 10  # the shared prefix itself is untouched


def test_prefix_lm_mask_hides_the_future():
    model = make(**DECODERS["gqa-rope-rmsnorm-swiglu"])
    T, prefix = 10, 4
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed[:, :prefix] = True
    ids = torch.randint(0, 97, (1, T))
    changed = ids.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 97
    with torch.no_grad():
        a = model(ids, attn_mask=allowed[None])
        b = model(changed, attn_mask=allowed[None])
    assert (a[0, :7] - b[0, :7]).abs().max().item() < 1e-6  # nothing before 7 sees position 7
    assert (a[0, 7:] - b[0, 7:]).abs().max().item() > 1e-4
    changed = ids.clone()
    changed[0, 3] = (changed[0, 3] + 1) % 97  # a prefix token is seen by every position
    with torch.no_grad():
        c = model(changed, attn_mask=allowed[None])
    assert (a[0, 0] - c[0, 0]).abs().max().item() > 1e-4


def test_encoder_is_bidirectional_and_bert_heads():
    model = make("encoder", prenorm=False, embed_norm=True, type_vocab_size=2, mlm_head=True, pooler=True)
    ids = torch.randint(0, 97, (2, 8))
    types = torch.zeros_like(ids)
    types[:, 4:] = 1
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 97
    with torch.no_grad():
        logits, h = model(ids, token_type_ids=types, return_hidden=True)
        assert (logits[:, 0] - model(changed, token_type_ids=types)[:, 0]).abs().max() > 1e-4
        assert model.nsp_logits(h).shape == (2, 2)


def test_dropout_only_in_training():
    model = make(dropout=0.5)
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model(ids))


def test_grouped_query_variants_have_fewer_kv_params():
    mha = make(**DECODERS["mha-learned-layernorm-gelu"])
    mqa = make(**DECODERS["mqa-sinusoidal-geglu"])
    assert mha.decoder.blocks[0].attn.qkv.out_features == 3 * 32
    assert mqa.decoder.blocks[0].attn.qkv.out_features == 32 + 2 * 8


def test_config_errors_name_the_field():
    with pytest.raises(LmlabError, match="n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3, d_model=32)
    with pytest.raises(LmlabError, match="did you mean 'n_head'"):
        ModelConfig.from_dict({"n_heads": 4})
    with pytest.raises(LmlabError, match="known presets: .*smollm2-135m"):
        preset("no-such-model")
    assert preset("smollm2-135m", n_layer=2).n_kv_head == 3


def test_bfloat16_prompt_attention_takes_the_native_kernel(monkeypatch):
    """A bfloat16 causal prompt on CPU goes through lmlab's native causal_attention where it is vectorized,
    and gives the logits PyTorch's attention gives; with gradients on it stays on PyTorch's (the op has no
    backward)."""
    from lmlab.inference import native

    if not native.causal_attention_fast(32):
        pytest.skip("no vectorized native causal attention here (AVX-512 BF16 and a compiler needed)")
    model = make(pos="rope", norm="rmsnorm", mlp="swiglu", d_model=128, n_head=4, n_kv_head=2).bfloat16()
    ids = torch.randint(0, 97, (2, 45))
    real, calls = torch.ops.lmlab.causal_attention, []
    monkeypatch.setattr(torch.ops.lmlab, "causal_attention", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = model(ids).float()
        monkeypatch.setenv(native.ENV, "off")
        want = model(ids).float()
    assert len(calls) == model.cfg.n_layer
    assert (got - want).abs().max() <= 0.03 * want.abs().max(), (got - want).abs().max()
    monkeypatch.delenv(native.ENV)
    model(ids).float().sum().backward()  # the native op would raise: it has no autograd
    assert len(calls) == model.cfg.n_layer
