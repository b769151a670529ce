"""Parity with lm-evaluation-harness 0.4.13 on the HF export of SmolLM2-135M (same prompts, same items).

A small set for the suite (the machine is 2 shared CPU cores); the full comparison (≥200 items, all
100 COPA, 5-shot MMLU) is `python tests/eval/parity.py --items 200 --copa 100 --mmlu-shots 5`."""
import os

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

ITEMS = int(os.environ.get("LMLAB_PARITY_ITEMS", "8"))


@pytest.fixture(scope="module")
def parity(data_dir, tmp_path_factory):
    from lmlab import checkpoints
    from tests_eval_parity_helper import compare, run  # noqa: F401  (path set below)
    return compare(run(ITEMS, ITEMS, 0, tmp_path_factory.mktemp("parity")))


@pytest.fixture(scope="module", autouse=True)
def _path():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    import parity as helper
    sys.modules["tests_eval_parity_helper"] = helper
    yield


@pytest.mark.slow
def test_loglikelihoods_and_accuracies_match_lm_eval(parity):
    assert {"piqa", "boolq", "copa", "arc_easy_mosaic"} <= set(parity)
    assert any(k.startswith("mmlu_") for k in parity)
    for name, r in parity.items():
        assert r["n"] > 0, name
        assert r["max_ll_diff"] < 1e-3, (name, r)
        assert abs(r["acc_lmlab"] - r["acc_lm_eval"]) <= 0.005, (name, r)
        assert abs(r["acc_norm_lmlab"] - r["acc_norm_lm_eval"]) <= 0.005, (name, r)
