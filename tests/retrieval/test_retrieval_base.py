"""The Retriever contract shared by every kind: exclusions, k checks, deterministic tie order."""
import numpy as np
import pytest

from lmlab.errors import LmlabError
from lmlab.retrieval.base import check_k, exclusions, top_n
from lmlab.retrieval.bm25 import BM25Retriever


def test_top_n_breaks_ties_by_index():
    s = np.array([0.5, 0.9, 0.5, 0.1, 0.9, 0.5], dtype=np.float32)
    assert top_n(s, 3).tolist() == [1, 4, 0]
    assert top_n(s, 4).tolist() == [1, 4, 0, 2]
    assert top_n(s, 6).tolist() == [1, 4, 0, 2, 5, 3]
    assert top_n(np.zeros(5, dtype=np.float32), 2).tolist() == [0, 1]


def test_exclusions_take_ints_lists_and_none():
    assert exclusions([3, None, [0, 1], np.int64(2)], 4, 5) == [{3}, set(), {0, 1}, {2}]
    assert exclusions(None, 2, 5) == [set(), set()]
    with pytest.raises(LmlabError, match="exclude has 1 entries for 2 queries"):
        exclusions([1], 2, 5)
    with pytest.raises(LmlabError, match=r"exclude\[1\]: 7 is not an index of the 5 indexed texts"):
        exclusions([0, [7]], 2, 5)


def test_k_beyond_the_pool_names_both_numbers():
    with pytest.raises(LmlabError, match="k=6 but the index holds only 5 texts"):
        check_k(6, 5, [set()])
    with pytest.raises(LmlabError, match=r"k=5 but the index holds only 4 texts for query 1 \(5 less 1 excluded\)"):
        check_k(5, 5, [set(), {2}])
    with pytest.raises(LmlabError, match="non-negative integer"):
        check_k(-1, 5, [])


def test_search_never_returns_excluded_and_handles_k_zero():
    texts = ["red apple", "green apple", "red car", "blue car", "apple pie"]
    r = BM25Retriever().index(texts)
    hits = r.search(texts, 4, exclude=range(5))
    for q, row in enumerate(hits.indices):
        assert q not in row and len(set(row.tolist())) == 4
    assert r.search(["apple"], 0).indices.shape == (1, 0)
    assert r.search([], 3).indices.shape == (0, 3)


def test_bad_inputs():
    with pytest.raises(LmlabError, match="search before index"):
        BM25Retriever().search(["x"], 1)
    with pytest.raises(LmlabError, match="no texts"):
        BM25Retriever().index([])
    with pytest.raises(LmlabError, match=r"texts\[1\] is int"):
        BM25Retriever().index(["ab cd", 3])
    with pytest.raises(LmlabError, match="none of the 2 texts has a word BM25 can index"):
        BM25Retriever().index(["a b", "the"])
    with pytest.raises(LmlabError, match="queries: expected a list of texts, got one string"):
        BM25Retriever().index(["ab cd"]).search("ab", 1)
    with pytest.raises(LmlabError, match="unknown BM25 method 'okapi'"):
        BM25Retriever(method="okapi")
