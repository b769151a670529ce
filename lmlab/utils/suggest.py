"""'Did you mean' hints for mistyped names."""
from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(name: object, known: Iterable[str], *, cutoff: float = 0.6) -> str:
    """' (did you mean 'x'?)' for the closest known name, or '' when none is close."""
    hint = difflib.get_close_matches(str(name), list(known), n=1, cutoff=cutoff)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


def unknown(what: str, name: object, known: Iterable[str]) -> str:
    """"unknown <what> 'name' (did you mean 'x'?; known: a, b, c)": the one message for a bad name."""
    known = sorted(known)
    hint = difflib.get_close_matches(str(name), known, n=1)
    mean = f"did you mean '{hint[0]}'? " if hint else ""
    return f"unknown {what} {str(name)!r} ({mean}known: {', '.join(known)})"  # repr: one line, whatever the name
