"""Reading prepared token shards: one memory-mapped stream per split, windows and documents out of it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lmlab.data.prepare import DTYPES, META
from lmlab.errors import LmlabError
from lmlab.tokenizer import Tokenizer


class TokenStream:
    """The concatenation of a split's shards, read through memory maps."""

    def __init__(self, files: list[Path], dtype: str):
        self.maps = [np.memmap(f, dtype=DTYPES[dtype], mode="r") for f in files if f.stat().st_size]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self._docs: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as int64, crossing shard ends when needed."""
        out, pos = [], start
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while n > 0 and i < len(self.maps):
            local = pos - int(self.starts[i])
            part = self.maps[i][local:local + n]
            out.append(part.astype(np.int64))
            n -= len(part)
            pos += len(part)
            i += 1
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def windows(self, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
        """n random windows of `length` tokens (nanoGPT's sampling), drawn from `gen`."""
        if len(self) <= length:
            raise LmlabError(f"split has {len(self)} tokens, fewer than one window of {length + 1}")
        starts = torch.randint(len(self) - length, (n,), generator=gen).tolist()
        return torch.from_numpy(np.stack([self.read(s, length) for s in starts]))

    def documents(self, sep: int) -> np.ndarray:
        """K×2 array of [start, end) token ranges of the documents (separators excluded), computed once."""
        if self._docs is None:
            ends = []
            for base, m in zip(self.starts[:-1], self.maps):
                for off in range(0, len(m), 1 << 24):
                    hits = np.flatnonzero(np.asarray(m[off:off + (1 << 24)]) == sep)
                    ends.append(hits + base + off)
            ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
            starts = np.concatenate([[0], ends + 1])
            ends = np.concatenate([ends, [len(self)]])
            docs = np.stack([starts, ends], 1)
            self._docs = docs[docs[:, 1] > docs[:, 0]]
        return self._docs


class TokenData:
    """A prepared folder: tokenizer, train and validation streams, separator id."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / META).is_file():
            raise LmlabError(f"{folder}: not a prepared data folder (no {META}; run `lmlab prepare` first)")
        self.folder = folder
        self.meta = json.loads((folder / META).read_text())
        self.tokenizer = Tokenizer.from_folder(folder)
        self.sep_id: int = self.meta["sep_id"]
        self.train = TokenStream([folder / s["file"] for s in self.meta["shards"]["train"]], self.meta["dtype"])
        self.val = TokenStream([folder / s["file"] for s in self.meta["shards"]["val"]], self.meta["dtype"])
        if len(self.val) == 0:
            self.val = self.train

    def split(self, name: str) -> TokenStream:
        return self.train if name == "train" else self.val
