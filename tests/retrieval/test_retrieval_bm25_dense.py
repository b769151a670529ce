"""BM25 and dense top-k return the expected neighbours on a small hand-built pool."""
import math
from collections import Counter

import numpy as np
import pytest

from lmlab.retrieval.bm25 import BM25Retriever
from lmlab.retrieval.dense import DenseRetriever

POOL = [
    "The cat sat on the warm mat.",                        # 0 cats
    "The dog barks loudly at the mailman.",               # 1 dogs
    "Stock markets fell sharply after the announcement.",  # 2 markets
    "The kitten and the cat played with yarn.",            # 3 cats
    "Investors sold shares as markets tumbled.",           # 4 markets
    "A puppy chased the dog around the park.",             # 5 dogs
    "Bake the bread in a hot oven for an hour.",           # 6 baking
    "The oven was too hot for the cake.",                  # 7 baking
]


def lucene_bm25(query, docs, k1=1.5, b=0.75):
    """BM25 as Lucene scores it, written out: sum over query words of idf × saturated, length-normalised tf."""
    import bm25s

    toks = bm25s.tokenize(docs, stopwords="en", return_ids=False, show_progress=False)
    q = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
    avg = sum(map(len, toks)) / len(toks)
    out = []
    for d in toks:
        tf, s = Counter(d), 0.0
        for w in q:
            df = sum(w in t for t in toks)
            idf = math.log(1 + (len(toks) - df + 0.5) / (df + 0.5))
            s += idf * tf[w] / (tf[w] + k1 * (1 - b + b * len(d) / avg))
        out.append(s)
    return np.array(out)


def test_bm25_scores_match_the_formula():
    r = BM25Retriever().index(POOL)
    for query in ["cat yarn", "markets investors", "hot oven cake", "dog park"]:
        np.testing.assert_allclose(r.scores(query), lucene_bm25(query, POOL), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda enc: BM25Retriever(), lambda enc: DenseRetriever(enc)], ids=["bm25", "dense"])
def test_expected_neighbours(make, bag_of_words):
    from retrieval_fakes import BagOfWords

    r = make(BagOfWords(dim=4096)).index(POOL)  # wide enough that no two pool words share a slot
    hits = r.search(["cat yarn", "markets investors", "oven hot cake", "dog park puppy"], 2)
    assert hits.indices.tolist() == [[3, 0], [4, 2], [7, 6], [5, 1]]
    assert (np.diff(hits.scores, axis=1) <= 0).all() and hits.indices.dtype == np.int64


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_pool_items_find_their_topic_without_themselves(kind, bag_of_words):
    from retrieval_fakes import BagOfWords

    r = BM25Retriever() if kind == "bm25" else DenseRetriever(BagOfWords(dim=4096))
    r.index(POOL)
    hits = r.search(POOL, 1, exclude=range(len(POOL)))
    # every pool item's best other item is the one on its topic (they share a content word)
    assert hits.indices[:, 0].tolist() == [3, 5, 4, 0, 2, 1, 7, 6]
    again = r.search(POOL, 3, exclude=range(len(POOL)))
    assert again.indices[:, 0].tolist() == hits.indices[:, 0].tolist()  # deterministic, k-independent head


def test_dense_cosine_scores(bag_of_words):
    r = DenseRetriever(bag_of_words).index(POOL)
    hits = r.search(["The cat sat on the warm mat."], 1)
    assert hits.indices[0, 0] == 0 and abs(hits.scores[0, 0] - 1.0) < 1e-5
    v = r.vectors([0, 3])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-6)


@pytest.mark.slow
def test_minilm_finds_paraphrases_without_shared_words(minilm_path, tmp_path):
    from lmlab.retrieval.embed import SentenceEncoder

    r = DenseRetriever(SentenceEncoder.load("all-minilm-l6-v2")).index(POOL)
    queries = ["A feline rested on a rug.", "Equities dropped.", "Canines making noise"]
    hits = r.search(queries, 1)
    assert hits.indices[:, 0].tolist() == [0, 2, 1]
    r.save(tmp_path / "idx")
    again = DenseRetriever.load(tmp_path / "idx")  # the recorded model is loaded again by its spec
    assert again.encoder.name == r.encoder.name
    np.testing.assert_array_equal(again.search(queries, 3).indices, r.search(queries, 3).indices)
