"""Labeled text for sequence classification: jsonl or csv records with a text and a label field, or
'label-text' lines ("<label> <text>", as the SST-2/TREC files under shared/data/icl).

Labels are strings (a jsonl 0/1 becomes '0'/'1'); the label set is given (a label outside it names
the file, line and value) or taken from the data, sorted. Batches are right-padded with the pad id.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.errors import LmlabError
from lmlab.eval.data import read_csv, read_json, read_jsonl


@dataclass
class Labeled:
    texts: list[str]
    labels: list[int]  # indices into label_names
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)


FORMATS = ("auto", "jsonl", "csv", "label-text")


def _records(path: Path, fmt: str, text_field: str, label_field: str):
    """(origin "file:line", record dict) of a jsonl/json, csv or label-text file (auto: by the file's suffix).
    jsonl, json and csv go through lmlab.eval.data's readers."""
    if fmt == "auto":
        fmt = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(path.suffix, "")
        if not fmt:
            raise LmlabError(f"{path}: expected a .jsonl or .csv file (or set the format: label-text)")
    if fmt not in FORMATS:
        raise LmlabError(f"{path}: format '{fmt}' is not one of {', '.join(FORMATS)}")
    if fmt == "label-text":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    label, _, text = line.strip().partition(" ")
                    yield f"{path}:{n}", {label_field: label, text_field: text.strip()}
        return
    docs = read_csv(path) if fmt == "csv" else read_json(path) if path.suffix == ".json" else read_jsonl(path)
    yield from zip(docs.origins, docs.docs)


def _label(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def load_labeled(path: str | Path, labels: list[str] | None = None, text_field: str = "text",
                 label_field: str = "label", limit: int = 0, fmt: str = "auto") -> Labeled:
    """Texts and label indices from a jsonl/csv/label-text file (the first `limit` records when limit > 0)."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"{path}: file not found")
    texts, raw, origins = [], [], []
    for origin, rec in _records(path, fmt, text_field, label_field):
        for key in (text_field, label_field):
            if rec.get(key) is None or rec.get(key) == "":
                raise LmlabError(f"{origin}: missing field '{key}'")
        if not isinstance(rec[text_field], str):
            raise LmlabError(f"{origin}: field '{text_field}' should be a string, got {rec[text_field]!r}")
        texts.append(rec[text_field])
        raw.append(_label(rec[label_field]))
        origins.append(origin)
        if limit and len(texts) >= limit:
            break
    if not texts:
        raise LmlabError(f"{path}: no records")
    names = [_label(x) for x in labels] if labels else sorted(set(raw))
    index = {lab: i for i, lab in enumerate(names)}
    for origin, lab in zip(origins, raw):
        if lab not in index:
            raise LmlabError(f"{origin}: label '{lab}' is not in the label set ({', '.join(names)})")
    return Labeled(texts, [index[lab] for lab in raw], names)


def encode_labeled(data: Labeled, tokenizer, max_len: int) -> list[list[int]]:
    """Token ids of each text (special tokens as the tokenizer adds them), cut to max_len."""
    return [ids[:max_len] for ids in tokenizer.encode_batch(data.texts)]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask (B×T), right-padded."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids, mask
