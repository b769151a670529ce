"""SuperGLUE BoolQ (and BoolQ closed-book, without its passage), COPA, RTE, CB: <data-dir>/superglue/{BoolQ,COPA,RTE,CB}/val.jsonl (original fields);
few-shot examples from train.jsonl in the same folder when present."""
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.eval.data import read_jsonl
from lmlab.eval.tasks.files import find
from lmlab.eval.tasks.task import Task


def _splits(data_dir: Path, name: str):
    folder = find(data_dir, name.lower(), f"superglue/{name}", name)
    docs = read_jsonl(find(folder, name.lower(), "val.jsonl"))
    few = read_jsonl(folder / "train.jsonl") if (folder / "train.jsonl").is_file() else None
    return folder, docs, few


def _label(mapping: dict):
    def get(doc):
        value = doc["label"]
        if value not in mapping:
            raise LmlabError(f"label {value!r} is not one of {list(mapping)}")
        return mapping[value]
    return get


def boolq(data_dir: Path) -> Task:
    folder, docs, few = _splits(data_dir, "BoolQ")
    return Task("boolq", docs, "multiple_choice", fewshot_docs=few, source=str(folder),
                doc_to_text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
                doc_to_choice=lambda d: ["no", "yes"],
                doc_to_target=_label({False: 0, True: 1, 0: 0, 1: 1}))


def boolq_closed(data_dir: Path) -> Task:
    """BoolQ without its passage (closed book): `boolq`'s prompt less the passage line, so the same
    question after a retrieved passage (`--retrieve`) reads exactly as `boolq` with the gold one."""
    folder, docs, few = _splits(data_dir, "BoolQ")
    return Task("boolq_closed", docs, "multiple_choice", fewshot_docs=few, source=str(folder),
                doc_to_text=lambda d: f"Question: {d['question']}?\nAnswer:",
                doc_to_choice=lambda d: ["no", "yes"], doc_to_query=lambda d: d["question"],
                doc_to_target=_label({False: 0, True: 1, 0: 0, 1: 1}))


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


def copa(data_dir: Path) -> Task:
    folder, docs, few = _splits(data_dir, "COPA")
    connector = {"cause": "because", "effect": "therefore"}
    return Task("copa", docs, "multiple_choice", fewshot_docs=few, source=str(folder),
                doc_to_text=lambda d: d["premise"].strip()[:-1] + " " + connector[d["question"]],
                doc_to_choice=lambda d: [_lower_first(d["choice1"]), _lower_first(d["choice2"])],
                doc_to_target=_label({0: 0, 1: 1}))


def rte(data_dir: Path) -> Task:
    folder, docs, few = _splits(data_dir, "RTE")
    return Task("rte", docs, "multiple_choice", fewshot_docs=few, source=str(folder),
                doc_to_text=lambda d: f"{d['premise']}\nQuestion: {d['hypothesis']} True or False?\nAnswer:",
                doc_to_choice=lambda d: ["True", "False"],
                doc_to_target=_label({"entailment": 0, "not_entailment": 1, 0: 0, 1: 1}))


def cb(data_dir: Path) -> Task:
    folder, docs, few = _splits(data_dir, "CB")
    return Task("cb", docs, "multiple_choice", fewshot_docs=few, source=str(folder),
                doc_to_text=lambda d: f"{d['premise']}\nQuestion: {d['hypothesis']}. True, False, or Neither?\nAnswer:",
                doc_to_choice=lambda d: ["True", "False", "Neither"],
                doc_to_target=_label({"entailment": 0, "contradiction": 1, "neutral": 2, 0: 0, 1: 1, 2: 2}))
