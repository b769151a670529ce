"""Contextual and batch calibration on fixed probabilities, against hand-computed values."""
import numpy as np
import pytest

from lmlab.errors import LmlabError
from lmlab.icl.calibration import (CONTENT_FREE_INPUTS, batch_calibration, content_free_prior,
                                   contextual_calibration, contextual_weights, normalize, probs_from_logliks)

# label probabilities for "N/A", "" and "[MASK]": mean p_cf = [0.7, 0.3]
CF = [[0.8, 0.2], [0.6, 0.4], [0.7, 0.3]]


def test_content_free_inputs_are_the_papers():
    assert CONTENT_FREE_INPUTS == ("N/A", "", "[MASK]")


def test_contextual_calibration_two_labels():
    np.testing.assert_allclose(content_free_prior(CF), [0.7, 0.3])
    W, b = contextual_weights(CF)
    np.testing.assert_allclose(W, [[1 / 0.7, 0], [0, 1 / 0.3]])
    np.testing.assert_array_equal(b, [0, 0])
    out = contextual_calibration([[0.7, 0.3], [0.4, 0.6], [0.65, 0.35]], CF)
    # [0.7/0.7, 0.3/0.3] = [1, 1]; [0.4/0.7, 0.6/0.3] = [4/7, 2] → [2/9, 7/9]; [0.65/0.7, 0.35/0.3] = [13/14, 7/6]
    np.testing.assert_allclose(out, [[0.5, 0.5], [2 / 9, 7 / 9], [39 / 88, 49 / 88]])
    assert out[2].argmax() == 1  # the prompt's bias towards label 0 no longer decides this item


def test_contextual_calibration_normalises_its_inputs_first():
    unnormalised_cf = [[0.4, 0.1], [0.3, 0.2], [0.35, 0.15]]  # same distributions as CF, half the mass
    np.testing.assert_allclose(contextual_calibration([[0.2, 0.3]], unnormalised_cf),
                               contextual_calibration([[0.4, 0.6]], CF))


def test_contextual_calibration_three_labels():
    out = contextual_calibration([0.5, 0.3, 0.2], [0.5, 0.25, 0.25])
    # [0.5/0.5, 0.3/0.25, 0.2/0.25] = [1, 1.2, 0.8], sum 3
    np.testing.assert_allclose(out, [[1 / 3, 0.4, 0.8 / 3]])


def test_batch_calibration():
    out = batch_calibration([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    # batch mean [0.6, 0.4]: [1.5, 0.25] → [6/7, 1/7]; [1, 1] → [1/2, 1/2]; [0.5, 1.75] → [2/9, 7/9]
    np.testing.assert_allclose(out, [[6 / 7, 1 / 7], [0.5, 0.5], [2 / 9, 7 / 9]])


def test_batch_calibration_is_log_p_minus_log_mean():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 2, 3, 4], size=20)
    scores = np.log(p) - np.log(p.mean(0))
    out = batch_calibration(p)
    np.testing.assert_allclose(out.sum(1), 1.0)
    np.testing.assert_array_equal(out.argmax(1), scores.argmax(1))
    np.testing.assert_allclose(np.log(out) - np.log(out[:, :1]), scores - scores[:, :1], atol=1e-12)
    perm = rng.permutation(20)  # the batch is a set: its order does not matter
    np.testing.assert_allclose(batch_calibration(p[perm]), out[perm])
    assert np.allclose(batch_calibration([[1.0, 0.0], [0.5, 0.5]])[0], [1.0, 0.0])  # zero stays zero


def test_probs_from_logliks_and_normalize():
    np.testing.assert_allclose(probs_from_logliks([np.log(0.2), np.log(0.6)]), [[0.25, 0.75]])
    np.testing.assert_allclose(probs_from_logliks([[-1000.0, -1000.0 + np.log(3)]]), [[0.25, 0.75]])
    np.testing.assert_allclose(normalize([[1, 3], [2, 2]]), [[0.25, 0.75], [0.5, 0.5]])


def test_bad_inputs():
    with pytest.raises(LmlabError, match="label 1 has probability 0 for every content-free input"):
        contextual_calibration([[0.5, 0.5]], [[1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(LmlabError, match="probabilities have 3 labels, content-free ones 2"):
        contextual_calibration([[0.2, 0.3, 0.5]], CF)
    with pytest.raises(LmlabError, match="label 0 has probability 0 for every item in the batch"):
        batch_calibration([[0.0, 1.0], [0.0, 1.0]])
    with pytest.raises(LmlabError, match=r"entry \(1, 0\) is -0.1"):
        batch_calibration([[0.5, 0.5], [-0.1, 1.1]])
    with pytest.raises(LmlabError, match="finite"):
        normalize([[np.nan, 1.0]])
    with pytest.raises(LmlabError, match="at least 2 labels"):
        normalize([[1.0]])
    with pytest.raises(LmlabError, match="row 1 has no probability mass"):
        normalize([[1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(LmlabError, match="every label at -inf"):
        probs_from_logliks([[-np.inf, -np.inf]])
