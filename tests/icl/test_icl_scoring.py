"""Scoring on the eval engine against hand computation on a tiny model: direct, channel, generation,
content-free calibration wiring, batch calibration, and the shared-prefix KV cache path."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.eval.engine import Engine
from lmlab.eval.evaluator import answer
from lmlab.eval.data import Docs
from lmlab.eval.requests import MAIN, Loglikelihood
from lmlab.icl import scoring
from lmlab.icl.calibration import CONTENT_FREE_INPUTS
from lmlab.icl.experiment import Grid, GridConfig
from lmlab.icl.prompt import Prompt
from lmlab.icl.tasks import ICLTask
from lmlab.inference.text import generate_from_ids
from lmlab.inference.sampling import GenerationConfig

P = Prompt("Review: {text}\nSentiment: {label}", {"neg": "bad", "pos": "good"})
LABELS = ["neg", "pos"]
DEMOS = [{"text": "loved it", "label": "pos"}, {"text": "meh", "label": "neg"}]
DOC = {"text": "fine film", "label": "pos"}


def logp(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context), one full unbatched forward pass."""
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([whole]))[0].float(), -1)
    return float(sum(lp[j - 1, whole[j]] for j in range(len(ctx), len(whole))))


def run(engine, items):
    answer(engine, [(type("T", (), {"name": "t"}), items)])
    return items


def test_direct_scores_each_label_word_after_the_prompt(tiny):
    model, tok = tiny
    prefix = P.prefix(DEMOS)
    item = run(Engine(model, tok, progress=False), [scoring.build_item(0, DOC, "x:1", P, LABELS, prefix,
                                                                       "direct", False)])[0]
    context = "Review: loved it\nSentiment: good\n\nReview: meh\nSentiment: bad\n\nReview: fine film\nSentiment:"
    want = [logp(model, tok, context, " bad"), logp(model, tok, context, " good")]
    assert np.allclose([a.logprob for a in item.answers[MAIN]], want, atol=1e-4)
    p = scoring.label_probs(item)
    assert np.allclose(p, np.exp(want) / np.exp(want).sum(), atol=1e-4)


def test_channel_scores_the_input_given_each_label(tiny):
    model, tok = tiny
    prefix = P.prefix(DEMOS, channel=True)
    assert prefix == "Sentiment: good\nReview: loved it\n\nSentiment: bad\nReview: meh\n\n"
    item = run(Engine(model, tok, progress=False), [scoring.build_item(0, DOC, "x:1", P, LABELS, prefix,
                                                                       "channel", False)])[0]
    want = [logp(model, tok, prefix + f"Sentiment: {w}", "\nReview: fine film") for w in ("bad", "good")]
    assert np.allclose([a.logprob for a in item.answers[MAIN]], want, atol=1e-4)


def test_generation_is_greedy_and_parsed_by_the_verbalizer(tiny):
    model, tok = tiny
    item = run(Engine(model, tok, progress=False), [scoring.build_item(0, DOC, "x:1", P, LABELS, P.prefix(DEMOS),
                                                                       "generate", False, max_gen_toks=6)])[0]
    context = P.prefix(DEMOS) + "Review: fine film\nSentiment:"
    done = generate_from_ids(Engine(model, tok).runner, tok, [tok.encode(context)],
                             GenerationConfig(max_new_tokens=6, temperature=0.0, stop=["\n", "\n\n"]))
    assert item.answers[MAIN][0] == done[0].text.split("\n")[0]
    assert scoring.parse_generation(" Good, really", P, LABELS) == 1
    assert scoring.parse_generation("bad", P, LABELS) == 0
    assert scoring.parse_generation(" badly", P, LABELS) is None
    assert scoring.parse_generation("no idea", P, LABELS) is None


def test_content_free_group_is_the_same_prompt_with_content_free_inputs(tiny):
    model, tok = tiny
    prefix = P.prefix(DEMOS)
    item = scoring.build_item(0, DOC, "x:1", P, LABELS, prefix, "direct", True)
    assert [r.context for r in item.requests[scoring.CONTENT_FREE]] == [
        prefix + f"Review: {cf}\nSentiment: " for cf in CONTENT_FREE_INPUTS for _ in LABELS]
    run(Engine(model, tok, progress=False), [item])
    cf = scoring.content_free_probs(item, 2)
    want = np.array([[logp(model, tok, prefix + f"Review: {c}\nSentiment:", f" {w}") for w in ("bad", "good")]
                     for c in CONTENT_FREE_INPUTS])
    want = np.exp(want) / np.exp(want).sum(1, keepdims=True)
    assert np.allclose(cf, want, atol=1e-4)


def toy_task(n_test=6):
    pool = [{"text": t, "label": l} for t, l in [("great fun", "pos"), ("awful mess", "neg"), ("so good", "pos"),
                                                  ("boring", "neg"), ("loved it", "pos"), ("hated it", "neg")]]
    test = [{"text": f"film number {i} was {'good' if i % 2 else 'bad'}", "label": LABELS[i % 2]}
            for i in range(n_test)]
    return ICLTask("toy", Docs(pool, [f"pool:{i + 1}" for i in range(6)]),
                   Docs(test, [f"test:{i + 1}" for i in range(n_test)]), LABELS, P)


