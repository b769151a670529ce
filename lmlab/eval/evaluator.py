"""evaluate(model, tokenizer, tasks): build every task's items, answer all their requests (every
request group) in as few engine calls as possible (one per request type, across tasks), score, and
aggregate (suites included)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from lmlab.errors import LmlabError
from lmlab.eval import metrics
from lmlab.eval.engine import Engine
from lmlab.eval.requests import MAIN, GenerateUntil, Item, Loglikelihood, LoglikelihoodRolling
from lmlab.eval.tasks import builtin
from lmlab.eval.tasks.task import Task
from lmlab.eval.tasks.yaml import load_yaml

# request type → how the engine answers a list of them (in this order, the same on every process)
ENGINE_CALLS = {
    Loglikelihood: lambda engine, reqs, opts, desc: engine.loglikelihood(reqs, desc=desc),
    LoglikelihoodRolling: lambda engine, reqs, opts, desc: _rolling(engine, reqs, opts, desc),
    GenerateUntil: lambda engine, reqs, opts, desc: engine.generate_until(reqs, desc=desc),
}


def _rolling(engine: Engine, requests: list, opts: dict, desc: str) -> list:
    """Rolling log-likelihoods: plain windows, or In-Context RALM when a retrieval Augmenter is given."""
    kw = {"window": opts.get("rolling_window"), "stride": opts.get("rolling_stride"), "desc": desc}
    augment = opts.get("augment")
    return augment.rolling(engine, requests, **kw) if augment else engine.loglikelihood_rolling(requests, **kw)


def resolve_tasks(tasks: str | Sequence[str | Task], data_dir: str | Path | None = None) -> list[Task]:
    """Task names (built-in), paths to YAML task files, or Task objects → Tasks (suites expanded)."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    out: list[Task] = []
    for t in tasks:
        if isinstance(t, Task):
            out.append(t)
        elif str(t).endswith((".yaml", ".yml")):
            out.append(load_yaml(t, data_dir))
        else:
            out.extend(builtin.build(str(t).strip(), data_dir))
    if not out:
        raise LmlabError("no tasks given")
    return out


def answer(engine: Engine, built: Sequence[tuple[Task, list[Item]]], **opts) -> None:
    """Fill `item.answers[group]` for every request group of every item: one engine call per request
    type across all tasks and groups (small tasks such as MMLU subjects share batches). `opts`:
    rolling_window, rolling_stride, augment (retrieval augmentation of rolling requests)."""
    for _, items in built:
        for it in items:
            it.answers = {group: [None] * len(reqs) for group, reqs in it.requests.items()}
    for kind, call in ENGINE_CALLS.items():
        asked = [(task.name, it, group, i) for task, items in built for it in items
                 for group, reqs in it.requests.items() for i, r in enumerate(reqs) if type(r) is kind]
        if not asked:
            continue
        names = list(dict.fromkeys(name for name, *_ in asked))
        got = call(engine, [it.requests[g][i] for _, it, g, i in asked], opts,
                   names[0] if len(names) == 1 else f"{len(names)} tasks")
        for (_, it, group, i), a in zip(asked, got):
            it.answers[group][i] = a
    for _, items in built:
        for it in items:
            for group, reqs in it.requests.items():
                bad = [r for r, a in zip(reqs, it.answers[group]) if a is None]
                if bad:
                    raise LmlabError(f"{it.origin or f'item {it.index}'}: request group '{group}' holds a "
                                     f"{type(bad[0]).__name__}, not a request the engine answers")


