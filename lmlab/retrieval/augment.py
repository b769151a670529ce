"""Retrieval augmentation: retrieved passages are placed before what the model reads, the model unchanged
(In-Context RALM, Ram et al. 2023).

- Prompts (`lmlab generate --retrieve`): each prompt retrieves by its own text; the passages, best first,
  then `separator`, then the prompt.
- Evaluation items (`lmlab eval --retrieve`, loglikelihood and generation tasks): each item retrieves by
  its own text (or the task's `doc_to_query`, e.g. BoolQ's question), and the passages go between the
  few-shot demonstrations and the item's text, so every choice is scored after the same passages.
- Language modelling (`lmlab eval --retrieve` on rolling-perplexity tasks): the text is scored in blocks
  of `stride` tokens; before each block the last `query_tokens` tokens of the text so far retrieve a
  passage, and the block is scored after [prefix token] + passage + separator + as much preceding text
  as the window leaves room for. The first block has nothing to retrieve by and is scored without. The
  same blocks with no passage (`--rolling-stride s` without `--retrieve`) are the baseline: every token
  is scored exactly once in either case, so the perplexities compare directly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lmlab.errors import LmlabError
from lmlab.retrieval.base import Retriever

DEFAULT_STRIDE = 32  # In-Context RALM: retrieve every s tokens (Ram et al. use s=4 on GPUs; s=32 is 8x cheaper)
DEFAULT_QUERY_TOKENS = 32  # ... by the last q tokens (their best setting)


@dataclass
class Augmenter:
    """How passages are retrieved and placed. `max_passage_tokens` bounds a passage in language modelling
    (default: half the window); `stride` is the retrieval stride when the rolling stride is not given."""

    retriever: Retriever
    k: int = 1
    separator: str = "\n"
    query_tokens: int = DEFAULT_QUERY_TOKENS
    stride: int = DEFAULT_STRIDE
    max_passage_tokens: int | None = None
    name: str = ""  # the index folder, for messages

    def __post_init__(self) -> None:
        where = f"the index {self.name}" if self.name else "the index"
        for opt, value in (("--retrieve-k", self.k), ("--retrieve-query-tokens", self.query_tokens),
                           ("the retrieval stride", self.stride)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LmlabError(f"{opt} must be a positive integer, got {value!r}")
        if self.k > len(self.retriever):
            raise LmlabError(f"--retrieve-k {self.k} is larger than {where}, which holds "
                             f"{len(self.retriever)} passages")
        if self.max_passage_tokens is not None and self.max_passage_tokens < 1:
            raise LmlabError(f"max_passage_tokens must be positive, got {self.max_passage_tokens}")

    # ------------------------------------------------------------------ passages
    def hits(self, queries: Sequence[str]) -> list[list[int]]:
        """The indices of each query's k best passages, best first."""
        return [[int(j) for j in row] for row in self.retriever.search(list(queries), self.k).indices]

    def passages(self, queries: Sequence[str]) -> list[str]:
        """Each query's k best passages joined by the separator, best first."""
        return [self.separator.join(self.retriever.texts[j] for j in row) for row in self.hits(queries)]

    def prompts(self, prompts: Sequence[str]) -> list[str]:
        """Each prompt after the passages it retrieves."""
        return [p + self.separator + x for p, x in zip(self.passages(prompts), prompts)]

    # ------------------------------------------------------------------ evaluation items
    def items(self, task, items: list) -> list:
        """Rewrite the contexts of every item's main requests (loglikelihood, generation): the item's own
        text (after its few-shot prefix) follows its passages. Rolling requests are left to `rolling`."""
        from lmlab.eval.requests import MAIN

        own = [i for i in items if any(hasattr(r, "context") for r in i.requests.get(MAIN, []))]
        if not own:
            return items
        query = getattr(task, "doc_to_query", None)
        queries = [query(i.doc) if query else _own_text(i) for i in own]
        for item, passage in zip(own, self.passages(queries)):
            item.requests[MAIN] = [_placed(r, item.prefix, passage + self.separator) for r in item.requests[MAIN]]
            item.doc = {**item.doc, "retrieved": passage}  # shows in --log-samples
        return items

    def describe(self, rolling_stride: int | None = None) -> dict:
        """What a results file records about the retrieval (`rolling_stride`: the run's, when given)."""
        r = self.retriever
        return {"index": self.name, "kind": r.kind, "passages": len(r), "k": self.k, "separator": self.separator,
                "query_tokens": self.query_tokens, "stride": rolling_stride or self.stride,
                "max_passage_tokens": self.max_passage_tokens,
                "encoder": getattr(getattr(r, "encoder", None), "name", None)}

    # ------------------------------------------------------------------ language modelling
    def rolling(self, engine, requests: Sequence, *, window: int | None = None, stride: int | None = None,
                desc: str = "rolling+retrieval") -> list:
        """In-Context RALM log-likelihoods of whole texts (LoglikelihoodRolling requests): see the module
        docstring. Returns RollingResult per request, as Engine.loglikelihood_rolling."""
        from lmlab.eval.requests import RollingResult

        window = window or engine.max_length
        stride = stride or min(self.stride, window)
        cap = min(self.max_passage_tokens or window // 2, window - stride)
        if stride > window or cap < 1:
            raise LmlabError(f"retrieval stride {stride} leaves no room for a passage in a {window}-token window")
        texts = [engine.encode(r.text) for r in requests]
        blocks = [(i, start) for i, t in enumerate(texts) for start in range(0, len(t), stride)]
        asked = [(i, s) for i, s in blocks if s > 0]
        queries = [engine.tok.decode(texts[i][max(0, s - self.query_tokens):s]) for i, s in asked]
        found = dict(zip(asked, self.passages(queries))) if asked else {}
        heads = {p: ([engine.prefix_id] + engine.tok.encode(p + self.separator, add_special_tokens=False))[:cap]
                 for p in set(found.values())}
        windows = []
        for i, s in blocks:
            head = heads[found[(i, s)]] if (i, s) in found else []
            seq = [engine.prefix_id] + texts[i]  # seq[j] predicts texts[i][j]
            end = min(s + stride, len(texts[i]))
            windows.append((head + seq[max(0, end - (window - len(head))):end], texts[i][s:end]))
        scores = engine.score_windows(windows, desc=desc)
        totals = [0.0] * len(requests)
        for (i, _), lp in zip(blocks, scores):
            totals[i] += lp
        return [RollingResult(totals[i], len(texts[i])) for i in range(len(requests))]


def _own_text(item) -> str:
    from lmlab.eval.requests import MAIN

    context = next(r.context for r in item.requests[MAIN] if hasattr(r, "context"))
    return context[len(item.prefix):] if context.startswith(item.prefix) else context


def _placed(request, prefix: str, passage: str):
    if not hasattr(request, "context"):
        return request
    c = request.context
    rest = c[len(prefix):] if c.startswith(prefix) else c
    return dataclasses.replace(request, context=(prefix if c.startswith(prefix) else "") + passage + rest)


def load(index: str | Path, *, k: int = 1, embed: str | None = None, **options) -> Augmenter:
    """An Augmenter over a saved index; `embed` names the model to query a dense index with (default:
    the one that built it; another one is an error naming both)."""
    from lmlab.retrieval import index as indexes

    encoder = None
    if embed is not None:
        if store_kind(index) != "dense":
            raise LmlabError(f"{index}: --retrieve-embed applies to a dense index; this one is "
                             f"'{store_kind(index)}'")
        from lmlab.retrieval.embed import SentenceEncoder

        encoder = SentenceEncoder.load(embed)
    return Augmenter(indexes.load(index, encoder), k=k, name=str(index), **options)


def store_kind(index: str | Path) -> str:
    from lmlab.retrieval import store

    return str(store.read_manifest(index).get("kind"))
