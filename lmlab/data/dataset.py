"""Reading prepared token shards: one memory-mapped stream per split, windows and documents out of it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmlab.data.prepare import DTYPES, META
from lmlab.config import read_json
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


def read_meta(path: Path) -> dict:
    """meta.json of a prepared folder, checked: types, and every shard file of the size it records."""
    meta = read_json(path)

    def bad(field: str, what: str) -> LmlabError:
        return LmlabError(f"{path}: {field}: {what} (prepare the folder again)")

    if not isinstance(meta, dict):
        raise bad("meta", "not a JSON object")
    if meta.get("dtype") not in DTYPES:
        raise bad("dtype", f"{meta.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    vocab = meta.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise bad("vocab_size", f"{vocab!r} is not a positive integer")
    sep = meta.get("sep_id")
    if sep is not None and (not isinstance(sep, int) or isinstance(sep, bool) or not 0 <= sep < vocab):
        raise bad("sep_id", f"{sep!r} is not a token id below vocab_size={vocab}")
    shards = meta.get("shards")
    if not isinstance(shards, dict) or not all(isinstance(shards.get(s), list) for s in ("train", "val")):
        raise bad("shards", "expected lists of train and val shards")
    itemsize = np.dtype(DTYPES[meta["dtype"]]).itemsize
    for split in ("train", "val"):
        for i, shard in enumerate(shards[split]):
            where = f"shards.{split}[{i}]"
            if not isinstance(shard, dict) or not isinstance(shard.get("file"), str) \
                    or not isinstance(shard.get("tokens"), int) or "/" in shard["file"] or shard["file"] in ("", ".", ".."):
                raise bad(where, "expected {file: NAME, tokens: N}")
            f = path.parent / shard["file"]
            size = f.stat().st_size if f.is_file() else None
            if size != shard["tokens"] * itemsize:
                raise bad(where, f"{shard['file']} has {size if size is not None else 'no'} bytes, "
                                 f"expected {shard['tokens'] * itemsize}")
    return meta


class TokenData:
    """A prepared folder: tokenizer, train and validation streams, separator id."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / META).is_file():
            raise LmlabError(f"{folder}: not a prepared data folder (no {META}; run `lmlab prepare` first)")
        self.folder = folder
        self.meta = read_meta(folder / META)
        self.tokenizer = Tokenizer.from_folder(folder)
        if self.tokenizer.vocab_size != self.meta["vocab_size"]:
            raise LmlabError(f"{folder / META}: vocab_size: {self.meta['vocab_size']} but tokenizer.json has "
                             f"{self.tokenizer.vocab_size} tokens (prepare the folder again)")
        self.sep_id: int = self.meta["sep_id"]
        self.train = TokenStream([folder / s["file"] for s in self.meta["shards"]["train"]], self.meta["dtype"])
        self.val = TokenStream([folder / s["file"] for s in self.meta["shards"]["val"]], self.meta["dtype"])
        if len(self.val) == 0:
            self.val = self.train

    def split(self, name: str) -> TokenStream:
        return self.train if name == "train" else self.val
