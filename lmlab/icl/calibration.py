"""Calibrating a model's label probabilities, as pure functions on arrays (rows: items, columns: labels).

- Contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): score the prompt with content-free
  inputs ("N/A", "", "[MASK]") in place of the test input; their mean label distribution p_cf measures
  the prompt's bias. Calibrated probabilities are W·p + b with W = diag(p_cf)^-1 and b = 0, renormalised,
  i.e. ∝ p / p_cf. (The paper applies a softmax to W·p; the predicted label is the same.)
- Batch calibration (Zhou et al. 2023): the bias is estimated from the test batch itself, as the mean
  label probability over the batch; calibrated scores are log p − log mean_batch p (renormalised here).
"""
from __future__ import annotations

import numpy as np

from lmlab.errors import LmlabError

CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")


def _matrix(probs, what: str) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = p[None, :]
    if p.ndim != 2 or p.shape[1] < 2 or p.shape[0] < 1:
        raise LmlabError(f"{what}: expected items × labels (at least 2 labels), got shape {np.shape(probs)}")
    if not np.isfinite(p).all() or (p < 0).any():
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(p) | (p < 0))[0])
        raise LmlabError(f"{what}: entry {bad} is {float(p[bad])}, probabilities must be finite and non-negative")
    return p


def normalize(probs, what: str = "probabilities") -> np.ndarray:
    """Each row divided by its sum (label probabilities restricted to the label set)."""
    p = _matrix(probs, what)
    sums = p.sum(axis=1, keepdims=True)
    if (sums <= 0).any():
        raise LmlabError(f"{what}: row {int(np.flatnonzero(sums[:, 0] <= 0)[0])} has no probability mass")
    return p / sums


def probs_from_logliks(logliks) -> np.ndarray:
    """Label probabilities from each label's log-likelihood (softmax over the labels of a row)."""
    x = np.asarray(logliks, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] < 2 or np.isnan(x).any() or (x == np.inf).any():
        raise LmlabError(f"log-likelihoods: expected items × labels of numbers below +inf, got shape {x.shape}")
    if (x.max(axis=1) == -np.inf).any():
        raise LmlabError("log-likelihoods: a row has every label at -inf")
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def content_free_prior(content_free_probs) -> np.ndarray:
    """p_cf: the mean over content-free inputs of their (normalised) label probabilities."""
    return normalize(content_free_probs, "content-free probabilities").mean(axis=0)


def contextual_weights(content_free_probs) -> tuple[np.ndarray, np.ndarray]:
    """Zhao et al.'s affine map: W = diag(p_cf)^-1, b = 0."""
    p_cf = content_free_prior(content_free_probs)
    if (p_cf <= 0).any():
        raise LmlabError(f"content-free probabilities: label {int(np.flatnonzero(p_cf <= 0)[0])} has probability 0 "
                         "for every content-free input, it cannot be calibrated")
    return np.diag(1.0 / p_cf), np.zeros_like(p_cf)


def contextual_calibration(probs, content_free_probs) -> np.ndarray:
    """Calibrated probabilities ∝ p / p_cf (rows of `probs` normalised first), each row summing to 1."""
    p = normalize(probs)
    W, b = contextual_weights(content_free_probs)
    if W.shape[0] != p.shape[1]:
        raise LmlabError(f"probabilities have {p.shape[1]} labels, content-free ones {W.shape[0]}")
    return normalize(p @ W.T + b, "calibrated probabilities")


def batch_calibration(probs) -> np.ndarray:
    """Calibrated probabilities from log p − log mean_batch p over the rows of `probs` (one test batch),
    each row renormalised to sum to 1."""
    p = normalize(probs)
    mean = p.mean(axis=0)
    if (mean <= 0).any():
        raise LmlabError(f"label {int(np.flatnonzero(mean <= 0)[0])} has probability 0 for every item in the "
                         "batch, it cannot be calibrated")
    with np.errstate(divide="ignore"):  # a zero probability stays zero (log 0 = -inf)
        scores = np.log(p) - np.log(mean)
    z = np.exp(scores - scores.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)
