"""Templates: doc_to_text / doc_to_target / doc_to_choice as doc → value functions, and rendering them
on a document with errors that name the template, the field and the document's file:line.

A YAML value is a field name, a Jinja2 template (sandboxed, strict about undefined fields), a constant
or a list of those; built-in tasks give Python callables directly.
"""
from __future__ import annotations

import ast
import re
from typing import Any, Callable

from lmlab.errors import LmlabError, first_line

DocFn = Callable[[dict], Any]


def _jinja():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl: re.sub(pattern, repl, s)
    return env


def _literal(text: str, key: str) -> Any:
    """A rendered template's value: a list literal becomes a list, a number target an int."""
    if key == "doc_to_text":
        return text
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            return ast.literal_eval(stripped)
        except (ValueError, SyntaxError):
            return text
    if key == "doc_to_target" and stripped.isdigit():
        return int(stripped)
    return text


def template(spec: Any, source: str, key: str, *, fields: set[str]) -> DocFn:
    """A doc → value function from a YAML value: a field name, a Jinja2 template, a constant or a list."""
    if isinstance(spec, list):
        parts = [template(s, source, key, fields=fields) for s in spec]
        return lambda doc: [p(doc) for p in parts]
    if not isinstance(spec, str):
        return lambda doc: spec
    if spec in fields:
        return lambda doc: doc[spec]
    from jinja2 import TemplateSyntaxError

    try:
        compiled = _jinja().from_string(spec)
    except TemplateSyntaxError as e:
        raise LmlabError(f"{source}: {key} is not a valid Jinja2 template ({e.message})") from None
    return lambda doc: _literal(compiled.render(**doc), key)


def missing_field(e: Exception) -> str | None:
    """The document field a failed template or lookup asked for, when the error says."""
    if isinstance(e, KeyError):
        return str(e.args[0]) if e.args else None
    msg = str(e)
    m = re.search(r"has no attribute '([^']+)'", msg) or re.search(r"'([^']+)' is undefined", msg)
    return m.group(1) if m else None


def render(fn: DocFn, doc: dict, *, source: str, what: str, origin: str) -> Any:
    """fn(doc); a failure is an LmlabError naming `source`, the template `what` and the document."""
    try:
        return fn(doc)
    except LmlabError:
        raise
    except Exception as e:  # a template or field lookup failed on this document
        name = missing_field(e)
        if name:
            raise LmlabError(f"{source}: {what} names field '{name}', missing from {origin}") from None
        raise LmlabError(f"{source}: {what} failed on {origin} ({first_line(e)})") from None
