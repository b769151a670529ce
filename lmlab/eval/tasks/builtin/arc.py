"""ARC (AI2 release): <data-dir>/ARC-Easy/ARC-Easy-Test.jsonl and <data-dir>/ARC-Challenge/ARC-Challenge-Test.jsonl
({id, question: {stem, choices: [{text, label}]}, answerKey}); also under <data-dir>/arc/ or ARC-V1-Feb2018-2/."""
from pathlib import Path

from lmlab.eval.data import read_jsonl
from lmlab.eval.tasks.files import find
from lmlab.eval.tasks.task import Task


def _gold(doc) -> int:
    labels = [c["label"] for c in doc["question"]["choices"]]
    return labels.index(doc["answerKey"]) if doc["answerKey"] in labels else -1


def _build(data_dir: Path, name: str, folder_name: str) -> Task:
    rel = f"{folder_name}/{folder_name}-Test.jsonl"
    path = find(data_dir, name, rel, f"arc/{rel}", f"ARC-V1-Feb2018-2/{rel}")
    return Task(name, read_jsonl(path), "multiple_choice", source=str(path),
                doc_to_text=lambda d: f"Question: {d['question']['stem']}\nAnswer:",
                doc_to_choice=lambda d: [c["text"] for c in d["question"]["choices"]], doc_to_target=_gold)


def build_easy(data_dir: Path) -> Task:
    return _build(data_dir, "arc_easy", "ARC-Easy")


def build_challenge(data_dir: Path) -> Task:
    return _build(data_dir, "arc_challenge", "ARC-Challenge")
