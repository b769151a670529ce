"""Classification tasks for in-context learning: a demonstration pool, test documents, the label set and
a default prompt. Documents are dicts holding the input fields (`text`, or `premise`/`hypothesis`) and
`label` (a label name); each remembers its origin ("file:line").

Built-in tasks read their common public layouts under --data-dir:
  sst2    sst2/stsa.binary.{train,dev,test}        "<0|1> <sentence>" lines (test split: dev)
  mr, cr, subj, mpqa   <task>/{train,test}.txt      "<0|1> <sentence>" lines
  trec    trec/{train,test}.txt                     "COARSE:fine question" lines (6 coarse classes)
  agnews  agnews/{train,test}.csv                   class index 1–4, title, description
  rte, cb superglue/{RTE,CB}/{train,val}.jsonl      SuperGLUE's fields
A YAML task file (lmlab eval's format, e.g. over "label<TAB>text" lines with `line_pattern`) becomes a
classification task too: its choices are the labels, doc_to_text the input.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lmlab.errors import LmlabError
from lmlab.eval.data import Docs, read_jsonl
from lmlab.eval.tasks.files import find
from lmlab.icl.prompt import Prompt
from lmlab.utils.suggest import unknown


@dataclass
class ICLTask:
    name: str
    pool: Docs  # demonstrations are drawn from here
    test: Docs  # the items scored
    labels: list[str]
    prompt: Prompt
    source: str = ""

    def __post_init__(self) -> None:
        for docs, what in ((self.pool, "demonstration pool"), (self.test, "test split")):
            for doc, origin in zip(docs.docs, docs.origins):
                if doc.get("label") not in self.labels:
                    raise LmlabError(f"{origin}: label {doc.get('label')!r} is not one of {self.labels}")
        if not len(self.test):
            raise LmlabError(f"{self.source or self.name}: the test split has no documents")
        self.prompt.check_labels(self.labels, self.source or self.name)

    def input_text(self, doc: dict[str, Any]) -> str:
        """The text retrievers compare: the template's input fields joined."""
        return " ".join(str(doc[k]) for k in self.prompt.inputs)


# --------------------------------------------------------------------------- file layouts
def _read_text(path: Path) -> list[str]:
    if not path.is_file():
        raise LmlabError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:  # TREC's original files are Latin-1
        return raw.decode("latin-1").splitlines()


def read_label_lines(path: Path, labels: dict[str, str], pattern: str = r"(?P<label>\S+)\s+(?P<text>\S.*)",
                     layout: str = "'<label> <sentence>'") -> Docs:
    """Lines matching `pattern` (named groups → fields); `labels` maps the file's label to the label name."""
    rx = re.compile(pattern)
    docs, origins = [], []
    for n, line in enumerate(_read_text(path), 1):
        if not line.strip():
            continue
        m = rx.fullmatch(line.strip())
        if m is None:
            raise LmlabError(f"{path}:{n}: line does not match the {layout} layout: {line[:60]!r}")
        doc = {k: v.strip() for k, v in m.groupdict().items()}
        if doc["label"] not in labels:
            raise LmlabError(f"{path}:{n}: label {doc['label']!r} is not one of {sorted(labels)}")
        doc["label"] = labels[doc["label"]]
        docs.append(doc)
        origins.append(f"{path}:{n}")
    return Docs(docs, origins)


