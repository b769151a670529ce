"""The three kinds of request a task asks of a language model (as in lm-evaluation-harness).

A task turns each document into one or more requests; the engine answers them in batches; the task's
metrics turn answers back into scores. Requests are plain data so they can be sorted, split across
processes and logged.
"""
from __future__ import annotations

from dataclasses import dataclass, field


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
