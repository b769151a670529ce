"""The lm-evaluation-harness bridge (lmlab.eval.harness): lm_eval's own task pipeline, scored by lmlab's
engine, gives the same per-item answers as lmlab's evaluator on the same YAML tasks."""
import importlib
import json
import os
import sys
from pathlib import Path

import pytest

from lmlab.errors import LmlabError

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MC = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{q}}}} A:"
doc_to_choice: "{{{{opts}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""
ROLLING = """task: toy_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GENERATE = """task: toy_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{q}}}} A:"
doc_to_target: answer
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _tasks(folder: Path) -> list[Path]:
    rows = [{"q": f"what is {i} plus {i % 4}", "opts": ["yes", "no", "maybe so"], "label": i % 3,
             "text": f"Number {i} is {'odd' if i % 2 else 'even'}; twice it is {2 * i}. " * (1 + i % 3),
             "answer": str(2 * i)} for i in range(9)]
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = []
    for name, body in (("toy_mc", MC), ("toy_rolling", ROLLING), ("toy_gen", GENERATE)):
        (folder / f"{name}.yaml").write_text(body.format(data=data))
        paths.append(folder / f"{name}.yaml")
    return paths


def _their_answers(samples: list[dict]) -> list[list]:
    return [[r[0] for r in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


def _compare(theirs: dict, ours: dict, task: str) -> None:
    """lm_eval (through the bridge) vs lmlab's evaluator on one task: per-item answers and the scores."""
    mine = ours["samples"][task]
    other = _their_answers(theirs["samples"][task])
    assert len(mine) == len(other) > 0
    for s, t in zip(mine, other):
        for ours_r, their_r in zip(s["resps"], t):
            if isinstance(their_r, str):  # generation
                assert ours_r == their_r
            elif isinstance(their_r, (list, tuple)):  # loglikelihood: (logprob, is_greedy)
                assert abs(ours_r[0] - float(their_r[0])) < 1e-4 and bool(ours_r[1]) == bool(their_r[1])
            else:  # rolling: logprob
                assert abs(ours_r[0] - float(their_r)) < 1e-4
    for metric, value in ours["results"][task].items():
        key = f"{metric},none"
        if metric.endswith("_stderr") or key not in theirs["results"][task]:
            continue
        their = theirs["results"][task][key]
        if metric.startswith(("acc", "exact_match")):
            assert value == their, (task, metric)
        else:
            assert value == pytest.approx(their, rel=1e-6), (task, metric)


@pytest.mark.slow  # lm_eval import + dataset building: ~30 s on 2 cores
def test_bridge_matches_lmlab_evaluator_on_all_request_types(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lmlab.eval import evaluate
    from lmlab.eval.harness import LmlabLM  # noqa: F401  (registers "lmlab" with lm_eval)

    from lmlab.checkpoints import native

    model, tok = tiny
    paths = _tasks(tmp_path)
    names = [p.stem for p in paths]
    native.save(model, tok, tmp_path / "tiny")  # so the bridge loads it by spec, as from lm_eval's CLI
    theirs = simple_evaluate(model="lmlab", model_args=f"pretrained={tmp_path / 'tiny'},batch_size=4,progress=false",
                             tasks=names, task_manager=TaskManager(include_path=str(tmp_path)),
                             log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    ours = evaluate(model, tok, [str(p) for p in paths], batch_size=8, log_samples=True, progress=False)
    assert set(ours["results"]) == set(names)
    for name in names:
        _compare(theirs, ours, name)
    # the generation requests carried the task's stop string and token budget through the bridge
    gen = theirs["samples"]["toy_gen"][0]["arguments"][0][1]
    assert gen["until"] == ["."] and gen["max_gen_toks"] == 6
    assert all(len(tok.encode(s["resps"][0][0])) <= 6 and "." not in s["resps"][0][0]
               for s in theirs["samples"]["toy_gen"])


def test_bridge_arguments(tiny):
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    from lmlab.eval.harness import LmlabLM

    assert get_model("lmlab") is LmlabLM
    model, tok = tiny
    lm = LmlabLM.create_from_arg_obj({"model": model, "tokenizer": tok, "max_length": "128"},
                                     {"batch_size": "auto", "device": None})
    assert lm.max_length == 128 and lm.batch_size == 32
    with pytest.raises(LmlabError, match="unknown model argument"):
        LmlabLM(model=model, tokenizer=tok, trust_remote_code=True)
    with pytest.raises(LmlabError, match="pretrained="):
        LmlabLM()
    with pytest.raises(LmlabError, match="batch_size='big'"):
        LmlabLM(model=model, tokenizer=tok, batch_size="big")


def test_missing_lm_eval_is_a_clear_error(monkeypatch):
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import lm_eval...` fail
    monkeypatch.delitem(sys.modules, "lmlab.eval.harness", raising=False)
    with pytest.raises(LmlabError, match="needs the lm_eval package"):
        importlib.import_module("lmlab.eval.harness")
    monkeypatch.delitem(sys.modules, "lmlab.eval.harness", raising=False)


@pytest.mark.slow
def test_bridge_on_smollm2_matches_lmlab(data_dir, tmp_path):
    """simple_evaluate(model=LmlabLM(SmolLM2-135M)) on lm_eval YAMLs over the shared data (COPA and the
    ARC-Easy mosaic file) vs lmlab's built-in copa and its own arc YAML: the same items, the same answers."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    sys.path.insert(0, str(Path(__file__).parent))
    import parity

    from lmlab.checkpoints import load
    from lmlab.eval import evaluate
    from lmlab.eval.harness import LmlabLM

    limit = 12
    parity.write_lm_eval_tasks(tmp_path, data_dir, [])
    model, tok = load("smollm2-135m")
    theirs = simple_evaluate(model=LmlabLM(model=model, tokenizer=tok, batch_size=16, progress=False),
                             tasks=["p_copa", "p_arc_easy_mosaic"], task_manager=TaskManager(include_path=str(tmp_path)),
                             limit=limit, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    ours = evaluate(model, tok, ["copa", str(parity.REPO / "configs/tasks/arc_easy_mosaic.yaml")], data_dir=data_dir,
                    limit=limit, batch_size=8, log_samples=True, progress=False)
    for mine, their in (("copa", "p_copa"), ("arc_easy_mosaic", "p_arc_easy_mosaic")):
        assert len(ours["samples"][mine]) == limit
        ours["samples"][their], ours["results"][their] = ours["samples"][mine], ours["results"][mine]
        _compare(theirs, ours, their)
