"""A tiny fake sentence encoder for retrieval and ICL tests."""
import hashlib
import re

import numpy as np

STOPWORDS = {"the", "a", "an", "and", "at", "on", "in", "of", "for", "with", "as", "was", "too", "after", "around"}


class BagOfWords:
    """A tiny fake sentence encoder: hashed lower-case words (less a few stopwords), L2-normalised. Texts
    sharing words are close."""

    def __init__(self, name: str = "bag-of-words", dim: int = 64):
        self.name, self.dim, self.calls = name, dim, 0

    def __call__(self, texts):
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for r, text in enumerate(texts):
            for word in set(re.findall(r"\w+", text.lower())) - STOPWORDS:
                out[r, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1.0, norms)
