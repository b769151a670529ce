"""`lmlab icl` end to end on a tiny GGUF model (results JSON, demonstration log, PNG curve), the grid with
dense retrieval on a fake encoder, and one-line errors for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import data_dir
from lmlab.eval.engine import Engine
from lmlab.icl.experiment import Grid, GridConfig, summarize
from lmlab.icl.tasks import load_task
from retrieval_fakes import BagOfWords
from tiny_gguf import write_tiny

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("iclcmd")
    write_tiny(folder / "tiny.gguf")
    data_dir(folder / "data")
    return folder


def icl(setup, *args):
    return subprocess.run([sys.executable, "-m", "lmlab", "icl", "-m", str(setup / "tiny.gguf"), "--task", "sst2",
                           "--data-dir", str(setup / "data"), "--threads", "1", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_the_grid_end_to_end_with_plot_and_demonstration_log(setup, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "plots" / "curve.png"
    proc = icl(setup, "--shots", "0,1,2", "--seeds", "2", "--retriever", "random,bm25", "--calibrate",
               "--output", str(out), "--plot", str(png), "--log-demos", "--limit", "4")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    # 0-shot once, random 2 shot counts × 2 seeds, bm25 (similarity order: deterministic) 2 × 1
    assert [(c["retriever"], c["shots"], c["seed"]) for c in results["cells"]] == [
        ("none", 0, 0), ("random", 1, 0), ("random", 1, 1), ("bm25", 1, 0), ("random", 2, 0), ("random", 2, 1),
        ("bm25", 2, 0)]  # by shot count, so a stopped run has every retriever's cheaper cells
    assert all(c["n"] == 4 and sum(c["predictions"].values()) == 4 for c in results["cells"])
    assert results["complete"] and results["cells_planned"] == 7 and len(results["test_items"]) == 4
    assert results["config"]["grid"]["calibrate"] and results["config"]["prompt"]["verbalizer"] == {
        "negative": "negative", "positive": "positive"}
    rows = {(r["retriever"], r["shots"]): r for r in results["summary"]}
    assert rows[("random", 0)]["acc"] == rows[("bm25", 0)]["acc"] == results["cells"][0]["acc"]
    assert rows[("random", 2)]["seeds"] == 2
    assert "| random | 2 | 2 |" in proc.stdout and "acc_calibrated" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in (tmp_path / "r_demos.jsonl").read_text().splitlines()]
    assert len(log) == 7 * 4
    bm25 = [r for r in log if r["retriever"] == "bm25" and r["shots"] == 2]
    assert all(len(r["demonstrations"]) == 2 and "similarity" in r["demonstrations"][0] for r in bm25)
    assert all(r["origin"] not in [d["origin"] for d in r["demonstrations"]] for r in log)


@pytest.mark.parametrize("args, message", [
    (["--shots", "0,10"], "10 shots but the pool holds only 6 examples"),
    (["--shots", "1", "--verbalizer", "negative=bad"], "no word for label 'positive'"),
    (["--shots", "1", "--verbalizer", "negative=bad,positive=   "], "word for label 'positive' is blank"),
    (["--shots", "1", "--retriever", "bm2"], "unknown retriever 'bm2'"),
    (["--shots", "1", "--scoring", "channel", "--calibrate"], "needs --scoring direct"),
])
def test_bad_input_is_one_line(setup, args, message):
    proc = icl(setup, *args)
    assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_dense_retrieval_cells_and_summary(setup, tiny):
    model, tok = tiny
    task = load_task("sst2", setup / "data")
    cfg = GridConfig(shots=[0, 2], seeds=3, retrievers=["topk", "mmr", "balanced"], order="random", log_demos=True, limit=2,
                     scoring="channel")
    grid = Grid(Engine(model, tok, progress=False), task, cfg, encoder=BagOfWords(), progress=False)
    seen = []
    cells = grid.run(on_cell=lambda done, planned: seen.append((len(done), planned, done[-1]["retriever"])))
    assert seen == [(n + 1, 10, c["retriever"]) for n, c in enumerate(cells)]  # partial results after each cell
    assert [(c["retriever"], c["seed"]) for c in cells if c["shots"] == 2] == [
        (m, s) for m in ("topk", "mmr", "balanced") for s in range(3)]
    # a test item (copied from the pool) never sees itself
    assert all(r["origin"].split(":")[-1] not in [d["origin"].split(":")[-1] for d in r["demonstrations"]]
               for r in grid.demo_log)
    balanced = [r for r in grid.demo_log if r["retriever"] == "balanced"]
    assert all(sorted(d["label"] for d in r["demonstrations"]) == ["negative", "positive"] for r in balanced)
    rows = summarize(cells, cfg.retrievers, cfg.shots)
    assert [(r["retriever"], r["shots"], r["seeds"]) for r in rows] == [
        ("topk", 0, 1), ("topk", 2, 3), ("mmr", 0, 1), ("mmr", 2, 3), ("balanced", 0, 1), ("balanced", 2, 3)]
    assert "acc_calibrated" not in rows[0] and "acc_batch_calibrated" in rows[0]


def test_shared_prefix_across_a_bpe_boundary(setup):
    """Byte-level BPE tokenizes a trailing "\\n\\n" alone differently from "\\n\\nReview": the cached head
    stops before the boundary, every request still takes the shared path, and scores equal the plain ones."""
    from lmlab.eval.requests import Loglikelihood
    from lmlab.inference.load import load

    model, tok = load(str(setup / "tiny.gguf"))
    prefix = "Review: a fine film\nSentiment: positive\n\nReview: dull\nSentiment: negative\n\n"
    reqs = [Loglikelihood(prefix + f"Review: movie {i}\nSentiment:", w) for i in range(3)
            for w in (" negative", " positive")]
    engine = Engine(model, tok, batch_size=2, progress=False)
    plain = engine.loglikelihood(reqs)
    with engine.sharing(prefix):
        head, groups, rest = engine._prefix_groups(reqs)
        shared = engine.loglikelihood(reqs)
    assert rest == [] and len(groups) == 3 and 0 < len(head) < len(tok.encode(prefix))
    assert [round(a.logprob, 4) for a in shared] == pytest.approx([round(a.logprob, 4) for a in plain], abs=2e-4)
