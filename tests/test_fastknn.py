"""Approximate kNN indexes and the exact refinement of each image's top patches."""

import numpy as np
import pytest

from adlib import detector, fastknn
from adlib.fastknn import FastKNNDetector

DIM = 8


def unit_rows(rng, count: int, dim: int = DIM) -> np.ndarray:
    rows = rng.normal(size=(count, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def exact_distances(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """1 - max cosine similarity in float64, independent of faiss."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return 1.0 - (queries.astype(np.float64) @ bank.T.astype(np.float64)).max(axis=1)


@pytest.mark.parametrize(("bank_size", "expected"), [(1, "exact"), (fastknn.EXACT_MAX_BANK_SIZE, "exact"),
                                                     (fastknn.EXACT_MAX_BANK_SIZE + 1, "ivf")])
def test_choose_method_by_bank_size(bank_size, expected):
    assert fastknn.choose_method(bank_size) == expected


def test_choose_method_rejects_empty_bank():
    with pytest.raises(ValueError, match="bank_size must be positive"):
        fastknn.choose_method(0)


@pytest.mark.parametrize(("bank_size", "lists"), [(1, 4), (1024, 128), (131_072, 1024)])
def test_ivf_list_count(bank_size, lists):
    assert fastknn.ivf_list_count(bank_size) == lists


def test_ivf_probing_every_list_is_exact(rng):
    bank, queries = unit_rows(rng, 2000), unit_rows(rng, 300)
    index = fastknn.build_ivf_index(bank, n_lists=16, n_probe=16)
    distances = detector.nearest_cosine_distances(index, queries)
    np.testing.assert_allclose(distances, exact_distances(bank, queries), atol=1e-5)


def test_ivf_distances_are_upper_bounds(rng):
    bank, queries = unit_rows(rng, 2000), unit_rows(rng, 300)
    index = fastknn.build_ivf_index(bank, n_lists=64, n_probe=1)
    distances = detector.nearest_cosine_distances(index, queries)
    assert np.all(distances >= exact_distances(bank, queries) - 1e-5)


def test_ivf_rejects_invalid_settings(rng):
    bank = unit_rows(rng, 50)
    with pytest.raises(ValueError, match="n_lists must lie in"):
        fastknn.build_ivf_index(bank, n_lists=51)
    with pytest.raises(ValueError, match="n_probe must be at least 1"):
        fastknn.build_ivf_index(bank, n_lists=4, n_probe=0)
    with pytest.raises(ValueError, match="memory_bank must have shape"):
        fastknn.build_ivf_index(bank[None])


def test_coreset_picks_one_point_per_cluster(rng):
    centers = np.eye(DIM, dtype=np.float32)[:5] * 10
    bank = np.concatenate([center + 0.01 * rng.normal(size=(40, DIM)) for center in centers]).astype(np.float32)
    chosen = fastknn.greedy_coreset_indices(bank, size=5)
    assert sorted(chosen // 40) == [0, 1, 2, 3, 4]


def test_coreset_indices_unique_and_sized(rng):
    bank = unit_rows(rng, 500, dim=200)
    chosen = fastknn.greedy_coreset_indices(bank, size=50, projection_dim=16)
    assert chosen.shape == (50,)
    assert len(np.unique(chosen)) == 50


def test_coreset_rejects_invalid_size(rng):
    with pytest.raises(ValueError, match="size must lie in"):
        fastknn.greedy_coreset_indices(unit_rows(rng, 10), size=11)
    with pytest.raises(ValueError, match="fraction must lie in"):
        fastknn.build_coreset_index(unit_rows(rng, 10), fraction=0)


def test_coreset_distances_are_upper_bounds(rng):
    bank, queries = unit_rows(rng, 1000), unit_rows(rng, 200)
    index = fastknn.build_coreset_index(bank, fraction=0.1)
    assert index.ntotal == 100
    distances = detector.nearest_cosine_distances(index, queries)
    assert np.all(distances >= exact_distances(bank, queries) - 1e-5)


def test_refine_makes_top_patches_exact(rng):
    bank = unit_rows(rng, 500)
    patches = unit_rows(rng, 4 * 100).reshape(4, 100, DIM)
    exact = exact_distances(bank, patches.reshape(-1, DIM)).reshape(4, 100)
    approximate = exact + rng.uniform(0, 0.05, size=exact.shape)
    refined, fallbacks = fastknn.refine_top_patches(approximate, patches, bank,
                                                    top_count=3, candidate_count=12)
    top = np.sort(refined, axis=1)[:, -3:]
    np.testing.assert_allclose(top, np.sort(exact, axis=1)[:, -3:], atol=1e-5)
    assert fallbacks == 0


def test_refine_falls_back_when_bound_fails(rng):
    bank = unit_rows(rng, 500)
    patches = unit_rows(rng, 2 * 100).reshape(2, 100, DIM)
    exact = exact_distances(bank, patches.reshape(-1, DIM)).reshape(2, 100)
    approximate = exact.copy()
    # In image 0 the 12 lowest patches get inflated scores, so they become the
    # candidates while the true top patches stay outside.
    lowest = np.argsort(exact[0])[:12]
    approximate[0, lowest] = 5.0
    refined, fallbacks = fastknn.refine_top_patches(approximate, patches, bank,
                                                    top_count=3, candidate_count=12)
    assert fallbacks == 1
    np.testing.assert_allclose(refined[0], exact[0], atol=1e-5)


@pytest.mark.parametrize("method", ["ivf", "coreset"])
def test_fast_detector_image_scores_match_exact(rng, method):
    references = rng.normal(size=(6, 16, 16, DIM)).astype(np.float32)
    tests = rng.normal(size=(10, 16, 16, DIM)).astype(np.float32)
    tests[:3, :2, :2] += 3.0  # a few anomalous patches
    exact = detector.KNNDetector().fit(references)
    fast = FastKNNDetector(method=method, n_probe=1).fit(references)
    expected = exact.image_scores(exact.patch_scores(tests))
    scores = fast.image_scores(fast.patch_scores(tests))
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert fastknn.rank_agreement(expected, scores) > 0.999
    assert fast.method_ == method


def test_auto_switches_to_ivf_above_threshold(rng):
    small = rng.normal(size=(1, 8, 8, DIM)).astype(np.float32)
    large = rng.normal(size=(2, 48, 48, DIM)).astype(np.float32)  # 4,608 patches
    assert FastKNNDetector().fit(small).method_ == "exact"
    assert FastKNNDetector().fit(large).method_ == "ivf"


def test_fast_detector_on_real_features(lite0, elpv_small_images):
    from adlib import features

    images, labels = elpv_small_images
    extracted = features.extract_patch_features(lite0, images, progress=False)
    references, tests = extracted[:3], extracted[3:]
    exact = detector.KNNDetector().fit(references)
    fast = FastKNNDetector(method="ivf", n_probe=1).fit(references)
    expected = exact.image_scores(exact.patch_scores(tests))
    np.testing.assert_allclose(fast.image_scores(fast.patch_scores(tests)), expected, atol=1e-5)


def test_fast_detector_rejects_invalid_options():
    with pytest.raises(ValueError, match="Unknown kNN method"):
        FastKNNDetector(method="hnsw")
    with pytest.raises(ValueError, match="candidate_factor must be at least 1"):
        FastKNNDetector(candidate_factor=0)
    with pytest.raises(RuntimeError, match="Call fit"):
        FastKNNDetector().patch_scores(np.zeros((1, 2, 2, DIM), np.float32))


@pytest.mark.parametrize("query_count", [300, fastknn.FAISS_MIN_QUERIES])
def test_exact_cosine_distances(rng, query_count):
    bank, queries = unit_rows(rng, 1000), unit_rows(rng, query_count)
    distances = fastknn.exact_cosine_distances(bank * 3.0, queries, block_size=128)
    np.testing.assert_allclose(distances, exact_distances(bank, queries), atol=1e-5)


def test_search_quality_of_exact_index(rng):
    bank, queries = unit_rows(rng, 300), unit_rows(rng, 50)
    index = detector.build_index(bank)
    quality = fastknn.search_quality(index, index, queries)
    assert quality["recall_at_1"] == 1.0
    assert quality["max_distance_error"] == 0.0


def test_search_quality_of_coreset(rng):
    bank, queries = unit_rows(rng, 1000), unit_rows(rng, 200)
    quality = fastknn.search_quality(detector.build_index(bank), fastknn.build_coreset_index(bank, fraction=0.05),
                                     queries)
    assert quality["recall_at_1"] < 1.0
    assert quality["mean_distance_error"] > 0.0


def test_rank_agreement_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        fastknn.rank_agreement(np.arange(3), np.arange(4))
    assert fastknn.rank_agreement(np.arange(5), np.arange(5) ** 2) == pytest.approx(1.0)


def test_fast_detector_with_foreground_matches_masked_exact(rng):
    from adlib import masking

    references = rng.normal(size=(6, 16, 16, DIM)).astype(np.float32)
    tests = rng.normal(size=(6, 16, 16, DIM)).astype(np.float32)
    tests[:, :3, :3] += 3.0  # the highest patches, masked out as background below
    foreground = np.ones(tests.shape[:-1], dtype=bool)
    foreground[:, :3, :3] = False
    foreground[0] = False  # an image without foreground
    foreground[1] = False
    foreground[1, 5, 5] = True  # an image with fewer foreground patches than the top count
    exact = detector.KNNDetector().fit(references)
    fast = FastKNNDetector(method="ivf", n_probe=1).fit(references)
    expected = exact.image_scores(masking.apply_foreground_masks(exact.patch_scores(tests), foreground))
    masked = masking.apply_foreground_masks(fast.patch_scores(tests, foreground=foreground), foreground)
    np.testing.assert_allclose(fast.image_scores(masked), expected, atol=1e-5)


def test_fast_detector_rejects_misshaped_foreground(rng):
    references = rng.normal(size=(2, 8, 8, DIM)).astype(np.float32)
    fast = FastKNNDetector(method="ivf", n_probe=1).fit(references)
    with pytest.raises(ValueError, match="foreground must have shape"):
        fast.patch_scores(references, foreground=np.ones((2, 4, 4), dtype=bool))
