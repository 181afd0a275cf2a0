"""Image- and pixel-level detection metrics.

Threshold-free metrics (AUROC, AP, F1-max) rank the scores. Thresholded F1 and
G-mean use a threshold fixed beforehand on the calibration split, never on the
images they are reported on.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score


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


def au_pro(masks: np.ndarray, maps: np.ndarray, *, max_fpr: float = 0.3, n_thresholds: int = 1000) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``max_fpr``.

    Each connected region of the ground truth (8-connectivity, as in the MVTec
    AD evaluation code) counts equally, whatever its size. At a threshold t,
    pixels with ``map >= t`` are predicted anomalous. PRO(t) is the mean over all
    regions of all images of the share of the region's pixels predicted anomalous,
    and FPR(t) is the share of normal pixels predicted anomalous. The curve runs
    from (0, 0) through ``n_thresholds`` evenly spaced thresholds from the maximum
    to the minimum of ``maps``. It is linear between those points, integrated with
    the trapezoidal rule up to ``max_fpr`` and divided by ``max_fpr``.

    Parameters
    ----------
    masks : ndarray of shape (n, height, width)
        Ground truth, bool or 0/1.
    maps : ndarray of shape (n, height, width)
        Anomaly maps, higher is more anomalous.
    max_fpr : float, default=0.3
        Integration limit, in (0, 1].
    n_thresholds : int, default=1000
        Number of thresholds. More thresholds follow the exact curve more closely.

    Returns
    -------
    float
        In [0, 1]. A perfect map gives 1, and a constant map gives ``max_fpr / 2``.

    Raises
    ------
    ValueError
        If the shapes differ or are not 3-D, the masks are not binary, there is
        no anomalous or no normal pixel, the maps are not finite, or ``max_fpr``
        or ``n_thresholds`` is out of range.

    Examples
    --------
    >>> masks = np.zeros((1, 4, 4), dtype=bool)
    >>> masks[0, :2, :2] = True
    >>> au_pro(masks, masks.astype(float))
    1.0
    """
    masks = _check_pro_inputs(masks, maps, max_fpr, n_thresholds)
    weights = _region_weights(masks)
    thresholds = np.linspace(maps.max(), maps.min(), n_thresholds)
    fpr, pro = _pro_curve(masks, maps, weights, thresholds)
    return float(_area_up_to(fpr, pro, max_fpr) / max_fpr)


def _check_pro_inputs(masks, maps, max_fpr: float, n_thresholds: int) -> np.ndarray:
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must share one (n, height, width) shape.")
    if not np.isin(masks, (0, 1)).all():
        values = np.unique(masks)[:5].tolist()
        raise ValueError(f"masks must be binary, got values {values}.")
    masks = masks.astype(bool)
    if not masks.any() or masks.all():
        raise ValueError("masks need both anomalous and normal pixels to define PRO and FPR.")
    if not np.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values.")
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must lie in (0, 1], got {max_fpr}.")
    if n_thresholds < 2:
        raise ValueError(f"n_thresholds must be at least 2, got {n_thresholds}.")
    return masks


def _region_weights(masks: np.ndarray) -> np.ndarray:
    """Weight each anomalous pixel by 1 / (region size * number of regions), others by 0."""
    weights = np.zeros(masks.shape, dtype=np.float64)
    structure = np.ones((3, 3), dtype=int)
    n_regions = 0
    for index, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=structure)
        sizes = np.bincount(labels.ravel())
        weights[index][labels > 0] = 1.0 / sizes[labels[labels > 0]]
        n_regions += count
    return weights / n_regions


def _pro_curve(masks, maps, weights, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """Return FPR and PRO at each threshold, with the point (0, 0) prepended."""
    normal_scores = np.sort(maps[~masks])
    order = np.argsort(maps[masks])
    anomalous_scores = maps[masks][order]
    # tail_weight[i] is the summed weight of the i-th lowest anomalous score and all above it.
    tail_weight = np.append(np.cumsum(weights[masks][order][::-1])[::-1], 0.0)
    false_positives = len(normal_scores) - np.searchsorted(normal_scores, thresholds, side="left")
    fpr = false_positives / len(normal_scores)
    pro = tail_weight[np.searchsorted(anomalous_scores, thresholds, side="left")]
    return np.append(0.0, fpr), np.append(0.0, pro)


def _area_up_to(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    """Trapezoidal area under a curve with non-decreasing ``fpr`` from 0 to ``max_fpr``."""
    n_inside = int(np.searchsorted(fpr, max_fpr, side="right"))
    x, y = fpr[:n_inside], pro[:n_inside]
    if x[-1] < max_fpr:
        # Interpolate linearly to the first point beyond the limit.
        last, first_beyond = n_inside - 1, n_inside
        step = (max_fpr - fpr[last]) / (fpr[first_beyond] - fpr[last])
        x = np.append(x, max_fpr)
        y = np.append(y, pro[last] + step * (pro[first_beyond] - pro[last]))
    return float(auc(x, y))
