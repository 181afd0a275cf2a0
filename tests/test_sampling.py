"""Few-shot reference blocks and the calibration/evaluation split."""

import itertools

import numpy as np
import pytest

from adlib import data, sampling

SHOTS = (1, 2, 4, 8, 16)
SEEDS = (0, 1, 2)


def test_reference_block_hand_values():
    train_ids = ["e", "b", "f", "a", "d", "c"]

    # Sorted: a b c d e f. Seed s with k shots takes positions [s * k, (s + 1) * k).
    assert sampling.reference_block(train_ids, shots=2, seed=0) == ["a", "b"]
    assert sampling.reference_block(train_ids, shots=2, seed=2) == ["e", "f"]
    assert sampling.reference_block(train_ids, shots=1, seed=3) == ["d"]
    assert sampling.reference_block(train_ids, shots=3, seed=1) == ["d", "e", "f"]


def test_reference_block_ignores_input_order():
    train_ids = [f"good/{i:03d}.png" for i in range(20)]
    shuffled = list(np.random.default_rng(5).permutation(train_ids))

    assert sampling.reference_block(shuffled, shots=4, seed=2) == train_ids[8:12]


def test_reference_block_leaves_input_unchanged():
    train_ids = ["c", "a", "b"]
    sampling.reference_block(train_ids, shots=1, seed=0)

    assert train_ids == ["c", "a", "b"]


@pytest.mark.parametrize("shots", SHOTS)
def test_reference_blocks_disjoint(shots):
    train_ids = [f"{i:04d}" for i in range(60)]
    blocks = [set(sampling.reference_block(train_ids, shots=shots, seed=seed)) for seed in range(60 // shots)]

    for first, second in itertools.combinations(blocks, 2):
        assert not first & second
    assert sum(len(block) for block in blocks) == len(set().union(*blocks))


def test_reference_block_past_end():
    with pytest.raises(ValueError, match="shots=4 with seed=2 needs 12 normal training images, but only 10 exist"):
        sampling.reference_block([str(i) for i in range(10)], shots=4, seed=2)


def test_reference_block_rejects_shots():
    with pytest.raises(ValueError, match="shots must be at least 1, got 0"):
        sampling.reference_block(["a", "b"], shots=0, seed=0)


def test_reference_block_rejects_seed():
    with pytest.raises(ValueError, match="seed must be non-negative, got -1"):
        sampling.reference_block(["a", "b"], shots=1, seed=-1)


def assert_references_outside_test(dataset: data.AnomalyDataset) -> None:
    train_ids, test_ids = set(dataset.train_ids), set(dataset.test_ids)
    for shots, seed in itertools.product(SHOTS, SEEDS):
        references = sampling.reference_block(dataset.train_ids, shots=shots, seed=seed)
        assert len(references) == shots
        assert set(references) <= train_ids, (shots, seed)
        assert not set(references) & test_ids, (shots, seed)


def test_references_outside_test_elpv_mono(elpv_mono):
    assert_references_outside_test(elpv_mono)


def test_references_outside_test_elpv_poly(elpv_poly):
    assert_references_outside_test(elpv_poly)


def test_references_outside_test_bottle(bottle_root):
    bottle = data.load_mvtec_category(bottle_root, "bottle")

    assert_references_outside_test(bottle)
    # MVTec ids carry their folder, so the references must all come from train/good.
    references = sampling.reference_block(bottle.train_ids, shots=16, seed=2)
    assert all(image_id.startswith("train/good/") for image_id in references)


def test_references_outside_test_fixture(mvtec_root):
    widget = data.load_mvtec_category(mvtec_root, "widget")
    references = sampling.reference_block(widget.train_ids, shots=2, seed=1)

    assert references == ["train/good/002.png", "train/good/003.png"]
    assert not set(references) & set(widget.test_ids)


@pytest.fixture
def imbalanced_labels(rng):
    """70 normal and 31 anomalous labels in shuffled order."""
    return rng.permutation(np.r_[np.zeros(70, dtype=int), np.ones(31, dtype=int)])


def test_calibration_split_partition(imbalanced_labels):
    calibration, evaluation = sampling.calibration_split(imbalanced_labels, seed=0)

    assert not set(calibration) & set(evaluation)
    np.testing.assert_array_equal(np.sort(np.r_[calibration, evaluation]), np.arange(len(imbalanced_labels)))
    assert np.all(np.diff(calibration) > 0)
    assert np.all(np.diff(evaluation) > 0)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_calibration_split_stratified(imbalanced_labels, fraction):
    calibration, _ = sampling.calibration_split(imbalanced_labels, calibration_fraction=fraction, seed=1)
    calibration_labels = imbalanced_labels[calibration]

    assert abs(np.sum(calibration_labels == 0) - fraction * 70) <= 1
    assert abs(np.sum(calibration_labels == 1) - fraction * 31) <= 1


def test_calibration_split_deterministic(imbalanced_labels):
    first = sampling.calibration_split(imbalanced_labels, seed=3)
    second = sampling.calibration_split(imbalanced_labels, seed=3)
    other_seed = sampling.calibration_split(imbalanced_labels, seed=4)

    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], other_seed[0])


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5])
def test_calibration_split_rejects_fraction(imbalanced_labels, fraction):
    with pytest.raises(ValueError, match=r"calibration_fraction must lie in \(0, 1\)"):
        sampling.calibration_split(imbalanced_labels, calibration_fraction=fraction)


def test_calibration_split_small_class():
    labels = np.array([0, 0, 0, 0, 1])

    with pytest.raises(ValueError, match="Each class needs at least 2 test images.*got 4 normal and 1 anomalous"):
        sampling.calibration_split(labels)


def test_cap_per_class_counts(imbalanced_labels):
    kept_indices = sampling.cap_per_class(imbalanced_labels, max_per_class=20, seed=0)

    assert np.sum(imbalanced_labels[kept_indices] == 0) == 20
    assert np.sum(imbalanced_labels[kept_indices] == 1) == 20
    assert len(set(kept_indices)) == len(kept_indices)
    assert np.all(np.diff(kept_indices) > 0)


def test_cap_per_class_keeps_small_class(imbalanced_labels):
    kept_indices = sampling.cap_per_class(imbalanced_labels, max_per_class=50, seed=0)

    assert np.sum(imbalanced_labels[kept_indices] == 0) == 50
    assert np.sum(imbalanced_labels[kept_indices] == 1) == 31


def test_cap_per_class_deterministic(imbalanced_labels):
    first = sampling.cap_per_class(imbalanced_labels, max_per_class=10, seed=7)
    second = sampling.cap_per_class(imbalanced_labels, max_per_class=10, seed=7)

    np.testing.assert_array_equal(first, second)


def test_cap_per_class_rejects_cap():
    with pytest.raises(ValueError, match="max_per_class must be at least 2, got 1"):
        sampling.cap_per_class(np.array([0, 1, 0, 1]), max_per_class=1)


def test_shuffled_blocks_disjoint_and_fixed():
    ids = [f"cell{i:04d}" for i in range(40)]
    blocks = [sampling.reference_block(ids, shots=8, seed=s, order="shuffled") for s in range(5)]
    assert len(set().union(*map(set, blocks))) == 40
    assert blocks[0] != sorted(ids)[:8]
    assert blocks[1] == sampling.reference_block(list(reversed(ids)), shots=8, seed=1, order="shuffled")


def test_reference_block_bad_order():
    with pytest.raises(ValueError, match="order must be 'sorted' or 'shuffled'"):
        sampling.reference_block(["a", "b"], shots=1, seed=0, order="random")
