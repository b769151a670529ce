"""`lmlab index` (a thin map onto `build_index`) and the `--retrieve` options that generate and eval
share (a thin map onto lmlab.retrieval.augment.load)."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import LmlabError


@dataclass
class IndexArgs:
    corpus: list[str]
    out: str
    kind: str = "bm25"
    embed: str | None = None  # dense: the embedding model (default all-MiniLM-L6-v2)
    text_field: str = "text"
    split: str = "line"
    chunk_words: int = 0
    dedupe: bool = True
    batch_size: int = 64


def build_index(args: IndexArgs) -> Path:
    """Read the corpus, index it and save the index to `args.out` in one swap (an interrupted or failed
    build leaves any earlier index there untouched)."""
    from lmlab.retrieval import index
    from lmlab.retrieval.corpus import read_corpus
    if args.kind not in index.KINDS:
        from lmlab.utils.suggest import unknown

        raise LmlabError(unknown("index kind", args.kind, index.KINDS))
    if args.embed is not None and args.kind != "dense":
        raise LmlabError("--embed applies to --kind dense only")
    _check_out(Path(args.out))
    t0 = time.perf_counter()
    corpus = read_corpus(args.corpus, text_field=args.text_field, split=args.split, chunk_words=args.chunk_words,
                         dedupe=args.dedupe)
    print(f"read {corpus.read:,} passages from {len(corpus.files)} file(s)"
          + (f"; {corpus.duplicates:,} exact duplicates dropped" if args.dedupe else ""), file=sys.stderr)
    encoder = None
    if args.kind == "dense":
        from lmlab.retrieval import embed

        encoder = embed.SentenceEncoder.load(args.embed or embed.DEFAULT_ENCODER, batch_size=args.batch_size)
        encoder.progress_from = 1  # the command always shows embedding progress
    retriever = index.build(args.kind, corpus.texts, encoder)
    path = retriever.save(args.out)
    what = f"dense, {encoder.name}" if encoder is not None else "bm25"
    print(f"indexed {len(retriever):,} passages ({what}) in {time.perf_counter() - t0:.1f} s: {path}")
    return path


def _check_out(out: Path) -> None:
    """The output may be new, empty, or an earlier index (replaced whole): never another folder."""
    from lmlab.retrieval.store import MANIFEST
    from lmlab.utils.atomic import check_writable

    if out.exists() and not out.is_dir():
        raise LmlabError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise LmlabError(f"{out}: a folder that is not a saved index; it would be replaced, so choose another")
    check_writable(out.parent / f".{out.name}.probe")


def register(subparsers) -> None:
    p = subparsers.add_parser("index", help="build a passage index (BM25 or dense) over local text/jsonl",
                              description="Index passages for retrieval: .txt/.md files (one passage a line, "
                                          "or see --split) and .jsonl files (one passage a line, --text-field).")
    p.add_argument("corpus", nargs="+", help="files or folders (recursively: .txt .md .jsonl .json)")
    p.add_argument("-o", "--out", required=True, help="index folder to write (replaced in one swap)")
    p.add_argument("--kind", default="bm25", help="bm25 (default) or dense")
    p.add_argument("--dense", dest="kind", action="store_const", const="dense", help="same as --kind dense")
    p.add_argument("--embed", help="dense: embedding model (preset name or folder; default all-minilm-l6-v2)")
    p.add_argument("--text-field", default="text", help="jsonl: the field holding the passage (default text)")
    p.add_argument("--split", default="line", choices=["line", "blank_line", "file"],
                   help="text files: one passage per line (default), per blank-line paragraph, or per file")
    p.add_argument("--chunk-words", type=int, default=0, help="cut passages into chunks of at most N words (0: off)")
    p.add_argument("--keep-duplicates", dest="dedupe", action="store_false",
                   help="index repeated passages again (default: each distinct passage once)")
    p.add_argument("--batch-size", type=int, default=64, help="dense: texts per embedding batch")
    p.set_defaults(func=lambda a: build_index(IndexArgs(
        a.corpus, a.out, kind=a.kind, embed=a.embed, text_field=a.text_field, split=a.split,
        chunk_words=a.chunk_words, dedupe=a.dedupe, batch_size=a.batch_size)) and 0)


# --------------------------------------------------------------------------- --retrieve on generate / eval
def add_retrieve_args(p: argparse.ArgumentParser) -> None:
    from lmlab.retrieval.augment import DEFAULT_QUERY_TOKENS

    p.add_argument("--retrieve", metavar="INDEX", help="prepend passages retrieved from this index (lmlab index)")
    p.add_argument("--retrieve-k", type=int, default=1, help="passages per prompt/item/block (default 1)")
    p.add_argument("--retrieve-embed", help="dense index: the embedding model to query with "
                                            "(default: the one that built it)")
    p.add_argument("--retrieve-query-tokens", type=int, default=DEFAULT_QUERY_TOKENS,
                   help=f"perplexity: retrieve by the last Q tokens (default {DEFAULT_QUERY_TOKENS}); "
                        "the retrieval stride is --rolling-stride")


def retrieve_options(a: argparse.Namespace) -> dict:
    """The parsed --retrieve options ({} when --retrieve is not given)."""
    if not getattr(a, "retrieve", None):
        return {}
    return {"index": a.retrieve, "k": a.retrieve_k, "embed": a.retrieve_embed,
            "query_tokens": a.retrieve_query_tokens}


def augmenter(options: dict | None):
    """An Augmenter from retrieve_options (None when there are none)."""
    if not options:
        return None
    from lmlab.retrieval.augment import load

    return load(**options)
