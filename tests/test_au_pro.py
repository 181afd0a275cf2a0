"""Tests of AU-PRO on hand-built masks whose values are worked out in the comments."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from adlib.metrics import au_pro


@pytest.fixture
def two_regions() -> tuple[np.ndarray, np.ndarray]:
    """One 3 x 4 image with region A (2 pixels) and region B (1 pixel).

    masks        maps
    1 1 0 0      1.0  0.5  0    0
    0 0 0 0      0    0    0.75 0
    0 0 0 1      0    0    0    0.75

    With thresholds 1, 0.75, 0.5, 0.25, 0 (n_thresholds=5) the 9 normal pixels give
    FPR 0, 1/9, 1/9, 1/9, 1 and PRO = mean(A, B) = (1/2 + 0)/2, (1/2 + 1)/2, 1, 1, 1.
    The curve is (0, 0), (0, 1/4), (1/9, 3/4), (1/9, 1), (1/9, 1), (1, 1).
    """
    masks = np.zeros((1, 3, 4), dtype=bool)
    masks[0, 0, :2] = True
    masks[0, 2, 3] = True
    maps = np.zeros((1, 3, 4))
    maps[0, 0, 0], maps[0, 0, 1], maps[0, 1, 2], maps[0, 2, 3] = 1.0, 0.5, 0.75, 0.75
    return masks, maps


def test_au_pro_hand_computed(two_regions):
    masks, maps = two_regions
    # Area up to 0.3: (1/9) * (1/4 + 3/4) / 2 + (0.3 - 1/9) * 1 = 0.3 - 1/18, divided by 0.3 = 22/27.
    assert au_pro(masks, maps, n_thresholds=5) == pytest.approx(22 / 27)


def test_au_pro_full_range(two_regions):
    masks, maps = two_regions
    # Area up to 1: 1/18 + (1 - 1/9) = 17/18.
    assert au_pro(masks, maps, max_fpr=1.0, n_thresholds=5) == pytest.approx(17 / 18)


def test_au_pro_limit_inside_slope(two_regions):
    masks, maps = two_regions
    # At FPR 1/18, halfway along the slope, PRO is 1/2. Area (1/18) * (1/4 + 1/2) / 2 = 1/48, / (1/18) = 3/8.
    assert au_pro(masks, maps, max_fpr=1 / 18, n_thresholds=5) == pytest.approx(3 / 8)


def test_au_pro_uses_8_connectivity():
    # The diagonal pixel joins the pair into one 3-pixel region, so at threshold 1 the
    # PRO is 1/3 (with 4-connectivity it would be (0 + 1) / 2). The curve (0, 0), (0, 1/3),
    # (1, 1) has area (1/3 + 1) / 2 = 2/3 up to FPR 1.
    masks = np.zeros((1, 2, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = True
    maps = np.zeros((1, 2, 3))
    maps[0, 1, 2] = 1.0
    assert au_pro(masks, maps, max_fpr=1.0, n_thresholds=2) == pytest.approx(2 / 3)


def test_au_pro_regions_weigh_equally_across_images():
    # Image 0 has a 4-pixel region fully found at threshold 1, and image 1 a 1-pixel region
    # that is missed. PRO at threshold 1 is (1 + 0) / 2 whatever the sizes. Curve (0, 0),
    # (0, 1/2), (1, 1) has area 3/4 up to FPR 1.
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2, :2] = True
    masks[1, 3, 3] = True
    maps = np.where(masks, 1.0, 0.0)
    maps[1, 3, 3] = 0.0
    assert au_pro(masks, maps, max_fpr=1.0, n_thresholds=2) == pytest.approx(3 / 4)


def test_au_pro_perfect_and_inverted_maps(two_regions):
    masks, _ = two_regions
    assert au_pro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert au_pro(masks, 1.0 - masks) == pytest.approx(0.0)


def test_au_pro_constant_map(two_regions):
    masks, _ = two_regions
    # Every pixel is predicted anomalous at the only threshold: the curve is the diagonal.
    assert au_pro(masks, np.full(masks.shape, 0.5)) == pytest.approx(0.15)


def test_au_pro_affine_invariance(rng):
    # An increasing affine map moves the evenly spaced thresholds along with the scores.
    masks = rng.random((3, 16, 16)) > 0.85
    maps = rng.random((3, 16, 16)) + masks
    assert au_pro(masks, 3 * maps + 1) == pytest.approx(au_pro(masks, maps), abs=1e-9)


def brute_force_au_pro(masks, maps, thresholds, max_fpr):
    """Independent reference: loop over thresholds and regions, then integrate on a fine grid."""
    regions = []
    for index, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labels == k) for k in range(1, count + 1)]
    fprs, pros = [0.0], [0.0]
    for threshold in thresholds:
        predicted = maps >= threshold
        fprs.append((predicted & ~masks).sum() / (~masks).sum())
        pros.append(np.mean([predicted[index][region].mean() for index, region in regions]))
    grid = np.linspace(0, max_fpr, 200001)
    # Vertical steps (equal FPR) matter only at single grid points, so np.interp may pick either end.
    values = np.interp(grid, np.array(fprs), np.array(pros))
    return np.trapezoid(values, grid) / max_fpr


def test_au_pro_matches_brute_force(rng):
    masks = np.zeros((2, 12, 12), dtype=bool)
    masks[0, 2:5, 2:6] = True
    masks[0, 8:10, 8:9] = True
    masks[1, 5:11, 1:4] = True
    maps = rng.random((2, 12, 12)) * 0.6 + masks * rng.random((2, 12, 12)) * 0.8
    thresholds = np.linspace(maps.max(), maps.min(), 50)
    expected = brute_force_au_pro(masks, maps, thresholds, 0.3)
    assert au_pro(masks, maps, n_thresholds=50) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("masks, maps, options, message", [
    (np.ones((1, 2, 2)), np.ones((1, 2, 3)), {}, "must share one"),
    (np.ones((2, 2)), np.ones((2, 2)), {}, "must share one"),
    (np.full((1, 2, 2), 2), np.ones((1, 2, 2)), {}, "must be binary"),
    (np.zeros((1, 2, 2)), np.ones((1, 2, 2)), {}, "both anomalous and normal"),
    (np.ones((1, 2, 2)), np.ones((1, 2, 2)), {}, "both anomalous and normal"),
    (np.eye(2)[None], np.full((1, 2, 2), np.nan), {}, "NaN or infinite"),
    (np.eye(2)[None], np.ones((1, 2, 2)), {"max_fpr": 0.0}, r"max_fpr must lie in \(0, 1\]"),
    (np.eye(2)[None], np.ones((1, 2, 2)), {"max_fpr": 1.5}, r"max_fpr must lie in \(0, 1\]"),
    (np.eye(2)[None], np.ones((1, 2, 2)), {"n_thresholds": 1}, "n_thresholds must be at least 2"),
])
def test_au_pro_invalid_input(masks, maps, options, message):
    with pytest.raises(ValueError, match=message):
        au_pro(masks, maps, **options)
