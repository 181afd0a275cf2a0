"""Predictive entropy of the calibrated posterior, and flagging attacked inputs with it."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from .calibration import EPS


def binary_entropy(probabilities: np.ndarray) -> np.ndarray:
    """H(p) = -p ln p - (1 - p) ln(1 - p) in nats, between 0 and ln 2."""
    p = np.clip(np.asarray(probabilities, dtype=float), EPS, 1 - EPS)
    return -(p * np.log(p) + (1 - p) * np.log1p(-p))


def flagging_metrics(clean_entropy: np.ndarray, attacked_entropy: np.ndarray,
                     calibration_entropy: np.ndarray, *, target_fpr: float = 0.05) -> dict[str, float]:
    """Score how well entropy separates attacked from clean evaluation images.

    Parameters
    ----------
    clean_entropy, attacked_entropy : ndarray of shape (n_eval,)
        Entropy of the same evaluation images, clean and attacked.
    calibration_entropy : ndarray
        Entropy of clean calibration images. The flagging threshold is their
        ``1 - target_fpr`` quantile, so about ``target_fpr`` of clean inputs are flagged.
    target_fpr : float, default=0.05

    Returns
    -------
    dict
        ``flag_auroc`` (attacked is positive), ``flag_tpr`` at the threshold, the
        ``flag_fpr`` observed on clean evaluation images, and ``flag_threshold``.
    """
    if not 0 < target_fpr < 1:
        raise ValueError(f"target_fpr must lie in (0, 1), got {target_fpr}.")
    threshold = float(np.quantile(calibration_entropy, 1 - target_fpr))
    labels = np.r_[np.zeros(len(clean_entropy)), np.ones(len(attacked_entropy))]
    return {
        "flag_auroc": float(roc_auc_score(labels, np.r_[clean_entropy, attacked_entropy])),
        "flag_tpr": float(np.mean(attacked_entropy > threshold)),
        "flag_fpr": float(np.mean(clean_entropy > threshold)),
        "flag_threshold": threshold,
    }
