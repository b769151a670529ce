"""Name patterns over module and parameter names, shared by LoRA targets and freezing.

A pattern is a shell glob matched against the whole name, case-sensitively (`*` also crosses dots,
`[0-3]` is one character of a set), or a regular expression after a `re:` prefix, also matched
against the whole name. Error messages list the names that exist with layer numbers folded into
`*`, so a 30-layer model lists each kind of name once.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable

from lmlab.errors import LmlabError

_LAYER_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|:|$)")


def check_patterns(patterns: str | Iterable[str], what: str, allow_empty: bool = False) -> list[str]:
    """The patterns as a list (one string is one pattern); an empty list (unless allowed), a blank
    pattern or a bad regular expression is an LmlabError naming it."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns and not allow_empty:
        raise LmlabError(f"{what}: no pattern given")
    for p in patterns:
        if not isinstance(p, str) or not p.strip():
            raise LmlabError(f"{what}: pattern {p!r} is not a non-empty string")
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise LmlabError(f"{what}: pattern '{p}' is not a valid regular expression ({e})") from None
    return patterns


def matches(pattern: str, name: str) -> bool:
    """Whether the whole name matches the glob, or the regular expression after 're:'."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def layer_patterns(names: Iterable[str]) -> list[str]:
    """The names with layer numbers replaced by '*', each kind once, in first-seen order."""
    return list(dict.fromkeys(_LAYER_NUMBER.sub("*", n) for n in names))


def listing(names: Iterable[str], limit: int = 40) -> str:
    """A short comma-separated list of the layer patterns of `names` ('… and N more' past `limit`)."""
    kinds = layer_patterns(names)
    more = f" and {len(kinds) - limit} more" if len(kinds) > limit else ""
    return ", ".join(kinds[:limit]) + more
