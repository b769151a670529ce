"""Demonstration selectors: seeded, exactly balanced, nearest-first, diverse, never the query itself."""
from collections import Counter

import numpy as np
import pytest
from retrieval_fakes import BagOfWords

from lmlab.errors import LmlabError
from lmlab.icl.selectors import (BalancedSelector, BM25Selector, MMRSelector, RandomSelector, TopKSelector,
                                 make_selector, mmr)
from lmlab.retrieval.bm25 import BM25Retriever
from lmlab.retrieval.dense import DenseRetriever

POOL = [f"example number {i} about {topic}" for i, topic in
        enumerate(["cats", "dogs", "stocks", "cats", "bonds", "dogs", "cats", "stocks", "bonds", "dogs", "fish", "fish"])]
LABELS = ["pets", "pets", "money", "pets", "money", "pets", "pets", "money", "money", "pets", "food", "food"]


def enc():
    return BagOfWords(dim=4096)


def test_random_is_seeded_and_per_query():
    a = RandomSelector(POOL, seed=7).select(["q one", "q two", "q three"], 4)
    b = RandomSelector(POOL, seed=7).select(["q three", "q one"], 4)
    assert a.indices[0] == b.indices[1] and a.indices[2] == b.indices[0]  # independent of the other queries
    assert a.scores is None
    c = RandomSelector(POOL, seed=8).select(["q one", "q two", "q three"], 4)
    assert a.indices != c.indices
    for row in a.indices:
        assert len(set(row)) == 4 and all(0 <= i < len(POOL) for i in row)


def test_random_covers_the_pool_and_never_the_query():
    sel = RandomSelector(POOL, seed=0)
    picks = sel.select(POOL, 5, exclude=range(len(POOL)))
    for q, row in enumerate(picks.indices):
        assert q not in row and len(set(row)) == 5
    seen = Counter(i for row in sel.select([f"q{n}" for n in range(200)], 3).indices for i in row)
    assert set(seen) == set(range(len(POOL)))  # 600 draws reach every example
    assert max(seen.values()) < 2.0 * 600 / len(POOL)  # and none is drawn far more than its share


def test_a_pool_copy_of_the_query_is_never_shown():
    pool = ["the same text", "other a", "other b", "the same text"]
    for sel in (RandomSelector(pool), BM25Selector(pool), TopKSelector(pool, encoder=enc())):
        rows = sel.select(["the same text"], 2).indices
        assert sorted(rows[0]) == [1, 2]
    with pytest.raises(LmlabError, match=r"3 shots but the pool holds only 2 examples for query 0 \(4 less 2"):
        RandomSelector(pool).select(["the same text"], 3)


