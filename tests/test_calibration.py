"""Min-max baseline, Platt scaling and calibration metrics."""

import numpy as np
import pytest
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.metrics import roc_auc_score

from adlib import calibration


class ScoreColumnClassifier(ClassifierMixin, BaseEstimator):
    """Classifier whose decision function is the first feature column, for scikit-learn's Platt fit."""

    def fit(self, features, labels):
        self.classes_ = np.array([0, 1])
        return self

    def decision_function(self, features):
        return np.asarray(features)[:, 0]

    def predict(self, features):
        return (self.decision_function(features) > 0).astype(int)


def newton_platt(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Platt's maximum-likelihood fit of sigmoid(a * s + b) by plain Newton steps.

    Targets are Platt's smoothed labels, (N+ + 1) / (N+ + 2) for anomalous and
    1 / (N- + 2) for normal images.
    """
    n_positive, n_negative = labels.sum(), (1 - labels).sum()
    targets = np.where(labels == 1, (n_positive + 1) / (n_positive + 2), 1 / (n_negative + 2))
    design = np.column_stack([scores, np.ones_like(scores)])
    params = np.zeros(2)
    for _ in range(100):
        probabilities = expit(design @ params)
        gradient = design.T @ (probabilities - targets)
        hessian = design.T @ (design * (probabilities * (1 - probabilities))[:, None])
        step = np.linalg.solve(hessian, gradient)
        params -= step
        if np.abs(step).max() < 1e-12:
            break
    return float(params[0]), float(params[1])


@pytest.fixture
def overlapping_scores(rng):
    """300 normal scores from N(0, 1) and 100 anomalous from N(2, 1), with labels."""
    scores = np.r_[rng.normal(0.0, 1.0, 300), rng.normal(2.0, 1.0, 100)]
    labels = np.r_[np.zeros(300, dtype=int), np.ones(100, dtype=int)]
    return scores, labels


def test_platt_matches_newton(overlapping_scores):
    scores, labels = overlapping_scores
    a, b = calibration.fit_platt(scores, labels)
    expected_a, expected_b = newton_platt(scores, labels)

    assert a == pytest.approx(expected_a, rel=1e-4)
    assert b == pytest.approx(expected_b, rel=1e-4)


def test_platt_matches_sklearn(overlapping_scores):
    scores, labels = overlapping_scores
    frozen = FrozenEstimator(ScoreColumnClassifier().fit(scores[:, None], labels))
    calibrated = CalibratedClassifierCV(frozen, method="sigmoid").fit(scores[:, None], labels)
    sigmoid = calibrated.calibrated_classifiers_[0].calibrators[0]
    a, b = calibration.fit_platt(scores, labels)

    # scikit-learn writes the model as 1 / (1 + exp(a * s + b)), with the opposite sign.
    assert a == pytest.approx(-sigmoid.a_, rel=1e-4)
    assert b == pytest.approx(-sigmoid.b_, rel=1e-4)


def test_platt_recovers_generating_sigmoid(rng):
    scores = rng.uniform(-3.0, 3.0, 20000)
    labels = (rng.random(20000) < expit(1.5 * scores - 0.5)).astype(int)
    a, b = calibration.fit_platt(scores, labels)

    assert a == pytest.approx(1.5, abs=0.1)
    assert b == pytest.approx(-0.5, abs=0.1)


def test_platt_invariant_to_score_shift(overlapping_scores):
    # Platt standardises internally, so shifting and scaling the scores must only
    # change (a, b) by the inverse affine map.
    scores, labels = overlapping_scores
    a, b = calibration.fit_platt(scores, labels)
    shifted_a, shifted_b = calibration.fit_platt(1000.0 + 50.0 * scores, labels)

    assert shifted_a == pytest.approx(a / 50.0, rel=1e-4)
    assert shifted_b == pytest.approx(b - 1000.0 * a / 50.0, rel=1e-4, abs=1e-6)


def test_platt_lowers_ece(rng):
    # The true posterior is sigmoid(3s - 1), but the naive probabilities are
    # sigmoid(s): under-confident and shifted.
    scores = rng.normal(0.0, 1.5, 4000)
    labels = (rng.random(4000) < expit(3.0 * scores - 1.0)).astype(int)
    calibration_part, evaluation_part = slice(0, 2000), slice(2000, None)
    a, b = calibration.fit_platt(scores[calibration_part], labels[calibration_part])

    naive_ece = calibration.expected_calibration_error(labels[evaluation_part], expit(scores[evaluation_part]))
    platt_probabilities = calibration.platt_probabilities(scores[evaluation_part], a, b)
    platt_ece = calibration.expected_calibration_error(labels[evaluation_part], platt_probabilities)

    assert naive_ece > 0.1
    assert platt_ece < 0.05
    assert platt_ece < naive_ece / 3


def test_platt_lowers_ece_below_minmax(overlapping_scores):
    scores, labels = overlapping_scores
    low, high = calibration.fit_minmax(scores)
    a, b = calibration.fit_platt(scores, labels)

    minmax_ece = calibration.expected_calibration_error(labels, calibration.minmax_probabilities(scores, low, high))
    platt_ece = calibration.expected_calibration_error(labels, calibration.platt_probabilities(scores, a, b))

    assert platt_ece < minmax_ece


def test_platt_keeps_auroc(overlapping_scores):
    scores, labels = overlapping_scores
    a, b = calibration.fit_platt(scores, labels)
    probabilities = calibration.platt_probabilities(scores, a, b)

    assert a > 0
    assert roc_auc_score(labels, probabilities) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_minmax_keeps_auroc(overlapping_scores):
    scores, labels = overlapping_scores
    low, high = calibration.fit_minmax(scores)
    probabilities = calibration.minmax_probabilities(scores, low, high)

    assert roc_auc_score(labels, probabilities) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_platt_probabilities_hand_values():
    # sigmoid(2 * 0.5 - 1) = sigmoid(0) = 0.5, and sigmoid(2 * 1 - 1) = 1 / (1 + e^-1).
    probabilities = calibration.platt_probabilities(np.array([0.5, 1.0]), 2.0, -1.0)

    np.testing.assert_allclose(probabilities, [0.5, 1 / (1 + np.exp(-1.0))])


def test_platt_single_class():
    with pytest.raises(ValueError, match="Platt scaling needs both classes, got 3 normal and 0 anomalous"):
        calibration.fit_platt(np.arange(3.0), np.zeros(3, dtype=int))


def test_minmax_maps_and_clips():
    low, high = calibration.fit_minmax(np.array([2.0, 4.0, 3.0, 6.0]))
    probabilities = calibration.minmax_probabilities(np.array([0.0, 2.0, 3.0, 6.0, 9.0]), low, high)

    assert (low, high) == (2.0, 6.0)
    np.testing.assert_allclose(probabilities, [0.0, 0.0, 0.25, 1.0, 1.0])


def test_minmax_constant_scores():
    with pytest.raises(ValueError, match="All 3 calibration scores equal 1.5; min-max scaling is undefined"):
        calibration.fit_minmax(np.full(3, 1.5))


# Six images in 15 bins of width 1/15:
#   0.05 -> bin 0 (0.75), 0.5 -> bin 7 (7.5), 0.95 -> bin 14 (14.25).
# Bin 0: mean probability 0.05, anomaly frequency 1/2, gap 0.45.
# Bin 7: mean probability 0.5, frequency 0, gap 0.5.
# Bin 14: mean probability 0.95, frequency 1, gap 0.05.
# Each bin contains 2 of 6 images, so ECE = (0.45 + 0.5 + 0.05) / 3 = 1/3.
ECE_LABELS = np.array([0, 1, 0, 0, 1, 1])
ECE_PROBABILITIES = np.array([0.05, 0.05, 0.5, 0.5, 0.95, 0.95])


def test_ece_hand_value():
    assert calibration.expected_calibration_error(ECE_LABELS, ECE_PROBABILITIES) == pytest.approx(1 / 3)


def test_ece_one_bin():
    # One bin: |mean label - mean probability| = |1/2 - 0.5| = 0.
    assert calibration.expected_calibration_error(ECE_LABELS, ECE_PROBABILITIES, n_bins=1) == pytest.approx(0.0)


def test_ece_perfect_predictions():
    assert calibration.expected_calibration_error(np.array([0, 1, 1]), np.array([0.0, 1.0, 1.0])) == 0.0


def test_reliability_table_hand_counts():
    table = calibration.reliability_table(ECE_LABELS, ECE_PROBABILITIES)

    np.testing.assert_array_equal(table["count"], [2, 2, 2])
    np.testing.assert_allclose(table["center"], [0.5 / 15, 7.5 / 15, 14.5 / 15])
    np.testing.assert_allclose(table["confidence"], [0.05, 0.5, 0.95])
    np.testing.assert_allclose(table["frequency"], [0.5, 0.0, 1.0])


def test_reliability_table_edges():
    # 0 and 0.01 fall in bin 0, 0.5 in bin 7, and 1.0 in the closed last bin 14.
    table = calibration.reliability_table(np.array([0, 0, 1, 1, 1]), np.array([0.0, 0.01, 0.5, 1.0, 1.0]))

    np.testing.assert_array_equal(table["count"], [2, 1, 2])
    np.testing.assert_allclose(table["center"], [0.5 / 15, 7.5 / 15, 14.5 / 15])
    assert table["count"].sum() == 5


def test_reliability_table_bin_count():
    with pytest.raises(ValueError, match="n_bins must be at least 1, got 0"):
        calibration.reliability_table(ECE_LABELS, ECE_PROBABILITIES, n_bins=0)


@pytest.mark.parametrize("probabilities", [np.array([0.5, 1.2]), np.array([-0.1, 0.5]), np.array([])],
                         ids=["above-one", "negative", "empty"])
def test_reliability_table_rejects_probabilities(probabilities):
    labels = np.zeros(len(probabilities))

    with pytest.raises(ValueError, match=r"probabilities must be a non-empty array with values in \[0, 1\]"):
        calibration.reliability_table(labels, probabilities)


def test_nll_hand_value():
    # -(ln 0.8 + ln 0.6 + ln 0.5 + ln 0.9) / 4 = -ln(0.216) / 4 = 0.3831192...
    labels = np.array([1, 0, 1, 0])
    probabilities = np.array([0.8, 0.4, 0.5, 0.1])

    assert calibration.negative_log_likelihood(labels, probabilities) == pytest.approx(0.38311922, abs=1e-8)


def test_nll_finite_at_certain_mistake():
    # p = 0 for an anomalous image is clipped to 1e-12: NLL = -ln(1e-12) / 2 = 13.8155...
    value = calibration.negative_log_likelihood(np.array([1, 0]), np.array([0.0, 0.0]))

    assert value == pytest.approx(13.815510557964274, rel=1e-9)


def test_calibration_metrics_hand_values():
    # Brier = (0.2^2 + 0.4^2 + 0.5^2 + 0.1^2) / 4 = 0.46 / 4 = 0.115.
    labels = np.array([1, 0, 1, 0])
    probabilities = np.array([0.8, 0.4, 0.5, 0.1])
    result = calibration.calibration_metrics(labels, probabilities)

    assert result["brier"] == pytest.approx(0.115)
    assert result["nll"] == pytest.approx(0.38311922, abs=1e-8)
    # Bins: 0.1 -> 1, 0.4 -> 6, 0.5 -> 7, 0.8 -> 12, one image each:
    # ECE = (0.1 + 0.4 + 0.5 + 0.2) / 4 = 0.3.
    assert result["ece"] == pytest.approx(0.3)
