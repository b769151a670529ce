"""Bounded mutation fuzz of lmlab's readers: every outcome is a successful load or an LmlabError.

Seed inputs (written once per run): a tiny GGUF (tests/tiny_gguf.py), a tiny lmlab checkpoint folder
(lmlab.json + model.safetensors), a tiny HF folder (config.json + model.safetensors) and two task YAML
files (multiple choice; generation with few-shot, filters and generation_kwargs) over a small jsonl. Each
case mutates one of them (header bytes, the JSON text, or the YAML's values, keys and characters) with a
seeded RNG and loads it in a worker process (a task is evaluated on a tiny random model); any other exception type, a crash or a case running past its timeout is a failure that
names the target and seed, so `python -m tests.fuzz --case TARGET:SEED` reproduces it.

    python -m tests.fuzz --minutes 10        # the long run; prints counts per outcome
    tests/test_fuzz.py                       # the bounded run in the suite (<= 60 s)

A new target is one entry in TARGETS: a function that writes the seed file(s) into a folder and returns
what to mutate, and a function that loads it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_gguf, when run as python -m tests.fuzz

CASE_TIMEOUT_S = 20.0  # one case; a worker imports torch and lmlab before it reports ready
STARTUP_TIMEOUT_S = 300.0  # importing torch on a machine other jobs keep busy
MEMORY_LIMIT = 4 << 30  # a reader that allocates more than this for a tiny file has trusted a count


@dataclass(frozen=True)
class Target:
    name: str
    make: Callable[[Path], Path]  # write the seed input under a folder; return the file to mutate
    region: Callable[[bytes], int]  # how many leading bytes of that file to mutate
    load: Callable[[Path], object]  # load the (mutated) input; LmlabError is a fine outcome
    text: str = ""  # "json" or "yaml": mutate as text of that kind rather than bytes


# --- seed inputs ----------------------------------------------------------------------------------

def make_gguf(folder: Path) -> Path:
    from tiny_gguf import write_tiny

    path = folder / "tiny.gguf"
    write_tiny(path, n_layer=1, d_model=32, n_head=2, n_kv_head=1, d_ff=64)
    return path


def _tiny_model():
    import torch

    from lmlab.config import preset
    from lmlab.model import Transformer

    torch.manual_seed(0)
    return Transformer(preset("tiny-llama", vocab_size=64, n_layer=1, d_model=32, n_head=2, n_kv_head=1,
                              d_ff=64, max_seq_len=32))


def make_native(folder: Path) -> Path:
    from lmlab.checkpoints import native

    native.save(_tiny_model(), None, folder / "native")
    return folder / "native" / native.WEIGHTS_NAME


def make_hf(folder: Path) -> Path:
    from lmlab.checkpoints.hf.writer import export

    export(_tiny_model(), None, folder / "hf")
    return folder / "hf" / "model.safetensors"


def make_lmlab_json(folder: Path) -> Path:
    return make_native(folder).parent / "lmlab.json"


def make_config_json(folder: Path) -> Path:
    return make_hf(folder).parent / "config.json"


TASK_ROWS = [{"q": f"what is {i}?", "opts": ["yes", "no", "maybe"], "label": i % 3, "answer": f"#### {i}"}
             for i in range(4)]
TASK_MC = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: toy.jsonl
test_split: test
output_type: multiple_choice
description: "Answer the question.\\n\\n"
doc_to_text: "Q: {{q}}\\nA:"
doc_to_choice: "{{opts}}"
doc_to_target: label
target_delimiter: " "
num_fewshot: 1
metric_list:
  - metric: acc
  - metric: acc_norm
"""
TASK_GEN = """task: toy_gen
dataset_path: json
data_files: {test: toy.jsonl, train: toy.jsonl}
test_split: test
fewshot_split: train
output_type: generate_until
doc_to_text: "Question: {{q}}\\nAnswer:"
doc_to_target: answer
fewshot_delimiter: "\\n\\n"
num_fewshot: 2
fewshot_config:
  sampler: first_n
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  max_gen_toks: 4
  temperature: 0
metric_list:
  - metric: exact_match
    ignore_case: true
filter_list:
  - name: strict
    filter:
      - function: regex
        regex_pattern: '#### (\\d+)'
      - function: take_first
"""


