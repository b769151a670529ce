"""Demonstration selection: for each query, `shots` examples from a pool, in the order they are shown.

Methods: random and class-balanced (seeded), BM25, TopK (dense) and MMR (relevance minus redundancy).
Orders: "similarity" (the most similar demonstration last, right before the query) or "random".
A query never sees itself: pool entries with the query's exact text are left out, and so are the
indices passed in `exclude` (e.g. the query's own position when queries come from the pool).
Randomness is drawn per query from (seed, the query's text), so an item sees the same demonstrations
whatever other items are selected with it. Every selection returns the chosen pool indices for logging.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar, Hashable, Sequence

import numpy as np

from lmlab.errors import LmlabError
from lmlab.retrieval.base import Exclude, Retriever, check_texts, exclusions, keep_best, wanted
from lmlab.retrieval.embed import Embedder

ORDERS = ("similarity", "random")


@dataclass(frozen=True)
class Selection:
    """Per query: the chosen pool indices in prompt order (first shown first), and for similarity-based
    methods each one's similarity to the query (None for random and class-balanced)."""

    indices: list[list[int]]
    scores: list[list[float]] | None = None

    def __len__(self) -> int:
        return len(self.indices)


class Selector(ABC):
    method: ClassVar[str]
    scored: ClassVar[bool] = False  # whether the method ranks by similarity (then "similarity" order applies)

    def __init__(self, pool: Sequence[str], *, seed: int = 0, order: str | None = None):
        self.pool = check_texts(pool, "pool")
        if not self.pool:
            raise LmlabError("the demonstration pool is empty")
        order = order or ("similarity" if self.scored else "random")
        if order not in ORDERS:
            raise LmlabError(f"unknown order '{order}' (choose from {', '.join(ORDERS)})")
        if order == "similarity" and not self.scored:
            raise LmlabError(f"order 'similarity' needs a similarity-based selector (bm25, topk, mmr), "
                             f"not '{self.method}'")
        self.seed, self.order = int(seed), order
        self.same_text: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(self.pool):
            self.same_text[t].append(i)

    def select(self, queries: Sequence[str], shots: int, exclude: Exclude = None) -> Selection:
        """`shots` demonstrations for each query (exclude[q]: pool indices query q must not see)."""
        queries = check_texts(queries, "queries")
        skip = exclusions(exclude, len(queries), len(self.pool))
        for q, text in enumerate(queries):
            skip[q] |= set(self.same_text.get(text, ()))
        check_shots(shots, len(self.pool), skip)
        if shots == 0 or not queries:
            return Selection([[] for _ in queries], [[] for _ in queries] if self.scored else None)
        picked, scores = self._pick(queries, shots, skip)
        out_i, out_s = [], []
        for q, text in enumerate(queries):
            perm = self._arrangement(text, scores[q] if scores is not None else None, len(picked[q]))
            out_i.append([int(picked[q][j]) for j in perm])
            out_s.append([float(scores[q][j]) for j in perm] if scores is not None else None)
        return Selection(out_i, out_s if self.scored else None)

    @abstractmethod
    def _pick(self, queries: list[str], shots: int, skip: list[set[int]]) -> tuple[list, list | None]:
        """Per query the chosen indices (best first for scored methods) and their scores (or None)."""

    def rng(self, query: str, stream: int) -> np.random.Generator:
        """The generator for one query: fixed by the seed and the query's text alone."""
        key = int.from_bytes(hashlib.sha256(query.encode("utf-8")).digest()[:8], "little")
        return np.random.default_rng([self.seed, stream, key])

    def _arrangement(self, query: str, scores: list[float] | None, n: int) -> list[int]:
        """Positions of the picked demonstrations in prompt order."""
        if self.order == "similarity":  # ascending similarity: the most similar last, next to the query
            return sorted(range(n), key=lambda j: (scores[j], -j))  # equal scores: the first picked goes last
        return self.rng(query, 1).permutation(n).tolist()


