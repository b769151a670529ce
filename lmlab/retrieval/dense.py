"""Dense top-k: inner product over L2-normalised sentence embeddings (cosine similarity) in a faiss flat
index. The embedding model is injected (any Embedder: a name and texts → N×D vectors), and a saved index
records the model's name, so it is never searched with vectors from another model."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from lmlab.errors import LmlabError, first_line
from lmlab.retrieval import store
from lmlab.retrieval.base import Retriever
from lmlab.retrieval.embed import Embedder

FILE = "index.faiss"


class DenseRetriever(Retriever):
    kind = "dense"

    def __init__(self, encoder: Embedder | None = None):
        super().__init__()
        if encoder is None:
            from lmlab.retrieval.embed import SentenceEncoder

            encoder = SentenceEncoder.load()
        self.encoder = encoder
        self.faiss_index = None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """N×D float32 unit vectors of `texts` under this retriever's encoder."""
        v = np.ascontiguousarray(self.encoder(list(texts)), dtype=np.float32)
        if v.ndim != 2 or len(v) != len(texts):
            raise LmlabError(f"encoder {self.encoder.name} returned shape {v.shape} for {len(texts)} texts")
        if self.faiss_index is not None and v.shape[1] != self.faiss_index.d:
            raise LmlabError(f"encoder {self.encoder.name} gives {v.shape[1]}-dim vectors, "
                             f"the index holds {self.faiss_index.d}-dim ones")
        if not np.isfinite(v).all():
            raise LmlabError(f"encoder {self.encoder.name} returned non-finite values")
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        return v / np.where(norms == 0, 1.0, norms)

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored unit vectors of indexed texts."""
        return self.faiss_index.reconstruct_batch(np.asarray(ids, dtype=np.int64))

    def _build(self, texts: list[str]) -> None:
        import faiss

        self.faiss_index = None  # a rebuilt index may change dimension
        v = self.embed(texts)
        self.faiss_index = faiss.IndexFlatIP(v.shape[1])
        self.faiss_index.add(v)

    def _candidates(self, queries: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.search_vectors(self.embed(queries), n)

    def search_vectors(self, vectors: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Q×n indices and cosine similarities of the n nearest texts to each unit vector, best first
        (equal scores in index order)."""
        scores, ids = self.faiss_index.search(np.ascontiguousarray(vectors, dtype=np.float32), n)
        order = np.lexsort((ids, -scores), axis=-1)
        return np.take_along_axis(ids, order, -1).astype(np.int64), np.take_along_axis(scores, order, -1)

    def _save_files(self, folder: Path) -> dict:
        import faiss

        faiss.write_index(self.faiss_index, str(folder / FILE))
        return {"encoder": self.encoder.name, "encoder_spec": getattr(self.encoder, "spec", None),
                "dim": int(self.faiss_index.d)}

    @classmethod
    def load(cls, folder: str | Path, encoder: Embedder | None = None) -> "DenseRetriever":
        """A saved dense index with the encoder that built it: pass it, or (encoder=None) the model it
        was built with is loaded again from its recorded spec."""
        import faiss

        folder = Path(folder)
        manifest = store.read_manifest(folder, cls.kind)
        built_with = manifest.get("encoder")
        if encoder is None:
            spec = manifest.get("encoder_spec")
            if not spec:
                raise LmlabError(f"{folder}: built with embedding model '{built_with}'; pass that encoder to load it")
            from lmlab.retrieval.embed import SentenceEncoder

            encoder = SentenceEncoder.load(spec)
        if encoder.name != built_with:
            raise LmlabError(f"{folder}: index built with embedding model '{built_with}', "
                             f"cannot search it with '{encoder.name}'")
        self = cls(encoder)
        try:
            self.faiss_index = faiss.read_index(str(folder / FILE))
        except RuntimeError as e:
            raise LmlabError(f"{folder / FILE}: cannot read the faiss index ({first_line(e)})") from None
        self.texts = store.read_texts(folder, manifest["count"])
        if self.faiss_index.ntotal != len(self.texts) or self.faiss_index.d != manifest.get("dim"):
            raise LmlabError(f"{folder / FILE}: holds {self.faiss_index.ntotal} vectors of dimension "
                             f"{self.faiss_index.d}, the manifest says {len(self.texts)} of {manifest.get('dim')}")
        return self
