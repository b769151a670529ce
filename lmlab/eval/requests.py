"""The three kinds of request a task asks of a language model (as in lm-evaluation-harness), and the
item that carries one document's requests and answers.

A task turns each document into an `Item` holding named groups of requests ("main", and any a task
adds, e.g. content-free requests for contextual calibration); the engine answers them in batches; the
task's metrics turn answers back into scores. Requests are plain data so they can be sorted, split
across processes and logged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Loglikelihood:
    """log P(continuation | context) and whether the continuation is the greedy one."""

    context: str
    continuation: str


@dataclass(frozen=True)
class LoglikelihoodRolling:
    """log P(text) of a whole document, scored over windows of the model's context."""

    text: str


@dataclass(frozen=True)
class GenerateUntil:
    """Greedy (or configured) generation from `context` until one of `until` or `max_gen_toks`."""

    context: str
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    kwargs: tuple = field(default=())  # extra generation settings as sorted (key, value) pairs


Request = Loglikelihood | LoglikelihoodRolling | GenerateUntil


@dataclass
class LoglikelihoodResult:
    logprob: float
    is_greedy: bool
    n_tokens: int = 0


@dataclass
class RollingResult:
    logprob: float
    n_tokens: int


MAIN = "main"  # the request group every item has: the document's own requests


@dataclass
class Item:
    """One document to score: its requests by group, what they are scored against, and (once the
    evaluator has run them) the answers, by group in the same order as the requests."""

    index: int
    doc: dict[str, Any]
    origin: str = ""  # "file:line" of the document, for error messages
    prefix: str = ""  # description and few-shot demonstrations placed before the document's own text
    requests: dict[str, list] = field(default_factory=dict)
    gold: Any = None
    choices: list[str] | None = None
    target: str | None = None
    answers: dict[str, list] = field(default_factory=dict)