def read_agnews(path: Path) -> Docs:
    """AG News csv rows: class index (1–4), title, description; a header row is skipped."""
    names = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}
    if not path.is_file():
        raise LmlabError(f"{path}: file not found")
    docs, origins = [], []
    with open(path, encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if n == 1 and not row[0].strip().isdigit():
                continue  # a header ("Class Index,Title,Description")
            if len(row) != 3 or row[0].strip() not in names:
                raise LmlabError(f"{path}:{n}: expected 'class index (1-4),title,description', got {row[:3]!r}")
            text = " ".join(p.strip().replace("\\", " ") for p in row[1:] if p.strip())
            docs.append({"text": text, "label": names[row[0].strip()]})
            origins.append(f"{path}:{n}")
    return Docs(docs, origins)


# --------------------------------------------------------------------------- built-in tasks
SENTIMENT = {"0": "negative", "1": "positive"}
TREC = {"ABBR": "Abbreviation", "DESC": "Description", "ENTY": "Entity", "HUM": "Person", "LOC": "Location",
        "NUM": "Number"}


def _binary(name: str, file_labels: dict[str, str], template: str, words: dict[str, str]):
    def build(data_dir: Path, split: str | None) -> ICLTask:
        folder = find(data_dir, name, name)
        test_split = split or "test"
        pool = read_label_lines(find(folder, name, "train.txt", "train"), file_labels)
        test = read_label_lines(find(folder, name, f"{test_split}.txt", test_split), file_labels)
        return ICLTask(name, pool, test, list(file_labels.values()), Prompt(template, dict(words)), str(folder))
    return build


def sst2(data_dir: Path, split: str | None) -> ICLTask:
    folder = find(data_dir, "sst2", "sst2", "SST-2")
    test_split = split or "dev"
    pool = read_label_lines(find(folder, "sst2", "stsa.binary.train", "train.txt"), SENTIMENT)
    test = read_label_lines(find(folder, "sst2", f"stsa.binary.{test_split}", f"{test_split}.txt"), SENTIMENT)
    prompt = Prompt("Review: {text}\nSentiment: {label}", {"negative": "negative", "positive": "positive"})
    return ICLTask("sst2", pool, test, ["negative", "positive"], prompt, str(folder))


def trec(data_dir: Path, split: str | None) -> ICLTask:
    folder = find(data_dir, "trec", "trec", "TREC")
    pattern = r"(?P<label>[A-Z]+):(?P<fine>\S+)\s+(?P<text>\S.*)"
    layout = "'COARSE:fine question'"
    files = {"train": ("train.txt", "train_5500.label"), "test": ("test.txt", "TREC_10.label")}
    test_split = split or "test"
    pool = read_label_lines(find(folder, "trec", *files["train"]), TREC, pattern, layout)
    test = read_label_lines(find(folder, "trec", *files.get(test_split, (f"{test_split}.txt",))), TREC, pattern, layout)
    prompt = Prompt("Question: {text}\nAnswer Type: {label}", {v: v for v in TREC.values()})
    return ICLTask("trec", pool, test, list(TREC.values()), prompt, str(folder))


def agnews(data_dir: Path, split: str | None) -> ICLTask:
    folder = find(data_dir, "agnews", "agnews", "ag_news")
    pool = read_agnews(find(folder, "agnews", "train.csv"))
    test = read_agnews(find(folder, "agnews", f"{split or 'test'}.csv"))
    labels = ["World", "Sports", "Business", "Sci/Tech"]
    words = {"World": "World", "Sports": "Sports", "Business": "Business", "Sci/Tech": "Technology"}
    return ICLTask("agnews", pool, test, labels, Prompt("Article: {text}\nAnswer: {label}", words), str(folder))


def _superglue(name: str, folder_name: str, labels: dict, template: str, words: dict[str, str]):
    def build(data_dir: Path, split: str | None) -> ICLTask:
        folder = find(data_dir, name, f"superglue/{folder_name}", folder_name, name)
        pool = _glue_docs(find(folder, name, "train.jsonl"), labels)
        test = _glue_docs(find(folder, name, f"{split or 'val'}.jsonl"), labels)
        return ICLTask(name, pool, test, list(dict.fromkeys(labels.values())), Prompt(template, dict(words)),
                       str(folder))
    return build


def _glue_docs(path: Path, labels: dict) -> Docs:
    docs = read_jsonl(path)
    out = []
    for doc, origin in zip(docs.docs, docs.origins):
        for key in ("premise", "hypothesis", "label"):
            if key not in doc:
                raise LmlabError(f"{origin}: missing field '{key}'")
        if doc["label"] not in labels:
            raise LmlabError(f"{origin}: label {doc['label']!r} is not one of {list(labels)}")
        out.append({"premise": doc["premise"], "hypothesis": doc["hypothesis"], "label": labels[doc["label"]]})
    return Docs(out, docs.origins)


BUILTIN: dict[str, Callable[[Path, str | None], ICLTask]] = {
    "sst2": sst2,
    "trec": trec,
    "agnews": agnews,
    "mr": _binary("mr", SENTIMENT, "Review: {text}\nSentiment: {label}", {l: l for l in SENTIMENT.values()}),
    "cr": _binary("cr", SENTIMENT, "Review: {text}\nSentiment: {label}", {l: l for l in SENTIMENT.values()}),
    "mpqa": _binary("mpqa", SENTIMENT, "Phrase: {text}\nSentiment: {label}", {l: l for l in SENTIMENT.values()}),
    "subj": _binary("subj", {"0": "subjective", "1": "objective"}, "Input: {text}\nType: {label}",
                    {"subjective": "subjective", "objective": "objective"}),
    "rte": _superglue("rte", "RTE", {"entailment": "entailment", "not_entailment": "not_entailment",
                                     0: "entailment", 1: "not_entailment"},
                      "{premise}\nquestion: {hypothesis} True or False?\nanswer: {label}",
                      {"entailment": "True", "not_entailment": "False"}),
    "cb": _superglue("cb", "CB", {"entailment": "entailment", "contradiction": "contradiction", "neutral": "neutral",
                                  0: "entailment", 1: "contradiction", 2: "neutral"},
                     "{premise}\nquestion: {hypothesis} True, False, or Neither?\nanswer: {label}",
                     {"entailment": "True", "contradiction": "False", "neutral": "Neither"}),
}


# --------------------------------------------------------------------------- from a YAML task
def from_yaml(path: str | Path, data_dir: str | Path | None) -> ICLTask:
    """An lmlab eval YAML task (multiple_choice) as a classification task: its choices are the labels
    (and, by default, their words), doc_to_text is the input."""
    from lmlab.eval.tasks.templates import render
    from lmlab.eval.tasks.yaml import load_yaml

    task = load_yaml(path, data_dir)
    if task.doc_to_choice is None:
        raise LmlabError(f"{path}: an in-context learning task needs doc_to_choice (the label set)")

    def convert(docs: Docs) -> Docs:
        out = []
        for doc, origin in zip(docs.docs, docs.origins):
            choices = [str(c) for c in render(task.doc_to_choice, doc, source=str(path), what="doc_to_choice",
                                               origin=origin)]
            target = render(task.doc_to_target, doc, source=str(path), what="doc_to_target", origin=origin)
            if isinstance(target, str) and target in choices:
                label = target
            elif str(target).strip().isdigit() and int(target) < len(choices):
                label = choices[int(target)]
            else:
                raise LmlabError(f"{origin}: target {target!r} is not one of the choices {choices}")
            text = str(render(task.doc_to_text, doc, source=str(path), what="doc_to_text", origin=origin))
            out.append({"text": text, "label": label, "choices": choices})
        return Docs(out, docs.origins)

    test = convert(task.docs)
    pool = convert(task.fewshot_docs if task.fewshot_docs is not None else task.docs)
    labels = list(dict.fromkeys(c for d in test.docs + pool.docs for c in d["choices"]))
    for d in test.docs + pool.docs:
        del d["choices"]
    prompt = Prompt("{text}" + task.target_delimiter.replace("{", "{{").replace("}", "}}") + "{label}",
                    {l: l for l in labels}, instruction=task.description.strip(),
                    separator=task.fewshot_delimiter)
    return ICLTask(task.name, pool, test, labels, prompt, str(path))


def load_task(name: str, data_dir: str | Path | None = None, split: str | None = None) -> ICLTask:
    """A built-in task by name (reading --data-dir) or a YAML task file."""
    if name.endswith((".yaml", ".yml")):
        return from_yaml(name, data_dir)
    if name not in BUILTIN:
        raise LmlabError(unknown("in-context learning task", name, list(BUILTIN) + ["<file>.yaml"]))
    return BUILTIN[name](Path(data_dir) if data_dir else Path("."), split)
