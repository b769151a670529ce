"""Passages to index from local files: plain text (one passage a line, or blank-line separated paragraphs,
or one a file) and JSON lines (one passage a line, from a named field). Long passages can be cut into
chunks of at most N words, and exact duplicates are dropped (first kept), so an index over BoolQ's items
holds each Wikipedia passage once."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lmlab.errors import LmlabError

SPLITS = ("line", "blank_line", "file")
JSONL = (".jsonl", ".json")


@dataclass
class Corpus:
    texts: list[str]
    read: int  # passages read (after chunking), before dropping duplicates
    files: list[str]

    @property
    def duplicates(self) -> int:
        return self.read - len(self.texts)


def files_of(paths: Sequence[str | Path]) -> list[Path]:
    """Files named, or found (recursively: .txt .md .jsonl .json) in folders named; in a stable order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", *JSONL)))
        elif p.is_file():
            out.append(p)
        else:
            raise LmlabError(f"{p}: no such file or folder")
    if not out:
        raise LmlabError(f"{', '.join(map(str, paths)) or 'corpus'}: no .txt, .md or .jsonl files found")
    return out


def _jsonl_passages(path: Path, field: str) -> list[str]:
    from lmlab.eval.data import read_any

    docs = read_any(path)  # .jsonl: one object a line; .json: a list of objects (or JSON lines)
    out = []
    for doc, origin in zip(docs.docs, docs.origins):
        if field not in doc:
            raise LmlabError(f"{origin}: no field '{field}' (fields: {', '.join(sorted(doc)) or 'none'}); "
                             f"choose one with --text-field")
        value = doc[field]
        if not isinstance(value, str):
            raise LmlabError(f"{origin}: field '{field}' is {type(value).__name__}, expected a string")
        out.append(value)
    return out


def _text_passages(path: Path, split: str) -> list[str]:
    from lmlab.eval.data import read_lines

    if split == "line":
        return read_lines(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LmlabError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    text = text.replace("\r\n", "\n")
    if split == "file":
        return [text.strip()]
    return [" ".join(p.split()) for p in text.split("\n\n")]


def chunks(text: str, words: int) -> list[str]:
    """`text` cut into pieces of at most `words` words (0: whole)."""
    if words <= 0:
        return [text]
    w = text.split()
    return [" ".join(w[i:i + words]) for i in range(0, len(w), words)]


def read_corpus(paths: Sequence[str | Path], *, text_field: str = "text", split: str = "line",
                chunk_words: int = 0, dedupe: bool = True) -> Corpus:
    """The passages of every file (jsonl: `text_field` of each line; text: per `split`), cut into chunks of
    at most `chunk_words` words, without empty ones and (dedupe) without exact repeats."""
    if split not in SPLITS:
        raise LmlabError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    if chunk_words < 0:
        raise LmlabError(f"--chunk-words must be 0 (off) or positive, got {chunk_words}")
    files = files_of(paths)
    texts: list[str] = []
    for f in files:
        try:
            found = _jsonl_passages(f, text_field) if f.suffix in JSONL else _text_passages(f, split)
        except UnicodeDecodeError as e:
            raise LmlabError(f"{f}: not UTF-8 text (invalid byte at offset {e.start})") from None
        texts.extend(c for p in found for c in chunks(p.strip(), chunk_words) if c.strip())
    read = len(texts)
    if dedupe:
        texts = list(dict.fromkeys(texts))
    if not texts:
        raise LmlabError(f"{', '.join(map(str, files))}: no passages to index (empty corpus)")
    return Corpus(texts, read, [str(f) for f in files])
