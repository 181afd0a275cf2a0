"""White-box FGSM through a linear surrogate head on frozen backbone features.

The kNN detector has no useful gradient, so the attacker trains a logistic
regression on the backbone's pooled features (normal vs anomalous) and takes the
gradient of its loss with respect to the input pixels. The attacked images are
then scored by the unchanged kNN detector.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn

EPSILONS_255 = (0, 1, 2, 4, 8)


def fit_linear_head(pooled_features: np.ndarray, labels: np.ndarray, *, regularization: float = 1.0) -> nn.Linear:
    """Fit a logistic-regression head on (n, dim) pooled features and return it as ``nn.Linear``.

    Classes are weighted to balance, because anomalous and normal test images
    rarely come in equal numbers. ``regularization`` is scikit-learn's ``C``.
    """
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=2)
    if counts.min() == 0:
        raise ValueError(f"The surrogate head needs both classes, got {counts[0]} normal "
                         f"and {counts[1]} anomalous images.")
    classifier = LogisticRegression(C=regularization, class_weight="balanced", max_iter=5000)
    classifier.fit(pooled_features, labels)
    head = nn.Linear(pooled_features.shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(classifier.coef_, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(classifier.intercept_, dtype=torch.float32))
    return head.requires_grad_(False)


class SurrogateClassifier(nn.Module):
    """Backbone, spatial mean pooling and linear head: one anomaly logit per image."""

    def __init__(self, extractor: nn.Module, head: nn.Linear):
        super().__init__()
        self.extractor = extractor
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor.pooled(images))[:, 0]


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """One untargeted FGSM step in [0, 1] pixel space under an L-infinity budget.

    ``x_adv = clip(x + epsilon * sign(grad_x BCE(model(x), y)), 0, 1)``. Raising the
    loss on the true label pushes anomalies towards "normal" and normal images
    towards "anomalous".

    Parameters
    ----------
    model : nn.Module
        Maps (batch, 3, H, W) images in [0, 1] to (batch,) logits.
    images : Tensor of shape (batch, 3, H, W), values in [0, 1]
    labels : Tensor of shape (batch,), 1 for anomalous
    epsilon : float
        Budget in pixel units of [0, 1], for example 8 / 255.
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be non-negative, got {epsilon}.")
    if images.min() < 0 or images.max() > 1:
        raise ValueError("FGSM expects images in [0, 1]; normalisation belongs inside the model.")
    if epsilon == 0:
        return images.clone()
    inputs = images.clone().requires_grad_(True)
    loss = F.binary_cross_entropy_with_logits(model(inputs), labels.float())
    (gradient,) = torch.autograd.grad(loss, inputs)
    return (images + epsilon * gradient.sign()).clamp(0.0, 1.0).detach()


def surrogate_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the mean binary cross-entropy of the surrogate on ``images``."""
    with torch.no_grad():
        return float(F.binary_cross_entropy_with_logits(model(images), labels.float()))


def perturbation_stats(clean: np.ndarray, attacked: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image L-infinity norm and PSNR (dB, peak 1.0) of a perturbation.

    PSNR is infinite for an unchanged image.
    """
    difference = (attacked.astype(np.float64) - clean.astype(np.float64)).reshape(len(clean), -1)
    linf = np.abs(difference).max(axis=1)
    mse = np.mean(difference ** 2, axis=1)
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, 10 * np.log10(1.0 / np.where(mse > 0, mse, 1.0)), np.inf)
    return {"linf": linf, "psnr": psnr}
