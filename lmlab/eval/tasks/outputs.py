"""Output types: how a task turns one document into requests, shows it as a few-shot example, and
scores the model's answers (lm-evaluation-harness's multiple_choice, loglikelihood,
loglikelihood_rolling and generate_until).

Each is one `OutputType` entry in OUTPUT_TYPES; add one with `register(OutputType(...))`:

- `build(task, item)` → the item's main requests (it may set item.gold / item.choices / item.target);
  `item.prefix` already holds the description and few-shot demonstrations.
- `score(task, item, answers)` → {metric: per-item value} for the task's metrics (corpus metrics as
  (log-likelihood, units) pairs); `answers` are the engine's answers to the main requests.
- `example(task, doc, origin)` → the document shown as a demonstration (None: the type takes no shots).
- `metrics` it can report, `default_metrics`, and `needs`: Task fields that must be set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lmlab.errors import LmlabError
from lmlab.eval import metrics
from lmlab.eval.requests import GenerateUntil, Item, Loglikelihood, LoglikelihoodRolling
from lmlab.utils.suggest import unknown


@dataclass(frozen=True)
class OutputType:
    name: str
    build: Callable[[Any, Item], list]
    score: Callable[[Any, Item, list], dict[str, Any]]
    metrics: tuple[str, ...]
    default_metrics: tuple[str, ...]
    example: Callable[[Any, dict, str], str] | None = None
    needs: tuple[str, ...] = ()


OUTPUT_TYPES: dict[str, OutputType] = {}


def register(kind: OutputType) -> OutputType:
    if kind.name in OUTPUT_TYPES:
        raise LmlabError(f"output type '{kind.name}' is already registered")
    OUTPUT_TYPES[kind.name] = kind
    return kind


def get(name: str, where: str) -> OutputType:
    if name not in OUTPUT_TYPES:
        raise LmlabError(f"{where}: " + unknown("output_type", name, OUTPUT_TYPES))
    return OUTPUT_TYPES[name]


def _text(task, doc: dict, origin: str) -> str:
    return str(task.render(task.doc_to_text, doc, origin, "doc_to_text"))


def _target(task, doc: dict, origin: str) -> str:
    return str(task.render(task.doc_to_target, doc, origin, "doc_to_target"))


def _answer(task, doc: dict, origin: str) -> str:
    """The scored answer (doc_to_answer when the task has one: gsm8k scores the number, shows the reasoning)."""
    return str(task.render(task.doc_to_answer or task.doc_to_target, doc, origin, "doc_to_target"))


def _plain_example(task, doc: dict, origin: str) -> str:
    return _text(task, doc, origin) + task.target_delimiter + _target(task, doc, origin)


# ------------------------------------------------------------------ multiple_choice
def _choices(task, doc: dict, origin: str) -> list[str]:
    choices = task.render(task.doc_to_choice, doc, origin, "doc_to_choice")
    if not isinstance(choices, list) or not choices:
        raise LmlabError(f"{task.where}: doc_to_choice gave {choices!r} for {origin} (expected a non-empty list)")
    return [str(c) for c in choices]


def _index(task, g: Any, origin: str, choices: list[str]) -> int:
    if isinstance(g, str) and not g.strip().lstrip("-").isdigit():
        if g not in choices:
            raise LmlabError(f"{task.where}: target {g!r} of {origin} is not one of its choices {choices}")
        g = choices.index(g)
    if isinstance(g, bool) or not isinstance(g, (int, str)) and not (isinstance(g, float) and g.is_integer()):
        raise LmlabError(f"{task.where}: target {g!r} of {origin} is not a choice index or one of its choices")
    g = int(g)
    if not 0 <= g < len(choices):
        raise LmlabError(f"{task.where}: label {g} of {origin} is out of range for {len(choices)} choices")
    return g


def _gold(task, doc: dict, origin: str, choices: list[str]) -> int | list[int]:
    """The right choice (or choices: truthfulqa); with multiple_inputs doc_to_text gives its index."""
    if task.multiple_inputs:
        return _index(task, task.render(task.doc_to_text, doc, origin, "doc_to_text"), origin, choices)
    target = task.render(task.doc_to_target, doc, origin, "doc_to_target")
    if isinstance(target, list):
        return [_index(task, g, origin, choices) for g in target]
    return _index(task, target, origin, choices)


def _first(gold: int | list[int]) -> int:
    return gold[0] if isinstance(gold, list) else gold


def _mc_build(task, item: Item) -> list:
    item.choices = _choices(task, item.doc, item.origin)
    item.gold = _gold(task, item.doc, item.origin, item.choices)
    if task.multiple_inputs:  # each choice completes the context; the shared rest is scored (winogrande)
        item.target = _target(task, item.doc, item.origin)
        return [Loglikelihood(item.prefix + c, task.target_delimiter + item.target) for c in item.choices]
    context = item.prefix + _text(task, item.doc, item.origin)
    return [Loglikelihood(context, task.target_delimiter + c) for c in item.choices]


def _mc_example(task, doc: dict, origin: str) -> str:
    choices = _choices(task, doc, origin)
    gold = _first(_gold(task, doc, origin, choices))
    if task.multiple_inputs:
        return choices[gold] + task.target_delimiter + _target(task, doc, origin)
    return _text(task, doc, origin) + task.target_delimiter + choices[gold]


def _mc_score(task, item: Item, answers: list) -> dict[str, Any]:
    lls = [a.logprob for a in answers]
    golds = item.gold if isinstance(item.gold, list) else [item.gold]
    labels = [item.target or "" for _ in lls] if task.multiple_inputs else item.choices
    mc = metrics.score_multiple_choice(lls, labels, golds, [a.is_greedy for a in answers])
    mc["mc1"] = float(metrics.argmax(lls) == golds[0])
    mc["mc2"] = metrics.score_mc2(lls, golds)
    return {m: mc[m] for m in task.metrics}


register(OutputType("multiple_choice", _mc_build, _mc_score, example=_mc_example, needs=("doc_to_choice",),
                    metrics=("acc", "acc_norm", "acc_bytes", "exact_match", "mc1", "mc2"),
                    default_metrics=("acc", "acc_norm")))


# ------------------------------------------------------------------ loglikelihood
def _ll_build(task, item: Item) -> list:
    item.target = _answer(task, item.doc, item.origin)
    context = item.prefix + _text(task, item.doc, item.origin)
    return [Loglikelihood(context, task.target_delimiter + item.target)]


def _ll_score(task, item: Item, answers: list) -> dict[str, Any]:
    a = answers[0]
    values = {"perplexity": (a.logprob, 1), "acc": float(a.is_greedy)}
    return {m: values[m] for m in task.metrics}


register(OutputType("loglikelihood", _ll_build, _ll_score, example=_plain_example,
                    metrics=("perplexity", "acc"), default_metrics=("perplexity", "acc")))


# ------------------------------------------------------------------ loglikelihood_rolling
def _rolling_build(task, item: Item) -> list:
    item.target = _target(task, item.doc, item.origin)
    return [LoglikelihoodRolling(item.target)]


def _rolling_score(task, item: Item, answers: list) -> dict[str, Any]:
    a = answers[0]
    text = item.target if task.count_text is None else task.count_text(item.doc)
    values = {"word_perplexity": (a.logprob, metrics.count_words(text)),
              "byte_perplexity": (a.logprob, metrics.count_bytes(text)),
              "bits_per_byte": (a.logprob, metrics.count_bytes(text)),
              "perplexity": (a.logprob, a.n_tokens)}
    return {m: values[m] for m in task.metrics}


register(OutputType("loglikelihood_rolling", _rolling_build, _rolling_score,
                    metrics=("word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"),
                    default_metrics=("word_perplexity", "byte_perplexity", "bits_per_byte")))


# ------------------------------------------------------------------ generate_until
def _gen_build(task, item: Item) -> list:
    item.target = _answer(task, item.doc, item.origin)
    kw = dict(task.generation_kwargs)
    until = kw.pop("until", [task.fewshot_delimiter])
    until = (until,) if isinstance(until, str) else tuple(until)
    max_gen = int(kw.pop("max_gen_toks", 256))
    kw.pop("do_sample", None)
    context = item.prefix + _text(task, item.doc, item.origin)
    return [GenerateUntil(context, until, max_gen, tuple(sorted(kw.items())))]


def _gen_score(task, item: Item, answers: list) -> dict[str, Any]:
    out = {}
    for fname, fn in (task.filters or {"": lambda s: s}).items():
        pred = fn(answers[0])
        for m in task.metrics:
            key = f"{m},{fname}" if fname else m
            out[key] = metrics.score_exact_match(pred, item.target, **task.metric_options.get(m, {}))
    return out


register(OutputType("generate_until", _gen_build, _gen_score, example=_plain_example,
                    metrics=("exact_match",), default_metrics=("exact_match",)))
