"""Bad input on the command line, run in this process: each case is one line naming the flag, file or
field and what is allowed, exit code 1, and never the CLI's catch-all (conftest fails a test reaching it)."""
import io
import json
import re
from pathlib import Path

import pytest
import torch

from lmlab import cli
from lmlab.errors import LmlabError
from tiny_gguf import write_tiny

TASK = ("task: toy\ndataset_path: json\ndata_files: {test: toy.jsonl}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: 'Q: {{q}} A:'\ndoc_to_choice: '{{opts}}'\ndoc_to_target: label\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    write_tiny(folder / "tiny.gguf", n_layer=1, d_model=32, n_head=2, n_kv_head=1, d_ff=64)
    rows = [{"q": f"what is {i}", "opts": ["yes", "no"], "label": i % 2} for i in range(4)]
    (folder / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "toy.yaml").write_text(TASK)
    (folder / "a-file").write_text("a file, not a folder: convert must leave it alone")
    return folder


def run(capsys, monkeypatch, folder, argv, stdin=b""):
    monkeypatch.chdir(folder)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    with pytest.raises(SystemExit) as ended:
        cli.main(argv)
    captured = capsys.readouterr()
    return ended.value.code, captured.out, captured.err


GEN = ["generate", "-m", "tiny.gguf", "--max-new-tokens", "2"]
EVAL = ["eval", "-m", "tiny.gguf", "--tasks", "toy.yaml"]

CASES = {
    "seed-65-bits": ([*GEN, "-p", "hi", "--seed", str(2**64)], b"",
                     r"seed=18446744073709551616 is invalid \(must be an integer from 0 to 2\*\*64-1\)"),
    "threads-0": ([*GEN, "-p", "hi", "--threads", "0"], b"", r"--threads: must be an integer >= 1, got 0"),
    "stdin-not-utf8": ([*GEN, "-p", "-"], b"caf\xe9\n",
                       r"^lmlab generate: error: stdin: -p -: not UTF-8 text \(invalid byte 0xe9 at byte offset 3\)$"),
    "chat-stdin-not-utf8": (["chat", "-m", "tiny.gguf", "--max-new-tokens", "2"], b"caf\xe9\n",
                            r"stdin: chat input is not UTF-8 text"),
    "eval-max-length-0": ([*EVAL, "--max-length", "0"], b"", r"--max-length: 0 is out of range \(allowed: an integer >= 1\)"),
    "eval-rolling-stride-0": ([*EVAL, "--rolling-stride", "0"], b"",
                              r"--rolling-stride: 0 is out of range \(allowed: an integer >= 1\)"),
    "eval-num-fewshot-negative": ([*EVAL, "--num-fewshot", "-1"], b"",
                                  r"--num-fewshot: -1 is out of range \(allowed: an integer >= 0\)"),
    "eval-seed-65-bits": ([*EVAL, "--seed", str(2**64)], b"",
                          r"--seed: 18446744073709551616 is out of range \(allowed: an integer from 0 to 2\*\*64-1\)"),
    "eval-threads-0": ([*EVAL, "--threads", "0"], b"", r"--threads: must be an integer >= 1, got 0"),
    "convert-onto-a-file": (["convert", "-m", "tiny.gguf", "-o", "a-file"], b"",
                            r"a-file: is a file, expected a folder to write the lmlab checkpoint into"),
    "convert-under-a-file": (["convert", "-m", "tiny.gguf", "-o", "a-file/out"], b"",
                             r"a-file/out/config.json: cannot write here \(a-file is not a writable folder\)"),
    "objective-weight-negative": (["pretrain", "objectives.0.weight=-1", "--print-config"], b"",
                                  r"objectives\[0\]: weight: -1 is out of range \(allowed: a number >= 0\)"),
    "objective-weight-string": (["pretrain", "objectives.0.weight=abc", "--print-config"], b"",
                                r"objectives\[0\]: weight: 'abc' is out of range"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_command_line_is_one_line(folder, capsys, monkeypatch, case):
    argv, stdin, message = CASES[case]
    code, _, err = run(capsys, monkeypatch, folder, argv, stdin)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"lmlab {argv[0]}: error: ") and re.search(message, lines[0]), lines[0]
    assert (folder / "a-file").read_text().startswith("a file")


def test_kv_cache_beyond_free_memory_is_refused_before_allocating(monkeypatch):
    """100 prompts x 8000 new tokens on SmolLM2's shape would take ~37 GB of KV cache: refused up front,
    saying what is needed and what fits; the estimate is what a cache really holds."""
    from lmlab.config import preset
    from lmlab.inference import runner as runner_module
    from lmlab.inference.generate import generate_tokens
    from lmlab.inference.sampling import GenerationConfig
    from lmlab.model import Transformer

    model = Transformer(preset("tiny-llama", vocab_size=64, n_layer=2, d_model=32, n_head=2, n_kv_head=1, d_ff=64,
                               max_seq_len=128)).eval()
    run = runner_module.Runner(model)
    cache = model.make_cache(3, 40)
    assert run.cache_bytes(3, 40) == sum(t.numel() * t.element_size() for t in [*cache.k, *cache.v])
    monkeypatch.setattr(runner_module, "free_memory", lambda device: 10 * run.cache_bytes(1, 128))
    monkeypatch.setattr(model, "make_cache", lambda *a, **k: pytest.fail("the cache was allocated"))
    prompts = [[1, 2, 3]] * 100
    with pytest.raises(LmlabError, match=r"the KV cache for 100 prompt\(s\) x 128 positions needs 3.1 MiB but 0.3 MiB is "
                                         r"free on cpu \(that fits 10 prompt\(s\) of this length, or 12 positions for "
                                         r"100: pass fewer prompts or a lower --max-new-tokens\)"):
        generate_tokens(run, prompts, GenerationConfig(max_new_tokens=8000, temperature=0), stop_ids=[], pad_id=0)
    with torch.device("meta"):
        smollm2 = runner_module.Runner(Transformer(preset("smollm2-135m")))
    assert 37e9 < smollm2.cache_bytes(100, 8192) < 38e9  # the 37 GB


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_eval_output_that_cannot_be_written_fails_before_the_run(folder, capsys, monkeypatch, where):
    """Checked by writing a probe file, not by permission bits (which say yes to root, also for /proc)."""
    from lmlab.inference import load as runtime

    if where == "proc" and not (Path("/proc") / "self").is_dir():
        pytest.skip("no /proc here")
    out = folder / "a-file" / "r.json" if where == "under-a-file" else Path("/proc/lmlab-test/r.json")
    monkeypatch.setattr(runtime, "load", lambda *a, **k: pytest.fail("the run started"))
    code, _, err = run(capsys, monkeypatch, folder, [*EVAL, "--output", str(out)])
    assert code == 1 and err.strip() == f"lmlab eval: error: {out}: cannot write here ({out.parents[1 if where == 'proc' else 0]} " \
                                        f"is not a writable folder)"


def test_eval_prints_the_table_before_writing(folder, capsys, monkeypatch):
    """A write that fails after the run (disk full, say) still leaves the results table on stdout."""
    from lmlab.eval import report

    def full(path, *a):
        raise LmlabError(f"{path}: no space left on device")

    monkeypatch.setattr(report, "write_results", full)
    code, out, err = run(capsys, monkeypatch, folder, [*EVAL, "--output", "out/r.json", "--threads", "1"])
    assert code == 1 and "no space left" in err
    assert "| toy | 4 | acc |" in out