@pytest.mark.parametrize("shots,counts", [(6, [2, 2, 2]), (7, [2, 2, 3]), (2, [0, 1, 1]), (3, [1, 1, 1])])
def test_balanced_is_exact(shots, counts):
    sel = BalancedSelector(POOL, LABELS, seed=3)
    out = sel.select([f"query {n}" for n in range(30)], shots, exclude=[n % 10 for n in range(30)])
    extra_classes = Counter()
    for n, row in enumerate(out.indices):
        got = Counter(LABELS[i] for i in row)
        assert sorted(got.get(c, 0) for c in ("pets", "money", "food")) == counts
        assert len(set(row)) == shots and n % 10 not in row
        extra_classes.update(c for c, k in got.items() if k > shots // 3)
    if shots % 3:  # the label that gets one more varies (seeded) among those that have one to spare
        assert set(extra_classes) == ({"pets", "money"} if shots == 7 else {"pets", "money", "food"})
    assert out.indices == BalancedSelector(POOL, LABELS, seed=3).select(
        [f"query {n}" for n in range(30)], shots, exclude=[n % 10 for n in range(30)]).indices


def test_balanced_needs_enough_of_each_label():
    with pytest.raises(LmlabError, match="label 'food' has only 1 examples for query 0, 2 needed for 6 balanced"):
        BalancedSelector(POOL, LABELS).select(["q"], 6, exclude=[10])
    # 7 = 2 + 2 + 3: food has no third example, so the extra one goes to pets or money
    rows = BalancedSelector(POOL, LABELS).select([f"q{n}" for n in range(20)], 7).indices
    assert all(Counter(LABELS[i] for i in row)["food"] == 2 for row in rows)
    # 8 = 2 + 3 + 3, but with two money examples left out only pets has a third one
    with pytest.raises(LmlabError, match="only 1 labels have more than 2 examples for query 0, 2 must give one more"):
        BalancedSelector(POOL, LABELS).select(["q"], 8, exclude=[[4, 7]])
    with pytest.raises(LmlabError, match="3 labels for a pool of 12"):
        BalancedSelector(POOL, LABELS[:3])


@pytest.mark.parametrize("make", [lambda: BM25Selector(POOL), lambda: TopKSelector(POOL, encoder=enc())],
                         ids=["bm25", "topk"])
def test_nearest_demonstrations_in_similarity_order(make):
    sel = make()
    out = sel.select(["a question about stocks", "something on fish"], 2)
    assert [sorted(r) for r in out.indices] == [[2, 7], [10, 11]]
    for scores in out.scores:
        assert scores == sorted(scores)  # ascending: the most similar sits right before the query
    cats = sel.select(["cats"], 4).indices[0]
    assert sorted(cats[1:]) == [0, 3, 6] and cats[0] not in (0, 3, 6)  # the least similar shown first


def test_similarity_order_puts_the_best_match_last():
    pool = ["red apple pie", "red apple", "green pear"]
    for sel in (BM25Selector(pool), TopKSelector(pool, encoder=enc())):
        assert sel.select(["red apple pie recipe"], 3).indices[0][-1] == 0
        assert sel.select(["green pear tart"], 3).indices[0][-1] == 2


def test_random_order_shuffles_the_same_demonstrations():
    ranked = TopKSelector(POOL, encoder=enc(), order="similarity").select(["cats and dogs"], 6)
    shuffled = TopKSelector(POOL, encoder=enc(), order="random", seed=1).select(["cats and dogs"], 6)
    assert sorted(ranked.indices[0]) == sorted(shuffled.indices[0]) and ranked.indices != shuffled.indices
    pairs = dict(zip(shuffled.indices[0], shuffled.scores[0]))
    assert pairs == dict(zip(ranked.indices[0], ranked.scores[0]))  # each score travels with its example


DUPS = ["apple banana", "apple banana", "apple banana", "pie crust", "melon lime"]


def test_mmr_trades_relevance_for_diversity():
    topk = TopKSelector(DUPS, encoder=enc()).select(["apple banana pie"], 2)
    assert sorted(topk.indices[0]) == [0, 1]  # two copies of the same text
    diverse = MMRSelector(DUPS, encoder=enc(), lam=0.5).select(["apple banana pie"], 2)
    assert diverse.indices[0] == [3, 0]  # one copy, then the other relevant text; similarity order
    same = MMRSelector(DUPS, encoder=enc(), lam=1.0).select(["apple banana pie"], 2)
    assert same.indices == topk.indices  # lam = 1 is TopK


def test_mmr_matches_a_brute_force_greedy():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(10, 8))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    rel = np.sort(rng.uniform(size=10))[::-1]
    for lam in (0.0, 0.3, 0.7, 1.0):
        chosen = []
        for _ in range(4):
            best = max((j for j in range(10) if j not in chosen),
                       key=lambda j: lam * rel[j] - (1 - lam) * max((v[j] @ v[s] for s in chosen), default=0.0))
            chosen.append(best)
        assert mmr(rel, v, 4, lam) == chosen


