"""The in-context learning grid: retrievers × shot counts × seeds, each cell scored on the eval engine.

Demonstrations: `random` and `balanced` draw one set per seed, shown to every test item (Zhao et al.
2021), so the prompt prefix is shared and runs once into a KV cache (Engine.sharing); `bm25`, `topk` and
`mmr` retrieve per item (Liu et al. 2021); with the "similarity" order they are deterministic and run
one seed. A test item never sees itself: pool entries with its exact text are left out. Zero shots is
the same prompt for every retriever and seed: it runs once and fills each retriever's 0-shot cell.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from lmlab.errors import LmlabError
from lmlab.eval.evaluator import answer
from lmlab.eval.requests import MAIN, Item
from lmlab.icl import scoring
from lmlab.icl.calibration import batch_calibration, contextual_calibration
from lmlab.icl.selectors import METHODS, Selector, make_selector
from lmlab.icl.tasks import ICLTask
from lmlab.utils.progress import Progress

FIXED = ("random", "balanced")  # one demonstration set per seed, shared by every item


@dataclass
class GridConfig:
    shots: list[int] = field(default_factory=lambda: [0, 1, 4, 8, 16])
    seeds: int = 5
    retrievers: list[str] = field(default_factory=lambda: ["random"])
    order: str | None = None  # None: similarity for retrieval, random for random/balanced
    scoring: str = "direct"
    calibrate: bool = False
    limit: int | None = None  # the first N test items
    sample: int | None = None  # or a seeded random N of them (the same items in every cell), in file order
    sample_seed: int = 0
    share_prefix: bool = True
    log_demos: bool = False
    mmr_lambda: float = 0.5

    def order_of(self, method: str) -> str:
        return "random" if method in FIXED else (self.order or "similarity")

    def seeds_for(self, method: str) -> list[int]:
        """Similarity-ordered retrieval is deterministic: one seed."""
        return list(range(self.seeds)) if self.order_of(method) == "random" else [0]

    def plan(self) -> list[tuple[str, int, int]]:
        """The cells (retriever, shots, seed) in order of shot count (then retriever, then seed), so a run
        stopped part-way has every retriever's cheaper cells."""
        cells = [("none", 0, 0)] if 0 in self.shots else []
        for k in sorted(set(self.shots) - {0}):
            cells += [(method, k, s) for method in self.retrievers for s in self.seeds_for(method)]
        return cells

    def check(self, pool_size: int) -> None:
        if not self.shots or any(s < 0 for s in self.shots):
            raise LmlabError(f"--shots must be non-negative integers, got {self.shots}")
        if max(self.shots) > pool_size:
            raise LmlabError(f"{max(self.shots)} shots but the pool holds only {pool_size} examples")
        if self.seeds < 1:
            raise LmlabError(f"--seeds must be at least 1 (got {self.seeds})")
        if self.limit is not None and self.limit < 1:
            raise LmlabError(f"--limit must be at least 1 (got {self.limit})")
        if self.sample is not None and self.sample < 1:
            raise LmlabError(f"--sample must be at least 1 (got {self.sample})")
        if self.limit is not None and self.sample is not None:
            raise LmlabError("--limit (the first N items) and --sample (a seeded random N): give one, not both")
        for r in self.retrievers:
            if r not in METHODS:
                from lmlab.utils.suggest import unknown

                raise LmlabError(unknown("retriever", r, METHODS))
        scoring.check_scoring(self.scoring)
        if self.calibrate and self.scoring != "direct":
            raise LmlabError(f"--calibrate (contextual calibration) needs --scoring direct, not {self.scoring}")


