"""A task: documents → items (requests by group) → per-item scores.

Built-in tasks (lmlab.eval.tasks.builtin) construct `Task` with Python callables; a YAML file
(lmlab.eval.tasks.yaml) with Jinja2 templates. What the requests are and how answers are scored
depends on the output type (lmlab.eval.tasks.outputs).

Beside its main requests an item can carry named groups of further requests: `task.add_group(name,
build, score)` makes every item ask `build(task, item)` too (content-free inputs for contextual
calibration, say); the evaluator answers every group with the main requests, puts the answers in
`item.answers[name]`, and `score(task, item)` (optional) adds per-item metrics from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from lmlab.errors import LmlabError
from lmlab.eval.data import Docs
from lmlab.eval.requests import MAIN, Item
from lmlab.eval.tasks import fewshot, outputs, templates
from lmlab.utils.suggest import unknown


@dataclass(frozen=True)
class RequestGroup:
    """Requests every item asks beside its main ones, and (optionally) the metrics they give."""

    build: Callable[["Task", Item], list]
    score: Callable[["Task", Item], dict[str, Any]] | None = None


@dataclass
class Task:
    name: str
    docs: Docs
    output_type: str
    doc_to_text: Callable[[dict], Any]
    doc_to_target: Callable[[dict], Any]
    doc_to_choice: Callable[[dict], list[str]] | None = None
    fewshot_docs: Docs | None = None
    num_fewshot: int = 0
    fewshot_sampler: str = "random"  # a name in lmlab.eval.tasks.fewshot.SAMPLERS
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    generation_kwargs: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    metric_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    multiple_inputs: bool = False  # choices are contexts completed by one target (winogrande)
    filters: dict[str, Callable[[str], str]] = field(default_factory=dict)  # generation answer filters
    doc_to_answer: Callable[[dict], str] | None = None  # generation: the scored answer, when it differs
    # from the few-shot target (gsm8k: the number after '####', while examples show the reasoning)
    count_text: Callable[[dict], str] | None = None  # rolling: the text whose words/bytes are counted,
    # when it is not the scored text (wikitext counts the original text, before detokenization)
    doc_to_query: Callable[[dict], str] | None = None  # retrieval augmentation: the text to retrieve by,
    # when it is not the item's own text (BoolQ: the question)
    group: str | None = None  # suite this task belongs to (mmlu, ceval, ...)
    source: str = ""  # file that defines the task, for error messages
    request_groups: dict[str, RequestGroup] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kind = outputs.get(self.output_type, self.where)
        for need in self.kind.needs:
            if getattr(self, need) is None:
                raise LmlabError(f"{self.where}: a {self.output_type} task needs {need}")
        self.metrics = self.metrics or list(self.kind.default_metrics)
        for m in self.metrics:
            if m not in self.kind.metrics:
                raise LmlabError(f"{self.where}: " + unknown(f"metric for {self.output_type}", m, self.kind.metrics))
        fewshot.sampler(self.fewshot_sampler, self.where)
        if not len(self.docs):
            raise LmlabError(f"{self.where}: the evaluation split has no documents")

    @property
    def where(self) -> str:
        return self.source or self.name

    def render(self, fn: Callable, doc: dict, origin: str, what: str) -> Any:
        return templates.render(fn, doc, source=self.where, what=what, origin=origin)

    def add_group(self, name: str, build: Callable[["Task", Item], list],
                  score: Callable[["Task", Item], dict[str, Any]] | None = None) -> None:
        """Every item also asks `build(task, item)` under `name`; see the module docstring."""
        if name == MAIN or name in self.request_groups:
            raise LmlabError(f"{self.where}: request group '{name}' already exists")
        self.request_groups[name] = RequestGroup(build, score)

    # ------------------------------------------------------------------ prompts
    def fewshot_prefix(self, doc: dict, index: int, k: int, seed: int) -> str:
        if self.kind.example is None:
            return ""
        pool = self.fewshot_docs if self.fewshot_docs is not None else self.docs
        if k > 0 and len(pool) == 0:
            raise LmlabError(f"{self.where}: {k}-shot needs examples, but the few-shot split is empty")
        shots = fewshot.choose(pool.docs, k, item=doc, item_index=index, seed=seed,
                               sampler_name=self.fewshot_sampler)
        where = {id(d): o for d, o in zip(pool.docs, pool.origins)}
        return self.description + "".join(self.kind.example(self, s, where[id(s)]) + self.fewshot_delimiter
                                          for s in shots)

    # ------------------------------------------------------------------ requests
    def items(self, *, limit: int | None = None, num_fewshot: int | None = None, seed: int = 1234) -> list[Item]:
        k = self.num_fewshot if num_fewshot is None else num_fewshot
        n = len(self.docs) if limit is None else min(limit, len(self.docs))
        return [self.item(i, k, seed) for i in range(n)]

    def item(self, i: int, k: int, seed: int) -> Item:
        doc, origin = self.docs.docs[i], self.docs.origins[i]
        item = Item(i, doc, origin, prefix=self.fewshot_prefix(doc, i, k, seed))
        item.requests[MAIN] = self.kind.build(self, item)
        for name, group in self.request_groups.items():
            item.requests[name] = group.build(self, item)
        return item

    # ------------------------------------------------------------------ scoring
    def score(self, item: Item) -> dict[str, Any]:
        """Per-item metric values from `item.answers` (corpus metrics as (log-likelihood, units) pairs)."""
        out = self.kind.score(self, item, item.answers[MAIN])
        for name, group in self.request_groups.items():
            if group.score is not None:
                extra = group.score(self, item)
                clash = sorted(set(extra) & set(out))
                if clash:
                    raise LmlabError(f"{self.where}: request group '{name}' scores {clash[0]}, "
                                     f"which the task already reports")
                out.update(extra)
        return out
