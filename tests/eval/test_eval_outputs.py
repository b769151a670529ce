"""Output types and named request groups: the registries, and the evaluator answering every group."""
import json
from dataclasses import replace

import pytest

from lmlab.errors import LmlabError
from lmlab.eval import evaluate, metrics
from lmlab.eval.data import Docs
from lmlab.eval.engine import Engine
from lmlab.eval.requests import Loglikelihood, LoglikelihoodResult, LoglikelihoodRolling
from lmlab.eval.tasks import outputs
from lmlab.eval.tasks.task import Task

ROWS = [{"q": f"what is {i}", "opts": ["yes", "no", "maybe so"], "label": i % 3} for i in range(6)]


def _toy(output_type="multiple_choice", **kw) -> Task:
    docs = Docs([dict(r) for r in ROWS], [f"toy.jsonl:{i + 1}" for i in range(len(ROWS))])
    return Task("toy", docs, output_type, doc_to_text=lambda d: f"Q: {d['q']} A:",
                doc_to_choice=lambda d: d["opts"], doc_to_target=lambda d: d["label"], fewshot_delimiter=" || ", **kw)


def _content_free(task, item):
    """Contextual calibration's requests: the same demonstrations, a content-free input, every choice."""
    return [Loglikelihood(item.prefix + "Q: N/A A:", task.target_delimiter + c) for c in item.choices]


def _calibrated(task, item):
    shifted = [m.logprob - c.logprob for m, c in zip(item.answers["main"], item.answers["calibration"])]
    return {"acc,calibrated": float(metrics.argmax(shifted) == item.gold)}


def test_unknown_output_type_and_metric_name_the_known_ones():
    with pytest.raises(LmlabError, match=r"toy.yaml: unknown output_type 'multiple_choise' \(did you mean "
                                         r"'multiple_choice'\? known: generate_until, loglikelihood, "):
        Task("t", _toy().docs, "multiple_choise", lambda d: "", lambda d: 0, source="toy.yaml")
    with pytest.raises(LmlabError, match=r"unknown metric for multiple_choice 'word_perplexity' .*known: acc, "):
        _toy(metrics=["word_perplexity"])
    with pytest.raises(LmlabError, match="a multiple_choice task needs doc_to_choice"):
        Task("t", _toy().docs, "multiple_choice", lambda d: "", lambda d: 0)


def test_a_registered_output_type_builds_and_scores(monkeypatch):
    """A new output type: the log-likelihood of the right choice alone, as its perplexity."""
    def build(task, item):
        item.gold = task.render(task.doc_to_target, item.doc, item.origin, "doc_to_target")
        right = item.doc["opts"][item.gold]
        return [Loglikelihood(item.prefix + task.render(task.doc_to_text, item.doc, item.origin, "doc_to_text"),
                              " " + right)]

    kind = outputs.OutputType("gold_loglikelihood", build, lambda task, item, answers: {
        "perplexity": (answers[0].logprob, 1)}, metrics=("perplexity",), default_metrics=("perplexity",))
    monkeypatch.setitem(outputs.OUTPUT_TYPES, kind.name, kind)
    task = _toy(output_type="gold_loglikelihood")
    items = task.items()
    assert items[4].requests["main"] == [Loglikelihood("Q: what is 4 A:", " no")]
    assert task.items(num_fewshot=1)[0].prefix == ""  # no `example`: the type takes no shots
    with pytest.raises(LmlabError, match="already registered"):
        outputs.register(replace(kind))


