"""The lm-evaluation-harness bridge (lmlab.eval.harness): lm_eval's own task pipeline scored through the
bridge gives the same per-item answers and scores as lm_eval's own HF model class (HFLM) on the HF
export of the same model, for all three request types; and lmlab's evaluator agrees with both."""
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


def _lm_eval_answers(out: dict, task: str) -> list[list]:
    """Per document (by doc_id), its answers from an lm_eval run: (logprob, is_greedy), logprob or text."""
    docs = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] if isinstance(r[0], str) else (tuple(r[0]) if isinstance(r[0], (list, tuple)) else r[0])
             for r in s["resps"]] for s in docs]


def _lmlab_answers(out: dict, task: str) -> list[list]:
    """The same from lmlab's evaluator (its samples list answers in document order)."""
    return [[tuple(r) if isinstance(r, list) and isinstance(r[1], bool) else (r[0] if isinstance(r, list) else r)
             for r in s["resps"]] for s in out["samples"][task]]


def _same_answers(mine: list[list], ref: list[list], task: str) -> None:
    assert len(mine) == len(ref) > 0, task
    for doc, (a, b) in enumerate(zip(mine, ref)):
        assert len(a) == len(b), (task, doc)
        for x, y in zip(a, b):
            if isinstance(y, str):  # generated text
                assert x == y, (task, doc)
            elif isinstance(y, tuple):  # loglikelihood
                assert abs(float(x[0]) - float(y[0])) < 1e-4 and bool(x[1]) == bool(y[1]), (task, doc, x, y)
            else:  # rolling loglikelihood
                assert abs(float(x) - float(y)) < 1e-4, (task, doc, x, y)


def _same_scores(mine: dict, ref: dict, task: str, key=lambda m: f"{m},none") -> None:
    compared = 0
    for metric, value in mine.items():
        if "_stderr" in metric or metric == "alias" or key(metric) not in ref:
            continue
        if metric.startswith(("acc", "exact_match")):
            assert value == ref[key(metric)], (task, metric)
        else:
            assert value == pytest.approx(ref[key(metric)], rel=1e-5), (task, metric)
        compared += 1
    assert compared > 0, task


@pytest.mark.slow  # lm_eval import, dataset building and two lm_eval runs: ~40 s on 2 cores
def test_bridge_matches_lm_eval_hf_model_on_all_request_types(tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmlab.checkpoints import load
    from lmlab.checkpoints.hf import export
    from lmlab.eval import evaluate
    from lmlab.eval.harness import LmlabLM  # noqa: F401  (registers "lmlab" with lm_eval)
    from tiny_gguf import write_tiny

    write_tiny(tmp_path / "tiny.gguf")  # a random Llama with a byte-level BPE vocabulary, BOS and EOS
    model, tok = load(str(tmp_path / "tiny.gguf"))
    export(model, tok, tmp_path / "hf")
    paths = _tasks(tmp_path)
    names = [p.stem for p in paths]
    run = dict(tasks=names, task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
               bootstrap_iters=0, verbosity="ERROR")
    # the bridge loads the HF folder by spec, as lm_eval's command line would
    bridge = simple_evaluate(model="lmlab", model_args=f"pretrained={tmp_path / 'hf'},batch_size=4,progress=false",
                             **run)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    reference = simple_evaluate(model=HFLM(pretrained=hf, tokenizer=AutoTokenizer.from_pretrained(tmp_path / "hf"),
                                           batch_size=4), **run)
    ours = evaluate(model, tok, [str(p) for p in paths], batch_size=8, log_samples=True, progress=False)
    assert set(ours["results"]) == set(names)
    for name in names:
        ref = _lm_eval_answers(reference, name)
        _same_answers(_lm_eval_answers(bridge, name), ref, name)
        _same_answers(_lmlab_answers(ours, name), ref, name)
        _same_scores({k: v for k, v in bridge["results"][name].items() if k.endswith(",none")},
                     reference["results"][name], name, key=lambda m: m)
        _same_scores(ours["results"][name], reference["results"][name], name)
    # the generation requests carried the task's stop string and token budget through the bridge
    gen = bridge["samples"]["toy_gen"][0]["arguments"][0][1]
    assert gen["until"] == ["."] and gen["max_gen_toks"] == 6
    texts = [s["resps"][0][0] for s in bridge["samples"]["toy_gen"]]
    assert any(texts) and not any("." in t for t in texts)  # equal to HFLM's, which keeps the budget


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
def test_bridge_on_smollm2_matches_lm_eval_hf_model(data_dir, tmp_path):
    """simple_evaluate on lm_eval YAMLs over the shared data (COPA and the ARC-Easy mosaic file):
    LmlabLM(SmolLM2-135M) gives the answers and scores of lm_eval's HFLM on the HF export of the same
    weights."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    sys.path.insert(0, str(Path(__file__).parent))
    import parity

    from lmlab.checkpoints import load
    from lmlab.eval.harness import LmlabLM

    parity.write_lm_eval_tasks(tmp_path, data_dir, [])
    model, tok = load("smollm2-135m")
    run = dict(tasks=["p_copa", "p_arc_easy_mosaic"], task_manager=TaskManager(include_path=str(tmp_path)),
               limit=12, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    bridge = simple_evaluate(model=LmlabLM(model=model, tokenizer=tok, batch_size=16, progress=False), **run)
    reference = simple_evaluate(model=parity.hf_lm(model, tok, tmp_path, batch_size=16), **run)
    for name in ("p_copa", "p_arc_easy_mosaic"):
        mine, ref = _lm_eval_answers(bridge, name), _lm_eval_answers(reference, name)
        assert len(mine) == 12
        for a, b in zip(mine, ref):
            assert max(abs(x[0] - y[0]) for x, y in zip(a, b)) < 1e-3, name  # as the parity test allows
        assert bridge["results"][name]["acc,none"] == reference["results"][name]["acc,none"]
        assert bridge["results"][name]["acc_norm,none"] == reference["results"][name]["acc_norm,none"]
