"""Retrieval: sentence embeddings and retrievers (BM25, dense top-k) over a list of texts, with indexes
saved to and loaded from a folder. In-context learning picks demonstrations with them and retrieval
augmentation picks passages with them."""