def check_shots(shots: int, size: int, skip: list[set[int]]) -> None:
    if not isinstance(shots, (int, np.integer)) or isinstance(shots, bool) or shots < 0:
        raise LmlabError(f"shots must be a non-negative integer, got {shots!r}")
    if shots > size:
        raise LmlabError(f"{shots} shots but the pool holds only {size} examples")
    for q, drop in enumerate(skip):
        if shots > size - len(drop):
            raise LmlabError(f"{shots} shots but the pool holds only {size - len(drop)} examples for query {q} "
                             f"({size} less {len(drop)} excluded as the query itself)")


# --------------------------------------------------------------------------- random and class-balanced
class RandomSelector(Selector):
    method = "random"

    def _pick(self, queries, shots, skip):
        picked = []
        for text, drop in zip(queries, skip):
            # the first `shots` allowed entries of a random ordered sample: a uniform sample of the allowed ones
            draw = self.rng(text, 0).choice(len(self.pool), shots + len(drop), replace=False)
            picked.append([int(i) for i in draw if int(i) not in drop][:shots])
        return picked, None


class BalancedSelector(Selector):
    """Equal numbers of each label (when shots is not a multiple of the classes, a seeded choice of
    classes gets one more)."""

    method = "balanced"

    def __init__(self, pool: Sequence[str], labels: Sequence[Hashable], *, seed: int = 0, order: str | None = None):
        super().__init__(pool, seed=seed, order=order)
        labels = list(labels)
        if len(labels) != len(self.pool):
            raise LmlabError(f"{len(labels)} labels for a pool of {len(self.pool)} examples")
        self.labels = labels
        self.classes = list(dict.fromkeys(labels))  # in order of first appearance
        self.members = {c: [i for i, l in enumerate(labels) if l == c] for c in self.classes}

    def quotas(self, query: str, q: int, shots: int, available: dict[Hashable, list[int]]) -> dict[Hashable, int]:
        """shots // classes of each label; the remainder goes one each to a seeded choice of the labels
        that have an example to spare."""
        base, extra = divmod(shots, len(self.classes))
        for c in self.classes:
            if len(available[c]) < base:
                raise LmlabError(f"label {c!r} has only {len(available[c])} examples for query {q}, "
                                 f"{base} needed for {shots} balanced shots")
        roomy = [j for j, c in enumerate(self.classes) if len(available[c]) > base]
        if extra > len(roomy):
            raise LmlabError(f"only {len(roomy)} labels have more than {base} examples for query {q}, "
                             f"{extra} must give one more for {shots} balanced shots")
        lucky = set(self.rng(query, 2).choice(roomy, extra, replace=False).tolist()) if extra else set()
        return {c: base + (j in lucky) for j, c in enumerate(self.classes)}

    def _pick(self, queries, shots, skip):
        picked = []
        for q, (text, drop) in enumerate(zip(queries, skip)):
            rng, chosen = self.rng(text, 0), []
            available = {c: [i for i in self.members[c] if i not in drop] for c in self.classes}
            for c, need in self.quotas(text, q, shots, available).items():
                chosen += rng.choice(available[c], need, replace=False).tolist() if need else []
            picked.append(chosen)
        return picked, None


# --------------------------------------------------------------------------- similarity-based
def _retriever_over(pool: list[str], retriever: Retriever | None, make, kind: str) -> Retriever:
    if retriever is None:
        return make().index(pool)
    if retriever.kind != kind:
        raise LmlabError(f"this selector needs a {kind} retriever, got a {retriever.kind} one")
    if retriever.texts != pool:
        diff = next((i for i, (a, b) in enumerate(zip(retriever.texts, pool)) if a != b), None)
        where = f"they differ at entry {diff}" if diff is not None else \
            f"it indexes {len(retriever.texts)} texts, the pool holds {len(pool)}"
        raise LmlabError(f"the retriever was not built over this pool ({where})")
    return retriever


class _Nearest(Selector):
    """The pool examples a retriever ranks first for the query."""

    scored = True
    retriever: Retriever

    def _pick(self, queries, shots, skip):
        hits = self.retriever.search(queries, shots, exclude=[sorted(s) for s in skip])
        return hits.indices.tolist(), hits.scores.tolist()


