"""bench/decode.py's pure helpers: spread formatting, best-of with every run kept, the bytes a GGUF decoding
step reads, and the PASS/FAIL goal lines. No timings are asserted."""
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest

from lmlab.checkpoints import is_gguf

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "bench" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spread_formats_best_and_range(bench):
    assert bench.spread([23.7, 24.94, 24.1]) == "24.9 (23.7–24.9, n=3)"
    assert bench.spread([0.1234, 0.1301], scale=1e3, best=min, digits=0) == "123 (123–130, n=2)"
    assert bench.spread([7.0]) == "7.0 (n=1)"


def test_best_of_keeps_every_run(bench):
    runs = [dict(tokens=[1, 2], decode_tps=10.0, ttft=0.5), dict(tokens=[1, 3], decode_tps=12.0, ttft=0.7)]
    best = bench.best_of(runs)
    assert best["tokens"] == [1, 2]
    assert best["decode_tps"] == 12.0 and best["ttft"] == 0.5
    assert best["all_decode_tps"] == [10.0, 12.0] and best["all_ttft"] == [0.5, 0.7]
    assert "old_tps" not in best and "all_old_tps" not in best


def write_gguf(path: Path, tied: bool) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.zeros((100, 16), dtype=np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((16, 16), dtype=np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((32, 16), dtype=np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.zeros(16, dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", np.zeros((100, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_bytes_per_token(bench, tmp_path, tied):
    path = tmp_path / "m.gguf"
    write_gguf(path, tied)
    matrices = 16 * 16 * 4 + 32 * 16 * 2                     # norms are not counted
    head = 100 * 16 * 2 if tied else 100 * 16 * 4           # the embedding only when it is the head
    assert is_gguf(path) and not is_gguf(tmp_path)
    assert bench.gguf_bytes_per_token(path) == matrices + head


def test_llamacpp_absent_is_a_notice(bench, tmp_path):
    llm, note = bench.load_llamacpp(tmp_path / "nowhere", tmp_path / "m.gguf", 2, 64)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        assert llm is None and note.startswith("llama.cpp: not built (run bench/build_llamacpp.sh")


def test_goal_lines(bench):
    def row(name, tps, ttft, limit, h=None):
        return dict(name=name, o=dict(decode_tps=tps, ttft=ttft), h=h, limit=limit, nbytes=1e8)

    rows = [row("float32", 20.0, 1.0, 24.0, h=dict(decode_tps=25.0, ttft=2.0)), row("int4", 100.0, 0.5, 150.0)]
    lines = bench.goal_lines(rows, dict(decode_tps=90.0, ttft=0.4), 512)
    assert lines[0].startswith("FAIL  float32 decode ≥ HF")
    assert lines[1].startswith("PASS  float32 prefill (512 tokens) ≥ HF")
    assert lines[2].startswith("PASS  float32 decode ≥ 80%")          # 20 of 24 = 83%
    assert lines[3].startswith("PASS  int4 decode ≥ 60%")             # 100 of 150 = 67%
    assert lines[4].startswith("PASS  int4 decode ≥ llama.cpp") and "1.11x" in lines[4]
    assert bench.goal_lines(rows, None, 512)[-1].startswith("SKIP  int4 decode ≥ llama.cpp")
