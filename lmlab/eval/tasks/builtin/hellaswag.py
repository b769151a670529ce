"""HellaSwag (original release): <data-dir>/hellaswag/hellaswag_val.jsonl
({ctx_a, ctx_b or ctx, endings, label, activity_label}); bracketed artifacts such as [title] are cleaned."""
import re
from pathlib import Path

from lmlab.eval.data import read_jsonl
from lmlab.eval.tasks.files import find
from lmlab.eval.tasks.task import Task


def clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _context(doc) -> str:
    if "ctx_a" in doc:
        ctx = doc["ctx_a"] + " " + doc.get("ctx_b", "").capitalize()
    else:
        ctx = doc["ctx"]
    return clean(doc["activity_label"] + ": " + ctx)


def build(data_dir: Path) -> Task:
    path = find(data_dir, "hellaswag", "hellaswag/hellaswag_val.jsonl", "hellaswag_val.jsonl")
    return Task("hellaswag", read_jsonl(path), "multiple_choice", source=str(path), doc_to_text=_context,
                doc_to_choice=lambda d: [clean(e) for e in d["endings"]], doc_to_target=lambda d: int(d["label"]))
