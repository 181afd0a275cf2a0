"""AnomalyDINO's zero-shot foreground mask on a grid of patch features.

The rule follows ``compute_background_mask`` in the official AnomalyDINO code
(github.com/dammsi/AnomalyDINO, ``src/backbones.py``):

1. Project every patch token of one image onto the image's first principal component.
2. Keep the patches whose projection exceeds 10.
3. If at most 35 % of the central crop is kept, the object is probably on the
   other side of the component, so keep the patches whose negated projection
   exceeds 10 instead. The central crop drops 20 % of the grid on every side,
   rows ``int(0.2 * h)`` to ``int(0.8 * h)`` and likewise for columns.
4. Dilate with a 3 x 3 kernel, then close with the same kernel.

The threshold of 10 refers to DINOv2 patch tokens after the final LayerNorm, not
L2-normalised, which is what :class:`adlib.backbones.DinoV2Extractor` returns.
For other backbones the threshold has no calibrated meaning.

Only test images are masked. The official code builds the memory bank from
unmasked references, because its ``mask_ref_images`` option defaults to False.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.decomposition import PCA

PCA_THRESHOLD = 10.0
CENTER_BORDER = 0.2
MIN_CENTER_FOREGROUND = 0.35
KERNEL_SIZE = 3


def first_principal_component(patch_features: np.ndarray) -> np.ndarray:
    """Project patch features onto their first principal component.

    Parameters
    ----------
    patch_features : ndarray of shape (n_patches, dim)
        The patches of one image. They are centred before the projection.

    Returns
    -------
    ndarray of shape (n_patches,), float32
        The sign follows scikit-learn's convention for principal axes, which
        is arbitrary for this purpose. Step 3 of the rule undoes a wrong sign.
    """
    features = np.asarray(patch_features, dtype=np.float32)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"patch_features must have shape (n_patches, dim) with n_patches >= 2, "
                         f"got {features.shape}.")
    return PCA(n_components=1, svd_solver="full").fit_transform(features)[:, 0]


def threshold_first_component(component: np.ndarray, *, threshold: float = PCA_THRESHOLD,
                              center_border: float = CENTER_BORDER,
                              min_center_fraction: float = MIN_CENTER_FOREGROUND) -> np.ndarray:
    """Threshold a grid of first-component values into a foreground mask (steps 2 and 3).

    Parameters
    ----------
    component : ndarray of shape (grid_h, grid_w)
    threshold : float, default=10.0
    center_border : float, default=0.2
        Share of the grid dropped on each side to form the central crop. A crop
        that would be empty (grids with fewer than 3 rows or columns) is replaced
        by the whole grid.
    min_center_fraction : float, default=0.35
        The sign is flipped when at most this share of the central crop is foreground.

    Returns
    -------
    ndarray of shape (grid_h, grid_w), bool
    """
    if component.ndim != 2:
        raise ValueError(f"component must be a (grid_h, grid_w) grid, got shape {component.shape}.")
    if not 0 <= center_border < 0.5:
        raise ValueError(f"center_border must lie in [0, 0.5), got {center_border}.")
    mask = component > threshold
    height, width = component.shape
    center = mask[int(height * center_border):int(height * (1 - center_border)),
                  int(width * center_border):int(width * (1 - center_border))]
    if center.size == 0:
        center = mask
    if center.sum() <= min_center_fraction * center.size:
        mask = -component > threshold
    return mask


def clean_mask(mask: np.ndarray, *, kernel_size: int = KERNEL_SIZE) -> np.ndarray:
    """Dilate a (grid_h, grid_w) bool mask, then close it, with a square kernel (step 4).

    Outside the grid counts as background for dilation and as foreground for
    erosion, which is OpenCV's default border and so matches the official code.
    ``scipy.ndimage.binary_closing`` would instead erode foreground at the border.
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}.")
    structure = np.ones((kernel_size, kernel_size), dtype=bool)
    dilated = ndimage.binary_dilation(mask, structure, border_value=0)
    closing_dilated = ndimage.binary_dilation(dilated, structure, border_value=0)
    return ndimage.binary_erosion(closing_dilated, structure, border_value=1)


def foreground_mask(patch_features: np.ndarray, *, threshold: float = PCA_THRESHOLD,
                    center_border: float = CENTER_BORDER,
                    min_center_fraction: float = MIN_CENTER_FOREGROUND,
                    kernel_size: int = KERNEL_SIZE) -> np.ndarray:
    """Compute the foreground mask of one image from its patch features.

    Parameters
    ----------
    patch_features : ndarray of shape (grid_h, grid_w, dim)
        Unnormalised DINOv2 patch tokens of one image.
    threshold, center_border, min_center_fraction
        See :func:`threshold_first_component`.
    kernel_size : int, default=3
        See :func:`clean_mask`.

    Returns
    -------
    ndarray of shape (grid_h, grid_w), bool
        True for foreground patches, which keep their anomaly scores.
    """
    if patch_features.ndim != 3:
        raise ValueError(f"patch_features must have shape (grid_h, grid_w, dim), got {patch_features.shape}.")
    height, width, dim = patch_features.shape
    component = first_principal_component(patch_features.reshape(-1, dim)).reshape(height, width)
    mask = threshold_first_component(component, threshold=threshold, center_border=center_border,
                                     min_center_fraction=min_center_fraction)
    return clean_mask(mask, kernel_size=kernel_size)


def foreground_masks(patch_features: np.ndarray, **options) -> np.ndarray:
    """Apply :func:`foreground_mask` to every image of a (n, grid_h, grid_w, dim) batch.

    Keyword options are passed on. Returns a bool array of shape (n, grid_h, grid_w).
    """
    if patch_features.ndim != 4:
        raise ValueError(f"patch_features must have shape (n, grid_h, grid_w, dim), got {patch_features.shape}.")
    return np.stack([foreground_mask(features, **options) for features in patch_features])


def apply_foreground_masks(patch_scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Set the scores of background patches to 0, as AnomalyDINO does.

    Parameters
    ----------
    patch_scores : ndarray of shape (n, grid_h, grid_w)
    masks : ndarray of shape (n, grid_h, grid_w), bool
        True for foreground.

    Returns
    -------
    ndarray of shape (n, grid_h, grid_w), a new array
    """
    if patch_scores.shape != masks.shape:
        raise ValueError(f"patch_scores {patch_scores.shape} and masks {masks.shape} differ in shape.")
    return np.where(masks, patch_scores, 0).astype(patch_scores.dtype)
