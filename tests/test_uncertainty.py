"""Binary predictive entropy and entropy-based attack flagging."""

import numpy as np
import pytest

from adlib import uncertainty


def test_entropy_max_at_half():
    assert uncertainty.binary_entropy(np.array([0.5]))[0] == pytest.approx(np.log(2.0))


def test_entropy_max_over_grid():
    grid = np.linspace(0.0, 1.0, 101)
    entropy = uncertainty.binary_entropy(grid)

    assert grid[np.argmax(entropy)] == pytest.approx(0.5)
    assert entropy.max() <= np.log(2.0) + 1e-15


def test_entropy_zero_at_ends():
    entropy = uncertainty.binary_entropy(np.array([0.0, 1.0]))

    np.testing.assert_allclose(entropy, 0.0, atol=1e-9)
    assert np.all(entropy >= 0.0)


def test_entropy_symmetric():
    probabilities = np.array([0.01, 0.2, 0.3, 0.45])

    np.testing.assert_allclose(uncertainty.binary_entropy(probabilities),
                               uncertainty.binary_entropy(1.0 - probabilities), rtol=1e-12)


def test_entropy_hand_value():
    # H(0.25) = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616 = 0.5623351 nats.
    assert uncertainty.binary_entropy(np.array([0.25]))[0] == pytest.approx(0.5623351446, abs=1e-9)


# Calibration entropies 0, 1/30, ..., 20/30: the 0.95 quantile sits at position
# 0.95 * 20 = 19, so the threshold is 19/30 = 0.6333.
CALIBRATION_ENTROPY = np.arange(21) / 30
# Clean: only 0.65 lies above the threshold, so FPR = 1/4.
CLEAN_ENTROPY = np.array([0.1, 0.2, 0.65, 0.3])
# Attacked: 0.66, 0.68 and 0.69 lie above it, so TPR = 3/4.
ATTACKED_ENTROPY = np.array([0.66, 0.68, 0.5, 0.69])


def test_flagging_hand_values():
    # AUROC, attacked positive: 0.66, 0.68 and 0.69 beat all four clean values and
    # 0.5 beats three of them, so 15 of 16 pairs are ordered correctly.
    result = uncertainty.flagging_metrics(CLEAN_ENTROPY, ATTACKED_ENTROPY, CALIBRATION_ENTROPY)

    assert result["flag_threshold"] == pytest.approx(19 / 30)
    assert result["flag_tpr"] == pytest.approx(0.75)
    assert result["flag_fpr"] == pytest.approx(0.25)
    assert result["flag_auroc"] == pytest.approx(15 / 16)


def test_flagging_target_fpr_moves_threshold():
    # The 0.5 quantile of 0, 1/30, ..., 20/30 is 10/30. Clean values above it are
    # 0.65 only, and every attacked value lies above it.
    result = uncertainty.flagging_metrics(CLEAN_ENTROPY, ATTACKED_ENTROPY, CALIBRATION_ENTROPY, target_fpr=0.5)

    assert result["flag_threshold"] == pytest.approx(10 / 30)
    assert result["flag_tpr"] == pytest.approx(1.0)
    assert result["flag_fpr"] == pytest.approx(0.25)


def test_flagging_identical_entropies():
    result = uncertainty.flagging_metrics(CLEAN_ENTROPY, CLEAN_ENTROPY, CALIBRATION_ENTROPY)

    assert result["flag_auroc"] == pytest.approx(0.5)
    assert result["flag_tpr"] == result["flag_fpr"]


@pytest.mark.parametrize("target_fpr", [0.0, 1.0, -0.05])
def test_flagging_rejects_target_fpr(target_fpr):
    with pytest.raises(ValueError, match=r"target_fpr must lie in \(0, 1\)"):
        uncertainty.flagging_metrics(CLEAN_ENTROPY, ATTACKED_ENTROPY, CALIBRATION_ENTROPY, target_fpr=target_fpr)
