"""PIQA: <data-dir>/piqa/valid.jsonl ({goal, sol1, sol2}) + valid-labels.lst (one 0/1 per line)."""
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.eval.data import read_jsonl, read_lines
from lmlab.eval.tasks.files import find
from lmlab.eval.tasks.task import Task


def build(data_dir: Path) -> Task:
    questions = find(data_dir, "piqa", "piqa/valid.jsonl", "valid.jsonl")
    folder = questions.parent
    docs = read_jsonl(questions)
    labels_path = find(folder, "piqa", "valid-labels.lst")
    labels = read_lines(labels_path)
    if len(labels) != len(docs):
        raise LmlabError(f"{labels_path}: {len(labels)} labels for {len(docs)} questions in valid.jsonl")
    for doc, label, n in zip(docs.docs, labels, range(1, len(labels) + 1)):
        if label not in ("0", "1"):
            raise LmlabError(f"{labels_path}:{n}: label '{label}' is not 0 or 1")
        doc["label"] = int(label)
    return Task("piqa", docs, "multiple_choice", source=str(folder),
                doc_to_text=lambda d: f"Question: {d['goal']}\nAnswer:",
                doc_to_choice=lambda d: [d["sol1"], d["sol2"]], doc_to_target=lambda d: d["label"])
