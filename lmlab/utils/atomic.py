"""Atomic writes: a file or folder is replaced in one rename, so a crash leaves the old one or the new
one, never half of either. Temporary names live in the same folder (a rename never crosses file
systems) and get the permissions of an ordinary file/folder under the process umask."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path` (ending in `suffix`, for writers that insist on one) to write by
    any means; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # an ordinary file's permissions, not mkstemp's private 0600
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """`open` for writing whose result appears at `path` only when the block ends without an error."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding) as f:
            yield f


def write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_json(path: str | Path, obj: Any, **kw: Any) -> Path:
    """JSON (indent 2, UTF-8, trailing newline) written atomically."""
    kw.setdefault("indent", 2)
    kw.setdefault("ensure_ascii", False)
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **kw)
        f.write("\n")
    return Path(path)


def write_jsonl(path: str | Path, records: Any, **kw: Any) -> Path:
    """One JSON object a line, written atomically."""
    kw.setdefault("ensure_ascii", False)
    with atomic_open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, **kw) + "\n")
    return Path(path)


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `folder` (the old one is moved
    aside first and removed only after the swap). A crash leaves the old folder or the new, never half.
    A stale aside-folder left by an earlier crash is removed first, not an obstacle."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # an ordinary folder's permissions, not mkdtemp's 0700
        yield tmp
        old = folder.with_name(f".{folder.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if folder.exists():
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except BaseException:
            if old.exists() and not folder.exists():
                os.replace(old, folder)  # put the old one back
            raise
        _fsync_dir(folder.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(path: str | Path) -> None:
    """Raise LmlabError now (before any long work) when `path` (a file to be written) cannot be written."""
    from lmlab.errors import LmlabError

    path = Path(path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if path.is_dir():
        raise LmlabError(f"{path}: is a folder, expected a file path")
    try:  # by trying: permission bits do not tell for root, read-only mounts or /proc
        if not parent.is_dir():
            raise NotADirectoryError(parent)
        fd, probe = tempfile.mkstemp(prefix=".lmlab-write-check.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError:
        raise LmlabError(f"{path}: cannot write here ({parent} is not a writable folder)") from None
