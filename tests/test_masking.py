"""Tests of AnomalyDINO's PCA foreground mask."""

from __future__ import annotations

import numpy as np
import pytest

from adlib.masking import (
    apply_foreground_masks,
    clean_mask,
    first_principal_component,
    foreground_mask,
    foreground_masks,
    threshold_first_component,
)


def object_features(rng, *, size: int = 10, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Patch features of a centred square object on a background, and the object's grid mask.

    Object patches sit at +20 and background patches at -20 along the first axis.
    16 of the 100 patches are object, so the mean is -13.6, and after centring the
    object projects to about 33.6 and the background to about -6.4. Only the
    object passes the threshold of 10, on one side or the other of the component.
    """
    inside = np.zeros((size, size), dtype=bool)
    inside[3:7, 3:7] = True
    features = rng.normal(scale=0.1, size=(size, size, dim)).astype(np.float32)
    features[..., 0] += np.where(inside, 20.0, -20.0)
    return features, inside


def dilated(mask: np.ndarray) -> np.ndarray:
    """Dilation by a 3 x 3 kernel written out by hand."""
    padded = np.pad(mask, 1)
    shifts = [padded[1 + dr:1 + dr + mask.shape[0], 1 + dc:1 + dc + mask.shape[1]]
              for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
    return np.logical_or.reduce(shifts)


def test_first_component_separates_groups(rng):
    features, inside = object_features(rng)
    component = first_principal_component(features.reshape(-1, 8)).reshape(10, 10)
    sign = np.sign(component[inside][0])
    np.testing.assert_allclose(sign * component[inside], 33.6, atol=0.5)
    np.testing.assert_allclose(sign * component[~inside], -6.4, atol=0.5)


def test_mask_finds_centred_object(rng):
    features, inside = object_features(rng)
    mask = foreground_mask(features)
    np.testing.assert_array_equal(mask, dilated(inside))


def test_mask_ignores_component_sign(rng):
    features, _ = object_features(rng)
    np.testing.assert_array_equal(foreground_mask(features), foreground_mask(-features))


def test_threshold_keeps_central_foreground():
    component = np.full((10, 10), -20.0)
    component[2:8, 2:8] = 20.0
    mask = threshold_first_component(component)
    np.testing.assert_array_equal(mask, component > 10)


def test_threshold_flips_when_centre_is_background():
    # The positive side is the frame around the object, so the centre is empty and the sign flips.
    component = np.full((10, 10), 20.0)
    component[2:8, 2:8] = -20.0
    mask = threshold_first_component(component)
    np.testing.assert_array_equal(mask, component < -10)


def test_threshold_flip_rule_boundary():
    # The central crop of a 10 x 10 grid is rows and columns 2..7, 36 patches.
    # 35 % of 36 is 12.6: 12 foreground patches flip the sign, 13 do not.
    center_indices = [row * 10 + column for row in range(2, 8) for column in range(2, 8)]
    for n_foreground, flipped in ((12, True), (13, False)):
        component = np.full((10, 10), -20.0)
        component.reshape(-1)[center_indices[:n_foreground]] = 20.0
        mask = threshold_first_component(component)
        assert mask.sum() == (100 - n_foreground if flipped else n_foreground), n_foreground


def test_threshold_is_strict():
    component = np.full((10, 10), 10.0)
    component[4:6, 4:6] = 10.5
    mask = threshold_first_component(component, min_center_fraction=0.0)
    assert mask.sum() == 4


def test_threshold_tiny_grid_uses_whole_grid():
    component = np.array([[20.0, 20.0, -20.0]])
    np.testing.assert_array_equal(threshold_first_component(component), [[True, True, False]])


def test_clean_mask_keeps_border_foreground():
    mask = np.zeros((6, 6), dtype=bool)
    mask[:, 0] = True
    expected = np.zeros((6, 6), dtype=bool)
    expected[:, :2] = True
    np.testing.assert_array_equal(clean_mask(mask), expected)


def test_clean_mask_closes_hole():
    # Dilation alone leaves the centre of a 3 x 3 hole empty; the closing fills it.
    mask = np.zeros((9, 9), dtype=bool)
    mask[1:8, 1:8] = True
    mask[3:6, 3:6] = False
    assert not dilated(mask)[4, 4]
    cleaned = clean_mask(mask)
    assert cleaned[4, 4]
    np.testing.assert_array_equal(cleaned, dilated(mask) | (np.arange(81).reshape(9, 9) == 40))


def test_masks_for_batch(rng):
    features, inside = object_features(rng)
    masks = foreground_masks(np.stack([features, -features]))
    assert masks.shape == (2, 10, 10)
    np.testing.assert_array_equal(masks[0], dilated(inside))
    np.testing.assert_array_equal(masks[1], dilated(inside))


def test_apply_masks_zeroes_background():
    scores = np.arange(8, dtype=np.float32).reshape(1, 2, 4) + 1
    masks = np.array([[[True, False, True, False], [False, False, True, True]]])
    masked = apply_foreground_masks(scores, masks)
    np.testing.assert_array_equal(masked, [[[1, 0, 3, 0], [0, 0, 7, 8]]])
    assert masked.dtype == np.float32
    assert scores[0, 0, 1] == 2


@pytest.mark.parametrize("call, message", [
    (lambda: first_principal_component(np.zeros((1, 4))), r"n_patches >= 2"),
    (lambda: threshold_first_component(np.zeros(4)), r"\(grid_h, grid_w\) grid"),
    (lambda: threshold_first_component(np.zeros((4, 4)), center_border=0.5), r"center_border must lie in \[0, 0.5\)"),
    (lambda: clean_mask(np.zeros((4, 4), bool), kernel_size=2), "positive odd number, got 2"),
    (lambda: foreground_mask(np.zeros((4, 4))), r"\(grid_h, grid_w, dim\)"),
    (lambda: foreground_masks(np.zeros((4, 4, 3))), r"\(n, grid_h, grid_w, dim\)"),
    (lambda: apply_foreground_masks(np.zeros((1, 2, 2)), np.ones((1, 2, 3), bool)), "differ in shape"),
])
def test_masking_invalid_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
