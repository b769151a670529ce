"""Recall@k of a saved index against questions whose gold passage is known (BoolQ: each item carries
its Wikipedia passage): the share of questions whose gold passage is among the k retrieved.

    python -m lmlab.retrieval.recall INDEX QUESTIONS.jsonl --query-field question --gold-field passage --k 1,5
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from lmlab.errors import LmlabError
from lmlab.retrieval.base import Retriever


def recall_at(retriever: Retriever, queries: Sequence[str], golds: Sequence[str], ks: Sequence[int]) -> dict:
    """{"recall@k": share of queries whose gold text is among their k best, ...} plus counts. A gold text
    must be in the index (compared after stripping, as `lmlab index` reads passages)."""
    if len(queries) != len(golds) or not queries:
        raise LmlabError(f"need as many gold passages as queries, and at least one (got {len(queries)} "
                         f"queries, {len(golds)} gold passages)")
    where = {t: i for i, t in reversed(list(enumerate(retriever.texts)))}
    missing = [g for g in golds if g.strip() not in where]
    if missing:
        raise LmlabError(f"{len(missing)} gold passages are not in the index, e.g. {missing[0][:60]!r}")
    gold_ids = [where[g.strip()] for g in golds]
    hits = retriever.search(list(queries), max(ks)).indices
    out = {f"recall@{k}": float(sum(g in row[:k] for g, row in zip(gold_ids, hits)) / len(gold_ids)) for k in ks}
    out["queries"] = len(queries)
    out["passages"] = len(retriever)
    return out


def main(argv: list[str] | None = None) -> int:
    from lmlab.eval.data import read_jsonl
    from lmlab.retrieval import augment

    p = argparse.ArgumentParser(prog="python -m lmlab.retrieval.recall", description=__doc__.split("\n\n")[0])
    p.add_argument("index")
    p.add_argument("questions", help="jsonl with a query field and a gold-passage field per line")
    p.add_argument("--query-field", default="question")
    p.add_argument("--gold-field", default="passage")
    p.add_argument("--k", default="1,5", help="comma-separated cut-offs (default 1,5)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--output", help="also write the figures as JSON here")
    a = p.parse_args(argv)
    try:
        ks = sorted({int(k) for k in a.k.split(",")})
        docs = read_jsonl(a.questions)
        rows = list(zip(docs.docs, docs.origins))[:a.limit]
        for doc, origin in rows:
            for f in (a.query_field, a.gold_field):
                if not isinstance(doc.get(f), str):
                    raise LmlabError(f"{origin}: no string field '{f}'")
        t0 = time.perf_counter()
        retriever = augment.load(a.index, k=1).retriever
        out = recall_at(retriever, [d[a.query_field] for d, _ in rows], [d[a.gold_field] for d, _ in rows], ks)
        out.update(index=a.index, kind=retriever.kind, seconds=round(time.perf_counter() - t0, 1))
    except (LmlabError, ValueError) as e:
        print(f"recall: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    if a.output:
        from lmlab.utils.atomic import write_json

        write_json(Path(a.output), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
