"""`lmlab prepare`: corpora → memory-mapped token shards with document separators and a validation split.

The corpus streams through in work units of about `chunk_chars` characters; worker processes tokenize
units while the main process writes finished ones in order, so memory stays bounded by the number of
units in flight. Each unit's last `val_fraction` of tokens goes to the validation split (for a corpus
smaller than one unit this is exactly nanoGPT's 90/10 split).

Output folder: train_000.bin, ..., val_000.bin (raw uint16 or uint32), tokenizer.json, meta.json.
It is written as a temporary sibling and swapped in whole at the end (lmlab.utils.atomic.atomic_folder),
so a failed re-prepare leaves the previous data as it was.
"""
from __future__ import annotations

import itertools
import json
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Iterator

import numpy as np

from lmlab.data.corpus import Piece, expand_inputs, iter_documents, iter_pieces
from lmlab.data.tokenizers import char_tokenizer, load_tokenizer, with_separator
from lmlab.errors import LmlabError
from lmlab.tokenizer import Tokenizer
from lmlab.utils.atomic import atomic_folder, write_json
from lmlab.utils.progress import Progress

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
META = "meta.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class PrepareConfig:
    inputs: list[str] = field(default_factory=list)
    out_dir: str = "data/prepared"
    tokenizer: str = "char"  # "char", a tokenizer.json / folder, or any model spec
    dtype: str = "auto"  # auto | uint16 | uint32
    val_fraction: float = 0.1
    doc_boundary: str = "file"  # file | blank_line | line (jsonl: always one document per line)
    text_field: str = "text"
    workers: int = 2
    chunk_chars: int = 4 << 20
    shard_tokens: int = 1 << 28
    progress: bool = True


def pick_dtype(name: str, vocab_size: int) -> str:
    if name == "auto":
        return "uint16" if vocab_size <= 1 << 16 else "uint32"
    if name not in DTYPES:
        raise LmlabError(f"unknown dtype '{name}' (choose from auto, uint16, uint32)")
    limit = np.iinfo(DTYPES[name]).max + 1
    if vocab_size > limit:
        raise LmlabError(f"tokenizer vocabulary ({vocab_size} ids) does not fit dtype {name} (at most {limit} ids); "
                         f"use dtype=uint32")
    return name


# ---------------------------------------------------------------- worker side
_worker_tok: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer as HFTokenizer

    _worker_tok = Tokenizer(HFTokenizer.from_str(tokenizer_json))


def tokenize_unit(pieces: list[tuple[str, bool]], sep: int, dtype: str, tok: Tokenizer | None = None) -> np.ndarray:
    tok = tok or _worker_tok
    ids: list[int] = []
    texts = [t for t, _ in pieces]
    for (_, end), toks in zip(pieces, tok.encode_batch(texts, add_special_tokens=False)):
        ids.extend(toks)
        if end:
            ids.append(sep)
    return np.asarray(ids, dtype=DTYPES[dtype])


# ---------------------------------------------------------------- main side
def _units(pieces: Iterator[Piece], chunk_chars: int) -> Iterator[list[tuple[str, bool]]]:
    unit: list[tuple[str, bool]] = []
    size = 0
    for p in pieces:
        unit.append((p.text, p.end_of_doc))
        size += len(p.text)
        if size >= chunk_chars:
            yield unit
            unit, size = [], 0
    if unit:
        yield unit


class ShardWriter:
    """Appends token arrays to numbered shard files of at most shard_tokens tokens."""

    def __init__(self, folder: Path, split: str, dtype: str, shard_tokens: int):
        self.folder, self.split, self.dtype, self.limit = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.f = None

    def _open(self) -> None:
        if self.f:
            self.f.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self.f = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def write(self, arr: np.ndarray) -> None:
        while len(arr):
            if self.f is None or self.shards[-1]["tokens"] >= self.limit:
                self._open()
            room = self.limit - self.shards[-1]["tokens"]
            part, arr = arr[:room], arr[room:]
            self.f.write(part.tobytes())
            self.shards[-1]["tokens"] += len(part)

    def close(self) -> list[dict]:
        if self.f:
            self.f.close()
        return self.shards


