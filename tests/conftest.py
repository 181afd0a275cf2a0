"""Shared fixtures: small real images, the real EfficientNet-Lite0 and a generated MVTec folder.

Hugging Face lookups are forced offline before anything imports
``huggingface_hub``, so no test reaches the network. Torch uses two threads,
which keeps the run time predictable on shared machines.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adlib import backbones, data

torch.set_num_threads(2)

MVTEC_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"
BOTTLE_DIR = MVTEC_ROOT / "bottle"

# Height and width of the generated MVTec images. They are not square, so a test
# would notice if height and width were swapped anywhere.
FIXTURE_HEIGHT, FIXTURE_WIDTH = 40, 60
# The bright defect of every generated anomalous image and its mask, in pixels. It is
# off-centre, so a flipped or transposed image would no longer line up with its mask.
DEFECT_ROWS, DEFECT_COLUMNS = slice(5, 20), slice(10, 30)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def lite0() -> backbones.PatchFeatureExtractor:
    """Load the pretrained EfficientNet-Lite0 extractor once per session."""
    return backbones.load_backbone(backbones.EFFICIENTNET_LITE0)


@pytest.fixture(scope="session")
def elpv_mono() -> data.AnomalyDataset:
    return data.load_elpv("mono")


@pytest.fixture(scope="session")
def elpv_poly() -> data.AnomalyDataset:
    return data.load_elpv("poly")


@pytest.fixture(scope="session")
def bottle_root() -> Path:
    """Return the folder that contains the MVTec-AD bottle category, or skip if it is absent."""
    if not BOTTLE_DIR.is_dir():
        pytest.skip(f"MVTec-AD bottle category not found at {BOTTLE_DIR}; "
                    "copy the category there to run this test.")
    return MVTEC_ROOT


@pytest.fixture(scope="session")
def elpv_small_images(elpv_mono) -> tuple[np.ndarray, np.ndarray]:
    """Load twelve real ELPV mono cells at 64 x 64 px: six normal, then six defective.

    Returns images of shape (12, 64, 64, 3) in [0, 1] and labels of shape (12,).
    """
    labels = elpv_mono.test_labels
    normal = [i for i, label in zip(elpv_mono.test_ids, labels) if label == 0][:6]
    defective = [i for i, label in zip(elpv_mono.test_ids, labels) if label == 1][:6]
    paths = [elpv_mono.paths[i] for i in normal + defective]
    images = data.load_images(paths, image_size=64, multiple=16)
    return images, np.array([0] * 6 + [1] * 6)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Write a uint8 array as PNG: 2-D arrays as grayscale, (H, W, 3) arrays as RGB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def defect_image(*, grayscale: bool = False) -> np.ndarray:
    """Draw a dark image with one bright rectangle at ``DEFECT_ROWS`` x ``DEFECT_COLUMNS``."""
    pixels = np.full((FIXTURE_HEIGHT, FIXTURE_WIDTH), 30, dtype=np.uint8)
    pixels[DEFECT_ROWS, DEFECT_COLUMNS] = 230
    return pixels if grayscale else np.repeat(pixels[..., None], 3, axis=2)


def defect_mask() -> np.ndarray:
    mask = np.zeros((FIXTURE_HEIGHT, FIXTURE_WIDTH), dtype=np.uint8)
    mask[DEFECT_ROWS, DEFECT_COLUMNS] = 255
    return mask


@pytest.fixture
def mvtec_root(tmp_path) -> Path:
    """Write a tiny category ``widget`` in MVTec-AD's layout under ``tmp_path``.

    train/good contains three RGB images and one grayscale image (``003.png``) plus
    a text file that the reader must ignore. test/good contains one image, and
    test/crack two anomalous images, each with a mask in ground_truth/crack.
    """
    category = tmp_path / "widget"
    plain = np.full((FIXTURE_HEIGHT, FIXTURE_WIDTH, 3), 30, dtype=np.uint8)
    for index in range(3):
        write_png(category / "train" / "good" / f"00{index}.png", plain + index)
    write_png(category / "train" / "good" / "003.png", defect_image(grayscale=True))
    (category / "train" / "good" / "notes.txt").write_text("not an image")
    write_png(category / "test" / "good" / "000.png", plain)
    for index in range(2):
        write_png(category / "test" / "crack" / f"00{index}.png", defect_image())
        write_png(category / "ground_truth" / "crack" / f"00{index}_mask.png", defect_mask())
    return tmp_path