class Grid:
    """Runs the cells of one task on one engine; `encoder` embeds texts for topk/mmr."""

    def __init__(self, engine, task: ICLTask, cfg: GridConfig, encoder=None, progress: bool = True):
        cfg.check(len(task.pool))
        self.engine, self.task, self.cfg, self.encoder = engine, task, cfg, encoder
        self.progress = progress
        chosen = scored_items(len(task.test), cfg)
        self.test_docs = [task.test.docs[i] for i in chosen]
        self.test_origins = [task.test.origins[i] for i in chosen]
        self.pool_texts = [task.input_text(d) for d in task.pool.docs]
        self.test_texts = [task.input_text(d) for d in self.test_docs]
        test_set = set(self.test_texts)
        self.leaks = {i for i, t in enumerate(self.pool_texts) if t in test_set}  # test items in the pool
        task.prompt.check_tokens(engine.encode, task.labels)
        self.max_gen_toks = max(len(engine.encode(" " + w)) for w in task.prompt.verbalizer.values()) + 2
        self._selectors: dict[tuple[str, int], Selector] = {}
        self.demo_log: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ demonstrations
    def selector(self, method: str, seed: int) -> Selector:
        key = (method, seed if method in FIXED or self.order(method) == "random" else 0)
        if key not in self._selectors:
            base = next((s for (m, _), s in self._selectors.items() if m == method), None)
            self._selectors[key] = make_selector(
                method, self.pool_texts, labels=[d["label"] for d in self.task.pool.docs], seed=key[1],
                order=self.cfg.order if method not in FIXED else None, encoder=self.encoder,
                retriever=getattr(base, "retriever", None), mmr_lambda=self.cfg.mmr_lambda)
        return self._selectors[key]

    def order(self, method: str) -> str:
        return self.cfg.order_of(method)

    def demonstrations(self, method: str, shots: int, seed: int) -> tuple[list[list[int]], list | None]:
        sel = self.selector(method, seed)
        if method in FIXED:
            chosen = sel.select([f"demonstrations for seed {seed}"], shots, exclude=[sorted(self.leaks)])
            return chosen.indices * len(self.test_docs), None
        chosen = sel.select(self.test_texts, shots)
        return chosen.indices, chosen.scores

    # ------------------------------------------------------------------ one cell
    def items(self, demos: list[list[int]]) -> list[Item]:
        t, prompt, channel = self.task, self.task.prompt, self.cfg.scoring == "channel"
        out = []
        for i, (doc, origin) in enumerate(zip(self.test_docs, self.test_origins)):
            prefix = prompt.prefix([t.pool.docs[j] for j in demos[i]], [t.pool.origins[j] for j in demos[i]],
                                   channel)
            out.append(scoring.build_item(i, doc, origin, prompt, t.labels, prefix, self.cfg.scoring,
                                          self.cfg.calibrate, self.max_gen_toks))
        return out

    def answer(self, items: list[Item], shared: bool) -> None:
        """Fixed demonstrations: every item's prompt starts with the same prefix, run once into a KV cache.
        Per-item demonstrations with several contexts per item (the content-free inputs of calibration, or
        channel scoring's one context per label): each item's own prefix is run once for its contexts."""
        if not (self.cfg.share_prefix and items and items[0].prefix):
            answer(self.engine, [(self.task, items)])
        elif shared:
            with self.engine.sharing(items[0].prefix):
                answer(self.engine, [(self.task, items)])
        elif self.cfg.calibrate or self.cfg.scoring == "channel":
            for it in items:
                with self.engine.sharing(it.prefix):
                    answer(self.engine, [(self.task, [it])])
        else:  # one context per item: nothing to share, batch the items
            answer(self.engine, [(self.task, items)])

    def cell(self, method: str, shots: int, seed: int) -> dict[str, Any]:
        started = time.perf_counter()
        demos, sims = self.demonstrations(method, shots, seed) if shots else ([[]] * len(self.test_docs), None)
        items = self.items(demos)
        self.answer(items, shared=method in FIXED or shots == 0)
        result = self.score(items)
        result.update(retriever=method if shots else "none", shots=shots, seed=seed,
                      seconds=round(time.perf_counter() - started, 3))
        if self.cfg.log_demos:
            self.log(result, items, demos, sims)
        result.pop("_preds")
        return result

    def score(self, items: list[Item]) -> dict[str, Any]:
        labels, K = self.task.labels, len(self.task.labels)
        gold = np.array([it.gold for it in items])
        out: dict[str, Any] = {"n": len(items)}
        if self.cfg.scoring == "generate":
            parsed = [scoring.parse_generation(it.answers[MAIN][0], self.task.prompt, labels) for it in items]
            preds = np.array([-1 if p is None else p for p in parsed])
            out.update(acc=float(np.mean(preds == gold)), unparsed=int(np.sum(preds < 0)),
                       predictions=_distribution(preds, labels))
            out["_preds"] = {"prediction": preds, "generated": [it.answers[MAIN][0] for it in items]}
            return out
        probs = np.stack([scoring.label_probs(it) for it in items])
        preds = probs.argmax(1)
        out.update(acc=float(np.mean(preds == gold)), predictions=_distribution(preds, labels))
        out["_preds"] = {"prediction": preds}
        if self.cfg.calibrate:
            cal = np.stack([contextual_calibration(p, scoring.content_free_probs(it, K))[0]
                            for p, it in zip(probs, items)])
            out.update(acc_calibrated=float(np.mean(cal.argmax(1) == gold)),
                       predictions_calibrated=_distribution(cal.argmax(1), labels))
            out["_preds"]["prediction_calibrated"] = cal.argmax(1)
        batch = batch_calibration(probs)
        out.update(acc_batch_calibrated=float(np.mean(batch.argmax(1) == gold)),
                   predictions_batch_calibrated=_distribution(batch.argmax(1), labels))
        out["_preds"]["prediction_batch_calibrated"] = batch.argmax(1)
        return out

    def log(self, result: dict, items: list[Item], demos: list[list[int]], sims) -> None:
        labels, preds = self.task.labels, result["_preds"]
        for i, it in enumerate(items):
            record = {"retriever": result["retriever"], "shots": result["shots"], "seed": result["seed"],
                      "item": it.index, "origin": it.origin, "label": it.doc["label"],
                      "demonstrations": [{"pool_index": j, "origin": self.task.pool.origins[j],
                                          "label": self.task.pool.docs[j]["label"]} for j in demos[i]]}
            if sims is not None and sims[i] is not None:
                for d, s in zip(record["demonstrations"], sims[i]):
                    d["similarity"] = round(float(s), 6)
            for key, values in preds.items():
                v = values[i]
                record[key] = v if isinstance(v, str) else (labels[int(v)] if int(v) >= 0 else None)
            self.demo_log.append(record)

    # ------------------------------------------------------------------ the grid
    def run(self, on_cell: Callable[[list[dict[str, Any]], int], None] | None = None) -> list[dict[str, Any]]:
        """Every cell of the plan; `on_cell(cells so far, cells planned)` after each (to save partial results)."""
        plan = self.cfg.plan()
        bar = Progress(len(plan), f"icl {self.task.name}", unit="cell", enabled=self.progress)
        cells = []
        for method, shots, seed in plan:
            cells.append(self.cell(method, shots, seed))
            bar.set(acc=f"{cells[-1]['acc']:.3f}")
            bar.update(1)
            if on_cell is not None:
                on_cell(cells, len(plan))
        bar.close()
        return cells