def make_task(folder: Path, name: str, text: str) -> Path:
    (folder / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TASK_ROWS))
    (folder / name).write_text(text)
    return folder / name


_EVAL_MODEL = []


def evaluate_task(path: Path):
    """Evaluate the task on a tiny random model with a character tokenizer (built once per worker)."""
    import string

    from lmlab.config import preset
    from lmlab.eval import evaluate
    from lmlab.model import Transformer
    from lmlab.tokenizer import Tokenizer

    if not _EVAL_MODEL:
        tok = Tokenizer.char_level(string.printable)
        cfg = preset("tiny-llama", vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, n_kv_head=1, d_ff=64,
                     max_seq_len=256)
        _EVAL_MODEL.append((Transformer(cfg).eval(), tok))
    model, tok = _EVAL_MODEL[0]
    return evaluate(model, tok, [str(path)], limit=3, batch_size=4, progress=False, log_samples=True)


def gguf_header_size(data: bytes) -> int:
    """Bytes before the first tensor's data: KV and tensor-info region (found by the tensor names' end)."""
    end = data.rfind(b"blk.0.ffn_down.weight")
    return min(len(data), (end if end > 0 else 4096) + 64)


def safetensors_header_size(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def read_spec(path: Path):
    from lmlab.checkpoints import read

    spec = path if path.suffix == ".gguf" else path.parent
    return read(str(spec))


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("gguf", make_gguf, gguf_header_size, read_spec),
    Target("safetensors", make_native, safetensors_header_size, read_spec),
    Target("hf-safetensors", make_hf, safetensors_header_size, read_spec),
    Target("lmlab.json", make_lmlab_json, len, read_spec, text="json"),
    Target("config.json", make_config_json, len, read_spec, text="json"),
    Target("task-mc.yaml", lambda d: make_task(d, "task-mc.yaml", TASK_MC), len, evaluate_task, text="yaml"),
    Target("task-gen.yaml", lambda d: make_task(d, "task-gen.yaml", TASK_GEN), len, evaluate_task, text="yaml"),
)}

_SEED_NAMES = {"gguf": "tiny.gguf", "safetensors": "model.safetensors", "hf-safetensors": "model.safetensors",
               "lmlab.json": "lmlab.json", "config.json": "config.json", "task-mc.yaml": "task-mc.yaml",
               "task-gen.yaml": "task-gen.yaml"}

# targets that check the harness itself (never part of a fuzz run)
SELFTEST: dict[str, Callable[[Path], object]] = {"hang": lambda path: time.sleep(3600), "crash": lambda path: os._exit(3)}


# --- mutations ------------------------------------------------------------------------------------

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF]
INTERESTING_64 = [0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]
JSON_VALUES = ["0", "-1", "1e309", "NaN", "-0.5", "2147483648", "9" * 30, '"x"', "[]", "{}", "null", "true",
               '"\\u00ff"', "[1, 2]"]


