"""The types and ranges of a task YAML's values, checked before anything is read or rendered.

`check(cfg, path, lines)` raises one LmlabError `FILE:LINE: FIELD: got VALUE (expected WHAT)` for the first
value of the wrong type or range; `lines` maps a dotted field (`generation_kwargs.until`) to its line.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

from lmlab.errors import LmlabError
from lmlab.utils.suggest import did_you_mean

Rule = tuple[str, Callable[[Any], bool]]


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _int(low: int, high: float = math.inf) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _number(ok: Callable[[float], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v)


def _list_of(ok: Callable[[Any], bool], empty: bool = False) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and (empty or bool(v)) and all(ok(x) for x in v)


def _regex(v: Any) -> bool:
    try:
        re.compile(v)
    except (re.error, TypeError, RecursionError, OverflowError):
        return False
    return True


def _template(v: Any) -> bool:
    scalar = lambda x: isinstance(x, (str, int, float)) and not isinstance(x, bool)  # noqa: E731
    return scalar(v) or _list_of(scalar)(v)


_NAMES: Rule = ("a string or a list of strings", lambda v: _str(v) or _list_of(_str, empty=True)(v))
_FILES = lambda v: _str(v) or _list_of(_str)(v)  # noqa: E731
_DATA_FILES: Rule = ("a file name, a list of them, or a mapping {split: file name(s)}",
                     lambda v: _FILES(v) or (isinstance(v, dict) and bool(v)
                                             and all(_str(k) and _FILES(f) for k, f in v.items())))
_SPLIT: Rule = ("a split name", _str)
_TEMPLATE: Rule = ("a field name, a Jinja2 template, a constant or a list of those", _template)
_MAPPING: Rule = ("a mapping", lambda v: isinstance(v, dict))
_LIST: Rule = ("a list", lambda v: isinstance(v, list))

TOP: dict[str, Rule] = {
    "task": ("a string", _str), "dataset_path": ("a string: json, csv, text or a local folder", _str),
    "dataset_name": ("a string or null", lambda v: v is None or _str(v)), "data_files": _DATA_FILES,
    "dataset_kwargs": _MAPPING, "test_split": _SPLIT, "validation_split": _SPLIT, "training_split": _SPLIT,
    "fewshot_split": _SPLIT, "output_type": ("a string", _str), "doc_to_text": _TEMPLATE, "doc_to_target": _TEMPLATE,
    "doc_to_choice": _TEMPLATE, "target_delimiter": ("a string", _str), "fewshot_delimiter": ("a string", _str),
    "description": ("a string", _str), "num_fewshot": ("an integer >= 0", _int(0)), "generation_kwargs": _MAPPING,
    "metric_list": _LIST, "fewshot_config": _MAPPING, "filter_list": _LIST, "tag": _NAMES, "group": _NAMES,
    "metadata": _MAPPING, "should_decontaminate": ("true or false", lambda v: isinstance(v, bool)),
    "doc_to_decontamination_query": ("a string", _str), "repeats": ("1 (one answer per request)", lambda v: v == 1),
    "line_pattern": ("a regular expression", lambda v: _str(v) and _regex(v)),
}
GENERATION: dict[str, Rule] = {
    "until": ("a non-empty string or a list of them", lambda v: (_str(v) and bool(v)) or
              _list_of(lambda x: _str(x) and bool(x), empty=True)(v)),
    "max_gen_toks": ("an integer >= 1", _int(1)),
    "temperature": ("a number >= 0", _number(lambda x: x >= 0)),
    "top_k": ("an integer >= 0", _int(0)),
    "top_p": ("a number in (0, 1]", _number(lambda x: 0 < x <= 1)),
    "do_sample": ("true or false", lambda v: isinstance(v, bool)),
    "seed": ("an integer from 0 to 2**64-1", _int(0, 2**64 - 1)),
}
METRIC: dict[str, Rule] = {
    "metric": ("a metric name", _str), "ignore_case": ("true or false", lambda v: isinstance(v, bool)),
    "ignore_punctuation": ("true or false", lambda v: isinstance(v, bool)),
    "aggregation": ("a string", _str), "higher_is_better": ("true or false", lambda v: isinstance(v, bool)),
}
FILTER_STEP: dict[str, Rule] = {
    "function": ("a filter function name", _str), "regex_pattern": ("a regular expression", lambda v: _str(v) and _regex(v)),
    "group_select": ("an integer", _int(-2**31, 2**31)), "fallback": ("a string", _str),
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Checker:
    def __init__(self, path, lines: dict[str, int]):
        self.path, self.lines = path, lines

    def fail(self, field: str, what: str) -> LmlabError:
        parts = field.split(".")
        line = next((self.lines[k] for k in (".".join(parts[:i]) for i in range(len(parts), 0, -1))
                     if k in self.lines), None)
        return LmlabError(f"{self.path}{f':{line}' if line else ''}: {field}: {what}")

    def mapping(self, d: dict, rules: dict[str, Rule], prefix: str, strict: bool = True) -> None:
        for key, value in d.items():
            field = f"{prefix}{key}"
            if key not in rules:
                if strict:
                    raise self.fail(field, f"unknown key{did_you_mean(str(key), rules)} (allowed: {', '.join(rules)})")
                continue
            allowed, ok = rules[key]
            if not ok(value):
                raise self.fail(field, f"got {_show(value)} (expected {allowed})")

    def entries(self, items: list, field: str, rules: dict[str, Rule], name_key: str) -> None:
        """A list whose entries are a name or a mapping checked against `rules`."""
        for i, entry in enumerate(items):
            if isinstance(entry, dict):
                self.mapping(entry, rules, f"{field}.{i}.")
            elif not _str(entry):
                raise self.fail(f"{field}.{i}", f"got {_show(entry)} (expected a {name_key} name or a mapping)")


def check(cfg: dict[str, Any], path, lines: dict[str, int] | None = None) -> None:
    """Every known key's value against its type and range (unknown top-level keys are checked elsewhere)."""
    c = _Checker(path, lines or {})
    c.mapping({k: v for k, v in cfg.items() if k in TOP}, TOP, "")
    kwargs = cfg.get("dataset_kwargs") or {}
    if "data_files" in kwargs:
        c.mapping({"data_files": kwargs["data_files"]}, {"data_files": _DATA_FILES}, "dataset_kwargs.")
    c.mapping(cfg.get("generation_kwargs") or {}, GENERATION, "generation_kwargs.")
    c.mapping(cfg.get("fewshot_config") or {}, {"sampler": ("a sampler name", _str)}, "fewshot_config.", strict=False)
    c.entries(cfg.get("metric_list") or [], "metric_list", METRIC, "metric")
    for i, entry in enumerate(cfg.get("filter_list") or []):
        if not isinstance(entry, dict):
            raise c.fail(f"filter_list.{i}", f"got {_show(entry)} (expected a mapping {{name, filter: [steps]}})")
        c.mapping(entry, {"name": ("a string", _str), "filter": _LIST}, f"filter_list.{i}.")
        c.entries(entry.get("filter") or [], f"filter_list.{i}.filter", FILTER_STEP, "function")


def key_lines(node, prefix: str = "", out: dict[str, int] | None = None, seen: set | None = None) -> dict[str, int]:
    """Dotted field → 1-based line, from a composed YAML node (mapping keys and list items)."""
    import yaml

    out, seen = ({} if out is None else out), (set() if seen is None else seen)
    if id(node) in seen:  # an alias met again (a recursive structure)
        return out
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                name = f"{prefix}{key.value}"
                out[name] = key.start_mark.line + 1  # a repeated key: YAML keeps the last
                key_lines(value, f"{name}.", out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            out.setdefault(f"{prefix}{i}", value.start_mark.line + 1)
            key_lines(value, f"{prefix}{i}.", out, seen)
    return out
