"""Image- and pixel-level detection metrics.

Threshold-free metrics (AUROC, AP, F1-max) rank the scores. Thresholded F1 and
G-mean use a threshold fixed beforehand on the calibration split, never on the
images they are reported on.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the best F1 over all thresholds of the precision-recall curve."""
    return float(_f1_curve(labels, scores)[0].max())


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the score threshold that maximises F1 on (calibration) data.

    An image is predicted anomalous when its score is at least the threshold.
    """
    f1, thresholds = _f1_curve(labels, scores)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def _f1_curve(labels, scores):
    _check_binary(labels)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return f1, thresholds


def threshold_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """F1, G-mean = sqrt(TPR * TNR), TPR and TNR at a fixed threshold (score >= threshold)."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(scores) >= threshold
    true_positive = np.sum(predicted & labels)
    false_positive = np.sum(predicted & ~labels)
    false_negative = np.sum(~predicted & labels)
    tpr = true_positive / max(labels.sum(), 1)
    tnr = np.sum(~predicted & ~labels) / max((~labels).sum(), 1)
    f1_denominator = 2 * true_positive + false_positive + false_negative
    f1 = 2 * true_positive / f1_denominator if f1_denominator else 0.0
    return {"f1": float(f1), "gmean": float(np.sqrt(tpr * tnr)), "tpr": float(tpr), "tnr": float(tnr)}


def image_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC, AP, F1-max and the thresholded F1 and G-mean of one set of image scores."""
    _check_binary(labels)
    fixed = threshold_metrics(labels, scores, threshold)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "ap": float(average_precision_score(labels, scores)),
        "f1_max": f1_max(labels, scores),
        "f1": fixed["f1"],
        "gmean": fixed["gmean"],
    }


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over all pixels of (n, height, width) ground-truth masks and anomaly maps."""
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape.")
    flat = masks.reshape(-1).astype(int)
    _check_binary(flat)
    return float(roc_auc_score(flat, maps.reshape(-1)))


def _check_binary(labels) -> None:
    values = np.unique(np.asarray(labels))
    if not np.array_equal(values, [0, 1]) and not np.array_equal(values, [False, True]):
        raise ValueError(f"Labels must contain both 0 and 1, got values {values.tolist()}.")