def mutate_bytes(data: bytes, region: int, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(max(1, region))
        kind = rng.randrange(5)
        if kind == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[at] = rng.choice(INTERESTING)
        elif kind == 2 and at + 8 <= len(buf):
            buf[at:at + 8] = struct.pack("<Q", rng.choice(INTERESTING_64))
        elif kind == 3:
            del buf[at:at + rng.randint(1, 16)]
        else:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    if rng.random() < 0.05:
        del buf[rng.randrange(len(buf)):]  # truncation
    return bytes(buf)


def mutate_text(data: bytes, rng: random.Random) -> bytes:
    text = data.decode("utf-8")
    values = [m.span() for m in re.finditer(r'-?\d+(\.\d+)?(e-?\d+)?|"[^"]*"|true|false|null', text)]
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(4)
        if kind <= 1 and values:  # replace a value (or a key) by a value of another type or range
            a, b = rng.choice(values)
            text = text[:a] + rng.choice(JSON_VALUES) + text[b:]
            values = [m.span() for m in re.finditer(r'-?\d+(\.\d+)?(e-?\d+)?|"[^"]*"|true|false|null', text)]
        elif kind == 2 and text:
            at = rng.randrange(len(text))
            text = text[:at] + text[at + rng.randint(1, 4):]
        elif text:
            at = rng.randrange(len(text))
            text = text[:at] + rng.choice(['"', "{", "]", ",", ":", "\\"]) + text[at:]
    out = text.encode("utf-8")
    if rng.random() < 0.1:
        out = out.replace(b'"', b'"\xff', 1)  # not UTF-8
    return out


YAML_VALUES = ["0", "-1", "2147483648", "1e309", ".nan", "-0.5", "~", "", "true", "x", '"x"', "[]", "{}",
               "[1, 2]", "{a: 1}", "[[1]]", "!function utils.f", "'{{ q }}'", "'{{ nope }}'", "'{{ q'", "'{{ opts }}'",
               "'{{ label }}'", "[a, b]", "[\"\"]", "'(unclosed'", "'#### (\\d+)'", "-", "'\\u00ff'", "&a x", "*a"]
YAML_KEYS = ["num_fewshot", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "description",
             "target_delimiter", "fewshot_delimiter", "generation_kwargs", "until", "max_gen_toks", "temperature",
             "metric_list", "metric", "filter_list", "filter", "function", "regex_pattern", "group_select",
             "fewshot_config", "sampler", "test_split", "fewshot_split", "data_files", "dataset_kwargs", "task",
             "repeats", "ignore_case", "line_pattern", "dataset_path"]


def mutate_yaml(data: bytes, rng: random.Random) -> bytes:
    """Replace a value or a key, drop or duplicate a line, or edit characters of a YAML file."""
    lines = data.decode("utf-8").split("\n")
    for _ in range(rng.randint(1, 3)):
        n = rng.randrange(len(lines))
        line = lines[n]
        key, colon, value = line.partition(":")
        kind = rng.randrange(6)
        if kind <= 1 and colon:  # a value of another type, shape or range
            lines[n] = f"{key}: {rng.choice(YAML_VALUES)}"
        elif kind == 2 and colon:  # another key (at the same indentation)
            indent = key[:len(key) - len(key.lstrip())]
            lines[n] = f"{indent}{key.lstrip()[:2] if key.lstrip().startswith('- ') else ''}{rng.choice(YAML_KEYS)}:{value}"
        elif kind == 3:
            del lines[n]
        elif kind == 4:
            lines.insert(n, line)
        elif line:
            at = rng.randrange(len(line))
            lines[n] = line[:at] + rng.choice(["", '"', "'", "{", "[", "]", ",", ":", "\\", "  ", "-", "#", "{{", "}}"]) + \
                line[at + rng.randint(0, 2):]
        if not lines:
            lines = [""]
    out = "\n".join(lines).encode("utf-8")
    if rng.random() < 0.05:
        out = out.replace(b"Q", b"Q\xe9", 1)  # not UTF-8
    return out


def mutated(target: Target, seed_data: bytes, seed: int) -> bytes:
    rng = random.Random(f"{target.name}:{seed}")
    if target.text == "yaml":
        return mutate_yaml(seed_data, rng)
    if target.text:
        return mutate_text(seed_data, rng)
    return mutate_bytes(seed_data, target.region(seed_data), rng)


# --- running cases in a worker with a timeout ------------------------------------------------------

def _worker(conn, memory_limit: int) -> None:
    import resource

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if memory_limit:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    import torch

    from lmlab.errors import LmlabError

    torch.set_num_threads(1)
    import lmlab.checkpoints  # noqa: F401 - imported before the first case's clock starts
    import lmlab.eval  # noqa: F401

    conn.send(("ready", ""))
    while True:
        job = conn.recv()
        if job is None:
            return
        name, path = job
        try:
            (SELFTEST[name] if name in SELFTEST else TARGETS[name].load)(Path(path))
            conn.send(("ok", ""))
        except LmlabError as e:
            message = str(e)
            conn.send(("lmlab-error", "" if "\n" not in message else f"multi-line message: {message!r}"))
        except BaseException as e:  # noqa: BLE001 - that is the finding
            conn.send((type(e).__name__, "".join(traceback.format_exception(e)[-3:])))


class Pool:
    """One worker process; replaced when a case times out or kills it."""

    def __init__(self, memory_limit: int = MEMORY_LIMIT):
        self.ctx, self.memory_limit, self.proc = mp.get_context("spawn"), memory_limit, None

    def start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, self.memory_limit), daemon=True)
        self.proc.start()
        child.close()  # so a dead worker reads as end-of-file here
        if not self.conn.poll(STARTUP_TIMEOUT_S) or self.conn.recv() != ("ready", ""):
            self.proc.kill()
            raise RuntimeError(f"fuzz worker did not start within {STARTUP_TIMEOUT_S:.0f} s")

    def run(self, name: str, path: Path, timeout: float) -> tuple[str, str]:
        if self.proc is None or not self.proc.is_alive():
            self.start()
        self.conn.send((name, str(path)))
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
            self.proc = None
            return "timeout", f"no answer within {timeout:.0f} s"
        code = self.proc.exitcode
        self.proc = None
        return "crash", f"worker exit code {code}"

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()