class BM25Selector(_Nearest):
    method = "bm25"

    def __init__(self, pool: Sequence[str], *, retriever: Retriever | None = None, seed: int = 0,
                 order: str | None = None):
        from lmlab.retrieval.bm25 import BM25Retriever

        super().__init__(pool, seed=seed, order=order)
        self.retriever = _retriever_over(self.pool, retriever, BM25Retriever, "bm25")


class TopKSelector(_Nearest):
    """The pool examples nearest to the query in sentence-embedding space (cosine)."""

    method = "topk"

    def __init__(self, pool: Sequence[str], *, encoder: Embedder | None = None, retriever: Retriever | None = None,
                 seed: int = 0, order: str | None = None):
        from lmlab.retrieval.dense import DenseRetriever

        super().__init__(pool, seed=seed, order=order)
        self.retriever = _retriever_over(self.pool, retriever, lambda: DenseRetriever(encoder), "dense")


class MMRSelector(TopKSelector):
    """Maximal marginal relevance over the nearest candidates: each next demonstration maximises
    lam·sim(query, d) − (1 − lam)·max sim(d, already chosen). lam=1 is TopK; lower values trade relevance
    for diversity."""

    method, scored = "mmr", True

    def __init__(self, pool: Sequence[str], *, encoder: Embedder | None = None, retriever: Retriever | None = None,
                 lam: float = 0.5, candidates: int | None = None, seed: int = 0, order: str | None = None):
        super().__init__(pool, encoder=encoder, retriever=retriever, seed=seed, order=order)
        if not 0.0 <= lam <= 1.0:
            raise LmlabError(f"MMR lambda must be within [0, 1], got {lam}")
        if candidates is not None and candidates < 1:
            raise LmlabError(f"MMR candidates must be at least 1, got {candidates}")
        self.lam, self.candidates = float(lam), candidates

    def _pick(self, queries, shots, skip):
        pool_n = max(shots, self.candidates or 4 * shots)
        n = min(pool_n, min(len(self.pool) - len(s) for s in skip))
        vectors = self.retriever.embed(queries)
        cand, sims = self.retriever.search_vectors(vectors, wanted(n, skip, len(self.pool)))
        hits = keep_best(cand, sims, skip, n)
        picked, scores = [], []
        for q in range(len(queries)):
            order = mmr(hits.scores[q], self.retriever.vectors(hits.indices[q]), shots, self.lam)
            picked.append(hits.indices[q][order].tolist())
            scores.append(hits.scores[q][order].tolist())
        return picked, scores


def mmr(relevance: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> list[int]:
    """Greedy maximal marginal relevance: positions of k candidates (given best first), in pick order."""
    sim = vectors @ vectors.T
    chosen: list[int] = []
    redundancy = np.full(len(relevance), -np.inf)
    for _ in range(k):
        gain = lam * relevance - (1 - lam) * (redundancy if chosen else 0.0)
        gain[chosen] = -np.inf
        best = int(np.argmax(gain))  # ties: the earlier (more relevant) candidate
        chosen.append(best)
        redundancy = np.maximum(redundancy, sim[best])
    return chosen


# --------------------------------------------------------------------------- by name
METHODS = ("random", "balanced", "bm25", "topk", "mmr")


def make_selector(method: str, pool: Sequence[str], *, labels: Sequence[Hashable] | None = None, seed: int = 0,
                  order: str | None = None, encoder: Embedder | None = None, retriever: Retriever | None = None,
                  mmr_lambda: float = 0.5) -> Selector:
    """A selector by name (what `lmlab icl --retriever` takes)."""
    if method == "random":
        return RandomSelector(pool, seed=seed, order=order)
    if method == "balanced":
        if labels is None:
            raise LmlabError("the balanced selector needs the pool's labels")
        return BalancedSelector(pool, labels, seed=seed, order=order)
    if method == "bm25":
        return BM25Selector(pool, retriever=retriever, seed=seed, order=order)
    if method == "topk":
        return TopKSelector(pool, encoder=encoder, retriever=retriever, seed=seed, order=order)
    if method == "mmr":
        return MMRSelector(pool, encoder=encoder, retriever=retriever, lam=mmr_lambda, seed=seed, order=order)
    from lmlab.utils.suggest import unknown

    raise LmlabError(unknown("selector", method, METHODS))
