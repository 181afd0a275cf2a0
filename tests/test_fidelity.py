"""End-to-end fidelity: adlib's scores equal an independent brute-force AnomalyDINO computation.

The same seeded random DINOv2 ViT-S/14 weights feed both sides. The brute-force side
calls timm's model directly, drops the prefix tokens itself, and compares every test
patch with every bank patch by cosine similarity in float64, without faiss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adlib import backbones, data, features, sampling
from adlib.detector import KNNDetector

from conftest import BOTTLE_DIR

IMAGE_SIZE = 112  # 8 x 8 patches of 14 pixels keeps the ViT fast on two cores


def _brute_force_scores(model, references, tests, top_fraction=0.01):
    def tokens(images):
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2).double()
        mean = torch.tensor(backbones.IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(backbones.IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
        with torch.no_grad():
            output = model.double().forward_features((tensor - mean) / std)
        return output[:, model.num_prefix_tokens:]

    bank = torch.nn.functional.normalize(tokens(references).reshape(-1, model.embed_dim), dim=1)
    query = torch.nn.functional.normalize(tokens(tests), dim=2)
    distances = 1 - (query @ bank.T).max(dim=2).values
    count = max(1, int(distances.shape[1] * top_fraction))
    image_scores = distances.topk(count, dim=1).values.mean(dim=1)
    return distances.numpy(), image_scores.numpy()


@pytest.mark.skipif(not BOTTLE_DIR.is_dir(), reason="MVTec-AD bottle folder not found beside the checkout")
def test_scores_match_brute_force_dinov2():
    dataset = data.load_mvtec_category(BOTTLE_DIR.parent, "bottle")
    reference_ids = sampling.reference_block(dataset.train_ids, shots=2, seed=0)
    test_ids = [dataset.test_ids[i] for i in (0, 25, 60)]
    references = data.load_images([dataset.paths[i] for i in reference_ids], image_size=IMAGE_SIZE, multiple=14)
    tests = data.load_images([dataset.paths[i] for i in test_ids], image_size=IMAGE_SIZE, multiple=14)

    extractor = backbones.load_backbone("dinov2_vits14", weights="random", seed=3)
    detector = KNNDetector().fit(features.extract_patch_features(extractor, references, progress=False))
    patch_scores = detector.patch_scores(features.extract_patch_features(extractor, tests, progress=False))
    image_scores = detector.image_scores(patch_scores)

    reference_model = backbones.load_backbone("dinov2_vits14", weights="random", seed=3).model
    expected_patches, expected_images = _brute_force_scores(reference_model, references, tests)

    assert patch_scores.shape == (3, 8, 8)
    np.testing.assert_allclose(patch_scores.reshape(3, -1), expected_patches, atol=1e-5)
    np.testing.assert_allclose(image_scores, expected_images, atol=1e-5)
