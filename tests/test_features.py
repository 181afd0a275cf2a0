"""Array/tensor conversion, batched extraction, rotated views and batched FGSM."""

import numpy as np
import pytest
import torch
from torch import nn

from adlib import attacks, features


class MeanIntensityModel(nn.Module):
    """Logit = 4 * (mean pixel - 0.5): no batch coupling, so batching cannot change FGSM."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 4.0 * (images.flatten(1).mean(dim=1) - 0.5)


def test_tensor_round_trip(rng):
    images = rng.random((2, 5, 7, 3))
    tensor = features.to_tensor(images)

    assert tensor.shape == (2, 3, 5, 7)
    assert tensor.dtype == torch.float32
    torch.testing.assert_close(tensor[1, 2], torch.as_tensor(images[1, :, :, 2], dtype=torch.float32))
    np.testing.assert_allclose(features.to_numpy(tensor), images.astype(np.float32))


def test_extract_batches_match_single_pass(lite0, rng):
    images = rng.random((5, 32, 48, 3)).astype(np.float32)
    batched = features.extract_patch_features(lite0, images, batch_size=2, progress=False)
    with torch.no_grad():
        single = lite0(features.to_tensor(images)).numpy()

    assert batched.shape == (5, 4, 6, 152)
    assert batched.dtype == np.float32
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_rotated_views_shape_and_identity(rng):
    images = rng.random((2, 8, 8, 3)).astype(np.float32)
    views = features.rotated_views(images)

    assert views.shape == (2 * len(features.ROTATION_ANGLES), 8, 8, 3)
    np.testing.assert_allclose(views[:2], images, atol=1e-6)


def test_rotated_views_quarter_turn(rng):
    images = rng.random((2, 8, 8, 3)).astype(np.float32)
    views = features.rotated_views(images, angles=(0, 90, 180))

    # Positive angles turn counter-clockwise, like np.rot90 from rows towards columns.
    np.testing.assert_allclose(views[2:4], np.rot90(images, k=1, axes=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(views[4:6], np.rot90(images, k=2, axes=(1, 2)), atol=1e-5)


def test_rotated_views_zero_fill_corners():
    images = np.ones((1, 16, 16, 3), dtype=np.float32)
    diagonal = features.rotated_views(images, angles=(45,))[0]

    # A 45-degree turn moves the corners outside the original square, so they fill with 0.
    assert diagonal[0, 0].max() == 0.0
    assert diagonal[8, 8].min() == pytest.approx(1.0)


def test_attack_in_batches_matches_fgsm(rng):
    model = MeanIntensityModel()
    images = rng.uniform(0.2, 0.8, (5, 4, 4, 3)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 1])

    batched = features.attack_in_batches(model, images, labels, 2 / 255, batch_size=2, progress=False)
    expected = attacks.fgsm(model, features.to_tensor(images), torch.as_tensor(labels, dtype=torch.float32), 2 / 255)

    assert batched.shape == images.shape
    np.testing.assert_allclose(batched, features.to_numpy(expected), atol=1e-7)


def test_attack_in_batches_direction(rng):
    # The loss of a normal image grows with its brightness and that of an anomalous
    # one falls with it, so FGSM brightens normal images and darkens anomalous ones.
    model = MeanIntensityModel()
    images = np.full((2, 4, 4, 3), 0.5, dtype=np.float32)

    attacked = features.attack_in_batches(model, images, np.array([0, 1]), 0.1, progress=False)

    np.testing.assert_allclose(attacked[0], 0.6, atol=1e-6)
    np.testing.assert_allclose(attacked[1], 0.4, atol=1e-6)
