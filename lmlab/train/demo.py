"""`demo_pretrain`: pretrain a small GPT on a corpus every machine already has — the docstrings of
Python's own standard library (read from its source files, nothing downloaded) — in about a minute."""
from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path
from typing import Any

from lmlab.utils.atomic import write_text

DEMO_MODEL = {"preset": "baby-gpt", "n_layer": 4, "n_head": 4, "d_model": 128}


def stdlib_docstrings(max_chars: int = 1_500_000) -> list[str]:
    """Module, class and function docstrings of the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in path.parts[-2:][0] or path.name.startswith("test"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40 and doc.isascii():
                    docs.append(doc)
                    total += len(doc)
        if total >= max_chars:
            break
    if total < 100_000:  # a Python without its source files: builtins always carry their docs
        import builtins

        docs += [getattr(builtins, n).__doc__ for n in sorted(dir(builtins))
                 if getattr(getattr(builtins, n), "__doc__", None)]
    return docs


def demo_pretrain(out_dir: str | Path, max_iters: int = 300, threads: int = 1, progress: bool | None = None,
                  **overrides: Any) -> dict[str, Any]:
    """Pretrain a 0.8M-parameter character-level GPT on the standard library's docstrings.

    Returns the run summary, including val_loss_start and val_loss (validation loss before and after).
    Extra keyword arguments override TrainConfig fields (e.g. batch_size=8).
    """
    from lmlab.train.config import TrainConfig, from_dict
    from lmlab.train.trainer import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "stdlib_docstrings.txt"
    if not corpus.is_file():
        write_text(corpus, "\n\n".join(stdlib_docstrings()) + "\n")  # whole or not at all: it is reused
    d = {"model": dict(DEMO_MODEL), "data": {"corpus": [str(corpus)], "tokenizer": "char", "workers": 1},
         "objectives": [{"name": "clm"}], "seq_len": 64, "batch_size": 12, "max_iters": max_iters,
         "eval_interval": max(1, max_iters // 4), "eval_iters": 20, "log_interval": max(1, max_iters // 10),
         "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_iters": min(50, max_iters // 10)},
         "out_dir": str(out), "threads": threads, "resume": False,
         "progress": sys.stderr.isatty() if progress is None else progress, **overrides}
    cfg = from_dict(TrainConfig, d)
    return train(cfg)
