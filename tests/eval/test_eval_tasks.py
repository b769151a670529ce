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


def test_the_word_function_in_a_value_is_text_not_a_hook(tmp_path):
    task = load_yaml(_write(tmp_path, TASK + 'description: "Say which !function applies.\\n"\n'))
    assert task.items(limit=1, num_fewshot=0)[0].requests["main"][0].context.startswith("Say which !function applies.\n")


# a value of the wrong type or range: (YAML line added, the one-line error it gives)
WRONG_TYPES = {
    "num_fewshot-string": ("num_fewshot: abc", r"toy.yaml:13: num_fewshot: got 'abc' \(expected an integer >= 0\)"),
    "num_fewshot-negative": ("num_fewshot: -2", r"toy.yaml:13: num_fewshot: got -2 \(expected an integer >= 0\)"),
    "output_type-list": ("output_type: [multiple_choice]", r"toy.yaml:13: output_type: got \['multiple_choice'\]"),
    "doc_to_text-mapping": ("doc_to_text: {a: 1}", r"toy.yaml:13: doc_to_text: got \{'a': 1\} \(expected a field name"),
    "description-list": ("description: [1]", r"toy.yaml:13: description: got \[1\] \(expected a string\)"),
    "split-list": ("test_split: [test]", r"toy.yaml:13: test_split: got \['test'\] \(expected a split name\)"),
    "data_files-number": ("data_files: 3", r"toy.yaml:13: data_files: got 3 \(expected a file name"),
    "until-number": ("generation_kwargs: {until: 5}", r"toy.yaml:13: generation_kwargs.until: got 5 \(expected a non-empty"),
    "max_gen_toks-zero": ("generation_kwargs:\n  max_gen_toks: 0",
                          r"toy.yaml:14: generation_kwargs.max_gen_toks: got 0 \(expected an integer >= 1\)"),
    "generation-unknown": ("generation_kwargs: {temprature: 0}",
                           r"generation_kwargs.temprature: unknown key \(did you mean 'temperature'\?\) \(allowed: until,"),
    "metric-option": ("metric_list:\n  - metric: acc\n    ignore_case: 3",
                      r"toy.yaml:15: metric_list.0.ignore_case: got 3 \(expected true or false\)"),
    "metric-list-of-lists": ("metric_list: [[acc]]", r"metric_list.0: got \['acc'\] \(expected a metric name or a mapping\)"),
    "sampler-list": ("fewshot_config: {sampler: [first_n]}", r"fewshot_config.sampler: got \['first_n'\]"),
    "filter-regex": ("filter_list:\n  - name: f\n    filter:\n      - function: regex\n        regex_pattern: '('",
                     r"toy.yaml:17: filter_list.0.filter.0.regex_pattern: got '\(' \(expected a regular expression\)"),
    "filter-entry": ("filter_list: [3]", r"filter_list.0: got 3 \(expected a mapping \{name, filter: \[steps\]\}\)"),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
def test_wrong_typed_value_names_file_line_and_field(tmp_path, case):
    line, message = WRONG_TYPES[case]
    path = _write(tmp_path, TASK.replace("num_fewshot: 2\n", "") + line + "\n")  # its first line is line 13
    with pytest.raises(LmlabError, match=message) as info:
        load_yaml(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("target", ["toy.yaml", "toy.jsonl"])
def test_not_utf8_task_files_name_file_line_and_byte(tmp_path, target):
    path = _write(tmp_path)
    (tmp_path / target).write_bytes((tmp_path / target).read_bytes().replace(b"what is 1?", b"what is \xe9?")
                                    .replace(b"num_fewshot", b"num_few\xffshot"))
    line, byte = (13, 0xff) if target == "toy.yaml" else (2, 0xe9)
    with pytest.raises(LmlabError, match=rf"{target}:{line}: not UTF-8 text \(invalid byte 0x{byte:02x} at byte offset"):
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


def test_a_template_failing_with_an_empty_message_still_says_what():
    from lmlab.eval.tasks.templates import render

    def boom(doc):
        raise ValueError("")

    with pytest.raises(LmlabError, match=r"^t.yaml: doc_to_text failed on t.jsonl:3 \(ValueError\)$"):
        render(boom, {}, source="t.yaml", what="doc_to_text", origin="t.jsonl:3")
