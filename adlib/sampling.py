"""Few-shot reference sampling and the calibration/evaluation split of test images."""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from sklearn.model_selection import train_test_split


def reference_block(train_ids: Sequence[str], *, shots: int, seed: int,
                    order: Literal["sorted", "shuffled"] = "sorted") -> list[str]:
    """Pick the few-shot references for one seed with AnomalyDINO's rule.

    The normal training ids are sorted, and seed ``s`` takes the block
    ``[s * shots, (s + 1) * shots)``. Blocks of different seeds never overlap.
    With ``order="shuffled"`` the sorted ids are first permuted by a generator
    with the fixed seed 0, so blocks stay disjoint but no longer hold neighbouring
    files. This matters for ELPV, whose file names run module by module, so a
    sorted block holds cells of a single solar module.

    Raises
    ------
    ValueError
        If ``shots`` or ``seed`` is negative or zero where it must not be, or the
        block runs past the end of the training images.

    Examples
    --------
    >>> reference_block(["c", "a", "b", "d"], shots=2, seed=1)
    ['c', 'd']
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}.")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}.")
    if order not in ("sorted", "shuffled"):
        raise ValueError(f"order must be 'sorted' or 'shuffled', got {order!r}.")
    ordered = sorted(train_ids)
    if order == "shuffled":
        ordered = [ordered[i] for i in np.random.default_rng(0).permutation(len(ordered))]
    end = (seed + 1) * shots
    if end > len(ordered):
        raise ValueError(
            f"shots={shots} with seed={seed} needs {end} normal training images, but only "
            f"{len(ordered)} exist; lower shots or seed.")
    return ordered[seed * shots:end]


def calibration_split(labels: np.ndarray, *, calibration_fraction: float = 0.5,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split test indices into a calibration part and an evaluation part.

    The split is stratified by label and seeded. Calibrators, decision
    thresholds and the attack's surrogate head are fitted on the calibration
    part. Every reported metric uses the evaluation part.

    Parameters
    ----------
    labels : array-like of shape (n_test,)
        Binary labels, 1 for anomalous.
    calibration_fraction : float, default=0.5
        Share of the test images in the calibration part, in (0, 1).
    seed : int, default=0

    Returns
    -------
    calibration, evaluation : ndarray of int
        Sorted indices into ``labels``.
    """
    labels = np.asarray(labels)
    if not 0 < calibration_fraction < 1:
        raise ValueError(f"calibration_fraction must lie in (0, 1), got {calibration_fraction}.")
    counts = np.bincount(labels, minlength=2)
    if counts.min() < 2:
        raise ValueError(f"Each class needs at least 2 test images for a stratified split; "
                         f"got {counts[0]} normal and {counts[1]} anomalous.")
    indices = np.arange(len(labels))
    calibration, evaluation = train_test_split(
        indices, train_size=calibration_fraction, stratify=labels, random_state=seed)
    return np.sort(calibration), np.sort(evaluation)


def cap_per_class(labels: np.ndarray, *, max_per_class: int, seed: int = 0) -> np.ndarray:
    """Return sorted indices keeping at most ``max_per_class`` images of each label.

    The subset is drawn without replacement with a seeded generator, so small
    parameter sets stay fast and reproducible.
    """
    if max_per_class < 2:
        raise ValueError(f"max_per_class must be at least 2, got {max_per_class}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    kept = []
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        if len(members) > max_per_class:
            members = rng.choice(members, size=max_per_class, replace=False)
        kept.append(members)
    return np.sort(np.concatenate(kept))