def test_request_groups_are_answered_and_scored_per_group(tiny):
    model, tok = tiny
    plain = evaluate(model, tok, [_toy(num_fewshot=1)], batch_size=4, log_samples=True, progress=False)
    task = _toy(num_fewshot=1)
    task.add_group("calibration", _content_free, _calibrated)
    task.add_group("whole", lambda t, item: [LoglikelihoodRolling(item.doc["q"])])  # answered, not scored
    out = evaluate(model, tok, [task], batch_size=4, log_samples=True, progress=False)
    res, samples = out["results"]["toy"], out["samples"]["toy"]
    # the main requests and scores do not change with the extra groups
    for key in ("acc", "acc_norm"):
        assert res[key] == plain["results"]["toy"][key]
    for s, p in zip(samples, plain["samples"]["toy"]):
        assert [r[0] for r in s["resps"]] == pytest.approx([r[0] for r in p["resps"]], abs=1e-4)
    # every group's answers are handed back under its name, in its requests' order
    items = task.items(num_fewshot=1)
    engine = Engine(model, tok, batch_size=4, progress=False)
    for item, s in zip(items, samples):
        cal = s["groups"]["calibration"]
        assert [a[0] for a in cal["arguments"]] == [r.context for r in item.requests["calibration"]]
        assert cal["arguments"][0][0].endswith(" || Q: N/A A:")  # the item's own demonstration kept
        direct = engine.loglikelihood(item.requests["calibration"], desc="direct")
        assert [r[0] for r in cal["resps"]] == pytest.approx([a.logprob for a in direct], abs=1e-4)
        whole = s["groups"]["whole"]["resps"]
        assert len(whole) == 1 and whole[0][0] < 0 and whole[0][1] > 0  # a RollingResult: (logprob, tokens)
        shifted = [m[0] - c[0] for m, c in zip(s["resps"], cal["resps"])]
        assert s["acc,calibrated"] == float(metrics.argmax(shifted) == s["target"])
    # the group's metric is aggregated like any other
    per_item = [s["acc,calibrated"] for s in samples]
    assert res["acc,calibrated"] == pytest.approx(sum(per_item) / len(per_item))
    assert "acc,calibrated_stderr" in res


def test_request_group_errors(tiny):
    task = _toy()
    with pytest.raises(LmlabError, match="request group 'main' already exists"):
        task.add_group("main", _content_free)
    task.add_group("calibration", _content_free, lambda t, item: {"acc": 1.0})
    with pytest.raises(LmlabError, match="request group 'calibration' already exists"):
        task.add_group("calibration", _content_free)
    item = task.items(limit=1)[0]
    item.answers = {"main": [LoglikelihoodResult(-1.0, False)] * 3, "calibration": []}
    with pytest.raises(LmlabError, match="request group 'calibration' scores acc, which the task already reports"):
        task.score(item)
    odd = _toy()
    odd.add_group("odd", lambda t, item: ["not a request"])
    model, tok = tiny
    with pytest.raises(LmlabError, match=r"toy.jsonl:1: request group 'odd' holds a str, not a request"):
        evaluate(model, tok, [odd], limit=1, progress=False)


def test_unknown_filter_function_in_yaml(tmp_path):
    from lmlab.eval.tasks.yaml import load_yaml

    (tmp_path / "d.jsonl").write_text(json.dumps({"q": "1+1", "a": "2"}) + "\n")
    (tmp_path / "g.yaml").write_text("task: g\ndataset_path: json\ndata_files: {test: d.jsonl}\ntest_split: test\n"
                                     "output_type: generate_until\ndoc_to_text: '{{q}}='\ndoc_to_target: a\n"
                                     "filter_list:\n  - name: last\n    filter:\n      - function: regx\n")
    with pytest.raises(LmlabError, match=r"g.yaml: filter_list entry 1: unknown filter function 'regx' "
                                         r"\(did you mean 'regex'"):
        load_yaml(tmp_path / "g.yaml")
    (tmp_path / "g.yaml").write_text((tmp_path / "g.yaml").read_text().replace("regx", "number"))
    task = load_yaml(tmp_path / "g.yaml")
    item = task.items()[0]
    item.answers = {"main": [" it is 2."]}
    assert task.score(item) == {"exact_match,last": 1.0}
