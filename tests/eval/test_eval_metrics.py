"""Per-item metrics and their aggregation, on values worked out by hand."""
import math

import pytest

from lmlab.errors import LmlabError
from lmlab.eval import metrics


def test_multiple_choice_acc_norm_by_characters_and_bytes():
    # 'sky' (3 chars, 3 bytes: -1 per char and per byte) vs '天空' (2 chars, 6 bytes: -1.2 per char,
    # -0.4 per byte): the total picks the Chinese, per character the English, per byte the Chinese
    lls, choices = [-3.0, -2.4], ["sky", "天空"]
    out = metrics.score_multiple_choice(lls, choices, 0, [False, True])
    assert out == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 0.0, "exact_match": 0.0}
    assert metrics.score_multiple_choice(lls, choices, [0, 1])["acc"] == 1.0  # several right answers


def test_argmax_first_maximum_wins():
    assert metrics.argmax([1.0, 3.0, 3.0]) == 1


def test_mc2_is_normalised_probability_of_the_true_answers():
    assert metrics.score_mc2([math.log(0.2), math.log(0.3), math.log(0.5)], [0, 2]) == pytest.approx(0.7)
    assert metrics.score_mc2([-1000.0, -1001.0], [0]) == pytest.approx(1 / (1 + math.exp(-1)))  # no underflow


def test_answer_extraction():
    assert metrics.extract_number("so 1,234.0 apples, then 5") == "5"
    assert metrics.extract_number("total: -1,234.0") == "-1234"
    assert metrics.extract_number("none") is None
    assert metrics.extract_regex("x #### 42 and #### 7", r"#### (\d+)") == "42"
    assert metrics.extract_regex("x #### 42 and #### 7", r"#### (\d+)", group=-1) == "7"
    assert metrics.extract_regex("nothing", r"#### (\d+)", fallback="?") == "?"
    assert metrics.score_exact_match(" Paris.", "paris", ignore_case=True, ignore_punctuation=True) == 1.0
    assert metrics.score_exact_match(" Paris.", "paris") == 0.0


def test_counts():
    assert metrics.count_words("a b\n c") == 3
    assert metrics.count_bytes("né") == 3


def test_corpus_perplexity_is_a_ratio_of_sums_not_a_mean_of_ratios():
    pairs = [(-2.0, 1), (-6.0, 3)]
    assert metrics.perplexity(pairs) == pytest.approx(math.exp(8 / 4))
    assert metrics.bits_per_byte(pairs) == pytest.approx(8 / 4 / math.log(2))


def test_aggregate_means_with_sample_stderr_and_bootstrap_for_corpus_metrics():
    value, err = metrics.aggregate("acc", [1.0, 0.0, 1.0, 1.0])
    assert value == 0.75 and err == pytest.approx(math.sqrt(0.25 / 4))  # sample sd 0.5, over sqrt(4)
    assert math.isnan(metrics.aggregate("acc", [1.0])[1])
    pairs = [(-1.0, 2), (-3.0, 2), (-2.0, 2)]
    value, err = metrics.aggregate("word_perplexity", pairs)
    assert value == pytest.approx(math.exp(1.0)) and 0 < err < value
    assert metrics.aggregate("word_perplexity", pairs) == (value, err)  # fixed-seed bootstrap


def test_unknown_metric_is_an_error():
    with pytest.raises(LmlabError, match=r"unknown metric 'acc_nrom' \(did you mean 'acc_norm'"):
        metrics.aggregate("acc_nrom", [1.0])
