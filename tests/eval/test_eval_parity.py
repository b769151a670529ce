"""Parity with lm-evaluation-harness 0.4.13 on the HF export of SmolLM2-135M (same prompts, same items).

The suite compares 25 items each of piqa, boolq, arc_easy (mosaic YAML), mmlu val and COPA, 0-shot, to keep
`make test` inside its 15-minute budget on a 2-core machine (at 200 items this one test outran that budget
alone on a loaded AMD EPYC). The issue's full set (200 items each, all 100 COPA items, MMLU 5-shot) is
`python tests/eval/parity.py --items 200 --copa 100 --mmlu-shots 5`, or here
`LMLAB_PARITY_ITEMS=200 LMLAB_PARITY_SHOTS=5 pytest tests/eval/test_eval_parity.py`."""
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
import parity as helper  # noqa: E402

ITEMS = int(os.environ.get("LMLAB_PARITY_ITEMS", "25"))
COPA = min(ITEMS, 100)
SHOTS = int(os.environ.get("LMLAB_PARITY_SHOTS", "0"))


@pytest.fixture(scope="module")
def report(data_dir, tmp_path_factory):
    return helper.compare(helper.run(ITEMS, COPA, SHOTS, tmp_path_factory.mktemp("parity")))


@pytest.mark.slow
def test_loglikelihoods_and_accuracies_match_lm_eval(report):
    assert set(report) == {"piqa", "boolq", "copa", "arc_easy_mosaic", "mmlu"}
    for name, r in report.items():
        assert r["n"] >= (COPA if name == "copa" else ITEMS), (name, r)
        assert r["self_demo"] <= 0.02 * r["n"], (name, r)  # lm_eval showing the item as its own example
        assert r["max_ll_diff"] < 1e-3, (name, r)
        assert abs(r["acc_lmlab"] - r["acc_lm_eval"]) <= 0.005, (name, r)
        assert abs(r["acc_norm_lmlab"] - r["acc_norm_lm_eval"]) <= 0.005, (name, r)


@pytest.mark.slow
def test_wikitext_bits_per_byte_match_lm_eval(data_dir, tmp_path):
    """One article in 256-token windows (lean); the full run is `parity.py --wikitext`."""
    w = helper.wikitext(1, 256, tmp_path)
    assert w["docs"] == 1
    assert w["max_doc_ll_diff"] < 1e-2  # a sum over ~1,300 tokens
    assert abs(w["bits_per_byte_lmlab"] / w["bits_per_byte_lm_eval"] - 1) < 0.01
    assert abs(w["word_perplexity_lmlab"] / w["word_perplexity_lm_eval"] - 1) < 0.01
