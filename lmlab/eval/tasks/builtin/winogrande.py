"""WinoGrande: <data-dir>/winogrande/dev.jsonl ({sentence with one '_', option1, option2, answer '1'/'2'}).

Partial scoring: each option fills the blank to make a context, and the shared text after the blank
is the scored continuation."""
from pathlib import Path

from lmlab.eval.data import read_jsonl
from lmlab.eval.tasks.files import find
from lmlab.eval.tasks.task import Task


def build(data_dir: Path) -> Task:
    path = find(data_dir, "winogrande", "winogrande/dev.jsonl", "winogrande_1.1/dev.jsonl")

    def contexts(d):
        i = d["sentence"].index("_")
        return [d["sentence"][:i] + d["option1"], d["sentence"][:i] + d["option2"]]

    return Task("winogrande", read_jsonl(path), "multiple_choice", source=str(path), multiple_inputs=True,
                doc_to_text=lambda d: {"1": 0, "2": 1}[str(d["answer"])], doc_to_choice=contexts,
                doc_to_target=lambda d: d["sentence"][d["sentence"].index("_") + 1:].strip())
