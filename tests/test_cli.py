"""The command line: every bad input is a one-line error and a non-zero exit."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab import cli
from lmlab.checkpoints import load, native
from tiny_gguf import write_tiny

ROOT = Path(__file__).resolve().parents[1]


UNEXPECTED = cli.unexpected  # conftest replaces it by a failure in every test; the fallback's own test restores it


def lmlab(*args, stdin=None, env=None):
    proc = subprocess.run([sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, input=stdin,
                          cwd=ROOT, env=env, timeout=600)
    assert cli.FALLBACK not in proc.stderr, f"reached the CLI fallback: {proc.stderr}"
    return proc


def one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert re.search(n, lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.gguf"
    write_tiny(path)
    return path


def test_help_lists_commands():
    out = lmlab("--help").stdout
    for cmd in ["download", "generate", "chat", "convert", "info", "eval"]:
        assert cmd in out


def test_unknown_preset_lists_known_ones():
    one_line_error(lmlab("info", "-m", "gpt-17"), "unknown model 'gpt-17'", "smollm2-135m")


def test_truncated_gguf(tmp_path):
    path = tmp_path / "cut.gguf"
    write_tiny(path, truncate=30000)
    one_line_error(lmlab("info", "-m", str(path)), "cut.gguf", "truncated|not a readable")


def test_info_reports_architecture(tiny):
    out = lmlab("info", "-m", str(tiny))
    assert out.returncode == 0, out.stderr
    assert "decoder (llama)" in out.stdout and "context length" in out.stdout and "chat template yes" in out.stdout


def test_native_checkpoint_errors(tiny, tmp_path):
    model, tok = load(str(tiny))
    folder = native.save(model, tok, tmp_path / "ckpt")
    # corrupted weights file
    bad = tmp_path / "bad"
    native.save(model, tok, bad)
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:1000])
    one_line_error(lmlab("info", "-m", str(bad)), "model.safetensors")
    # config that doesn't match the tensors
    cfg = json.loads((folder / "lmlab.json").read_text())
    cfg["d_ff"] = 96
    (folder / "lmlab.json").write_text(json.dumps(cfg))
    one_line_error(lmlab("generate", "-m", str(folder), "-p", "hi"), r"mlp\.gate_up\.weight", "shape")


def test_prompt_longer_than_context(tiny):
    prompt = "Paris is the capital of France. " * 100  # far beyond the 256-token context
    one_line_error(lmlab("generate", "-m", str(tiny), "-p", prompt, "--max-new-tokens", "4"), "context")


def test_bad_sampling_value(tiny):
    one_line_error(lmlab("generate", "-m", str(tiny), "-p", "hi", "--top-p", "1.5"), "top_p")


def greedy(model, tok, ids: list[int], n: int) -> str:
    """The greedy continuation by plain full forward passes (no cache, no sampling code): the reference
    the CLI's output is checked against."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if t in tok.stop_ids:
                break
            new.append(t)
    return tok.decode(new)


def test_convert_roundtrip_and_generate(tiny, tmp_path):
    out = tmp_path / "native"
    assert lmlab("convert", "-m", str(tiny), "-o", str(out)).returncode == 0
    a, tok = load(str(tiny))
    b, _ = load(str(out))
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    gen = lmlab("generate", "-m", str(out), "-p", "The quick", "--max-new-tokens", "5", "--temperature", "0")
    assert gen.returncode == 0, gen.stderr
    continuation = greedy(b, tok, tok.encode("The quick"), 5)
    assert continuation.strip()  # the model says something, and the CLI prints exactly that
    assert gen.stdout == "The quick" + continuation + "\n"


def test_no_load_path_runs_code():
    src = "\n".join(p.read_text() for p in (ROOT / "lmlab").rglob("*.py"))
    assert "trust_remote_code=True" not in src
    assert not re.search(r"^\s*import pickle|^\s*from pickle", src, re.M)
    for call in re.findall(r"torch\.load\([^)]*\)", src):
        assert "weights_only=True" in call, call


@pytest.mark.slow
def test_generate_names_paris(smollm2_path):
    out = lmlab("generate", "-m", "smollm2-135m", "-p", "The capital of France is", "--max-new-tokens", "16",
                "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_run_options_reach_generate_and_chat(tiny):
    """--dtype/--quantize/--threads are load-time choices: the CLI's greedy tokens are those of the
    model loaded in-process with the same RunConfig."""
    from lmlab.inference import load as runtime

    for opts, run in ((["--quantize", "int8", "--threads", "1"], runtime.RunConfig(quantize="int8", threads=1)),
                      (["--quantize", "int4", "--group-size", "32"], runtime.RunConfig(quantize="int4", group_size=32)),
                      (["--dtype", "bfloat16"], runtime.RunConfig(dtype="bfloat16"))):
        out = lmlab("generate", "-m", str(tiny), "-p", "The quick", "--max-new-tokens", "6", "--temperature", "0",
                    "--stats", *opts)
        assert out.returncode == 0, (opts, out.stderr)
        runner, tok = runtime.load(str(tiny), run)
        assert out.stdout == "The quick" + greedy(runner.model, tok, tok.encode("The quick"), 6) + "\n", opts
        assert re.search(r"\[\d+ tokens in [\d.]+ s: [\d.]+ tok/s; finish: \w+\]", out.stderr), opts
    chat = lmlab("chat", "-m", str(tiny), "--quantize", "int8", "--max-new-tokens", "3", "--temperature", "0",
                 stdin="hello\n")
    assert chat.returncode == 0, chat.stderr
    runner, tok = runtime.load(str(tiny), runtime.RunConfig(quantize="int8"))
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert chat.stdout == greedy(runner.model, tok, tok.encode(prompt, add_special_tokens=False), 3) + "\n"
    bad = lmlab("generate", "-m", str(tiny), "-p", "x", "--quantize", "int3")
    assert bad.returncode != 0 and "int3" in bad.stderr


def test_unexpected_exception_is_one_line_with_the_debug_hint(monkeypatch, capsys):
    """The catch-all: one line naming the exception and the --debug hint (an empty message still says
    something); --debug anywhere on the line shows the traceback instead."""
    from lmlab import commands

    monkeypatch.setattr(cli, "unexpected", UNEXPECTED)  # this test is about the fallback itself
    monkeypatch.setattr(commands, "info", lambda model: {}[model])
    with pytest.raises(SystemExit) as ended:
        cli.main(["info", "-m", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert ended.value.code == 1
    assert err == [f"lmlab info: unexpected error: KeyError: 'x' ({cli.FALLBACK})"]
    monkeypatch.setattr(commands, "info", lambda model: exec("raise ValueError('')"))
    with pytest.raises(SystemExit):
        cli.main(["info", "-m", "x"])
    assert capsys.readouterr().err.strip() == f"lmlab info: unexpected error: ValueError: ValueError ({cli.FALLBACK})"
    with pytest.raises(ValueError):
        cli.main(["info", "-m", "x", "--debug"])