def test_shot_counts():
    with pytest.raises(LmlabError, match="13 shots but the pool holds only 12 examples"):
        RandomSelector(POOL).select(["q"], 13)
    with pytest.raises(LmlabError, match="12 shots but the pool holds only 11 examples for query 1"):
        BM25Selector(POOL).select(["q", "r"], 12, exclude=[None, 4])
    empty = TopKSelector(POOL, encoder=enc()).select(["q", "r"], 0)
    assert empty.indices == [[], []] and empty.scores == [[], []]


def test_prebuilt_retrievers_and_bad_settings(tmp_path):
    DenseRetriever(enc()).index(POOL).save(tmp_path / "idx")
    loaded = DenseRetriever.load(tmp_path / "idx", enc())
    assert TopKSelector(POOL, retriever=loaded).select(["fish"], 2).indices == \
        TopKSelector(POOL, encoder=enc()).select(["fish"], 2).indices
    with pytest.raises(LmlabError, match="not built over this pool \\(they differ at entry 0\\)"):
        TopKSelector(["x"] + POOL[1:], retriever=loaded)
    with pytest.raises(LmlabError, match="needs a dense retriever, got a bm25 one"):
        TopKSelector(POOL, retriever=BM25Retriever().index(POOL))
    with pytest.raises(LmlabError, match="order 'similarity' needs a similarity-based selector"):
        RandomSelector(POOL, order="similarity")
    with pytest.raises(LmlabError, match="unknown order 'closest'"):
        BM25Selector(POOL, order="closest")
    with pytest.raises(LmlabError, match="unknown selector 'tpok' \\(did you mean 'topk'"):
        make_selector("tpok", POOL)
    with pytest.raises(LmlabError, match="needs the pool's labels"):
        make_selector("balanced", POOL)
    with pytest.raises(LmlabError, match="within \\[0, 1\\]"):
        MMRSelector(POOL, encoder=enc(), lam=1.5)
    with pytest.raises(LmlabError, match="pool is empty"):
        RandomSelector([])


def test_make_selector_builds_each_method():
    for method in ("random", "balanced", "bm25", "topk", "mmr"):
        sel = make_selector(method, POOL, labels=LABELS, encoder=enc(), seed=2)
        out = sel.select(["cats", "bonds"], 3, exclude=[0, 4])
        assert sel.method == method and len(out) == 2
        assert 0 not in out.indices[0] and 4 not in out.indices[1]
        assert (out.scores is not None) == (method in ("bm25", "topk", "mmr"))


SEMANTIC_POOL = ["The kitten is napping on the couch.", "Stock prices fell sharply today.",
                 "The striker scored twice in the final.", "A chef is chopping onions.",
                 "Heavy rain flooded the streets.", "The puppy chased a ball in the garden.",
                 "Investors sold their shares in a panic.", "The team won the championship match."]


@pytest.mark.slow
def test_topk_with_minilm_finds_neighbours_that_share_no_words(minilm):
    """Dense retrieval's point: the nearest demonstrations by meaning, where word overlap finds nothing."""
    sel = TopKSelector(SEMANTIC_POOL, encoder=minilm)
    out = sel.select(["A cat sleeps on the sofa.", "Markets crashed as traders dumped equities.",
                      "Our goalkeeper saved a penalty."], 2)
    assert out.indices[0][-1] == 0  # the cat: the napping kitten is the nearest, shown last
    assert set(out.indices[1]) == {1, 6}  # the markets: the two finance sentences (cosine 0.57, 0.53; next 0.22)
    assert set(out.indices[2]) == {2, 7}  # the goalkeeper: the two football sentences (0.46, 0.30; next 0.16)
    assert all(s == sorted(s) and 0 < s[-1] <= 1 for s in out.scores)
    # the same query twice gives the same demonstrations (deterministic), never the query's own copy
    again = TopKSelector(SEMANTIC_POOL + ["A cat sleeps on the sofa."], encoder=minilm).select(
        ["A cat sleeps on the sofa."], 2)
    assert again.indices[0] == out.indices[0]
