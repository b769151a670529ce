"""Build or load any retriever by kind: the one entry point for commands (`lmlab index`, ICL, RAG)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lmlab.errors import LmlabError
from lmlab.retrieval import store
from lmlab.retrieval.base import Retriever
from lmlab.retrieval.bm25 import BM25Retriever
from lmlab.retrieval.dense import DenseRetriever
from lmlab.retrieval.embed import Embedder

KINDS = {"bm25": BM25Retriever, "dense": DenseRetriever}


def build(kind: str, texts: Sequence[str], encoder: Embedder | None = None) -> Retriever:
    """An index of `kind` over `texts` (dense: with `encoder`, default all-MiniLM-L6-v2)."""
    if kind not in KINDS:
        from lmlab.utils.suggest import unknown

        raise LmlabError(unknown("retriever", kind, KINDS))
    if kind == "dense":
        return DenseRetriever(encoder).index(texts)
    if encoder is not None:
        raise LmlabError("a bm25 index takes no encoder")
    return BM25Retriever().index(texts)


def load(folder: str | Path, encoder: Embedder | None = None) -> Retriever:
    """A saved index of any kind (a dense one checks it is searched with the model that built it)."""
    kind = store.read_manifest(folder).get("kind")
    if kind == "dense":
        return DenseRetriever.load(folder, encoder)
    if kind == "bm25":
        if encoder is not None:
            raise LmlabError(f"{folder}: a bm25 index takes no encoder")
        return BM25Retriever.load(folder)
    raise LmlabError(f"{Path(folder) / store.MANIFEST}: unknown index kind {kind!r} (known: {', '.join(KINDS)})")
