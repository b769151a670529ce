"""Pretraining objectives: statistics and invariants with real assertions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmlab.config import preset
from lmlab.data.dataset import TokenStream
from lmlab.data.tokenizers import with_separator
from lmlab.tokenizer import Tokenizer
from lmlab.model import Transformer
from lmlab.objectives import (FIM, MLM, NSP, REGISTRY, PrefixLM, SpanCorruption, build_objectives,
                              objective_config)
from lmlab.objectives.base import IGNORE
from lmlab.objectives.prefix import prefix_mask
from lmlab.errors import LmlabError

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and far faster than two on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TEXT = ("the quick brown fox jumps over the lazy dog. " * 20 + "\n")


def tokenizer():
    return with_separator(Tokenizer.char_level(TEXT + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


def stream(tmp_path, ids, name="s.bin") -> TokenStream:
    path = tmp_path / name
    np.asarray(ids, dtype=np.uint16).tofile(path)
    return TokenStream([path], "uint16")


def random_docs(tok, n_docs, rng, lo=5, hi=60) -> list[list[int]]:
    regular = [i for i in range(tok.vocab_size) if i != tok.eos_id]
    return [list(rng.choice(regular, rng.integers(lo, hi))) for _ in range(n_docs)]


def joined(docs, sep):
    out = []
    for d in docs:
        out += d + [sep]
    return out


def test_mlm_rates_and_specials(tmp_path):
    tok = tokenizer()
    rng = np.random.default_rng(0)
    ids = joined(random_docs(tok, 3000, rng), tok.eos_id)
    mlm = MLM(objective_config({"name": "mlm"}), tok, 128, tok.eos_id)
    s = stream(tmp_path, ids)
    gen = torch.Generator().manual_seed(0)
    sel = masked = rand = kept = total = 0
    for _ in range(9):  # 9 × 100 × 128 = 115,200 tokens (about 110k not special)
        b = mlm.batch(s, 100, gen)
        orig = torch.where(b["labels"] != IGNORE, b["labels"], b["input_ids"])
        selected = b["labels"] != IGNORE
        special = mlm.special_mask[orig]
        assert not (selected & special).any(), "a special token was selected"
        assert (b["input_ids"][special] == orig[special]).all(), "a special token was changed"
        total += orig.numel() - special.sum().item()
        sel += selected.sum().item()
        masked += (selected & (b["input_ids"] == mlm.mask_id)).sum().item()
        kept += (selected & (b["input_ids"] == orig)).sum().item()
        rand += (selected & (b["input_ids"] != orig) & (b["input_ids"] != mlm.mask_id)).sum().item()
        assert not mlm.special_mask[b["input_ids"][selected & (b["input_ids"] != orig) &
                                                    (b["input_ids"] != mlm.mask_id)]].any()
    assert total >= 100_000
    assert abs(sel / total - 0.15) < 0.01
    # a random replacement can draw the original token (1/V): count it as "kept" in the expectation
    p_same = 1 / (mlm.special_mask.numel() - mlm.special_mask.sum().item())
    assert abs(masked / sel - 0.8) < 0.01
    assert abs(rand / sel - 0.1 * (1 - p_same)) < 0.01
    assert abs(kept / sel - (0.1 + 0.1 * p_same)) < 0.01


def test_mlm_whole_word(tmp_path):
    tok = tokenizer()
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rng = np.random.default_rng(1)
    text = " ".join(rng.choice(words, 4000))
    tok = with_separator(Tokenizer.char_level(text))
    s = stream(tmp_path, tok.encode(text))
    mlm = MLM(objective_config({"name": "mlm", "whole_word": True}), tok, 64, tok.eos_id)
    b = mlm.batch(s, 200, torch.Generator().manual_seed(3))
    orig = torch.where(b["labels"] != IGNORE, b["labels"], b["input_ids"])
    space = tok.encode(" ")[0]
    checked = 0
    for row_ids, row_sel in zip(orig.tolist(), (b["labels"] != IGNORE).tolist()):
        i = 1  # skip [CLS]; words are runs of non-space, non-special tokens
        while i < len(row_ids) - 1:
            if row_ids[i] == space or mlm.special_mask[row_ids[i]]:
                i += 1
                continue
            j = i
            while j < len(row_ids) - 1 and row_ids[j] != space and not mlm.special_mask[row_ids[j]]:
                j += 1
            if j < len(row_ids) - 1 and i > 1:  # whole word inside the window
                assert len(set(row_sel[i:j])) == 1, "a word was partly selected"
                checked += 1
            i = j
    assert checked > 1000
    rate = (b["labels"] != IGNORE).float().sum() / (~mlm.special_mask[orig] & (orig != space)).sum()
    assert 0.08 < rate < 0.25


def reassemble_span(src, tgt, sentinels, eos):
    """Original tokens from T5 (input, target): replace each sentinel in src by its span in tgt."""
    spans, cur = {}, None
    for t in tgt[:-1]:
        if t in sentinels:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in src[:-1]:
        out += spans[t] if t in sentinels else [t]
    assert src[-1] == eos and tgt[-1] == eos
    return out


@pytest.mark.parametrize("seed", range(6))
def test_span_corruption_lossless(tmp_path, seed):
    tok = tokenizer()
    rng = np.random.default_rng(seed)
    ids = joined(random_docs(tok, 200, rng), tok.eos_id)
    L = int(rng.integers(8, 120))
    cfg = objective_config({"name": "span", "noise_density": float(rng.uniform(0.05, 0.5)),
                            "mean_span_length": float(rng.uniform(1, 6))})
    obj = SpanCorruption(cfg, tok, L, tok.eos_id)
    s = stream(tmp_path, ids)
    gen = torch.Generator().manual_seed(seed)
    g2 = torch.Generator().manual_seed(seed)
    windows = s.windows(16, L, g2)
    b = obj.batch(s, 16, gen)
    sentinels = set(obj.sentinels)
    for w, src, tgt, dec in zip(windows.tolist(), b["encoder_input_ids"].tolist(), b["labels"].tolist(),
                                b["input_ids"].tolist()):
        assert reassemble_span(src, tgt, sentinels, tok.eos_id) == w
        assert sum(t in sentinels for t in src) == obj.spans
        assert len(tgt) - 1 - obj.spans == obj.noise
        assert dec[0] == obj.pad_id and dec[1:] == tgt[:-1]


def reassemble_fim(seq, pre, suf, mid):
    if pre not in seq:
        return seq
    if seq[0] == pre:  # PSM
        p, s, m = seq.index(pre), seq.index(suf), seq.index(mid)
        return seq[p + 1:s] + seq[m + 1:] + seq[s + 1:m]
    s, p, m = seq.index(suf), seq.index(pre), seq.index(mid)  # SPM
    return seq[p + 1:m] + seq[m + 1:] + seq[s + 1:p]


def test_fim_lossless_and_rates(tmp_path):
    tok = tokenizer()
    rng = np.random.default_rng(5)
    ids = joined(random_docs(tok, 300, rng), tok.eos_id)
    obj = FIM(objective_config({"name": "fim", "rate": 0.6, "spm_rate": 0.5}), tok, 40, tok.eos_id)
    s = stream(tmp_path, ids)
    gen, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    n = 2000
    windows = s.windows(n, 41, g2)
    b = obj.batch(s, n, gen)
    seqs = torch.cat([b["input_ids"], b["labels"][:, -1:]], 1).tolist()
    assert (b["input_ids"][:, 1:] == b["labels"][:, :-1]).all()
    n_fim = n_spm = 0
    for w, seq in zip(windows.tolist(), seqs):
        if obj.pre in seq:
            n_fim += 1
            n_spm += seq[0] == obj.suf
            assert reassemble_fim(seq, obj.pre, obj.suf, obj.mid) == w[:-3]
            assert sorted(seq.count(t) for t in (obj.pre, obj.suf, obj.mid)) == [1, 1, 1]
        else:
            assert seq == w
    assert abs(n_fim / n - 0.6) < 0.05
    assert abs(n_spm / n_fim - 0.5) < 0.06


def test_prefix_lm_mask_never_sees_future(tmp_path):
    tok = tokenizer()
    ids = joined(random_docs(tok, 100, np.random.default_rng(0)), tok.eos_id)
    obj = PrefixLM(objective_config({"name": "prefix"}), tok, 32, tok.eos_id)
    b = obj.batch(stream(tmp_path, ids), 64, torch.Generator().manual_seed(0))
    mask, p, labels = b["attn_mask"], b["prefix_len"], b["labels"]
    T = 32
    q = torch.arange(T)[:, None]
    k = torch.arange(T)[None, :]
    for i in range(64):
        m = mask[i]
        # suffix positions see no later position; prefix positions see the whole prefix and nothing beyond
        assert not (m & (k > q) & (q >= p[i])).any()
        assert (m[:p[i], :p[i]]).all() and not m[:p[i], p[i]:].any()
        # a position with a label never sees the token it predicts (label at q is token q+1)
        for pos in (labels[i] != IGNORE).nonzero().squeeze(1).tolist():
            assert not m[pos, pos + 1:].any()
        assert (labels[i, p[i] - 1:] != IGNORE).all()
    assert prefix_mask(torch.tensor([1]), 4)[0].equal(torch.ones(4, 4).tril().bool())


def test_nsp_pairs_balanced_and_never_same_document(tmp_path):
    tok = tokenizer()
    docs = random_docs(tok, 400, np.random.default_rng(7), lo=3, hi=50)
    s = stream(tmp_path, joined(docs, tok.eos_id))
    obj = NSP(objective_config({"name": "nsp"}), tok, 48, tok.eos_id)
    gen = torch.Generator().manual_seed(11)
    pairs = obj.pairs(s, 4000, gen)
    bounds = s.documents(tok.eos_id)
    rnd = 0
    for a, b, is_random, src_a, src_b in pairs:
        assert len(a) >= 1 and len(a) + len(b) <= 48 - 3
        if is_random:
            rnd += 1
            assert src_a != src_b
        else:
            assert src_a == src_b
            start, end = bounds[src_a]
            whole = s.read(start, end - start).tolist()
            joined_ab = a.tolist() + b.tolist()
            assert any(whole[i:i + len(joined_ab)] == joined_ab for i in range(len(whole)))
    assert abs(rnd / 4000 - 0.5) < 0.03
    batch = obj.batch(s, 8, gen)
    assert set(batch["nsp_labels"].tolist()) <= {0, 1}
    assert ((batch["token_type_ids"] == 1) <= (batch["attention_mask"] == 1)).all()


def test_nsp_needs_two_documents(tmp_path):
    tok = tokenizer()
    s = stream(tmp_path, list(range(5, 40)))
    obj = NSP(objective_config({"name": "nsp"}), tok, 32, tok.eos_id)
    with pytest.raises(LmlabError, match="at least 2 documents"):
        obj.batch(s, 2, torch.Generator())


def tiny(arch_preset, V, **kw):
    base = dict(n_layer=1, n_head=2, d_model=32, d_ff=64, max_seq_len=64, vocab_size=V)
    if arch_preset == "t5-small":
        base.update(head_dim=16)
    return Transformer(preset(arch_preset, **{**base, **kw}))


@pytest.mark.parametrize("names,arch", [(["clm"], "baby-gpt"), (["prefix"], "baby-gpt"), (["fim"], "baby-gpt"),
                                        (["clm", "fim", "prefix"], "baby-gpt"), (["mlm"], "bert-base"),
                                        (["nsp"], "bert-base"), (["span"], "t5-small")])
def test_each_objective_trains(tmp_path, names, arch):
    """A few optimizer steps on one batch lower every objective's loss (mixtures included)."""
    torch.manual_seed(0)
    tok = tokenizer()
    s = stream(tmp_path, joined(random_docs(tok, 200, np.random.default_rng(0)), tok.eos_id))
    mix = build_objectives([objective_config({"name": n}) for n in names], tok, 32, tok.eos_id)
    model = tiny(arch, tok.vocab_size)
    for o in mix.objectives:
        o.check_model(model)
    batches = mix.batches(s, 8, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss, metrics = mix.loss(model, batches)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first
    if "nsp" in names:
        assert {"nsp_acc", "mlm_acc"} <= set(metrics)


def test_objective_arch_and_config_errors():
    tok = tokenizer()
    with pytest.raises(LmlabError, match="did you mean 'mask_prob'"):
        objective_config({"name": "mlm", "mask_prb": 0.2})
    with pytest.raises(LmlabError, match="unknown objective 'spam'"):
        objective_config({"name": "spam"})
    mix = build_objectives([objective_config({"name": "mlm"})], tok, 32, tok.eos_id)
    with pytest.raises(LmlabError, match="arch encoder"):
        mix.objectives[0].check_model(tiny("baby-gpt", tok.vocab_size))
    assert set(REGISTRY) == {"clm", "mlm", "nsp", "span", "prefix", "fim"}


def test_mixture_sample_mode_follows_weights(tmp_path):
    tok = tokenizer()
    s = stream(tmp_path, joined(random_docs(tok, 50, np.random.default_rng(0)), tok.eos_id))
    mix = build_objectives([objective_config({"name": "clm", "weight": 3.0}),
                            objective_config({"name": "fim", "weight": 1.0})], tok, 16, tok.eos_id, mode="sample")
    gen = torch.Generator().manual_seed(0)
    picks = [mix.batches(s, 1, gen)[0][0] for _ in range(2000)]
    assert abs(picks.count(0) / 2000 - 0.75) < 0.04


# ------------------------------------------------------------------ the fused projection + cross-entropy
@pytest.mark.parametrize("vocab,rows,chunk", [(65, 100, 7), (1000, 300, 64), (300, 50, None)])
def test_linear_cross_entropy_matches_plain_route(monkeypatch, vocab, rows, chunk):
    import torch.nn.functional as F
    from lmlab.model import loss as fused

    if chunk:  # force many chunks (a ragged last one too)
        monkeypatch.setattr(fused, "_chunk_rows", lambda v, d: chunk)
    g = torch.Generator().manual_seed(vocab)
    h = torch.randn(rows, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(vocab, 16, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(vocab, (rows,), generator=g)
    y[::5] = IGNORE
    got = fused.linear_cross_entropy(h, w, y)
    (got * 2.5).backward()  # a non-unit upstream gradient is applied in backward
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = F.cross_entropy(F.linear(h, w), y, ignore_index=IGNORE)
    (want * 2.5).backward()
    assert abs(got.item() - want.item()) < 1e-12
    assert torch.allclose(gh, h.grad, atol=1e-12) and torch.allclose(gw, w.grad, atol=1e-12)
    with torch.no_grad():  # the evaluation route computes no gradient and gives the same loss
        assert abs(fused.linear_cross_entropy(h, w, y).item() - want.item()) < 1e-12


@pytest.mark.parametrize("name", ["baby-gpt", "tiny-llama", "t5-small"])
def test_model_labels_route_equals_logits_route(name):
    import torch.nn.functional as F

    kw = dict(n_layer=1, n_decoder_layer=1, d_model=32, d_ff=64, n_head=4, head_dim=8) if name == "t5-small" else {}
    torch.manual_seed(0)
    model = Transformer(preset(name, vocab_size=97, max_seq_len=16, **kw)).double()
    x = torch.randint(97, (3, 16))
    y = torch.randint(97, (3, 16))
    y[0, :5] = IGNORE
    extra = {"encoder_input_ids": torch.randint(97, (3, 10))} if name == "t5-small" else {}
    fused = model(x, labels=y, **extra)
    fused.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = F.cross_entropy(model(x, **extra).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    plain.backward()
    assert abs(fused.item() - plain.item()) < 1e-10
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-10), n


def test_layernorm_without_bias():
    with_bias = Transformer(preset("baby-gpt"))
    without = Transformer(preset("baby-gpt", norm_bias=False))
    norms = [m for m in without.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.bias is None for m in norms)
    assert with_bias.num_params() - without.num_params() == len(norms) * 128
    assert without(torch.randint(65, (2, 8))).shape == (2, 8, 65)
