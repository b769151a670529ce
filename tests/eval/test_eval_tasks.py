"""YAML tasks, few-shot sampling, bad input, batch-size invariance and atomic output (tiny model: fast)."""
import json
import re

import pytest

from lmlab.errors import LmlabError
from lmlab.eval import evaluate
from lmlab.eval.report import write_results
from lmlab.eval.tasks.yaml import load_yaml

TASK = """task: toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: toy.jsonl
    train: train.jsonl
test_split: test
fewshot_split: train
output_type: multiple_choice
doc_to_text: "Q: {{q}}\\nA:"
doc_to_choice: "{{opts}}"
doc_to_target: "{{label}}"
num_fewshot: 2
"""


def _write(tmp_path, yaml_text=TASK, rows=None):
    rows = rows or [{"q": f"what is {i}?", "opts": ["yes", "no", "maybe"], "label": i % 3} for i in range(12)]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    (tmp_path / "toy.yaml").write_text(yaml_text)
    return tmp_path / "toy.yaml"


def test_yaml_task_prompts_and_fewshot_never_leak(tmp_path):
    task = load_yaml(_write(tmp_path))
    items = task.items()
    assert len(items) == 12
    first = items[0].requests["main"][0]
    assert first.context.endswith("Q: what is 0?\nA:") and first.continuation == " yes"
    assert first.context.count("Q: ") == 3  # two shots + the item
    for it in items[:5]:  # these items are also in the few-shot pool: never shown to themselves
        assert it.requests["main"][0].context.count(f"Q: what is {it.index}?") == 1
    assert [r.context for r in task.items(limit=3)[2].requests["main"]] == [r.context for r in items[2].requests["main"]]


def test_unknown_key_names_file_and_key(tmp_path):
    path = _write(tmp_path, TASK + "doc_to_txt: oops\n")
    with pytest.raises(LmlabError, match=r"toy.yaml: unknown key 'doc_to_txt' \(did you mean 'doc_to_text'"):
        load_yaml(path)


def test_missing_field_names_field_and_first_bad_line(tmp_path):
    rows = [{"q": "a", "opts": ["x", "y"], "label": 0}] * 3 + [{"question": "b", "opts": ["x", "y"], "label": 0}]
    task = load_yaml(_write(tmp_path, rows=rows))
    with pytest.raises(LmlabError, match=r"toy.yaml: doc_to_text names field 'q', missing from .*toy.jsonl:4"):
        task.items(num_fewshot=0)


def test_python_hooks_are_refused_with_the_line(tmp_path):
    path = _write(tmp_path, TASK + "process_results: !function utils.process\n")
    line = TASK.count("\n") + 1
    with pytest.raises(LmlabError, match=rf"toy.yaml:{line}: '!function' \(a Python hook\) is not supported"):
        load_yaml(path)


def test_label_out_of_range(tmp_path):
    rows = [{"q": "a", "opts": ["x", "y"], "label": 0}, {"q": "b", "opts": ["x", "y"], "label": 2}]
    task = load_yaml(_write(tmp_path, rows=rows))
    with pytest.raises(LmlabError, match=r"label 2 of .*toy.jsonl:2 is out of range for 2 choices"):
        task.items(num_fewshot=0)


def test_empty_split_and_bad_jsonl(tmp_path):
    path = _write(tmp_path)
    (tmp_path / "toy.jsonl").write_text("")
    with pytest.raises(LmlabError, match="split 'test' has no documents"):
        load_yaml(path)
    (tmp_path / "toy.jsonl").write_text('{"q": "a", "opts": ["x"], "label": 0}\n{"q": oops}\n')
    with pytest.raises(LmlabError, match=r"toy.jsonl:2: not valid JSON"):
        load_yaml(path)


def test_bad_csv_names_file_and_line(tmp_path):
    from lmlab.eval.data import read_csv
    (tmp_path / "x.csv").write_text("a,b\n1,2\n3\n")
    with pytest.raises(LmlabError, match=r"x.csv:3: expected 2 columns, found 1"):
        read_csv(tmp_path / "x.csv")


def test_batch_size_invariance(tiny, tmp_path):
    model, tok = tiny  # a character tokenizer without newlines
    path = _write(tmp_path, TASK.replace("\\nA:", " A:") + 'fewshot_delimiter: " || "\n')
    runs = {bs: evaluate(model, tok, [str(path)], batch_size=bs, log_samples=True, progress=False)
            for bs in (1, 8, 32)}
    base = runs[1]
    for bs, r in runs.items():
        assert r["results"]["toy"]["acc"] == base["results"]["toy"]["acc"]
        assert r["results"]["toy"]["acc_norm"] == base["results"]["toy"]["acc_norm"]
        for a, b in zip(r["samples"]["toy"], base["samples"]["toy"]):
            for (la, _), (lb, _) in zip(a["resps"], b["resps"]):
                assert abs(la - lb) < 1e-4


def test_interrupted_write_leaves_nothing(tmp_path):
    out = tmp_path / "r.json"
    with pytest.raises(Exception):
        write_results(out, {"results": {"t": {"acc": object()}}})
    assert not out.exists() and not list(tmp_path.iterdir())
    write_results(out, {"results": {"t": {"acc": 0.5, "acc_stderr": float("nan")}}})
    assert json.loads(out.read_text())["results"]["t"] == {"acc": 0.5, "acc_stderr": None}


def test_wikitext_detokenizes_but_counts_the_original_text(tmp_path):
    from lmlab.eval.requests import RollingResult
    from lmlab.eval.tasks.builtin import wikitext

    raw = " = Title = \r\n Some text @-@ here , and ( a note ) .\r\n = = Section = = \r\n More .\r\n = Other = \r\n x\r\n"
    (tmp_path / "wikitext-2-raw-test.txt").write_text(raw, newline="")
    task = wikitext.build(tmp_path)
    items = task.items()
    assert len(items) == 2  # split at top-level headings only
    text, page = items[0].requests["main"][0].text, items[0].doc["page"]
    assert "Some text-here, and (a note)" in text and "== Section ==" in text and " @-@ " in page
    items[0].answers = {"main": [RollingResult(-10.0, 7)]}
    scored = task.score(items[0])
    assert scored["bits_per_byte"] == (-10.0, len(page.encode("utf-8")))  # as lm-evaluation-harness counts
    assert scored["word_perplexity"] == (-10.0, len(re.split(r"\s+", page))) and len(page) > len(text)
