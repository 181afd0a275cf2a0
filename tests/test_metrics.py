"""Image- and pixel-level metrics against values worked out by hand."""

import numpy as np
import pytest

from adlib import metrics

# Three anomalous and five normal images. Sorted by score, descending:
#   0.9 A, 0.8 A, 0.7 N, 0.6 N, 0.4 N, 0.3 A, 0.2 N, 0.1 N
LABELS = np.array([1, 1, 1, 0, 0, 0, 0, 0])
SCORES = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.4, 0.6])


def test_threshold_metrics_hand_values():
    # Threshold 0.5 predicts anomalous for 0.9, 0.8, 0.7, 0.6:
    # TP = 2, FP = 2, FN = 1, TN = 3, so TPR = 2/3 and TNR = 3/5.
    # F1 = 2TP / (2TP + FP + FN) = 4/7, G-mean = sqrt(2/3 * 3/5) = sqrt(0.4).
    result = metrics.threshold_metrics(LABELS, SCORES, 0.5)

    assert result["tpr"] == pytest.approx(2 / 3)
    assert result["tnr"] == pytest.approx(3 / 5)
    assert result["f1"] == pytest.approx(4 / 7)
    assert result["gmean"] == pytest.approx(0.6324555320336759)


def test_threshold_inclusive():
    # A score equal to the threshold counts as anomalous: at 0.8 the predictions
    # are 0.9 and 0.8, TP = 2, FP = 0, FN = 1, so F1 = 4/5 and G-mean = sqrt(2/3).
    result = metrics.threshold_metrics(LABELS, SCORES, 0.8)

    assert result["f1"] == pytest.approx(0.8)
    assert result["gmean"] == pytest.approx(np.sqrt(2 / 3))


def test_threshold_above_all_scores():
    # Nothing is predicted anomalous: TP = 0, so F1 = 0, TPR = 0 and G-mean = 0.
    result = metrics.threshold_metrics(LABELS, SCORES, 2.0)

    assert result["f1"] == 0.0
    assert result["gmean"] == 0.0
    assert result["tnr"] == 1.0


def test_f1_max_hand_value():
    # Top 1: P = 1, R = 1/3, F1 = 0.5. Top 2: P = 1, R = 2/3, F1 = 0.8.
    # Top 3: P = 2/3, R = 2/3, F1 = 2/3. Top 6: P = 1/2, R = 1, F1 = 2/3.
    assert metrics.f1_max(LABELS, SCORES) == pytest.approx(0.8)


def test_f1_optimal_threshold_hand_value():
    # The best F1 (0.8) predicts the top two scores, so the threshold is 0.8.
    assert metrics.f1_optimal_threshold(LABELS, SCORES) == pytest.approx(0.8)


def test_image_metrics_hand_values():
    # AUROC: pairs with anomalous > normal are 5 (0.9) + 5 (0.8) + 2 (0.3) = 12 of 15.
    # AP: precision at each anomalous image's rank is 1/1, 2/2 and 3/6, mean 2.5/3.
    result = metrics.image_metrics(LABELS, SCORES, 0.5)

    assert result["auroc"] == pytest.approx(12 / 15)
    assert result["ap"] == pytest.approx(2.5 / 3)
    assert result["f1_max"] == pytest.approx(0.8)
    assert result["f1"] == pytest.approx(4 / 7)
    assert result["gmean"] == pytest.approx(np.sqrt(0.4))


def test_image_metrics_label_flip():
    # Swapping the classes and negating the scores leaves AUROC unchanged.
    original = metrics.image_metrics(LABELS, SCORES, 0.5)["auroc"]
    flipped = metrics.image_metrics(1 - LABELS, -SCORES, -0.5)["auroc"]

    assert flipped == pytest.approx(original)


def test_image_metrics_single_class():
    with pytest.raises(ValueError, match=r"Labels must contain both 0 and 1, got values \[0\]"):
        metrics.image_metrics(np.zeros(4, dtype=int), np.arange(4.0), 0.5)


def test_f1_max_single_class():
    with pytest.raises(ValueError, match="Labels must contain both 0 and 1"):
        metrics.f1_max(np.ones(3, dtype=int), np.arange(3.0))


def test_pixel_auroc_hand_value():
    # Pixels 0.35 and 0.8 are anomalous, 0.1 and 0.4 normal: 0.35 beats 0.1 only,
    # 0.8 beats both, so AUROC = 3/4.
    masks = np.array([[[0, 0], [1, 1]]], dtype=bool)
    maps = np.array([[[0.1, 0.4], [0.35, 0.8]]])

    assert metrics.pixel_auroc(masks, maps) == pytest.approx(0.75)


def test_pixel_auroc_shape_mismatch():
    with pytest.raises(ValueError, match=r"masks \(1, 2, 2\) and maps \(1, 2, 3\) differ in shape"):
        metrics.pixel_auroc(np.zeros((1, 2, 2), dtype=bool), np.zeros((1, 2, 3)))


def test_pixel_auroc_no_anomalous_pixel():
    with pytest.raises(ValueError, match="Labels must contain both 0 and 1"):
        metrics.pixel_auroc(np.zeros((1, 2, 2), dtype=bool), np.zeros((1, 2, 2)))
