"""A saved index is a folder: retriever.json (kind, parameters, the embedding model of a dense index, and
the sha256 of every other file), texts.jsonl (the indexed texts, one {"text": ...} object a line, read with lmlab.eval.data's
reader) and the
retriever's own files. Loading checks every checksum first, so a corrupt or truncated file is named
before any library reads it; nothing is read with pickle."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError

MANIFEST = "retriever.json"
TEXTS = "texts.jsonl"
FORMAT = "lmlab-retriever"
VERSION = 2  # 2: texts.jsonl holds {"text": ...} objects (1: bare JSON strings)


def _sha256(path: Path) -> str:
    from lmlab.hub import sha256_of

    return sha256_of(path)


def write_texts(folder: Path, texts: list[str]) -> None:
    with open(folder / TEXTS, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def read_texts(folder: Path, count: int) -> list[str]:
    from lmlab.eval.data import read_jsonl

    docs = read_jsonl(folder / TEXTS)
    texts = []
    for doc, origin in zip(docs.docs, docs.origins):
        text = doc.get("text")
        if not isinstance(text, str):
            raise LmlabError(f"{origin}: 'text' should be a string, got {type(text).__name__}")
        texts.append(text)
    if len(texts) != count:
        raise LmlabError(f"{folder / TEXTS}: holds {len(texts)} texts, {MANIFEST} says {count}")
    return texts


def write_manifest(folder: Path, kind: str, count: int, meta: dict[str, Any]) -> None:
    """Record the index and the checksum of every file already in `folder` (call it last)."""
    files = {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = {"format": FORMAT, "version": VERSION, "kind": kind, "count": count, **meta, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def read_manifest(folder: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The manifest of a saved index, after checking that every file it lists is present and intact."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise LmlabError(f"{folder}: not a saved retriever index (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmlabError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LmlabError(f"{path}: not an lmlab retriever manifest")
    if manifest.get("version") != VERSION:
        raise LmlabError(f"{path}: format version {manifest.get('version')!r}, this lmlab reads {VERSION}")
    if kind is not None and manifest.get("kind") != kind:
        raise LmlabError(f"{folder}: a '{manifest.get('kind')}' index, not '{kind}'")
    count, files = manifest.get("count"), manifest.get("files")
    if not isinstance(count, int) or count < 1 or not isinstance(files, dict) or TEXTS not in files:
        raise LmlabError(f"{path}: missing or malformed 'count' or 'files'")
    for name, digest in files.items():
        f = folder / name
        if not f.is_file():
            raise LmlabError(f"{f}: missing from the saved index")
        if _sha256(f) != digest:
            raise LmlabError(f"{f}: corrupt or truncated (its sha256 differs from the one in {MANIFEST})")
    return manifest
