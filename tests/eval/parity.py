"""lmlab vs lm-evaluation-harness (HF backend on the HF export of the same weights), same prompts.

lm_eval cannot reach its hub, so its side reads task YAMLs written here over the same local files.
Used by tests/eval/test_eval_parity.py (a small set) and runnable for the full comparison:

    python tests/eval/parity.py --items 200 --copa 100 --mmlu-shots 5
    python tests/eval/parity.py --wikitext [--docs N] [--window 2048]     # bits per byte
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "eval"
REPO = Path(__file__).resolve().parents[2]
LETTERS = ["A", "B", "C", "D"]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _yaml(folder: Path, name: str, body: dict) -> None:
    import yaml

    (folder / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **body}, allow_unicode=True, sort_keys=False))


def write_lm_eval_tasks(folder: Path, data: Path, mmlu_subjects: list[str]) -> None:
    """lm_eval YAMLs whose prompts match lmlab's built-in piqa, boolq, copa and mmlu tasks."""
    mc = {"dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
          "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    labels = (data / "piqa" / "valid-labels.lst").read_text().split()
    piqa = [dict(json.loads(line), label=int(lab)) for line, lab in
            zip((data / "piqa" / "valid.jsonl").read_text().splitlines(), labels)]
    _yaml(folder, "p_piqa", {**mc, "dataset_kwargs": {"data_files": {"test": str(_jsonl(folder / "piqa.jsonl", piqa))}},
                             "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_choice": "{{[sol1, sol2]}}",
                             "doc_to_target": "label"})
    _yaml(folder, "p_boolq", {**mc, "dataset_kwargs": {"data_files": {"test": str(data / "superglue/BoolQ/val.jsonl")}},
                              "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
                              "doc_to_choice": ["no", "yes"], "doc_to_target": "{{label|int}}"})
    _yaml(folder, "p_copa", {**mc, "dataset_kwargs": {"data_files": {"test": str(data / "superglue/COPA/val.jsonl")}},
                             "doc_to_text": "{{premise.strip()[:-1]}} {{'because' if question == 'cause' else 'therefore'}}",
                             "doc_to_choice": "{{[choice1[0].lower() + choice1[1:], choice2[0].lower() + choice2[1:]]}}",
                             "doc_to_target": "label"})
    text = "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:"
    for s in mmlu_subjects:
        rows = {}
        for split in ("dev", "val"):
            with open(data / "mmlu" / split / f"{s}_{split}.csv", newline="") as f:
                rows[split] = [dict(zip(["question", *LETTERS, "answer"], r)) for r in csv.reader(f) if r]
        _yaml(folder, f"p_mmlu_{s}", {
            **mc, "dataset_kwargs": {"data_files": {
                "test": str(_jsonl(folder / f"mmlu_{s}_val.jsonl", rows["val"])),
                "dev": str(_jsonl(folder / f"mmlu_{s}_dev.jsonl", rows["dev"]))}},
            "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "description": f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n",
            "doc_to_text": text, "doc_to_choice": LETTERS, "doc_to_target": "{{['A','B','C','D'].index(answer)}}"})
    arc = (REPO / "configs/tasks/arc_easy_mosaic.yaml").read_text().replace(
        "test: arc_easy.mosaic.jsonl", f"test: {data / 'arc_easy.mosaic.jsonl'}").replace(
        "task: arc_easy_mosaic", "task: p_arc_easy_mosaic")
    (folder / "p_arc_easy_mosaic.yaml").write_text(arc)


def mmlu_subjects(data: Path, n_items: int) -> list[str]:
    """The first subjects (sorted) whose val items add up to at least n_items."""
    out, total = [], 0
    for f in sorted((data / "mmlu" / "val").glob("*_val.csv")):
        out.append(f.name[:-len("_val.csv")])
        total += sum(1 for r in csv.reader(open(f, newline="")) if r)
        if total >= n_items:
            break
    return out


def run(items: int, copa: int, mmlu_shots: int, workdir: Path, batch_size: int = 16,
        cache: Path | None = None) -> dict:
    """Both harnesses on the same items; returns per-task accuracies and per-item loglikelihoods.

    `cache`: a JSON file keeping lm_eval's side (which does not change with lmlab's code) between runs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lmlab.checkpoints import load
    from lmlab.checkpoints.hf import export
    from lmlab.eval import evaluate

    model, tok = load("smollm2-135m")
    export(model, tok, workdir / "hf")
    subjects = mmlu_subjects(DATA, items)
    write_lm_eval_tasks(workdir, DATA, subjects)
    per_subject = max(sum(1 for r in csv.reader(open(DATA / "mmlu" / "val" / f"{s}_val.csv", newline="")) if r)
                      for s in subjects)  # every item of the chosen subjects: at least `items` in all
    plan = {"piqa": ("piqa", items), "boolq": ("boolq", items), "copa": ("copa", copa),
            "arc_easy_mosaic": (str(REPO / "configs/tasks/arc_easy_mosaic.yaml"), items),
            **{f"mmlu_{s}": (None, per_subject) for s in subjects}}
    timings = {}
    # lmlab
    t0 = time.perf_counter()
    ours = {}
    for name, (spec, limit) in plan.items():
        if spec is None:
            continue
        ours.update(evaluate(model, tok, [spec], data_dir=DATA, limit=limit, batch_size=batch_size,
                             log_samples=True, progress=False)["samples"])
    from lmlab.eval.tasks.builtin import suites
    mmlu_tasks = [t for t in suites.mmlu(DATA) if t.name[len("mmlu_"):] in subjects]
    ours.update(evaluate(model, tok, mmlu_tasks, limit=per_subject, num_fewshot=mmlu_shots, batch_size=batch_size,
                         log_samples=True, progress=False)["samples"])
    timings["lmlab_s"] = time.perf_counter() - t0
    # lm_eval
    key = f"{items}:{copa}:{mmlu_shots}"
    if cache is not None and cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        saved = json.loads(cache.read_text())
        return {"ours": ours, "theirs": saved["theirs"], "timings": {**timings, "lm_eval_s": saved["lm_eval_s"]}}
    hf_model = AutoModelForCausalLM.from_pretrained(workdir / "hf", dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(workdir / "hf")
    lm = HFLM(pretrained=hf_model, tokenizer=hf_tok, batch_size=batch_size)
    tm = TaskManager(include_path=str(workdir))
    theirs = {}
    t0 = time.perf_counter()
    groups: dict[tuple[int, int], list[str]] = {}
    for name, (_, limit) in plan.items():
        shots = mmlu_shots if name.startswith("mmlu_") else 0
        groups.setdefault((limit, shots), []).append(f"p_{name}")
    for (limit, shots), names in groups.items():
        res = simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, num_fewshot=shots,
                              log_samples=True, bootstrap_iters=0, verbosity="ERROR")
        for n in names:
            theirs[n[2:]] = res["samples"][n]
    timings["lm_eval_s"] = time.perf_counter() - t0
    if cache is not None:
        slim = {t: [{"doc_id": x["doc_id"], "arguments": [list(a[:2]) for a in x["arguments"]], "resps": [[[float(r[0][0]), bool(r[0][1])]] for r in x["resps"]],
                     "acc": x["acc"], "acc_norm": x["acc_norm"]} for x in v] for t, v in theirs.items()}
        cache.write_text(json.dumps({"key": key, "theirs": slim, "lm_eval_s": timings["lm_eval_s"]}))
    return {"ours": ours, "theirs": theirs, "timings": timings}


WIKITEXT_YAML = """task: p_wikitext
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: !function p_wikitext_fns.wikitext_detokenizer
process_results: !function p_wikitext_fns.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def hf_lm(model, tok, workdir: Path, **kwargs):
    """lm_eval's HF backend on the HF export of the same weights."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmlab.checkpoints.hf import export

    if not (workdir / "hf" / "config.json").is_file():
        export(model, tok, workdir / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(workdir / "hf", dtype=torch.float32).eval()
    return HFLM(pretrained=hf_model, tokenizer=AutoTokenizer.from_pretrained(workdir / "hf"), **kwargs)


def wikitext(docs: int | None, window: int, workdir: Path, batch_size: int = 8) -> dict:
    """Rolling log-likelihood of SmolLM2-135M over the wikitext file, `window` tokens per window.

    lmlab: its built-in `wikitext` task. lm_eval: its own wikitext task definition (its detokenizer and
    its process_results, which count words and bytes in the original text), on a dataset of the same
    documents (lmlab's article split of the file). Returns both results and per-document log-likelihoods."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lmlab.checkpoints import load
    from lmlab.eval import evaluate
    from lmlab.eval.tasks.builtin.wikitext import articles

    corpora = DATA.parent / "corpora"
    model, tok = load("smollm2-135m")
    t0 = time.perf_counter()
    ours = evaluate(model, tok, ["wikitext"], data_dir=corpora, limit=docs, max_length=window,
                    batch_size=batch_size, log_samples=True, progress=False)
    ours_s = time.perf_counter() - t0
    pages = articles((corpora / "wikitext-2-raw-test.txt").read_text(encoding="utf-8"))[:docs]
    _jsonl(workdir / "wikitext.jsonl", [{"page": p} for p in pages])
    (workdir / "p_wikitext.yaml").write_text(WIKITEXT_YAML.format(data=workdir / "wikitext.jsonl"))
    (workdir / "p_wikitext_fns.py").write_text(
        "from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa\n")
    lm = hf_lm(model, tok, workdir, batch_size=batch_size, max_length=window)
    t0 = time.perf_counter()
    theirs = simple_evaluate(model=lm, tasks=["p_wikitext"], task_manager=TaskManager(include_path=str(workdir)),
                             log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    theirs_s = time.perf_counter() - t0
    mine, other = ours["results"]["wikitext"], theirs["results"]["p_wikitext"]
    their_lls = {s["doc_id"]: float(s["resps"][0][0]) for s in theirs["samples"]["p_wikitext"]}
    diff = max(abs(s["resps"][0][0] - their_lls[s["doc_id"]]) for s in ours["samples"]["wikitext"])
    return {"docs": len(pages), "window": window, "max_doc_ll_diff": diff,
            **{f"{m}_lmlab": mine[m] for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")},
            **{f"{m}_lm_eval": other[f"{m},none"] for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")},
            "lmlab_s": ours_s, "lm_eval_s": theirs_s}


def _self_demo(context: str) -> bool:
    """Whether a few-shot context shows the scored item itself as one of its demonstrations (lm_eval does
    when the few-shot split holds a copy of the item, e.g. MMLU college_physics dev/val; lmlab never does)."""
    question = context.rsplit("\n\n", 1)[-1]
    return context.count(question) >= 2


def compare(out: dict) -> dict[str, dict]:
    """Per task (and all mmlu subjects together as "mmlu"): n, both accuracies, the largest per-item
    log-likelihood difference over items with the same prompts, and `self_demo`: items whose prompts
    differ only because lm_eval's context shows the scored item as a demonstration (excluded from the
    log-likelihood comparison, kept in the accuracies)."""
    report = {}
    for name, mine in out["ours"].items():
        if name not in out["theirs"]:
            continue
        theirs = {s["doc_id"]: s for s in out["theirs"][name]}
        diff, self_demo = 0.0, 0
        acc = {"acc": [0.0, 0.0], "acc_norm": [0.0, 0.0]}
        for s in mine:
            t = theirs[s["doc_id"]]
            if [a[0] for a in s["arguments"]] != [a[0] for a in t["arguments"]]:
                assert _self_demo(t["arguments"][0][0]), (name, s["doc_id"], "prompts differ")
                self_demo += 1
            else:
                for (ll, _), r in zip(s["resps"], t["resps"]):
                    diff = max(diff, abs(ll - float(r[0][0])))
            for m in acc:
                acc[m][0] += s[m]
                acc[m][1] += t[m]
        report[name] = {"n": len(mine), "max_ll_diff": diff, "self_demo": self_demo,
                        **{f"{m}_lmlab": v[0] for m, v in acc.items()}, **{f"{m}_lm_eval": v[1] for m, v in acc.items()}}
    subjects = [k for k in report if k.startswith("mmlu_")]
    if subjects:
        report["mmlu"] = {k: (max if k == "max_ll_diff" else sum)(report[s][k] for s in subjects)
                          for k in report[subjects[0]]}
        for s in subjects:
            del report[s]
    for r in report.values():
        for k in ("acc_lmlab", "acc_norm_lmlab", "acc_lm_eval", "acc_norm_lm_eval"):
            r[k] /= r["n"]
    return report


if __name__ == "__main__":
    import tempfile

    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--copa", type=int, default=100)
    ap.add_argument("--mmlu-shots", type=int, default=5)
    ap.add_argument("--cache", type=Path, help="keep lm_eval's results in this JSON file and reuse them")
    ap.add_argument("--wikitext", action="store_true", help="compare wikitext bits per byte instead")
    ap.add_argument("--docs", type=int, help="wikitext: the first N articles (default: all 62)")
    ap.add_argument("--window", type=int, default=2048, help="wikitext: tokens per rolling window")
    a = ap.parse_args()
    if a.wikitext:
        with tempfile.TemporaryDirectory() as d:
            w = wikitext(a.docs, a.window, Path(d))
        print(json.dumps(w, indent=1))
        print(f"bits per byte: lmlab {w['bits_per_byte_lmlab']:.5f}  lm_eval {w['bits_per_byte_lm_eval']:.5f}  "
              f"relative difference {abs(w['bits_per_byte_lmlab'] / w['bits_per_byte_lm_eval'] - 1):.2e}")
        raise SystemExit(0)
    with tempfile.TemporaryDirectory() as d:
        out = run(a.items, a.copa, a.mmlu_shots, Path(d), cache=a.cache)
    rep = compare(out)
    for k, v in rep.items():
        print(k, json.dumps({x: round(y, 5) for x, y in v.items()}))
    print("timings", out["timings"])
