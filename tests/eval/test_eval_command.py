"""`lmlab eval` end to end on a tiny GGUF model: the table, the results and samples files, the run
options reaching the model, and one-line errors for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab import cli
from lmlab.inference import load as runtime
from lmlab.eval import evaluate
from lmlab.eval.command import EvalArgs
from tiny_gguf import write_tiny

ROOT = Path(__file__).resolve().parents[2]
TASK = ("task: toy\ndataset_path: json\ndata_files: {test: toy.jsonl}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: 'Q: {{q}} A:'\ndoc_to_choice: '{{opts}}'\ndoc_to_target: label\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evalcmd")
    write_tiny(folder / "tiny.gguf")
    rows = [{"q": f"what is {i}", "opts": ["yes", "no", "maybe so"], "label": i % 3} for i in range(6)]
    (folder / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "toy.yaml").write_text(TASK)
    return folder


def test_eval_writes_results_and_samples_with_the_run_options(setup, tmp_path):
    out = tmp_path / "new" / "r.json"
    proc = subprocess.run([sys.executable, "-m", "lmlab", "eval", "-m", str(setup / "tiny.gguf"), "--tasks",
                           str(setup / "toy.yaml"), "--batch-size", "4", "--output", str(out), "--log-samples",
                           "--quantize", "int8", "--threads", "1"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    records = [json.loads(line) for line in (out.parent / "r_samples_toy.jsonl").read_text().splitlines()]
    assert len(records) == 6 and results["n-samples"]["toy"] == {"original": 6, "effective": 6}
    assert results["config"]["run"] == {"dtype": "float32", "quantize": "int8", "group_size": 32, "device": None,
                                        "compile": False, "threads": 1, "adapter": None}
    acc = results["results"]["toy"]["acc"]
    assert f"| toy | 6 | acc | {acc:.4f} |" in proc.stdout
    # the same numbers as the int8 model evaluated in-process, and not those of the float32 model
    int8, tok = runtime.load(str(setup / "tiny.gguf"), runtime.RunConfig(quantize="int8", threads=1))
    f32, _ = runtime.load(str(setup / "tiny.gguf"))
    lls = {name: [[r[0] for r in s["resps"]] for s in evaluate(
        m, tok, [str(setup / "toy.yaml")], batch_size=4, log_samples=True, progress=False)["samples"]["toy"]]
        for name, m in (("int8", int8), ("float32", f32))}
    cli_lls = [[r[0] for r in s["resps"]] for s in records]
    assert cli_lls == [pytest.approx(x, abs=1e-5) for x in lls["int8"]]
    assert max(abs(a - b) for x, y in zip(cli_lls, lls["float32"]) for a, b in zip(x, y)) > 1e-5


def test_eval_args_take_the_run_options_from_the_runtime():
    a = cli.build_parser().parse_args(["eval", "-m", "m", "--tasks", "t", "--dtype", "bfloat16", "--quantize", "int4",
                                       "--group-size", "64", "--limit", "3"])
    args = EvalArgs.from_namespace(a)
    assert args.run == runtime.RunConfig(dtype="bfloat16", quantize="int4", group_size=64)
    assert (args.model, args.tasks, args.limit, args.batch_size) == ("m", "t", 3, 32)


@pytest.mark.parametrize("extra,message", [
    (["--limit", "0"], r"--limit must be at least 1 \(got 0\)"),
    (["--tasks", "pqia", "--data-dir", "."], r"unknown task 'pqia' \(did you mean 'piqa'\?\)"),
    (["--tasks", "piqa"], r"task 'piqa' reads its files from --data-dir; none given"),
    (["--output", "."], r"\.: is a folder, expected a file path"),
    (["--tasks", "bad.yaml"], r"bad.yaml: unknown key 'doc_to_txt' \(did you mean 'doc_to_text'\?\)"),
])
def test_bad_input_is_a_one_line_error(setup, capsys, monkeypatch, extra, message):
    import re

    monkeypatch.chdir(setup)
    (setup / "bad.yaml").write_text(TASK + "doc_to_txt: x\n")
    argv = ["eval", "-m", str(setup / "tiny.gguf"), "--tasks", "toy.yaml", *extra]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmlab eval: error: ") and re.search(message, err[0]), err


GEN_TASK = ("task: gen\ndataset_path: json\ndata_files: {test: gen.jsonl}\ntest_split: test\n"
            "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
            "generation_kwargs: {until: ['\\n\\n'], max_gen_toks: 12}\nmetric_list: [{metric: exact_match}]\n")


def test_eval_generation_with_speculation_gives_the_same_answers(setup, tmp_path):
    """`lmlab eval --draft M` / `--prompt-lookup N`: generation requests decode speculatively, and under
    greedy decoding every generated answer (hence every score) equals plain decoding's."""
    rows = [{"q": f"the the the cat {i} the the", "a": "x"} for i in range(5)]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "gen.yaml").write_text(GEN_TASK)
    model = str(setup / "tiny.gguf")

    def answers(*extra):
        out = tmp_path / f"r{len(extra)}{extra[:1]}.json"
        proc = subprocess.run([sys.executable, "-m", "lmlab", "eval", "-m", model, "--tasks", str(tmp_path / "gen.yaml"),
                               "--output", str(out), "--log-samples", "--threads", "1", *extra],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr
        samples = (out.with_name(f"{out.stem}_samples_gen.jsonl")).read_text().splitlines()
        return [json.loads(line)["resps"] for line in samples], json.loads(out.read_text())["results"]

    plain = answers()
    assert answers("--prompt-lookup", "3") == plain
    assert answers("--draft", model, "--speculate", "3") == plain


def test_evaluate_hands_the_speculation_to_generation(setup, tmp_path, monkeypatch):
    """The speculation evaluate() is given is the one generation requests decode with (a pass counter on
    the speculative step proves it is used), and the answers equal plain decoding's."""
    from lmlab.inference import drafting

    rows = [{"q": f"the the the cat {i} the the", "a": "x"} for i in range(3)]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "gen.yaml").write_text(GEN_TASK)
    runner, tok = runtime.load(str(setup / "tiny.gguf"), runtime.RunConfig(threads=1))
    passes = []
    real = drafting.speculative_step
    monkeypatch.setattr(drafting, "speculative_step", lambda *a, **k: passes.append(1) or real(*a, **k))
    kw = dict(log_samples=True, progress=False)
    plain = evaluate(runner, tok, [str(tmp_path / "gen.yaml")], **kw)["samples"]["gen"]
    assert not passes
    spec = runtime.load_speculation(runner, tok, prompt_lookup=3, adapt=False)
    fast = evaluate(runner, tok, [str(tmp_path / "gen.yaml")], speculation=spec, **kw)["samples"]["gen"]
    assert passes and [s["resps"] for s in fast] == [s["resps"] for s in plain]
