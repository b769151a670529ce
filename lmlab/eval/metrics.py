"""Scores: per-item metrics from the engine's answers, and their aggregation with standard errors.

Per item (`score_*`) each metric is one number; a task's score is the aggregate over items
(`AGGREGATE`): a mean for accuracies, and for perplexities a corpus-level ratio (total log-likelihood
over total tokens, words or bytes). Standard errors are analytic for means (sample standard deviation
over √n, as lm-evaluation-harness reports) and bootstrapped with a fixed seed for corpus metrics.
"""
from __future__ import annotations

import math
import random
import re
from typing import Callable, Sequence

from lmlab.errors import LmlabError
from lmlab.utils.suggest import unknown

LN2 = math.log(2)


# ------------------------------------------------------------------ multiple choice
def argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first maximum wins, like numpy


def score_multiple_choice(lls: Sequence[float], choices: Sequence[str], gold: int | Sequence[int],
                          is_greedy: Sequence[bool] | None = None) -> dict[str, float]:
    """acc, acc_norm (log-likelihood per character) and acc_bytes (per UTF-8 byte: right for Chinese)."""
    golds = [gold] if isinstance(gold, int) else list(gold)
    chars = [ll / max(len(c), 1) for ll, c in zip(lls, choices)]
    nbytes = [ll / max(len(c.encode("utf-8")), 1) for ll, c in zip(lls, choices)]
    out = {"acc": float(argmax(lls) in golds), "acc_norm": float(argmax(chars) in golds),
           "acc_bytes": float(argmax(nbytes) in golds)}
    if is_greedy is not None:  # the greedy continuation is a right choice
        out["exact_match"] = float(any(is_greedy[g] for g in golds))
    return out


def score_mc2(lls: Sequence[float], true: Sequence[int]) -> float:
    """TruthfulQA mc2: probability mass of the true answers, normalised over all answers."""
    m = max(lls)
    probs = [math.exp(ll - m) for ll in lls]
    return sum(probs[i] for i in true) / sum(probs)


# ------------------------------------------------------------------ generation
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def extract_number(text: str) -> str | None:
    """The last number in `text`, without thousands separators or a trailing '.0'."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    n = found[-1].replace(",", "")
    return n[:-2] if n.endswith(".0") else n


def extract_regex(text: str, pattern: str, group: int = 0, fallback: str = "[invalid]") -> str:
    """The `group`-th match of `pattern` (its first capture group when it has one)."""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    m = matches[group] if -len(matches) <= group < len(matches) else matches[0]
    if isinstance(m, tuple):
        m = next((x for x in m if x), m[0])
    return m.strip()


def normalise_answer(s: str, ignore_case: bool = False, ignore_punctuation: bool = False) -> str:
    s = s.strip()
    if ignore_case:
        s = s.lower()
    if ignore_punctuation:
        s = re.sub(r"[^\w\s]", "", s)
    return s


def score_exact_match(prediction: str, target: str, **opts) -> float:
    return float(normalise_answer(prediction, **opts) == normalise_answer(target, **opts))


# ------------------------------------------------------------------ perplexity family
def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def perplexity(pairs: Sequence[tuple[float, float]]) -> float:
    """exp(−Σ loglikelihood / Σ units) over (loglikelihood, units) pairs (units: tokens, words, items)."""
    return math.exp(-sum(ll for ll, _ in pairs) / sum(n for _, n in pairs))


def bits_per_byte(pairs: Sequence[tuple[float, float]]) -> float:
    return -sum(ll for ll, _ in pairs) / sum(n for _, n in pairs) / LN2


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


# metric name → aggregate over the per-item values
AGGREGATE: dict[str, Callable] = {
    "acc": mean, "acc_norm": mean, "acc_bytes": mean, "exact_match": mean, "mc1": mean, "mc2": mean,
    "perplexity": perplexity, "word_perplexity": perplexity, "byte_perplexity": perplexity,
    "bits_per_byte": bits_per_byte,
}


def mean_stderr(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def bootstrap_stderr(fn: Callable, items: Sequence, iters: int = 1000, seed: int = 1234) -> float:
    if len(items) < 2:
        return float("nan")
    rng = random.Random(seed)
    stats = [fn(rng.choices(items, k=len(items))) for _ in range(iters)]
    m = mean(stats)
    return math.sqrt(sum((s - m) ** 2 for s in stats) / (len(stats) - 1))


def aggregate(name: str, values: Sequence) -> tuple[float, float]:
    """(score, standard error) of a metric over its per-item values."""
    if name not in AGGREGATE:
        raise LmlabError(unknown("metric", name, AGGREGATE))
    fn = AGGREGATE[name]
    if fn is mean:
        return mean(values), mean_stderr(values)
    return fn(values), bootstrap_stderr(fn, values, iters=200)
