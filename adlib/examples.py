"""A few worked examples for figures: anomaly maps and adversarial images of selected test images."""

from __future__ import annotations

import numpy as np

from . import attacks, data, features, sampling, study
from .detector import anomaly_maps


def example_dataset(config: study.StudyConfig) -> str:
    """Return the first available ``name/category`` with masks, else the first available one."""
    summary = study.dataset_summary(config)
    if summary.empty:
        raise ValueError("No dataset of the config is available; check datasets and data_root.")
    with_masks = summary[summary.masks]
    row = (with_masks if not with_masks.empty else summary).iloc[0]
    return f"{row.dataset}/{row.category}"


def pick_examples(dataset: data.AnomalyDataset, evaluation: np.ndarray, *, count: int) -> np.ndarray:
    """Pick ``count`` evaluation indices, anomalous first, then normal, in a fixed order."""
    anomalous = [i for i in evaluation if dataset.test_labels[i] == 1]
    normal = [i for i in evaluation if dataset.test_labels[i] == 0]
    take = min(count - count // 4, len(anomalous))
    return np.array(anomalous[:take] + normal[:count - take])


def anomaly_map_examples(config: study.StudyConfig, spec: str, *, shots: int, seed: int, count: int = 4,
                         epsilon: float = 0) -> dict:
    """Images, ground-truth masks, anomaly maps and image scores of a few evaluation images.

    With ``epsilon > 0`` (in 1/255 units) the images are FGSM-attacked first, as in the study.

    Returns
    -------
    dict with ``ids``, ``images`` (n, H, W, 3), ``masks`` (n, H, W), ``maps`` (n, H, W),
    ``scores`` (n,) and ``labels`` (n,).
    """
    config, extractor, dataset, calibration, chosen = _example_setup(config, spec, seed=seed, count=count)
    ids = [dataset.test_ids[i] for i in chosen]
    images = study.load_split_images(config, dataset, ids, extractor)
    if epsilon > 0:
        _, images = _attack_chosen(config, extractor, dataset, calibration, chosen, epsilon)
    detector = study.fit_detector(config, dataset, extractor, shots=shots, seed=seed)
    patch_scores = detector.patch_scores(features.extract_patch_features(extractor, images, progress=False))
    masks = data.load_masks(dataset, ids, image_size=config.image_size, multiple=extractor.info.patch_size)
    return {"ids": ids, "images": images, "masks": masks, "maps": anomaly_maps(patch_scores, images.shape[1:3]),
            "scores": detector.image_scores(patch_scores), "labels": dataset.test_labels[chosen]}


def attack_examples(config: study.StudyConfig, spec: str, *, seed: int, epsilon: float, count: int = 4) -> dict:
    """Clean and FGSM-attacked versions of a few evaluation images, with the perturbation.

    Returns
    -------
    dict with ``ids``, ``clean`` and ``attacked`` (n, H, W, 3), ``perturbation``
    (n, H, W, 3) rescaled to [0, 1] for display, ``linf`` and ``psnr`` (n,).
    """
    config, extractor, dataset, calibration, chosen = _example_setup(config, spec, seed=seed, count=count)
    test_images, attacked = _attack_chosen(config, extractor, dataset, calibration, chosen, epsilon)
    clean = test_images[chosen]
    difference = attacked - clean
    scale = max(float(np.abs(difference).max()), 1e-12)
    stats = attacks.perturbation_stats(clean, attacked)
    return {"ids": [dataset.test_ids[i] for i in chosen], "clean": clean, "attacked": attacked,
            "perturbation": 0.5 + 0.5 * difference / scale, **stats}


def _example_setup(config: study.StudyConfig, spec: str, *, seed: int, count: int):
    """Load the backbone and the category ``spec``, then pick ``count`` evaluation images of ``seed``."""
    name, category = spec.split("/")
    config = study.with_overrides(config, progress=False)
    extractor = study.load_extractor(config)
    dataset = study.prepare_dataset(config, name, category)
    calibration, evaluation = sampling.calibration_split(
        dataset.test_labels, calibration_fraction=config.calibration_fraction, seed=seed)
    return config, extractor, dataset, calibration, pick_examples(dataset, evaluation, count=count)


def _attack_chosen(config, extractor, dataset, calibration, chosen, epsilon):
    """Return all test images and the FGSM-attacked ``chosen`` ones, with the study's surrogate head."""
    test_images = study.load_split_images(config, dataset, dataset.test_ids, extractor)
    attacked = study.attack_evaluation_images(config, extractor, test_images, dataset.test_labels,
                                              calibration, chosen, epsilon)
    return test_images, attacked
