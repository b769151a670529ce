"""Reading corpora as a stream of text pieces: plain text or JSON-lines files, folders and globs.

Files are read in fixed-size byte blocks, so a corpus larger than memory streams through. A piece is
a run of text plus a flag saying whether a document ends after it; how documents are cut depends on
`doc_boundary`: one per file, one per blank-line-separated paragraph, or one per line. JSON-lines
files always hold one document per line (the `text_field` of each object).
"""
from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmlab.errors import LmlabError

BLOCK_BYTES = 1 << 20
DOC_BOUNDARIES = ("file", "blank_line", "line")
TEXT_SUFFIXES = {".txt", ".text", ".md", ".jsonl", ".json"}
_BLANK_LINE = re.compile(r"\n[ \t\r]*\n\s*")


@dataclass
class Piece:
    text: str
    end_of_doc: bool


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named directly, found in folders (recursively, text and jsonl files) or matched by globs."""
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]
    files: list[Path] = []
    for spec in inputs:
        path = Path(spec).expanduser()
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise LmlabError(f"{path}: folder holds no .txt/.md/.jsonl files")
            files.extend(found)
        else:
            matched = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matched:
                raise LmlabError(f"{spec}: no such file, folder or glob match")
            files.extend(matched)
    if not files:
        raise LmlabError("no input files given")
    return files


def read_text_blocks(path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[str]:
    """UTF-8 text of a file in blocks; a bad byte is reported with its offset."""
    offset, carry = 0, b""
    with open(path, "rb") as f:
        while True:
            raw = f.read(block_bytes)
            eof = not raw
            data = carry + raw
            if not data:
                return
            try:
                text, carry = data.decode("utf-8"), b""
            except UnicodeDecodeError as e:
                if not eof and e.reason == "unexpected end of data" and len(data) - e.start < 4:
                    text, carry = data[:e.start].decode("utf-8"), data[e.start:]  # character split by the block
                else:
                    raise LmlabError(f"{path}: not UTF-8 text (invalid byte 0x{data[e.start]:02x} at byte offset "
                                     f"{offset + e.start})") from None
            offset += len(data) - len(carry)
            if text:
                yield text
            if eof:
                return


def _text_pieces(path: Path, doc_boundary: str, block_bytes: int) -> Iterator[Piece]:
    tail, seen = "", False
    for block in read_text_blocks(path, block_bytes):
        tail += block
        seen = True
        if doc_boundary == "file":
            cut = tail.rfind("\n") + 1  # pieces end at line ends, so tokenization is unaffected by blocks
            if not cut and len(tail) > 4 * block_bytes:  # one enormous line: cut it anyway
                cut = len(tail)
            if cut:
                yield Piece(tail[:cut], False)
                tail = tail[cut:]
            continue
        parts = _BLANK_LINE.split(tail) if doc_boundary == "blank_line" else tail.split("\n")
        tail = parts.pop()
        for part in parts:
            if part.strip():
                yield Piece(part, True)
    if doc_boundary == "file":
        if seen:  # an empty file is no document
            yield Piece(tail, True)
    elif tail.strip():
        yield Piece(tail.rstrip("\n"), True)


def _jsonl_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    lineno, rest = 0, ""
    for block in read_text_blocks(path):
        lines = (rest + block).split("\n")
        rest = lines.pop()
        for line in lines:
            lineno += 1
            yield from _jsonl_doc(path, lineno, line, text_field)
    if rest:
        yield from _jsonl_doc(path, lineno + 1, rest, text_field)


def _jsonl_doc(path: Path, lineno: int, line: str, text_field: str) -> Iterator[Piece]:
    if not line.strip():
        return
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise LmlabError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
        raise LmlabError(f"{path}:{lineno}: expected an object with a string field '{text_field}'")
    if obj[text_field]:
        yield Piece(obj[text_field], True)


def iter_pieces(files: list[Path], doc_boundary: str = "file", text_field: str = "text",
                block_bytes: int = BLOCK_BYTES) -> Iterator[Piece]:
    if doc_boundary not in DOC_BOUNDARIES:
        raise LmlabError(f"unknown doc_boundary '{doc_boundary}' (choose from {', '.join(DOC_BOUNDARIES)})")
    for path in files:
        if path.suffix.lower() in (".jsonl", ".json"):
            yield from _jsonl_pieces(path, text_field)
        else:
            yield from _text_pieces(path, doc_boundary, block_bytes)


def iter_documents(files: list[Path], doc_boundary: str = "file", text_field: str = "text",
                   max_chars: int = 1 << 20) -> Iterator[str]:
    """Document texts (long documents come in pieces of at most about max_chars), e.g. to train a tokenizer."""
    buf: list[str] = []
    size = 0
    for piece in iter_pieces(files, doc_boundary, text_field):
        buf.append(piece.text)
        size += len(piece.text)
        if piece.end_of_doc or size >= max_chars:
            yield "".join(buf)
            buf, size = [], 0