@dataclass
class Report:
    counts: Counter
    failures: list[str]


def _seed_input(name: str, work: Path) -> tuple[Path, bytes]:
    seed_dir = work / "seed" / name
    if not seed_dir.is_dir() or not any(seed_dir.iterdir()):
        seed_dir.mkdir(parents=True, exist_ok=True)
        TARGETS[name].make(seed_dir)
    path = next(p for p in seed_dir.rglob("*") if p.is_file() and p.name == _SEED_NAMES[name])
    return path, path.read_bytes()


def _write_case(name: str, path: Path, data: bytes, case_seed: int, work: Path) -> Path:
    trial = work / "case" / name
    shutil.rmtree(trial, ignore_errors=True)
    shutil.copytree(path.parent, trial)
    (trial / path.name).write_bytes(mutated(TARGETS[name], data, case_seed))
    return trial / path.name


def run_case(name: str, case_seed: int, work: Path, timeout: float = CASE_TIMEOUT_S) -> tuple[str, str]:
    """One case again: (outcome, detail)."""
    path, data = _seed_input(name, work)
    pool = Pool()
    try:
        return pool.run(name, _write_case(name, path, data, case_seed, work), timeout)
    finally:
        pool.close()


def fuzz(seconds: float, seed: int = 0, targets: list[str] | None = None, timeout: float = CASE_TIMEOUT_S,
         work: Path | None = None, replay: list[tuple[str, int]] = ()) -> Report:
    """Mutate and load cases round-robin over the targets until `seconds` have passed (after the
    (target, seed) cases of `replay`, e.g. failures found earlier)."""
    names = targets or list(TARGETS)
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="lmlab-fuzz-")) if own else work
    pool = Pool()
    counts: Counter = Counter()
    failures: list[str] = []
    try:
        seeds = {name: _seed_input(name, work) for name in {*names, *(n for n, _ in replay)}}
        deadline, case = time.monotonic() + seconds, 0
        while case < len(replay) or time.monotonic() < deadline:
            if case < len(replay):
                name, case_seed = replay[case]
            else:
                name = names[case % len(names)]
                case_seed = seed * 1_000_003 + case
            case += 1
            path, data = seeds[name]
            outcome, detail = pool.run(name, _write_case(name, path, data, case_seed, work), timeout)
            if outcome == "lmlab-error" and detail:
                outcome = "bad-message"
            counts[f"{name}: {outcome}"] += 1
            if outcome not in ("ok", "lmlab-error"):
                failures.append(f"target={name} seed={case_seed}: {outcome}: {detail.strip()}")
    finally:
        pool.close()
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return Report(counts, failures)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", action="append", choices=list(TARGETS), help="repeatable; default: all")
    ap.add_argument("--case", help="TARGET:SEED of a reported failure: run that one case and print its outcome")
    args = ap.parse_args(argv)
    if args.case:
        name, _, case_seed = args.case.rpartition(":")
        with tempfile.TemporaryDirectory(prefix="lmlab-fuzz-") as work:
            outcome, detail = run_case(name, int(case_seed), Path(work))
        print(outcome, detail)
        return 0 if outcome in ("ok", "lmlab-error") else 1
    report = fuzz(args.minutes * 60, args.seed, args.target)
    print(json.dumps(dict(sorted(report.counts.items())), indent=1))
    for line in report.failures:
        print("FAIL", line)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