def scored_items(size: int, cfg: GridConfig) -> list[int]:
    """The test items a grid scores: all, the first `limit`, or a seeded random `sample` in file order."""
    if cfg.sample is not None and cfg.sample < size:
        return sorted(np.random.default_rng(cfg.sample_seed).choice(size, cfg.sample, replace=False).tolist())
    return list(range(size if cfg.limit is None else min(cfg.limit, size)))


def _distribution(preds: np.ndarray, labels: Sequence[str]) -> dict[str, int]:
    out = {label: int(np.sum(preds == i)) for i, label in enumerate(labels)}
    if (preds < 0).any():
        out["(unparsed)"] = int(np.sum(preds < 0))
    return out


METRICS = ("acc", "acc_calibrated", "acc_batch_calibrated")


def summarize(cells: list[dict[str, Any]], retrievers: Sequence[str], shots: Sequence[int]) -> list[dict[str, Any]]:
    """Per retriever and shot count: mean ± std over seeds of each accuracy, and the predictions' label
    distribution summed over seeds (the 0-shot cell appears under every retriever)."""
    rows = []
    for method in retrievers:
        for k in shots:
            mine = [c for c in cells if c["shots"] == k and (k == 0 or c["retriever"] == method)]
            if not mine:
                continue
            row: dict[str, Any] = {"retriever": method, "shots": k, "seeds": len(mine)}
            for m in METRICS:
                if m in mine[0]:
                    values = np.array([c[m] for c in mine])
                    row[m] = float(values.mean())
                    row[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            dist: dict[str, int] = {}
            for c in mine:
                for label, n in c["predictions"].items():
                    dist[label] = dist.get(label, 0) + n
            row["predictions"] = dist
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = [m for m in METRICS if any(m in r for r in rows)]
    head = ["retriever", "shots", "seeds", *cols, "predicted labels"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        accs = [f"{r[m]:.3f} ± {r[m + '_std']:.3f}" if m in r else "" for m in cols]
        total = sum(r["predictions"].values()) or 1
        dist = ", ".join(f"{k} {v / total:.0%}" for k, v in r["predictions"].items())
        lines.append("| " + " | ".join([r["retriever"], str(r["shots"]), str(r["seeds"]), *accs, dist]) + " |")
    return "\n".join(lines)


def config_dict(cfg: GridConfig) -> dict[str, Any]:
    return asdict(cfg)
