import copy

import pytest
import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.eval.engine import Engine
from lmlab.eval.requests import Loglikelihood, LoglikelihoodRolling


def reference(model, tok, context, continuation):
    """log P(continuation | context) from one unpadded full forward pass."""
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    cont = whole[len(ctx):]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0].float(), -1)
    picks = [logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)]
    greedy = all(int(logp[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))
    return float(sum(picks)), greedy


REQS = [Loglikelihood("The cat sat on the", c) for c in [" mat", " hat and went home", " x"]] + [
    Loglikelihood("Question: 2+2?\nAnswer:", c) for c in [" 4", " five, surely"]] + [
    Loglikelihood("A", " b"), Loglikelihood("Some longer context that goes on for a while.", " ok")]


def test_matches_unbatched_forward_at_every_batch_size(tiny):
    model, tok = tiny
    want = [reference(model, tok, r.context, r.continuation) for r in REQS]
    for bs in (1, 2, 8):
        got = Engine(model, tok, batch_size=bs, progress=False).loglikelihood(REQS)
        for g, (lp, greedy) in zip(got, want):
            assert abs(g.logprob - lp) < 1e-4
            assert g.is_greedy == greedy


def test_trailing_space_moves_to_continuation(tiny):
    model, tok = tiny
    eng = Engine(model, tok, progress=False)
    assert eng.encode_pair("Answer: ", "yes") == eng.encode_pair("Answer:", " yes")


def test_rolling_equals_sum_over_windows(tiny):
    model, tok = tiny
    text = "hello world, " * 20
    eng = Engine(model, tok, batch_size=4, progress=False)
    ids = [eng.prefix_id] + tok.encode(text)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    full = float(sum(logp[j, ids[j + 1]] for j in range(len(ids) - 1)))
    one_window = eng.loglikelihood_rolling([LoglikelihoodRolling(text)], window=len(ids))[0]
    assert one_window.n_tokens == len(ids) - 1
    assert abs(one_window.logprob - full) < 1e-3
    # smaller windows lose context, so the score changes, but every token is scored exactly once
    windows = eng.windows(tok.encode(text), 64, 32)
    assert sum(len(t) for _, t in windows) == len(ids) - 1
    assert all(len(i) <= 64 for i, _ in windows)
    short = eng.loglikelihood_rolling([LoglikelihoodRolling(text)], window=64, stride=32)[0]
    assert short.n_tokens == len(ids) - 1 and short.logprob != one_window.logprob


def test_packed_rows_match_unbatched_forward(tiny):
    """Many groups of mixed lengths: several share a packed row, and every score is still exact."""
    import random

    model, tok = tiny
    rng = random.Random(0)
    words = ["alpha", "be", "c", "delta echo", "fox", "golf hotel india", "j"]
    reqs = []
    for g in range(12):
        ctx = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        for _ in range(rng.randint(1, 4)):
            reqs.append(Loglikelihood(ctx, " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))))
    want = [reference(model, tok, r.context, r.continuation) for r in reqs]
    eng = Engine(model, tok, batch_size=32, progress=False)
    groups = eng._groups(reqs)
    assert len(eng._rows(groups)) < len(groups)  # packing happened
    for bs in (1, 5, 32):
        got = Engine(model, tok, batch_size=bs, progress=False).loglikelihood(reqs)
        for g, (lp, greedy) in zip(got, want):
            assert abs(g.logprob - lp) < 1e-4
            assert g.is_greedy == greedy


def test_max_length_past_the_context_window_is_a_clear_error(tiny):
    model, tok = tiny  # context window 512
    with pytest.raises(LmlabError, match="--max-length 600 is outside the model's context window"):
        Engine(model, tok, max_length=600, progress=False)
    eng = Engine(model, tok, max_length=512, progress=False)
    long = "word " * 200  # ~1000 characters: rolling windows at the full window stay inside the table
    assert eng.loglikelihood_rolling([LoglikelihoodRolling(long)])[0].n_tokens == len(tok.encode(long))


def test_pad_id_zero_is_a_real_pad(tiny):
    model, tok = tiny
    eng = Engine(model, copy.copy(tok), progress=False)
    eng.tok.pad_id = 0
    assert eng._pad([[5, 6, 7], [8]])[1].tolist() == [8, 0, 0]
    eng.tok.pad_id = 3
    assert eng._pad([[5, 6, 7], [8]])[1].tolist() == [8, 3, 3]
    eng.tok.pad_id = None
    assert eng._pad([[5, 6, 7], [8]])[1].tolist() == [8, 0, 0]


def test_engine_calls_only_the_public_model_interface(tiny):
    """Scoring goes through hidden_states and logits (selected positions only), nothing else."""
    model, tok = tiny
    calls = []

    class Spy:
        def __init__(self, inner):
            self.inner, self.cfg = inner, inner.cfg

        def parameters(self):
            return self.inner.parameters()

        def hidden_states(self, *a, **kw):
            calls.append("hidden_states")
            return self.inner.hidden_states(*a, **kw)

        def logits(self, h, positions=None):
            calls.append("logits")
            assert positions is not None  # only the scored positions are projected
            return self.inner.logits(h, positions)

    got = Engine(Spy(model), tok, progress=False).loglikelihood(REQS[:3])
    want = Engine(model, tok, progress=False).loglikelihood(REQS[:3])
    assert [g.logprob for g in got] == [w.logprob for w in want]
    assert set(calls) == {"hidden_states", "logits"}
