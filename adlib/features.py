"""Batched feature extraction and reference augmentation.

This module sits between arrays and the backbone: numpy images of shape
(n, height, width, 3) in [0, 1] go in, numpy features come out. Progress bars
are optional so notebooks and tests can switch them off.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from tqdm import tqdm

from .attacks import fgsm

ROTATION_ANGLES = (0, 45, 90, 135, 180, 225, 270, 315)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """Convert (n, H, W, 3) float images to a (n, 3, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """Convert a (n, 3, H, W) tensor back to (n, H, W, 3) float32."""
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def extract_patch_features(extractor, images: np.ndarray, *, batch_size: int = 16,
                           progress: bool = True, description: str = "features") -> np.ndarray:
    """Run the extractor over images in batches.

    Returns
    -------
    ndarray of shape (n, grid_h, grid_w, dim), float32
    """
    outputs = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc=description, disable=not progress, leave=False):
            outputs.append(extractor(to_tensor(images[start:start + batch_size])).numpy())
    return np.concatenate(outputs)


def rotated_views(images: np.ndarray, angles: Sequence[float] = ROTATION_ANGLES) -> np.ndarray:
    """Stack every image rotated by every angle (degrees, bilinear, zero fill).

    Returns
    -------
    ndarray of shape (n * len(angles), H, W, 3)
    """
    tensor = to_tensor(images)
    views = [TF.rotate(tensor, float(angle), interpolation=TF.InterpolationMode.BILINEAR) for angle in angles]
    return to_numpy(torch.cat(views))


def attack_in_batches(model, images: np.ndarray, labels: np.ndarray, epsilon: float, *,
                      batch_size: int = 16, progress: bool = True) -> np.ndarray:
    """Apply :func:`adlib.attacks.fgsm` to (n, H, W, 3) images batch by batch."""
    attacked = []
    label_tensor = torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    for start in tqdm(range(0, len(images), batch_size), desc=f"FGSM eps={epsilon * 255:g}/255",
                      disable=not progress, leave=False):
        batch = to_tensor(images[start:start + batch_size])
        attacked.append(to_numpy(fgsm(model, batch, label_tensor[start:start + batch_size], epsilon)))
    return np.concatenate(attacked)