def build_tokenizer(cfg: PrepareConfig, files: list[Path]) -> Tokenizer:
    if cfg.tokenizer == "char":
        return char_tokenizer(iter_documents(files, cfg.doc_boundary, cfg.text_field))
    return with_separator(load_tokenizer(cfg.tokenizer))


def check_replaceable(out: Path) -> None:
    """`out` is new, empty or an earlier prepare's output: it is replaced whole, so nothing else may be lost."""
    if not out.exists():
        return
    if not out.is_dir():
        raise LmlabError(f"{out}: exists and is not a folder")
    ours = set(TOKENIZER_FILES) | {META}
    if (out / META).is_file():
        try:
            shards = json.loads((out / META).read_bytes().decode("utf-8"))["shards"]
            ours |= {s["file"] for split in shards.values() for s in split}
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # (JSON, UTF-8 errors)
            raise LmlabError(f"{out / META}: not a meta.json written by lmlab prepare; choose a new output "
                             "folder") from None
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if foreign:
        raise LmlabError(f"{out}: holds files lmlab prepare did not write ({', '.join(foreign[:3])}); "
                         "choose a new or empty output folder")


def prepare(cfg: PrepareConfig) -> dict:
    """Tokenize the corpus into cfg.out_dir (replaced whole on success); returns the metadata in meta.json."""
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise LmlabError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    out = Path(cfg.out_dir)
    check_replaceable(out)
    files = expand_inputs(cfg.inputs)
    tok = build_tokenizer(cfg, files)
    dtype = pick_dtype(cfg.dtype, tok.vocab_size)
    total_bytes = sum(f.stat().st_size for f in files)
    with atomic_folder(out) as tmp, Progress(total_bytes, "prepare", unit="B", unit_scale=True,
                                             enabled=cfg.progress) as bar:
        return _write(cfg, files, tok, dtype, tmp, bar)


def _write(cfg: PrepareConfig, files: list[Path], tok: Tokenizer, dtype: str, out: Path, bar: Progress) -> dict:
    tok.save(out)
    writers = {s: ShardWriter(out, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    units = _units(iter_pieces(files, cfg.doc_boundary, cfg.text_field), cfg.chunk_chars)
    n_tokens = 0

    def consume(chars: int, ids: np.ndarray) -> None:
        nonlocal n_tokens
        cut = len(ids) - int(round(len(ids) * cfg.val_fraction))
        writers["train"].write(ids[:cut])
        writers["val"].write(ids[cut:])
        n_tokens += len(ids)
        bar.set(tokens=n_tokens)
        bar.update(chars)

    first = list(itertools.islice(units, 2))
    units = itertools.chain(first, units)
    if cfg.workers <= 1 or len(first) < 2:  # one unit: no worker would have anything to do in parallel
        for unit in units:
            consume(sum(len(t) for t, _ in unit), tokenize_unit(unit, tok.eos_id, dtype, tok))
    else:
        pending: deque = deque()
        # fork where the platform has it: spawn would re-run a caller's unguarded __main__ script
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(cfg.workers, mp_context=get_context(method), initializer=_init_worker,
                                 initargs=(tok.tok.to_str(),)) as pool:
            for unit in units:
                pending.append((sum(len(t) for t, _ in unit), pool.submit(tokenize_unit, unit, tok.eos_id, dtype)))
                while len(pending) > 2 * cfg.workers:  # bounded: at most 2 units per worker in flight
                    chars, fut = pending.popleft()
                    consume(chars, fut.result())
            while pending:
                chars, fut = pending.popleft()
                consume(chars, fut.result())
    shards = {s: w.close() for s, w in writers.items()}
    if n_tokens == 0:
        raise LmlabError(f"corpus is empty: no text in {', '.join(str(f) for f in files)}")
    meta = {"dtype": dtype, "vocab_size": tok.vocab_size, "sep_id": tok.eos_id, "tokens": n_tokens,
            "train_tokens": sum(s["tokens"] for s in shards["train"]),
            "val_tokens": sum(s["tokens"] for s in shards["val"]),
            "shards": shards, "config": asdict(cfg), "files": [str(f) for f in files]}
    write_json(out / META, meta)  # last: a folder with meta.json is complete
    return meta
