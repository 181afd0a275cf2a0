"""FGSM through a linear surrogate head, checked on the real EfficientNet-Lite0."""

import numpy as np
import pytest
import torch
from torch import nn

from adlib import attacks, features

EPSILON = 4 / 255


class PixelSumModel(nn.Module):
    """Logit = sum of w * x over all pixels: the FGSM step can be written down by hand."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.weights = weights

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images * self.weights).flatten(1).sum(dim=1)


@pytest.fixture(scope="module")
def surrogate(lite0, elpv_small_images):
    """Lite0 with a head fitted on 3 normal and 3 defective cells, and 6 other cells to attack.

    The attacked cells are disjoint from the cells the head was fitted on.
    """
    images, labels = elpv_small_images
    fit_rows = np.r_[0:3, 6:9]
    attack_rows = np.r_[3:6, 9:12]
    with torch.no_grad():
        pooled = lite0.pooled(features.to_tensor(images[fit_rows])).numpy()
    head = attacks.fit_linear_head(pooled, labels[fit_rows])
    model = attacks.SurrogateClassifier(lite0, head)
    attack_images = features.to_tensor(images[attack_rows])
    attack_labels = torch.as_tensor(labels[attack_rows], dtype=torch.float32)
    return model, attack_images, attack_labels


@pytest.fixture(scope="module")
def attacked(surrogate):
    model, images, labels = surrogate
    return attacks.fgsm(model, images, labels, EPSILON)


def test_fgsm_within_budget(surrogate, attacked):
    _, images, _ = surrogate

    assert (attacked - images).abs().max().item() <= EPSILON + 1e-7


def test_fgsm_stays_in_unit_range(attacked):
    assert attacked.min().item() >= 0.0
    assert attacked.max().item() <= 1.0


def test_fgsm_changes_images(surrogate, attacked):
    _, images, _ = surrogate

    # Away from the clipping bounds every pixel moves by exactly epsilon.
    interior = (images > EPSILON) & (images < 1 - EPSILON)
    steps = (attacked - images).abs()[interior]
    torch.testing.assert_close(steps, torch.full_like(steps, EPSILON), atol=1e-6, rtol=0)


def test_fgsm_raises_surrogate_loss(surrogate, attacked):
    model, images, labels = surrogate
    clean_loss = attacks.surrogate_loss(model, images, labels)
    attacked_loss = attacks.surrogate_loss(model, attacked, labels)

    assert attacked_loss > clean_loss


def test_fgsm_zero_epsilon(surrogate):
    model, images, labels = surrogate
    unchanged = attacks.fgsm(model, images, labels, 0.0)

    assert torch.equal(unchanged, images)
    assert unchanged is not images


def test_fgsm_hand_step():
    # For label 0, the BCE loss grows with the logit sum(w * x), so its gradient
    # sign is sign(w): x_adv = clip(x + eps * sign(w), 0, 1). For label 1 it is -sign(w).
    weights = torch.tensor([1.0, -2.0, 0.5, -0.5]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    model = PixelSumModel(weights)
    images = torch.tensor([0.5, 0.5, 0.99, 0.01]).view(1, 1, 2, 2).expand(2, 3, 2, 2).clone()
    labels = torch.tensor([0.0, 1.0])
    result = attacks.fgsm(model, images, labels, 0.1)

    expected_normal = torch.tensor([0.6, 0.4, 1.0, 0.0]).view(1, 2, 2).expand(3, 2, 2)
    expected_anomalous = torch.tensor([0.4, 0.6, 0.89, 0.11]).view(1, 2, 2).expand(3, 2, 2)
    torch.testing.assert_close(result[0], expected_normal)
    torch.testing.assert_close(result[1], expected_anomalous)


def test_fgsm_rejects_negative_epsilon(surrogate):
    model, images, labels = surrogate

    with pytest.raises(ValueError, match="epsilon must be non-negative, got -0.1"):
        attacks.fgsm(model, images, labels, -0.1)


@pytest.mark.parametrize("value", [-0.1, 1.1], ids=["below-zero", "above-one"])
def test_fgsm_rejects_unnormalised_images(value):
    model = PixelSumModel(torch.ones(1, 3, 2, 2))
    images = torch.full((1, 3, 2, 2), 0.5)
    images[0, 0, 0, 0] = value

    with pytest.raises(ValueError, match=r"FGSM expects images in \[0, 1\]"):
        attacks.fgsm(model, images, torch.zeros(1), 0.1)


def test_linear_head_separates_classes(rng):
    pooled = np.r_[rng.normal(-2.0, 1.0, (20, 5)), rng.normal(2.0, 1.0, (20, 5))]
    labels = np.r_[np.zeros(20, dtype=int), np.ones(20, dtype=int)]
    head = attacks.fit_linear_head(pooled, labels)
    logits = head(torch.as_tensor(pooled, dtype=torch.float32))[:, 0]

    assert head.weight.shape == (1, 5)
    assert not head.weight.requires_grad
    assert torch.all(logits[:20] < 0)
    assert torch.all(logits[20:] > 0)


def test_linear_head_single_class(rng):
    with pytest.raises(ValueError, match="The surrogate head needs both classes, got 4 normal and 0 anomalous"):
        attacks.fit_linear_head(rng.normal(size=(4, 3)), np.zeros(4, dtype=int))


def test_surrogate_loss_hand_value():
    # Zero logits give p = 0.5, so the mean BCE is ln 2 whatever the labels.
    model = PixelSumModel(torch.zeros(1, 3, 2, 2))

    assert attacks.surrogate_loss(model, torch.rand(3, 3, 2, 2), torch.tensor([0.0, 1.0, 1.0])) == pytest.approx(
        np.log(2.0))


def test_perturbation_stats_constant_shift():
    # A perturbation of 0.1 on every pixel: MSE = 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB.
    clean = np.full((2, 4, 4, 3), 0.5, dtype=np.float32)
    result = attacks.perturbation_stats(clean, clean + 0.1)

    np.testing.assert_allclose(result["linf"], [0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(result["psnr"], [20.0, 20.0], rtol=1e-5)


def test_perturbation_stats_half_pixels():
    # 0.2 on half of the pixels: MSE = 0.04 / 2 = 0.02, PSNR = 10 log10(50) = 16.9897 dB.
    clean = np.full((1, 2, 2, 1), 0.5)
    attacked = clean.copy()
    attacked[0, 0] += 0.2

    result = attacks.perturbation_stats(clean, attacked)

    assert result["linf"][0] == pytest.approx(0.2)
    assert result["psnr"][0] == pytest.approx(16.98970004, abs=1e-6)


def test_perturbation_stats_unchanged():
    clean = np.random.default_rng(0).random((3, 4, 4, 3))
    attacked = clean.copy()
    attacked[1] += 0.05

    result = attacks.perturbation_stats(clean, attacked)

    assert np.isinf(result["psnr"][0])
    assert np.isinf(result["psnr"][2])
    assert result["psnr"][1] == pytest.approx(26.0206, abs=1e-4)
    np.testing.assert_allclose(result["linf"], [0.0, 0.05, 0.0], atol=1e-12)
