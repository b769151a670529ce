"""BM25 (bm25s's sparse implementation): lexical matching, no model needed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError
from lmlab.retrieval import store
from lmlab.retrieval.base import Retriever, top_n

METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")
FILES = "bm25"  # sub-folder holding bm25s's own files (JSON and .npy, written and read without pickle)


class BM25Retriever(Retriever):
    kind = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75, method: str = "lucene", stopwords: str | None = "en"):
        super().__init__()
        if method not in METHODS:
            raise LmlabError(f"unknown BM25 method '{method}' (choose from {', '.join(METHODS)})")
        if stopwords not in (None, "en"):
            raise LmlabError(f"stopwords must be 'en' or None, got {stopwords!r}")
        self.k1, self.b, self.method, self.stopwords = float(k1), float(b), method, stopwords
        self.bm25 = None

    def _tokens(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(texts, stopwords=self.stopwords or [], return_ids=False, show_progress=False)

    def _build(self, texts: list[str]) -> None:
        import bm25s

        tokens = self._tokens(texts)
        if not any(tokens):
            raise LmlabError(f"none of the {len(texts)} texts has a word BM25 can index "
                             "(words of two or more letters that are not stopwords)")
        self.bm25 = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        self.bm25.index(tokens, show_progress=False)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every indexed text for one query (0 where no query word occurs)."""
        if self.bm25 is None:
            raise LmlabError("scores before index(): the retriever holds no texts")
        ids = self.bm25.get_tokens_ids(self._tokens([query])[0])
        return np.asarray(self.bm25.get_scores_from_ids(ids), dtype=np.float32)

    def _candidates(self, queries: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.zeros((len(queries), n), dtype=np.int64)
        val = np.zeros((len(queries), n), dtype=np.float32)
        for q, query in enumerate(queries):
            s = self.scores(query)
            idx[q] = top_n(s, n)
            val[q] = s[idx[q]]
        return idx, val

    def _save_files(self, folder: Path) -> dict:
        self.bm25.save(str(folder / FILES), allow_pickle=False, show_progress=False)
        return {"params": {"k1": self.k1, "b": self.b, "method": self.method, "stopwords": self.stopwords}}

    @classmethod
    def load(cls, folder: str | Path) -> "BM25Retriever":
        import bm25s

        folder = Path(folder)
        manifest = store.read_manifest(folder, cls.kind)
        params = manifest.get("params")
        if not isinstance(params, dict):
            raise LmlabError(f"{folder / store.MANIFEST}: missing 'params'")
        try:
            self = cls(**params)
        except TypeError as e:
            raise LmlabError(f"{folder / store.MANIFEST}: bad 'params' ({e})") from None
        try:
            self.bm25 = bm25s.BM25.load(str(folder / FILES), allow_pickle=False, show_progress=False)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LmlabError(f"{folder / FILES}: cannot read the BM25 index ({e})") from None
        self.texts = store.read_texts(folder, manifest["count"])
        if int(self.bm25.scores["num_docs"]) != len(self.texts):
            raise LmlabError(f"{folder / FILES}: indexes {self.bm25.scores['num_docs']} texts, "
                             f"{store.TEXTS} holds {len(self.texts)}")
        return self
