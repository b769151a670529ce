"""1-process and 2-process (torchrun, gloo) evaluation give the same per-item scores, through the Python
API and through `lmlab eval`."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r'''
import json, string, sys, torch, torch.distributed as dist
from lmlab.config import preset
from lmlab.model import Transformer
from lmlab.tokenizer import Tokenizer
from lmlab.eval import evaluate
if "WORLD_SIZE" in __import__("os").environ:
    dist.init_process_group("gloo")
torch.manual_seed(0)
tok = Tokenizer.char_level(string.printable)
model = Transformer(preset("tiny-llama", vocab_size=tok.vocab_size, max_seq_len=512)).eval()
r = evaluate(model, tok, [sys.argv[1]], batch_size=2, log_samples=True, progress=False)
if not dist.is_initialized() or dist.get_rank() == 0:
    json.dump({"acc": r["results"]["toy"]["acc"], "lls": [[x[0] for x in s["resps"]] for s in r["samples"]["toy"]],
               "procs": r["config"]["processes"]}, open(sys.argv[2], "w"))
if dist.is_initialized():  # leave no gloo thread running into interpreter shutdown
    dist.barrier()
    dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not available")
    rows = [{"q": f"what is {i}", "opts": ["yes", "no", "maybe so"], "label": i % 3} for i in range(10)]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy.yaml").write_text("task: toy\ndataset_path: json\ndata_files: {test: toy.jsonl}\n"
                                       "test_split: test\noutput_type: multiple_choice\n"
                                       "doc_to_text: 'Q: {{q}} A:'\ndoc_to_choice: '{{opts}}'\ndoc_to_target: label\n")
    (tmp_path / "run.py").write_text(SCRIPT)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    subprocess.run([sys.executable, tmp_path / "run.py", tmp_path / "toy.yaml", tmp_path / "one.json"], check=True)
    subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29517", tmp_path / "run.py",
                    tmp_path / "toy.yaml", tmp_path / "two.json"], check=True)
    one, two = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert one["procs"] == 1 and two["procs"] == 2
    assert one["acc"] == two["acc"]
    for a, b in zip(one["lls"], two["lls"]):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.slow
def test_eval_command_under_torchrun(tmp_path):
    """`torchrun -m lmlab eval`: both processes take part, rank 0 alone prints and writes, and the
    results equal one process's."""
    if not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not available")
    from tiny_gguf import write_tiny

    write_tiny(tmp_path / "tiny.gguf")
    rows = [{"q": f"what is {i}", "opts": ["yes", "no", "maybe so"], "label": i % 3} for i in range(10)]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "toy.yaml").write_text("task: toy\ndataset_path: json\ndata_files: {test: toy.jsonl}\n"
                                       "test_split: test\noutput_type: multiple_choice\n"
                                       "doc_to_text: 'Q: {{q}} A:'\ndoc_to_choice: '{{opts}}'\ndoc_to_target: label\n")
    args = ["-m", "lmlab", "eval", "-m", str(tmp_path / "tiny.gguf"), "--tasks", str(tmp_path / "toy.yaml"),
            "--batch-size", "2", "--log-samples", "--output"]
    root = Path(__file__).resolve().parents[2]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one.json")], cwd=root, capture_output=True,
                         text=True, check=True)
    two = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "--master-port",
                          "29519", *args, str(tmp_path / "two.json")], cwd=root, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("| toy | 10 | acc |") == 1 and one.stdout.count("| toy | 10 | acc |") == 1
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (a["config"]["processes"], b["config"]["processes"]) == (1, 2)
    assert a["results"]["toy"]["acc"] == b["results"]["toy"]["acc"]
    for x, y in zip(*((json.loads(line) for line in (tmp_path / f"{n}_samples_toy.jsonl").read_text().splitlines())
                      for n in ("one", "two"))):
        assert [r[0] for r in x["resps"]] == pytest.approx([r[0] for r in y["resps"]], abs=1e-5)
