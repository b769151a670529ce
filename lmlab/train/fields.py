"""Checking one recipe value against its declared type (int, float, bool, str, Literal, X | None, list)."""
from __future__ import annotations

import types
import typing
from typing import Any

from lmlab.errors import LmlabError
from lmlab.utils.suggest import did_you_mean


def check_value(where: str, kind: Any, value: Any) -> Any:
    """`value` as `kind` (an int given as 3.0 becomes 3; YAML's string '1e-3' a float), or an LmlabError
    that names `where` and the value."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return check_value(where, inner[0], value) if len(inner) == 1 else value
    if origin is typing.Literal:
        if value not in args:
            raise LmlabError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}"
                             f"{did_you_mean(value, [str(a) for a in args])}")
        return value
    if origin is list and isinstance(value, str):
        return [value]
    if origin is list and not isinstance(value, list):
        raise LmlabError(f"{where}: expected a list, got {value!r}")
    return _scalar(where, kind, value)


def _scalar(where: str, kind: Any, value: Any) -> Any:
    if kind is bool and not isinstance(value, bool):
        raise LmlabError(f"{where}: expected true or false, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise LmlabError(f"{where}: expected an integer, got {value!r}")
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise LmlabError(f"{where}: expected a number, got {value!r}")
    if kind is float:
        return float(value)
    if kind is str and not isinstance(value, str):
        raise LmlabError(f"{where}: expected a string, got {value!r}")
    return value
