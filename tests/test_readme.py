"""The README's Layout section matches the tree: every path it names exists, and every lmlab package and
top-level module is named there (so a newcomer finds each concept's home)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout", 1)[1]
    return section.split("```", 2)[1]


def named_paths(block: str) -> set[str]:
    """Paths the block names: 'lmlab/x/' at the start of a line, and indented entries under the latest one."""
    paths, parent = set(), None
    for line in block.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            first = line.split()[0]
            parent = first if first.endswith("/") else None
            for tok in re.findall(r"(?:^|\s)((?:lmlab|configs|bench|tests)/[\w./]*|[\w]+\.py)(?=\s|$)", line[:33]):
                paths.add(tok if "/" in tok else f"lmlab/{tok}")
        elif parent and line.startswith("  ") and not line.startswith("    "):
            for tok in line[:33].split():
                paths.add(parent + tok)
    return paths


def test_every_named_path_exists():
    missing = sorted(p for p in named_paths(layout_block()) if not (ROOT / p).exists())
    assert not missing, f"README Layout names paths that do not exist: {missing}"


def test_every_lmlab_package_and_module_is_named():
    block = layout_block()
    names = {p.name + "/" if p.is_dir() else p.name for p in (ROOT / "lmlab").iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem not in
                                                                     ("__init__", "__main__", "errors"))}
    unnamed = sorted(n for n in names if f"lmlab/{n}" not in block and not re.search(rf"(?<![\w/]){re.escape(n)}", block))
    assert not unnamed, f"README Layout does not name: {unnamed}"