def _aggregate(scored: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in scored[0]:
        value, err = metrics.aggregate(key.split(",")[0], [s[key] for s in scored])
        out[key], out[f"{key}_stderr"] = value, err
    return out


def evaluate(model, tokenizer, tasks: str | Sequence[str | Task], *, data_dir: str | Path | None = None,
             num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 32, seed: int = 1234,
             max_length: int | None = None, rolling_window: int | None = None, rolling_stride: int | None = None,
             log_samples: bool = False, progress: bool = True, speculation=None, augment=None) -> dict[str, Any]:
    """Run `tasks` on an lmlab model; returns results shaped like lm-evaluation-harness output.
    `speculation` (lmlab.inference.drafting.Speculation): generation requests decode speculatively.
    `augment` (lmlab.retrieval.augment.Augmenter): retrieved passages go before each item's text, and
    rolling perplexity is scored In-Context-RALM style."""
    started = time.perf_counter()
    task_list = resolve_tasks(tasks, data_dir)
    engine = Engine(model, tokenizer, batch_size=batch_size, max_length=max_length, progress=progress,
                    speculation=speculation)
    built = [(t, t.items(limit=limit, num_fewshot=num_fewshot, seed=seed)) for t in task_list]
    if augment is not None:
        built = [(t, augment.items(t, items)) for t, items in built]
    answer(engine, built, rolling_window=rolling_window, rolling_stride=rolling_stride, augment=augment)
    results: dict[str, Any] = {}
    groups: dict[str, list[tuple[str, list[dict]]]] = {}
    samples: dict[str, list[dict]] = {}
    configs, n_samples = {}, {}
    for task, items in built:
        scored = [task.score(it) for it in items]
        results[task.name] = {"alias": task.name, **_aggregate(scored)}
        n_samples[task.name] = {"original": len(task.docs), "effective": len(items)}
        configs[task.name] = {"task": task.name, "output_type": task.output_type, "source": task.source,
                              "num_fewshot": task.num_fewshot if num_fewshot is None else num_fewshot,
                              "target_delimiter": task.target_delimiter,
                              "fewshot_delimiter": task.fewshot_delimiter, "metrics": task.metrics}
        if task.group:
            groups.setdefault(task.group, []).append((task.name, scored))
        if log_samples:
            samples[task.name] = [_sample(it, s) for it, s in zip(items, scored)]
    out: dict[str, Any] = {"results": results}
    if groups:
        out["groups"] = {g: _group_scores(members, results) for g, members in groups.items()}
        out["results"] = {**{g: {"alias": g, **v} for g, v in out["groups"].items()}, **results}
    out["configs"] = configs
    out["n-samples"] = n_samples
    out["config"] = {"model": getattr(model.cfg, "name", "") or "lmlab", "batch_size": batch_size,
                     "num_fewshot": num_fewshot, "limit": limit, "seed": seed, "max_length": engine.max_length,
                     "processes": engine.world}
    if augment is not None:
        out["config"]["retrieval"] = augment.describe(rolling_stride)
    out["total_evaluation_time_seconds"] = round(time.perf_counter() - started, 3)
    if log_samples:
        out["samples"] = samples
    return out


def _group_scores(members: list[tuple[str, list[dict]]], results: dict[str, Any]) -> dict[str, float]:
    """Suite scores: micro average over all items (what lm-evaluation-harness reports) and the macro
    average over subjects."""
    out: dict[str, float] = {}
    keys = [k for k in members[0][1][0] if metrics.AGGREGATE.get(k.split(",")[0]) is metrics.mean]
    for key in keys:
        every = [s[key] for _, scored in members for s in scored]
        out[key], out[f"{key}_stderr"] = metrics.mean(every), metrics.mean_stderr(every)
        out[f"{key}_macro"] = metrics.mean([results[name][key] for name, _ in members])
    return out


def _arguments(requests: list) -> list[list]:
    return [[getattr(r, "context", None), getattr(r, "continuation", getattr(r, "text", None))] for r in requests]


def _responses(answers: list) -> list:
    out = []
    for a in answers:
        if hasattr(a, "is_greedy"):
            out.append([a.logprob, a.is_greedy])
        elif hasattr(a, "n_tokens"):
            out.append([a.logprob, a.n_tokens])
        else:
            out.append(a)
    return out


def _sample(item: Item, scored: dict) -> dict[str, Any]:
    """One item's log record: its main requests and answers, any further groups', and its scores."""
    record = {"doc_id": item.index, "doc": item.doc, "target": item.gold if item.gold is not None else item.target,
              "arguments": _arguments(item.requests[MAIN]), "resps": _responses(item.answers[MAIN])}
    others = {g: {"arguments": _arguments(r), "resps": _responses(item.answers[g])}
              for g, r in item.requests.items() if g != MAIN}
    if others:
        record["groups"] = others
    return {**record, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in scored.items()}}
