"""Turning anomaly scores into probabilities, and measuring how well calibrated they are."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.metrics import brier_score_loss

# Probabilities are clipped to [EPS, 1 - EPS] before logarithms, so a min-max
# probability of exactly 0 or 1 gives a large but finite NLL.
EPS = 1e-12


def fit_minmax(scores: np.ndarray) -> tuple[float, float]:
    """Return the (min, max) of calibration-split scores for the "raw" baseline."""
    scores = np.asarray(scores, dtype=float)
    low, high = float(scores.min()), float(scores.max())
    if high <= low:
        raise ValueError(f"All {len(scores)} calibration scores equal {low}; min-max scaling is undefined.")
    return low, high


def minmax_probabilities(scores: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map scores linearly so that [low, high] becomes [0, 1], clipping outside values.

    This is the uncalibrated baseline: a rescaling, not a probability model.
    """
    return np.clip((np.asarray(scores, dtype=float) - low) / (high - low), 0.0, 1.0)


def fit_platt(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Fit Platt scaling, P(anomalous) = sigmoid(a * score + b), by maximum likelihood.

    Platt (1999, "Probabilistic outputs for support vector machines", section 2.2)
    replaces the 0/1 targets by (N+ + 1) / (N+ + 2) and 1 / (N- + 2) to avoid
    overfitting small calibration sets. Scores are standardised for the optimiser
    and the slope and intercept are mapped back to the original scale.

    Returns
    -------
    a, b : float
    """
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=int)
    n_positive, n_negative = int(labels.sum()), int((1 - labels).sum())
    if n_positive == 0 or n_negative == 0:
        raise ValueError(f"Platt scaling needs both classes, got {n_negative} normal and {n_positive} anomalous.")
    targets = np.where(labels == 1, (n_positive + 1) / (n_positive + 2), 1 / (n_negative + 2))
    center, scale = scores.mean(), scores.std() or 1.0
    standardized = (scores - center) / scale
    result = minimize(_platt_loss, x0=np.zeros(2), args=(standardized, targets), jac=True, method="L-BFGS-B")
    slope, intercept = result.x
    return float(slope / scale), float(intercept - slope * center / scale)


def _platt_loss(params, scores, targets):
    logits = params[0] * scores + params[1]
    # Cross-entropy with soft targets, written with logaddexp to stay finite.
    loss = np.sum(np.logaddexp(0, logits) - targets * logits)
    residual = expit(logits) - targets
    return loss, np.array([np.sum(residual * scores), np.sum(residual)])


def platt_probabilities(scores: np.ndarray, a: float, b: float) -> np.ndarray:
    """Return sigmoid(a * score + b)."""
    return expit(a * np.asarray(scores, dtype=float) + b)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, *, n_bins: int = 15) -> float:
    """ECE of P(anomalous) against binary labels over equal-width bins.

    Each bin contributes |mean label - mean probability| weighted by its share
    of the samples. Bins are [0, 1/n), ..., [(n-1)/n, 1], the last one closed.

    Examples
    --------
    >>> float(expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])))
    0.0
    """
    table = reliability_table(labels, probabilities, n_bins=n_bins)
    weights = table["count"] / table["count"].sum()
    return float(np.sum(weights * np.abs(table["frequency"] - table["confidence"])))


def reliability_table(labels: np.ndarray, probabilities: np.ndarray, *, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per non-empty bin: centre, sample count, mean probability and observed anomaly frequency."""
    labels = np.asarray(labels, dtype=float)
    probabilities = np.asarray(probabilities, dtype=float)
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}.")
    if probabilities.size == 0 or probabilities.min() < 0 or probabilities.max() > 1:
        raise ValueError("probabilities must be a non-empty array with values in [0, 1].")
    bins = np.minimum((probabilities * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    confidence = np.bincount(bins, weights=probabilities, minlength=n_bins)
    frequency = np.bincount(bins, weights=labels, minlength=n_bins)
    filled = count > 0
    return {
        "center": ((np.arange(n_bins) + 0.5) / n_bins)[filled],
        "count": count[filled],
        "confidence": confidence[filled] / count[filled],
        "frequency": frequency[filled] / count[filled],
    }


def negative_log_likelihood(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean binary NLL in nats, with probabilities clipped to [EPS, 1 - EPS]."""
    labels = np.asarray(labels, dtype=float)
    clipped = np.clip(np.asarray(probabilities, dtype=float), EPS, 1 - EPS)
    return float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)))


def calibration_metrics(labels: np.ndarray, probabilities: np.ndarray, *, n_bins: int = 15) -> dict[str, float]:
    """ECE, NLL and Brier score of one set of probabilities."""
    return {
        "ece": expected_calibration_error(labels, probabilities, n_bins=n_bins),
        "nll": negative_log_likelihood(labels, probabilities),
        "brier": float(brier_score_loss(labels, probabilities, pos_label=1)),
    }
