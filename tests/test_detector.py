"""kNN patch scoring checked against a brute-force torch computation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from adlib import detector

GRID = 20  # 20 x 20 = 400 patches per image, so the top 1 % is exactly 4 patches.
DIM = 16


def brute_force_patch_scores(reference_features: np.ndarray, features: np.ndarray) -> torch.Tensor:
    """1 - max cosine similarity of every test patch over all bank patches, in float64."""
    bank = torch.from_numpy(reference_features).double().reshape(-1, DIM)
    queries = torch.from_numpy(features).double().reshape(-1, DIM)
    cosine = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    return (1.0 - cosine.max(dim=1).values).reshape(features.shape[:-1])


def bilinear_upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear interpolation with half-pixel centres (align_corners=False), clamped at the edges."""
    grid_height, grid_width = grid.shape
    rows = np.clip((np.arange(height) + 0.5) * grid_height / height - 0.5, 0, grid_height - 1)
    columns = np.clip((np.arange(width) + 0.5) * grid_width / width - 0.5, 0, grid_width - 1)
    row0 = np.floor(rows).astype(int)
    column0 = np.floor(columns).astype(int)
    row1 = np.minimum(row0 + 1, grid_height - 1)
    column1 = np.minimum(column0 + 1, grid_width - 1)
    row_weight = (rows - row0)[:, None]
    column_weight = (columns - column0)[None, :]
    top = grid[row0][:, column0] * (1 - column_weight) + grid[row0][:, column1] * column_weight
    bottom = grid[row1][:, column0] * (1 - column_weight) + grid[row1][:, column1] * column_weight
    return top * (1 - row_weight) + bottom * row_weight


@pytest.fixture
def reference_and_test(rng):
    references = rng.normal(size=(2, GRID, GRID, DIM)).astype(np.float32)
    test_features = rng.normal(size=(3, GRID, GRID, DIM)).astype(np.float32)
    return references, test_features


def test_patch_scores_match_brute_force(reference_and_test):
    references, test_features = reference_and_test
    scores = detector.KNNDetector().fit(references).patch_scores(test_features)
    expected = brute_force_patch_scores(references, test_features).numpy()

    assert scores.shape == (3, GRID, GRID)
    np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_image_scores_match_brute_force(reference_and_test):
    references, test_features = reference_and_test
    knn = detector.KNNDetector().fit(references)
    image_scores = knn.image_scores(knn.patch_scores(test_features))
    expected = brute_force_patch_scores(references, test_features).reshape(3, -1).topk(4, dim=1).values.mean(dim=1)

    assert image_scores.shape == (3,)
    np.testing.assert_allclose(image_scores, expected.numpy(), atol=1e-5)


def test_nearest_distances_match_brute_force(reference_and_test):
    references, test_features = reference_and_test
    index = detector.build_index(references.reshape(-1, DIM))
    distances = detector.nearest_cosine_distances(index, test_features.reshape(-1, DIM))
    expected = brute_force_patch_scores(references, test_features).reshape(-1).numpy()

    np.testing.assert_allclose(distances, expected, atol=1e-5)


def test_bank_patch_scores_zero(reference_and_test):
    references, _ = reference_and_test
    scores = detector.KNNDetector().fit(references).patch_scores(references)

    np.testing.assert_allclose(scores, 0.0, atol=1e-6)
    assert scores.min() >= 0.0


def test_scores_ignore_feature_scale(reference_and_test):
    references, test_features = reference_and_test
    knn = detector.KNNDetector().fit(references)
    positive_scale = np.linspace(0.5, 20.0, GRID * GRID).reshape(1, GRID, GRID, 1).astype(np.float32)
    scaled_scores = knn.patch_scores(test_features * positive_scale)

    np.testing.assert_allclose(scaled_scores, knn.patch_scores(test_features), atol=1e-5)


def test_opposite_patch_distance_two():
    bank = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    queries = np.array([[-3.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=np.float32)
    distances = detector.nearest_cosine_distances(detector.build_index(bank), queries)

    # cos = -1 for the opposite vector and 0 for the orthogonal one.
    np.testing.assert_allclose(distances, [2.0, 1.0], atol=1e-6)


def test_top_fraction_mean_hand_values():
    scores = np.array([[1.0, 5.0, 3.0, 2.0], [4.0, 4.0, 0.0, 8.0]])

    # Half of 4 patches is 2: row 0 keeps 5 and 3, row 1 keeps 8 and 4.
    np.testing.assert_allclose(detector.top_fraction_mean(scores, 0.5), [4.0, 6.0])
    # 1 % of 4 patches rounds down to 0, and at least one patch is kept.
    np.testing.assert_allclose(detector.top_fraction_mean(scores, 0.01), [5.0, 8.0])
    np.testing.assert_allclose(detector.top_fraction_mean(scores, 1.0), [2.75, 4.0])


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_top_fraction_mean_rejects_fraction(fraction):
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\]"):
        detector.top_fraction_mean(np.ones((1, 4)), fraction)


def test_anomaly_maps_shape(rng):
    patch_scores = rng.random((2, 4, 6))
    maps = detector.anomaly_maps(patch_scores, (56, 84))

    assert maps.shape == (2, 56, 84)
    assert maps.dtype == np.float32


def test_anomaly_maps_match_scipy(rng):
    patch_scores = rng.random((2, 4, 6))
    maps = detector.anomaly_maps(patch_scores, (56, 84))

    for patch_grid, anomaly_map in zip(patch_scores, maps):
        expected = gaussian_filter(bilinear_upsample(patch_grid, 56, 84), sigma=4.0)
        np.testing.assert_allclose(anomaly_map, expected, atol=1e-5)


def test_anomaly_maps_sigma_changes_map(rng):
    patch_scores = rng.random((1, 4, 6))
    sharp = detector.anomaly_maps(patch_scores, (56, 84), sigma=1.0)[0]
    expected = gaussian_filter(bilinear_upsample(patch_scores[0], 56, 84), sigma=1.0)

    np.testing.assert_allclose(sharp, expected, atol=1e-5)
    assert not np.allclose(sharp, detector.anomaly_maps(patch_scores, (56, 84))[0], atol=1e-3)


def test_anomaly_maps_constant_grid():
    maps = detector.anomaly_maps(np.full((1, 3, 3), 0.25), (30, 45))

    np.testing.assert_allclose(maps, 0.25, atol=1e-6)


def test_patch_scores_before_fit():
    with pytest.raises(RuntimeError, match=r"Call fit\(\)"):
        detector.KNNDetector().patch_scores(np.ones((1, 2, 2, 4), dtype=np.float32))


@pytest.mark.parametrize("bank", [np.zeros((0, 4)), np.zeros(4)], ids=["empty", "one-dimensional"])
def test_build_index_rejects_bank(bank):
    with pytest.raises(ValueError, match=r"memory_bank must have shape \(n_patches, dim\)"):
        detector.build_index(bank)


def test_query_dimension_mismatch(rng):
    index = detector.build_index(rng.normal(size=(5, 8)))

    with pytest.raises(ValueError, match="Query dimension 4 does not match the bank's 8"):
        detector.nearest_cosine_distances(index, rng.normal(size=(3, 4)))


def test_normalize_rows_unit_norm(rng):
    rows = detector.normalize_rows(rng.normal(size=(6, 5)) * 7.0)

    assert rows.dtype == np.float32
    assert rows.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-6)


def test_normalize_rows_zero_row_finite():
    rows = detector.normalize_rows(np.zeros((2, 3)))

    assert np.all(np.isfinite(rows))
