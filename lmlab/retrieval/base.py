"""The Retriever interface: index a list of texts once, then `search(queries, k, exclude=...)` returns the
k best texts of each query (indices and scores, best first). Ties go to the lower index, so results are
deterministic. Indexes save to a folder atomically and load without pickle."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable, Sequence

import numpy as np

from lmlab.errors import LmlabError

Exclude = Sequence[int | Iterable[int] | None] | None


@dataclass(frozen=True)
class Hits:
    """Search results: row q holds query q's k best texts, best first."""

    indices: np.ndarray  # Q×k int64
    scores: np.ndarray  # Q×k float32

    def __len__(self) -> int:
        return len(self.indices)


class Retriever(ABC):
    kind: ClassVar[str]  # "bm25", "dense": the name recorded in a saved index

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __len__(self) -> int:
        return len(self.texts)

    def index(self, texts: Sequence[str]) -> "Retriever":
        """Build the index over `texts` (replacing any earlier one); returns self."""
        texts = check_texts(texts, "texts")
        if not texts:
            raise LmlabError("cannot build an index over no texts")
        self._build(texts)
        self.texts = texts
        return self

    def search(self, queries: Sequence[str], k: int, exclude: Exclude = None) -> Hits:
        """The k best texts for each query. exclude[q] (an index, several, or None) is never returned for
        query q: e.g. the query's own position when queries come from the indexed texts."""
        queries = check_texts(queries, "queries")
        if not self.texts:
            raise LmlabError("search before index(): the retriever holds no texts")
        skip = exclusions(exclude, len(queries), len(self))
        check_k(k, len(self), skip)
        if not queries or not k:
            return Hits(np.zeros((len(queries), k), dtype=np.int64), np.zeros((len(queries), k), dtype=np.float32))
        cand, scores = self._candidates(queries, wanted(k, skip, len(self)))
        return keep_best(cand, scores, skip, k)

    @abstractmethod
    def _build(self, texts: list[str]) -> None: ...

    @abstractmethod
    def _candidates(self, queries: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
        """Q×n indices and scores of the n best texts per query, best first, ties to the lower index."""

    @abstractmethod
    def _save_files(self, folder: Path) -> dict:
        """Write the retriever's own files into `folder`; return what the manifest should record."""

    def save(self, folder: str | Path) -> Path:
        """Write the index to `folder` in one swap: an interrupted save leaves the old folder or the new."""
        from lmlab.retrieval import store
        from lmlab.utils.atomic import atomic_folder

        if not self.texts:
            raise LmlabError("nothing to save: the retriever holds no texts")
        with atomic_folder(folder) as tmp:
            store.write_texts(tmp, self.texts)
            meta = self._save_files(tmp)
            store.write_manifest(tmp, self.kind, len(self), meta)
        return Path(folder)


def check_texts(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        raise LmlabError(f"{what}: expected a list of texts, got one string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise LmlabError(f"{what}[{i}] is {type(t).__name__}, expected str")
    return texts


def exclusions(exclude: Exclude, n_queries: int, size: int) -> list[set[int]]:
    """One set of indices to leave out per query, each checked against the index size."""
    if exclude is None:
        return [set() for _ in range(n_queries)]
    exclude = list(exclude)
    if len(exclude) != n_queries:
        raise LmlabError(f"exclude has {len(exclude)} entries for {n_queries} queries")
    out = []
    for q, e in enumerate(exclude):
        items = set() if e is None else {e} if isinstance(e, (int, np.integer)) else set(e)
        for i in items:
            if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < size:
                raise LmlabError(f"exclude[{q}]: {i!r} is not an index of the {size} indexed texts")
        out.append({int(i) for i in items})
    return out


def check_k(k: int, size: int, skip: list[set[int]]) -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise LmlabError(f"k must be a non-negative integer, got {k!r}")
    if k > size:
        raise LmlabError(f"k={k} but the index holds only {size} texts")
    for q, drop in enumerate(skip):
        if k > size - len(drop):
            raise LmlabError(f"k={k} but the index holds only {size - len(drop)} texts for query {q} "
                             f"({size} less {len(drop)} excluded)")


def wanted(k: int, skip: list[set[int]], size: int) -> int:
    """How many candidates to fetch so that k remain after every query's exclusions."""
    return min(size, k + max((len(s) for s in skip), default=0))


def keep_best(cand: np.ndarray, scores: np.ndarray, skip: list[set[int]], k: int) -> Hits:
    """The first k candidates of each row that its exclusions allow (rows are best first)."""
    out_i = np.zeros((len(cand), k), dtype=np.int64)
    out_s = np.zeros((len(cand), k), dtype=np.float32)
    for q, drop in enumerate(skip):
        keep = [j for j in range(cand.shape[1]) if int(cand[q, j]) not in drop][:k]
        out_i[q], out_s[q] = cand[q, keep], scores[q, keep]
    return Hits(out_i, out_s)


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest scores, largest first, ties to the lower index."""
    if n < len(scores):
        threshold = scores[np.argpartition(-scores, n - 1)[:n]].min()
        cand = np.flatnonzero(scores >= threshold)  # ascending: a stable sort keeps ties in index order
    else:
        cand = np.arange(len(scores))
    return cand[np.argsort(-scores[cand], kind="stable")][:n]
