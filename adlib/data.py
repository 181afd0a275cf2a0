"""Readers for anomaly-detection datasets and image loading.

A dataset category is described by :class:`AnomalyDataset`: sorted ids of the
normal training images (the pool the few-shot references come from), the test
ids with binary labels, and where each image and mask lives on disk. Pixels are
read only when :func:`load_images` or :func:`load_masks` is called.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class AnomalyDataset:
    """One category of an anomaly-detection dataset.

    Attributes
    ----------
    name, category : str
        For example ``"mvtec_ad"`` and ``"bottle"``.
    train_ids : tuple of str
        Normal training images, sorted. Few-shot references are drawn from here.
    test_ids : tuple of str
        Test images, disjoint from ``train_ids``.
    test_labels : ndarray of shape (n_test,)
        1 for anomalous, 0 for normal.
    test_defects : tuple of str
        Defect type per test image, ``"good"`` for normal ones.
    paths : dict
        Image path of every id in ``train_ids`` and ``test_ids``.
    mask_paths : dict
        Ground-truth mask path per anomalous test id that has one.
    """

    name: str
    category: str
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]
    test_labels: np.ndarray
    test_defects: tuple[str, ...]
    paths: dict[str, Path] = field(repr=False)
    mask_paths: dict[str, Path] = field(repr=False)

    def __post_init__(self):
        overlap = set(self.train_ids) & set(self.test_ids)
        if overlap:
            raise ValueError(f"{len(overlap)} images are both train and test, e.g. {sorted(overlap)[0]}.")
        if len(self.test_labels) != len(self.test_ids):
            raise ValueError("test_labels and test_ids differ in length.")

    @property
    def has_masks(self) -> bool:
        """True when every anomalous test image has a ground-truth mask."""
        anomalous = [i for i, label in zip(self.test_ids, self.test_labels) if label == 1]
        return bool(anomalous) and all(i in self.mask_paths for i in anomalous)

    def subset(self, test_indices: Sequence[int]) -> "AnomalyDataset":
        """Return a copy whose test set is restricted to ``test_indices``."""
        indices = np.asarray(test_indices, dtype=int)
        return AnomalyDataset(
            self.name, self.category, self.train_ids,
            tuple(self.test_ids[i] for i in indices), self.test_labels[indices],
            tuple(self.test_defects[i] for i in indices), self.paths, self.mask_paths,
        )


def load_mvtec_category(root: str | Path, category: str, *, name: str = "mvtec_ad") -> AnomalyDataset:
    """Read one category stored in MVTec-AD's folder layout.

    The layout is ``category/train/good``, ``category/test/<defect>`` and
    ``category/ground_truth/<defect>/<stem>_mask.png``. Anomalous images without a
    mask are kept, and a warning names the folder where masks were expected.

    Raises
    ------
    FileNotFoundError
        If the category folder, ``train/good`` or ``test`` is missing or empty.
    """
    category_dir = Path(root) / category
    train_dir = category_dir / "train" / "good"
    test_dir = category_dir / "test"
    if not category_dir.is_dir():
        raise FileNotFoundError(f"Category folder {category_dir} not found; expected "
                                f"<data_root>/{category}/{{train,test,ground_truth}} with data_root={root}.")
    train_files = _image_files(train_dir)
    if not train_files:
        raise FileNotFoundError(f"No normal training images in {train_dir}; the folder is missing or empty.")
    defects = sorted(d.name for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []
    if not defects:
        raise FileNotFoundError(f"No test images in {test_dir}; expected test/good and test/<defect> folders.")

    paths = {_relative_id(p, category_dir): p for p in train_files}
    test_ids, labels, test_defects, mask_paths = [], [], [], {}
    missing_masks = 0
    for defect in defects:
        for path in _image_files(test_dir / defect):
            image_id = _relative_id(path, category_dir)
            paths[image_id] = path
            test_ids.append(image_id)
            labels.append(int(defect != "good"))
            test_defects.append(defect)
            if defect == "good":
                continue
            mask = category_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
            if mask.is_file():
                mask_paths[image_id] = mask
            else:
                missing_masks += 1
    if missing_masks:
        logger.warning("%d anomalous images of %s have no mask in %s; pixel metrics are skipped.",
                       missing_masks, category, category_dir / "ground_truth")
    train_ids = tuple(sorted(_relative_id(p, category_dir) for p in train_files))
    return AnomalyDataset(name, category, train_ids, tuple(test_ids), np.asarray(labels, dtype=int),
                          tuple(test_defects), paths, mask_paths)


ELPV_CATEGORIES = ("mono", "poly")


def load_elpv(
    category: Literal["mono", "poly"],
    *,
    uncertain: Literal["exclude", "anomalous"] = "exclude",
    train_fraction: float = 0.5,
) -> AnomalyDataset:
    """Read one cell type of the ELPV solar-cell dataset from the ``elpv-dataset`` package.

    A cell with defect probability 0 is normal and one with probability 1 is
    anomalous. Cells rated 1/3 or 2/3 are held out, or counted as anomalous when
    ``uncertain="anomalous"``. ELPV has no train split, so a fixed permutation
    (seed 0, independent of the study's seeds) puts ``train_fraction`` of the
    normal cells into the reference pool and the rest into the test set.
    """
    if category not in ELPV_CATEGORIES:
        raise ValueError(f"ELPV category must be one of {ELPV_CATEGORIES}, got {category!r}.")
    if uncertain not in ("exclude", "anomalous"):
        raise ValueError(f"uncertain must be 'exclude' or 'anomalous', got {uncertain!r}.")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction}.")
    table = read_elpv_labels()
    table = [row for row in table if row[2] == category]
    normal = sorted(row[0] for row in table if row[1] == 0)
    threshold = 1.0 if uncertain == "exclude" else 0.3
    anomalous = sorted(row[0] for row in table if row[1] >= threshold)

    order = np.random.default_rng(0).permutation(len(normal))
    n_train = int(round(train_fraction * len(normal)))
    train_ids = tuple(sorted(normal[i] for i in order[:n_train]))
    test_normal = sorted(normal[i] for i in order[n_train:])
    test_ids = tuple(test_normal + anomalous)
    labels = np.array([0] * len(test_normal) + [1] * len(anomalous), dtype=int)
    defects = tuple(["good"] * len(test_normal) + ["defective"] * len(anomalous))
    root = elpv_root()
    paths = {image_id: root / image_id for image_id in (*train_ids, *test_ids)}
    return AnomalyDataset("elpv", category, train_ids, test_ids, labels, defects, paths, {})


def elpv_root() -> Path:
    """Return the folder of the ELPV ``labels.csv`` installed by ``elpv-dataset``."""
    try:
        import elpv_dataset
    except ImportError as error:
        raise ImportError("ELPV needs the package elpv-dataset: pip install elpv-dataset==1.0.0.post1") from error
    return Path(elpv_dataset.__file__).parent / "data"


def read_elpv_labels() -> list[tuple[str, float, str]]:
    """Return (image path, defect probability, cell type) rows of ELPV's ``labels.csv``."""
    rows = []
    with open(elpv_root() / "labels.csv", encoding="ascii") as handle:
        for line in handle:
            if line.strip():
                path, probability, cell_type = line.split()
                rows.append((path, float(probability), cell_type))
    return rows


def load_dataset(name: str, category: str, *, data_root: str | Path | None = None) -> AnomalyDataset:
    """Load a category by dataset name: ``"mvtec_ad"`` (needs ``data_root``) or ``"elpv"``."""
    if name == "elpv":
        return load_elpv(category)
    if name == "mvtec_ad":
        if data_root is None:
            raise ValueError("mvtec_ad needs data_root, the folder that contains the category folders.")
        return load_mvtec_category(data_root, category)
    raise ValueError(f"Unknown dataset {name!r}; expected 'mvtec_ad' or 'elpv'.")


def resized_shape(height: int, width: int, image_size: int, multiple: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Return the resize target and the centre-crop size for one image.

    The smaller edge becomes ``image_size`` and the other keeps the aspect ratio.
    The crop then trims each edge down to a multiple of ``multiple``.
    """
    scale = image_size / min(height, width)
    resized = (max(multiple, round(height * scale)), max(multiple, round(width * scale)))
    cropped = (resized[0] // multiple * multiple, resized[1] // multiple * multiple)
    return resized, cropped


def load_image(path: str | Path, *, image_size: int, multiple: int) -> np.ndarray:
    """Read an image as float32 RGB in [0, 1], shape (height, width, 3).

    Grayscale and palette images are converted to RGB. The smaller edge is
    resized to ``image_size`` (bicubic with antialiasing), then the image is
    centre-cropped to a multiple of ``multiple``.
    """
    image = _open_image(path).convert("RGB")
    (height, width), crop = resized_shape(image.height, image.width, image_size, multiple)
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return _center_crop(array, crop)


def load_mask(path: str | Path | None, *, image_size: int, multiple: int,
              original_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a binary mask with the same geometry as :func:`load_image`.

    ``path=None`` stands for a normal image and gives an all-false mask, which
    needs ``original_size`` (height, width) of the image.
    """
    if path is None:
        if original_size is None:
            raise ValueError("original_size is required for an image without a mask.")
        (height, width), crop = resized_shape(*original_size, image_size, multiple)
        return np.zeros(crop, dtype=bool)
    mask = _open_image(path)
    # MVTec masks are 0/255 grayscale, but VisA masks may hold small non-zero values
    # (VisA's own preparation script maps every non-zero value to 255). So any non-zero
    # gray value or palette index is anomalous.
    if mask.mode not in ("1", "L", "P"):
        mask = mask.convert("L")
    (height, width), crop = resized_shape(mask.height, mask.width, image_size, multiple)
    mask = mask.resize((width, height), Image.Resampling.NEAREST)
    return _center_crop(np.asarray(mask) > 0, crop)


def load_images(paths: Sequence[str | Path], *, image_size: int, multiple: int) -> np.ndarray:
    """Load images into one array of shape (n, height, width, 3).

    Raises
    ------
    ValueError
        If the images do not all end up with the same shape.
    """
    images = [load_image(p, image_size=image_size, multiple=multiple) for p in paths]
    shapes = sorted({im.shape for im in images})
    if len(shapes) > 1:
        raise ValueError(f"Images have different shapes after resizing: {shapes}; "
                         "a category must use one aspect ratio.")
    return np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.float32)


def load_masks(dataset: AnomalyDataset, ids: Sequence[str], *, image_size: int, multiple: int) -> np.ndarray:
    """Load ground-truth masks of test images, shape (n, height, width), bool."""
    masks = []
    for image_id in ids:
        mask_path = dataset.mask_paths.get(image_id)
        size = None
        if mask_path is None:
            with _open_image(dataset.paths[image_id]) as image:
                size = (image.height, image.width)
        masks.append(load_mask(mask_path, image_size=image_size, multiple=multiple, original_size=size))
    return np.stack(masks)


def _open_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image {path} not found.")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"Cannot read image {path}: {error}. Replace or remove the corrupt file.") from error
    return image


def _center_crop(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    top = (array.shape[0] - size[0]) // 2
    left = (array.shape[1] - size[1]) // 2
    return array[top:top + size[0], left:left + size[1]]


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _relative_id(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()
