"""AnomalyDINO's training-free nearest-neighbour patch scoring.

Patch features of the few-shot references form a memory bank. A test patch's
anomaly score is its cosine distance to the nearest bank patch, the image score
is the mean of the highest 1 % of patch scores, and the anomaly map is the
patch-score grid upsampled bilinearly and smoothed by a Gaussian (sigma = 4).
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def normalize_rows(features: np.ndarray) -> np.ndarray:
    """L2-normalise the rows of a (n, dim) array, returned as contiguous float32."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def build_index(memory_bank: np.ndarray) -> faiss.Index:
    """Return an exact faiss L2 index over the L2-normalised bank of shape (n, dim)."""
    if memory_bank.ndim != 2 or len(memory_bank) == 0:
        raise ValueError(f"memory_bank must have shape (n_patches, dim) with n_patches > 0, "
                         f"got {memory_bank.shape}.")
    bank = normalize_rows(memory_bank)
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    return index


def nearest_cosine_distances(index: faiss.Index, queries: np.ndarray) -> np.ndarray:
    """Return each query's cosine distance, 1 - cos, to its nearest bank patch.

    For unit vectors ||a - b||^2 = 2 - 2 cos(a, b), so half the squared L2
    distance that faiss returns is the cosine distance.
    """
    if queries.shape[1] != index.d:
        raise ValueError(f"Query dimension {queries.shape[1]} does not match the bank's {index.d}.")
    squared, _ = index.search(normalize_rows(queries), 1)
    return np.clip(squared[:, 0] / 2.0, 0.0, 2.0)


def top_fraction_mean(patch_scores: np.ndarray, fraction: float = 0.01) -> np.ndarray:
    """Mean of the highest ``fraction`` of each row's scores, at least one score.

    Parameters
    ----------
    patch_scores : ndarray of shape (n_images, n_patches)
    fraction : float, default=0.01

    Returns
    -------
    ndarray of shape (n_images,)
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
    count = max(1, int(patch_scores.shape[1] * fraction))
    top = np.partition(patch_scores, patch_scores.shape[1] - count, axis=1)[:, -count:]
    return top.mean(axis=1)


def anomaly_maps(patch_scores: np.ndarray, image_shape: tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Upsample (n, grid_h, grid_w) patch scores bilinearly to ``image_shape`` and smooth them.

    Returns
    -------
    ndarray of shape (n, height, width), float32
    """
    grid = torch.from_numpy(np.ascontiguousarray(patch_scores, dtype=np.float32))[:, None]
    upsampled = F.interpolate(grid, size=tuple(image_shape), mode="bilinear", align_corners=False)[:, 0].numpy()
    return np.stack([gaussian_filter(m, sigma=sigma) for m in upsampled]).astype(np.float32)


class KNNDetector:
    """Memory bank of reference patches with cosine nearest-neighbour scoring.

    Parameters
    ----------
    top_fraction : float, default=0.01
        Share of the highest patch scores averaged into the image score.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> detector = KNNDetector().fit(rng.normal(size=(2, 4, 4, 8)))
    >>> detector.patch_scores(rng.normal(size=(3, 4, 4, 8))).shape
    (3, 4, 4)
    """

    def __init__(self, *, top_fraction: float = 0.01):
        self.top_fraction = top_fraction
        self.index_ = None

    def fit(self, reference_features: np.ndarray) -> "KNNDetector":
        """Store every patch of the (n_refs, grid_h, grid_w, dim) reference features."""
        self.index_ = build_index(reference_features.reshape(-1, reference_features.shape[-1]))
        return self

    def patch_scores(self, features: np.ndarray) -> np.ndarray:
        """Return cosine distances of shape (n, grid_h, grid_w) for (n, grid_h, grid_w, dim) features."""
        if self.index_ is None:
            raise RuntimeError("Call fit() with reference features before scoring.")
        distances = nearest_cosine_distances(self.index_, features.reshape(-1, features.shape[-1]))
        return distances.reshape(features.shape[:-1])

    def image_scores(self, patch_scores: np.ndarray) -> np.ndarray:
        """Return the mean of the top ``top_fraction`` patch scores per image, shape (n,)."""
        return top_fraction_mean(patch_scores.reshape(len(patch_scores), -1), self.top_fraction)
