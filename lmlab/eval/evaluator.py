"""evaluate(model, tokenizer, tasks): build every task's requests, answer them in as few engine calls as
possible (all tasks' loglikelihood requests share batches), score, and aggregate (suites included)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from lmlab.errors import LmlabError
from lmlab.eval import metrics
from lmlab.eval.engine import Engine
from lmlab.eval.task import Item, Task, load_yaml


def resolve_tasks(tasks: str | Sequence[str | Task], data_dir: str | Path | None = None) -> list[Task]:
    """Task names (built-in), paths to YAML task files, or Task objects → Tasks (suites expanded)."""
    from lmlab.eval import tasks as builtin

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


def _answer(engine: Engine, kind: str, requests: list, rolling_window: int | None, rolling_stride: int | None,
            desc: str) -> list:
    if not requests:
        return []
    if kind in ("multiple_choice", "loglikelihood"):
        return engine.loglikelihood(requests, desc=desc)
    if kind == "loglikelihood_rolling":
        return engine.loglikelihood_rolling(requests, window=rolling_window, stride=rolling_stride, desc=desc)
    return engine.generate_until(requests, desc=desc)


def _aggregate(task: Task, scored: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in scored[0]:
        name = key.split(",")[0]
        value, err = metrics.aggregate(name, [s[key] for s in scored])
        out[key], out[f"{key}_stderr"] = value, err
    return out


def evaluate(model, tokenizer, tasks: str | Sequence[str | Task], *, data_dir: str | Path | None = None,
             num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 32, seed: int = 1234,
             max_length: int | None = None, rolling_window: int | None = None, rolling_stride: int | None = None,
             log_samples: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run `tasks` on an lmlab model; returns results shaped like lm-evaluation-harness output."""
    started = time.perf_counter()
    task_list = resolve_tasks(tasks, data_dir)
    engine = Engine(model, tokenizer, batch_size=batch_size, max_length=max_length, progress=progress)
    built: list[tuple[Task, list[Item]]] = [(t, t.items(limit=limit, num_fewshot=num_fewshot, seed=seed))
                                            for t in task_list]
    answers: dict[int, list] = {}
    # one engine call per request type, across tasks: small tasks (MMLU subjects) share batches
    request_type = {"multiple_choice": "loglikelihood", "loglikelihood": "loglikelihood",
                    "loglikelihood_rolling": "loglikelihood_rolling", "generate_until": "generate_until"}
    answers: dict[int, list] = {}
    for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        members = [it for t, items in built if request_type[t.output_type] == kind for it in items]
        names = [t.name for t, _ in built if request_type[t.output_type] == kind]
        flat = [r for it in members for r in it.requests]
        desc = names[0] if len(names) == 1 else f"{len(names)} tasks"
        got = _answer(engine, kind, flat, rolling_window, rolling_stride, desc)
        pos = 0
        for it in members:
            answers[id(it)] = got[pos:pos + len(it.requests)]
            pos += len(it.requests)
    results: dict[str, Any] = {}
    groups: dict[str, list[tuple[str, list[dict]]]] = {}
    samples: dict[str, list[dict]] = {}
    configs, n_samples = {}, {}
    for task, items in built:
        scored = [task.score(it, answers[id(it)]) for it in items]
        results[task.name] = {"alias": task.name, **_aggregate(task, scored)}
        n_samples[task.name] = {"original": len(task.docs), "effective": len(items)}
        configs[task.name] = {"task": task.name, "output_type": task.output_type, "source": task.source,
                              "num_fewshot": task.num_fewshot if num_fewshot is None else num_fewshot,
                              "target_delimiter": task.target_delimiter,
                              "fewshot_delimiter": task.fewshot_delimiter, "metrics": task.metrics}
        if task.group:
            groups.setdefault(task.group, []).append((task.name, scored))
        if log_samples:
            samples[task.name] = [_sample(task, it, answers[id(it)], s) for it, s in zip(items, scored)]
    out: dict[str, Any] = {"results": results}
    if groups:
        out["groups"] = {g: _group_scores(members, results) for g, members in groups.items()}
        out["results"] = {**{g: {"alias": g, **v} for g, v in out["groups"].items()}, **results}
    out["configs"] = configs
    out["n-samples"] = n_samples
    out["config"] = {"model": getattr(model.cfg, "name", "") or "lmlab", "batch_size": batch_size,
                     "num_fewshot": num_fewshot, "limit": limit, "seed": seed, "max_length": engine.max_length,
                     "processes": engine.world}
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


def _sample(task: Task, item: Item, answers: list, scored: dict) -> dict[str, Any]:
    resp = []
    for a in answers:
        if hasattr(a, "is_greedy"):
            resp.append([a.logprob, a.is_greedy])
        elif hasattr(a, "n_tokens"):
            resp.append([a.logprob, a.n_tokens])
        else:
            resp.append(a)
    args = []
    for r in item.requests:
        args.append([getattr(r, "context", None), getattr(r, "continuation", getattr(r, "text", None))])
    return {"doc_id": item.index, "doc": item.doc, "target": item.gold if item.gold is not None else item.target,
            "arguments": args, "resps": resp,
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in scored.items()}}