def test_calibrated_predictions_are_the_argmax_of_calibrated_probabilities(tiny):
    model, tok = tiny
    grid = Grid(Engine(model, tok, progress=False), toy_task(), GridConfig(shots=[2], seeds=1, calibrate=True,
                                                                           log_demos=True), progress=False)
    cell = grid.run()[0]
    demos = [d["pool_index"] for d in grid.demo_log[0]["demonstrations"]]
    assert len(demos) == 2 and all(r["demonstrations"] == grid.demo_log[0]["demonstrations"] for r in grid.demo_log)
    items = grid.items([demos] * 6)  # recompute by hand, with the demonstrations the cell used
    run(grid.engine, items)
    probs = np.stack([scoring.label_probs(it) for it in items])
    p_cf = np.stack([scoring.content_free_probs(it, 2).mean(0) for it in items])
    calibrated = (probs / p_cf).argmax(1)
    assert cell["acc_calibrated"] == pytest.approx(np.mean(calibrated == np.array([it.gold for it in items])))
    assert [r["prediction_calibrated"] for r in grid.demo_log] == [LABELS[i] for i in calibrated]
    assert [r["prediction"] for r in grid.demo_log] == [LABELS[i] for i in probs.argmax(1)]
    batch = np.log(probs) - np.log(probs.mean(0))
    assert [r["prediction_batch_calibrated"] for r in grid.demo_log] == [LABELS[i] for i in batch.argmax(1)]
    assert sum(cell["predictions_calibrated"].values()) == 6


def test_a_test_item_in_the_pool_is_never_a_fixed_demonstration(tiny):
    model, tok = tiny
    task = toy_task()
    task.test = Docs(task.pool.docs[:5], task.pool.origins[:5])  # five of six pool texts are test items
    grid = Grid(Engine(model, tok, progress=False), task, GridConfig(shots=[1], seeds=3, log_demos=True),
                progress=False)
    grid.run()
    assert {d["pool_index"] for r in grid.demo_log for d in r["demonstrations"]} == {5}


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_shared_prefix_gives_the_plain_log_likelihoods(tiny, batch_size):
    model, tok = tiny
    prefix = P.prefix(DEMOS)
    reqs = [Loglikelihood(prefix + f"Review: item {i}\nSentiment:", c) for i in range(5) for c in (" bad", " good!")]
    reqs += [Loglikelihood("Another context entirely", " x"), Loglikelihood(prefix, "Review")]
    engine = Engine(model, tok, batch_size=batch_size, progress=False)
    plain = engine.loglikelihood(reqs)
    with engine.sharing(prefix):
        shared = engine.loglikelihood(reqs)
    assert engine.shared_prefix is None
    with engine.sharing(prefix), torch.inference_mode():  # all but the two not starting with the prefix's tokens
        from lmlab.utils.progress import Progress

        done, rest = engine._score_on_prefix(reqs, Progress(1, "", enabled=False))
    assert rest == [10, 11] and sorted(done) == list(range(10))
    assert np.allclose([a.logprob for a in shared], [a.logprob for a in plain], atol=1e-4)
    assert [a.is_greedy for a in shared] == [a.is_greedy for a in plain]
    assert [a.n_tokens for a in shared] == [a.n_tokens for a in plain]


@pytest.mark.parametrize("retrievers,scoring", [(["random"], "direct"), (["bm25", "balanced"], "direct"),
                                                (["bm25"], "channel")])
def test_grid_predictions_identical_with_and_without_the_shared_prefix(tiny, retrievers, scoring):
    """Fixed demonstrations share one prefix; per-item ones (bm25) share each item's prefix between its
    query and its content-free inputs (or, for channel scoring, between its labels' contexts)."""
    model, tok = tiny

    class Counting(Engine):  # counts the requests scored on a cached prefix
        on_prefix = 0

        def _score_on_prefix(self, requests, bar):
            done, rest = super()._score_on_prefix(requests, bar)
            self.on_prefix += len(done)
            return done, rest

    out = []
    for share in (True, False):
        engine = Counting(model, tok, progress=False)
        grid = Grid(engine, toy_task(), GridConfig(
            shots=[0, 4], seeds=2, retrievers=retrievers, calibrate=scoring == "direct", scoring=scoring,
            share_prefix=share, log_demos=True), progress=False)
        cells = grid.run()
        per_item = 2 * (1 + len(CONTENT_FREE_INPUTS)) if scoring == "direct" else 2
        # every request of every 4-shot cell took the cached path (0 shots: no prefix to share)
        assert engine.on_prefix == (sum(c["n"] for c in cells if c["shots"]) * per_item if share else 0)
        out.append(([{k: v for k, v in c.items() if k != "seconds"} for c in cells], grid.demo_log))
    assert out[0] == out[1]
