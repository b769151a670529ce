"""Where a task's files are: the first candidate that exists, and an error listing every place looked.

A relative path in a YAML task is looked up under --data-dir, next to the YAML file, then in the
working directory; a built-in task tries each of its benchmark's published layouts under --data-dir.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError


def find(data_dir: Path, task: str, *candidates: str) -> Path:
    """The first candidate path (relative to data_dir) that exists, else an error listing them all."""
    for c in candidates:
        if (data_dir / c).exists():
            return data_dir / c
    raise LmlabError(f"task '{task}': expected {' or '.join(str(data_dir / c) for c in candidates)}")


def _places(name: str, yaml_path: Path, data_dir: Path | None) -> list[Path]:
    if Path(name).is_absolute():
        return [Path(name)]
    return [*([data_dir / name] if data_dir else []), yaml_path.parent / name, Path(name)]


def data_files(spec: Any, yaml_path: Path, data_dir: Path | None) -> list[Path]:
    """A YAML `data_files` value (a name or a list of names) → the files."""
    out = []
    for name in [spec] if isinstance(spec, str) else list(spec):
        places = _places(str(name), yaml_path, data_dir)
        found = next((p for p in places if p.is_file()), None)
        if found is None:
            raise LmlabError(f"{yaml_path}: data file {str(name)!r} not found (looked in "
                             f"{', '.join(str(p.parent) for p in places)})")
        out.append(found)
    return out


def split_files(folder_name: str, split: str, yaml_path: Path, data_dir: Path | None) -> list[Path]:
    """A YAML `dataset_path` folder → its `<split>*.jsonl|json|csv` files."""
    places = _places(folder_name, yaml_path, data_dir)
    folder = next((p for p in places if p.is_dir()), None)
    if folder is None:
        raise LmlabError(f"{yaml_path}: dataset_path {folder_name!r} is not 'json', 'csv' or a local folder "
                         f"(datasets are read from local files only)")
    paths = sorted(p for ext in ("jsonl", "json", "csv") for p in folder.glob(f"{split}*.{ext}"))
    if not paths:
        raise LmlabError(f"{yaml_path}: no {split}.jsonl/.json/.csv in {folder}")
    return paths
