"""Reading local benchmark files (jsonl, json, csv) into documents that remember where they came from.

Every document carries its origin ("file:line") so an error about it can name the line to fix.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError, first_line


@dataclass
class Docs:
    docs: list[dict[str, Any]]
    origins: list[str]

    def __len__(self) -> int:
        return len(self.docs)

    def __add__(self, other: "Docs") -> "Docs":
        return Docs(self.docs + other.docs, self.origins + other.origins)


def _need(path: Path) -> Path:
    if not path.is_file():
        raise LmlabError(f"{path}: file not found")
    return path


def text_of(path: str | Path) -> str:
    """A file's text, which must be UTF-8: otherwise an LmlabError naming the line and the byte."""
    path = _need(Path(path))
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LmlabError(f"{path}:{line}: not UTF-8 text (invalid byte "
                         f"0x{data[e.start]:02x} at byte offset {e.start})") from None


def read_jsonl(path: str | Path) -> Docs:
    path = Path(path)
    docs, origins = [], []
    for n, line in enumerate(text_of(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmlabError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(doc, dict):
            raise LmlabError(f"{path}:{n}: expected a JSON object, got {type(doc).__name__}")
        docs.append(doc)
        origins.append(f"{path}:{n}")
    return Docs(docs, origins)


def read_json(path: str | Path) -> Docs:
    """A JSON list of objects (or an object holding one list, as HF `field` datasets do), else jsonl."""
    path = Path(path)
    text = text_of(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return read_jsonl(path)
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise LmlabError(f"{path}: expected a list of objects")
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise LmlabError(f"{path}: expected a list of objects")
    return Docs(data, [f"{path}:item {i + 1}" for i in range(len(data))])


def read_csv(path: str | Path, header: bool | list[str] = True) -> Docs:
    """Rows as dicts; `header=False` names columns by position ('0', '1', ...); a list names them."""
    path = Path(path)
    docs, origins = [], []
    try:
        rows = list(csv.reader(io.StringIO(text_of(path), newline="")))
    except csv.Error as e:
        raise LmlabError(f"{path}: not valid csv ({first_line(e)})") from None
    names: list[str] | None = header if isinstance(header, list) else None
    start = 0
    if header is True:
        if not rows:
            raise LmlabError(f"{path}: empty csv file (expected a header line)")
        names, start = rows[0], 1
    for n, row in enumerate(rows[start:], start + 1):
        if not row:
            continue
        cols = names or [str(i) for i in range(len(row))]
        if len(row) != len(cols):
            raise LmlabError(f"{path}:{n}: expected {len(cols)} columns, found {len(row)}")
        docs.append(dict(zip(cols, row)))
        origins.append(f"{path}:{n}")
    return Docs(docs, origins)


def read_lines(path: str | Path) -> list[str]:
    return [line.strip() for line in text_of(path).splitlines() if line.strip()]


def read_any(path: str | Path, kind: str | None = None) -> Docs:
    path = Path(path)
    kind = kind or {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}.get(path.suffix, "jsonl")
    if kind == "csv":
        return read_csv(path)
    if kind == "json":
        return read_json(path)
    return read_jsonl(path)
