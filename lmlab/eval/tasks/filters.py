"""Answer filters for generation tasks: each turns the generated text into the answer that is scored.

A YAML `filter_list` entry is `{name, filter: [{function: F, ...}, ...]}`: the steps run in order and
the filter's scores are reported as `<metric>,<name>`. Steps are named in STEPS; add one with
`STEPS[name] = lambda options: (lambda text: ...)`.
"""
from __future__ import annotations

from typing import Any, Callable

from lmlab.errors import LmlabError
from lmlab.eval import metrics
from lmlab.utils.suggest import unknown

Filter = Callable[[str], str]
GSM8K_ANSWER = r"#### (\-?[0-9\.\,]+)"


def regex(pattern: str = GSM8K_ANSWER, group: int = 0, fallback: str = "[invalid]") -> Filter:
    """The `group`-th match of `pattern` (its first capture group when it has one), else `fallback`."""
    return lambda s: metrics.extract_regex(s, pattern, group, fallback)


def number(s: str) -> str:
    """The last number in the text, else '[invalid]'."""
    return metrics.extract_number(s) or "[invalid]"


# step name → (its options from the YAML entry → the step)
STEPS: dict[str, Callable[[dict[str, Any]], Filter]] = {
    "regex": lambda o: regex(o.get("regex_pattern", GSM8K_ANSWER), int(o.get("group_select", 0)),
                             o.get("fallback", "[invalid]")),
    "number": lambda o: number,
    "lowercase": lambda o: str.lower,
    "uppercase": lambda o: str.upper,
    "strip": lambda o: str.strip,
    "remove_whitespace": lambda o: str.strip,
    "take_first": lambda o: (lambda s: s),  # one answer per request here: the first is the only one
}


def chain(steps: list[Filter]) -> Filter:
    def run(s: str) -> str:
        for step in steps:
            s = step(s)
        return s
    return run


def from_yaml(spec: Any, source: str) -> dict[str, Filter]:
    """A YAML `filter_list` → {filter name: filter}."""
    if not isinstance(spec, list):
        raise LmlabError(f"{source}: filter_list must be a list of {{name, filter}} entries")
    out: dict[str, Filter] = {}
    for n, entry in enumerate(spec):
        if not isinstance(entry, dict) or not isinstance(entry.get("filter", []), list):
            raise LmlabError(f"{source}: filter_list entry {n + 1} must be {{name, filter: [steps]}}")
        steps = []
        for step in entry.get("filter", []):
            name = step.get("function") if isinstance(step, dict) else step
            if name not in STEPS:
                raise LmlabError(f"{source}: filter_list entry {n + 1}: " + unknown("filter function", name, STEPS))
            steps.append(STEPS[name](step if isinstance(step, dict) else {}))
        out[str(entry.get("name", f"filter{n}"))] = chain(steps)
    return out
