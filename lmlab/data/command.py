"""`lmlab prepare` and `lmlab tokenizer train`: thin maps onto lmlab.data's typed functions."""
from __future__ import annotations

import argparse
import json


def train_tokenizer(inputs: list[str], out_dir: str, vocab_size: int = 8192, min_frequency: int = 2,
                    doc_boundary: str = "file", text_field: str = "text",
                    special_tokens: tuple[str, ...] = ("<|endoftext|>",)) -> str:
    """Train a byte-level BPE on the corpus and save tokenizer.json (+ tokenizer_config.json) to out_dir."""
    from pathlib import Path

    from lmlab.data.corpus import expand_inputs, iter_documents
    from lmlab.data.tokenizers import train_bpe

    files = expand_inputs(inputs)
    tok = train_bpe(iter_documents(files, doc_boundary, text_field), vocab_size, min_frequency, special_tokens)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save(out_dir)
    print(f"byte-level BPE with {tok.vocab_size} tokens written to {out_dir}/tokenizer.json")
    return out_dir


def _prepare(args: argparse.Namespace) -> int:
    from lmlab.data.prepare import PrepareConfig, prepare

    meta = prepare(PrepareConfig(inputs=args.inputs, out_dir=args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                                 val_fraction=args.val_fraction, doc_boundary=args.doc_boundary,
                                 text_field=args.text_field, workers=args.workers, progress=not args.quiet))
    print(json.dumps({k: meta[k] for k in ("dtype", "vocab_size", "sep_id", "train_tokens", "val_tokens")}))
    return 0


def _tokenizer_train(args: argparse.Namespace) -> int:
    train_tokenizer(args.inputs, args.out, args.vocab_size, args.min_frequency, args.doc_boundary, args.text_field,
                    tuple(args.special or ["<|endoftext|>"]))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("prepare", help="tokenize corpora into memory-mapped token shards",
                              description="Tokenize text/jsonl corpora (files, folders, globs) into uint16/uint32 "
                                          "token shards with document separators and a validation split.")
    p.add_argument("inputs", nargs="+", help="text or .jsonl files, folders or globs")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("-t", "--tokenizer", default="char",
                   help="'char', a tokenizer.json or folder (e.g. from `lmlab tokenizer train`), or a model spec")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--doc-boundary", default="file", choices=["file", "blank_line", "line"],
                   help="how plain text splits into documents (jsonl: one per line)")
    p.add_argument("--text-field", default="text", help="jsonl field holding the text")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_prepare)

    t = subparsers.add_parser("tokenizer", help="tokenizer tools", description="Tokenizer tools.")
    tsub = t.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    tt = tsub.add_parser("train", help="train a byte-level BPE with the tokenizers library")
    tt.add_argument("inputs", nargs="+", help="text or .jsonl files, folders or globs")
    tt.add_argument("-o", "--out", required=True, help="output folder for tokenizer.json")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--min-frequency", type=int, default=2)
    tt.add_argument("--doc-boundary", default="file", choices=["file", "blank_line", "line"])
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--special", action="append", help="special token (repeatable; the first is end-of-text)")
    tt.set_defaults(func=_tokenizer_train)
