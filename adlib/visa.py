"""VisA reader, VisA-to-MVTec conversion and one loader for every dataset.

VisA (Zou et al., ECCV 2022) ships its images as ``<object>/Data/Images/{Normal,Anomaly}``
and its masks as ``<object>/Data/Masks/Anomaly``. The official one-class split is the
table ``split_csv/1cls.csv`` with the columns object, split, label, image and mask,
where label is ``normal`` or ``anomaly`` and paths are relative to the VisA folder.
"""

from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .data import AnomalyDataset, load_elpv, load_mvtec_category

logger = logging.getLogger(__name__)

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
# MVTec-AD categories whose test images get AnomalyDINO's PCA foreground mask.
MVTEC_MASKED = ("capsule", "hazelnut", "pill", "screw", "toothbrush")
VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
VISA_SPLIT_FILE = PurePosixPath("split_csv/1cls.csv")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
DATASETS = ("mvtec_ad", "visa", "elpv")


@dataclass(frozen=True)
class VisaSplitRow:
    """One row of ``split_csv/1cls.csv``.

    Attributes
    ----------
    object : str
        Category, for example ``"candle"``.
    split : {"train", "test"}
    label : {"normal", "anomaly"}
    image : str
        Image path relative to the VisA folder.
    mask : str
        Mask path relative to the VisA folder, ``""`` for normal images.
    """

    object: str
    split: str
    label: str
    image: str
    mask: str


def read_visa_split(root: str | Path) -> list[VisaSplitRow]:
    """Parse and validate VisA's ``split_csv/1cls.csv`` under ``root``.

    Raises
    ------
    FileNotFoundError
        If ``root`` or the split file is missing.
    ValueError
        If the header, a split or label value, or a path in the table is invalid.
    """
    root = Path(root)
    split_file = root / VISA_SPLIT_FILE
    if not root.is_dir():
        raise FileNotFoundError(f"VisA folder {root} not found; expected the extracted "
                                f"VisA_20220922.tar with {VISA_SPLIT_FILE} inside.")
    if not split_file.is_file():
        raise FileNotFoundError(f"VisA split file {split_file} not found; the copy in {root} is "
                                "incomplete. Extract the whole VisA_20220922.tar there.")
    with open(split_file, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = tuple(column.strip() for column in next(reader, ()))
        if header != VISA_COLUMNS:
            raise ValueError(f"{split_file} has columns {list(header)}, expected {list(VISA_COLUMNS)}.")
        return [_parse_row(values, split_file, line) for line, values in enumerate(reader, start=2)
                if any(value.strip() for value in values)]


def _parse_row(values: list[str], split_file: Path, line: int) -> VisaSplitRow:
    if len(values) != len(VISA_COLUMNS):
        raise ValueError(f"{split_file} line {line} has {len(values)} fields, expected {len(VISA_COLUMNS)}.")
    row = VisaSplitRow(*(value.strip() for value in values))
    if row.split not in ("train", "test"):
        raise ValueError(f"{split_file} line {line}: split must be 'train' or 'test', got {row.split!r}.")
    if row.label not in ("normal", "anomaly"):
        raise ValueError(f"{split_file} line {line}: label must be 'normal' or 'anomaly', got {row.label!r}.")
    for path in (row.image, row.mask):
        parts = PurePosixPath(path).parts
        if path.startswith(("/", "\\")) or ".." in parts:
            raise ValueError(f"{split_file} line {line}: path {path!r} must be relative to the VisA "
                             "folder and must not contain '..'.")
    if not row.image:
        raise ValueError(f"{split_file} line {line}: the image path is empty.")
    return row


def load_visa_category(root: str | Path, category: str, *, require_masks: bool = False) -> AnomalyDataset:
    """Read one VisA category with the official one-class split.

    Train ids are the images with split ``train`` and label ``normal``, sorted.
    Test ids are all ``test`` images, sorted, labelled 1 for ``anomaly``. The
    defect name is ``"good"`` or ``"bad"``, as in the MVTec-style copy that
    AnomalyDINO evaluates. Ids are the image paths from the split file.

    Parameters
    ----------
    root : path
        The extracted VisA folder, which contains ``split_csv/1cls.csv``.
    category : str
        One of :data:`VISA_CATEGORIES`.
    require_masks : bool, default=False
        Raise instead of warning when an anomalous test image has no mask.

    Raises
    ------
    ValueError
        If ``category`` is unknown or the split file is invalid.
    FileNotFoundError
        If the folder, the split file, the category's rows, its normal training
        images, an image file or (with ``require_masks``) a mask is missing.
    """
    if category not in VISA_CATEGORIES:
        raise ValueError(f"Unknown VisA category {category!r}; expected one of {', '.join(VISA_CATEGORIES)}.")
    root = Path(root)
    rows = [row for row in read_visa_split(root) if row.object == category]
    split_file = root / VISA_SPLIT_FILE
    if not rows:
        raise FileNotFoundError(f"{split_file} lists no images of {category}; the split file is incomplete.")
    train_ids = tuple(sorted(row.image for row in rows if row.split == "train" and row.label == "normal"))
    skipped = sum(row.split == "train" and row.label == "anomaly" for row in rows)
    if skipped:
        logger.warning("Ignoring %d anomalous train rows of %s in %s.", skipped, category, split_file)
    if not train_ids:
        raise FileNotFoundError(f"No normal training images of {category} in {split_file}; "
                                "the one-class split needs split=train, label=normal rows.")
    test_rows = sorted((row for row in rows if row.split == "test"), key=lambda row: row.image)
    paths = {image_id: root / image_id for image_id in (*train_ids, *(row.image for row in test_rows))}
    _check_images_exist(paths, root, category)
    mask_paths = _visa_mask_paths(test_rows, root, category, require_masks=require_masks)
    return AnomalyDataset(
        "visa", category, train_ids, tuple(row.image for row in test_rows),
        np.array([int(row.label == "anomaly") for row in test_rows], dtype=int),
        tuple("bad" if row.label == "anomaly" else "good" for row in test_rows), paths, mask_paths,
    )


def _check_images_exist(paths: dict[str, Path], root: Path, category: str) -> None:
    missing = sorted(image_id for image_id, path in paths.items() if not path.is_file())
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {category} listed in {root / VISA_SPLIT_FILE} "
                                f"are missing under {root}, for example {missing[0]}; the copy is "
                                "incomplete. Extract the whole VisA_20220922.tar again.")


def _visa_mask_paths(test_rows: Sequence[VisaSplitRow], root: Path, category: str, *,
                     require_masks: bool) -> dict[str, Path]:
    mask_paths, missing = {}, 0
    for row in test_rows:
        if row.label != "anomaly":
            continue
        if row.mask and (root / row.mask).is_file():
            mask_paths[row.image] = root / row.mask
        else:
            missing += 1
    if missing:
        expected = root / category / "Data" / "Masks" / "Anomaly"
        message = f"{missing} anomalous test images of {category} have no mask in {expected}"
        if require_masks:
            raise FileNotFoundError(f"{message}; extract the masks there or pass require_masks=False.")
        logger.warning("%s; pixel metrics are skipped.", message)
    return mask_paths


def convert_visa_to_mvtec(visa_root: str | Path, target_root: str | Path, *,
                          categories: Sequence[str] = VISA_CATEGORIES, progress: bool = True) -> Path:
    """Copy VisA into MVTec-AD's layout, the form AnomalyDINO's code reads.

    Each category gets ``train/good``, ``test/good``, ``test/bad`` and
    ``ground_truth/bad/<stem>_mask.png``. Masks are rewritten as 0/255 grayscale
    PNGs, because VisA's masks may hold other non-zero values. The copy can then be
    read with ``load_mvtec_category(target_root, category, name="visa")`` and has
    the same sorted training images as :func:`load_visa_category`.

    Returns
    -------
    Path
        ``target_root``.

    Raises
    ------
    ValueError
        If two images of one category would get the same file name.
    """
    target_root = Path(target_root)
    for category in tqdm(sorted(categories), desc="VisA to MVTec layout", disable=not progress):
        dataset = load_visa_category(visa_root, category)
        category_dir = target_root / category
        targets = {image_id: category_dir / "train" / "good" / Path(image_id).name
                   for image_id in dataset.train_ids}
        for image_id, defect in zip(dataset.test_ids, dataset.test_defects):
            targets[image_id] = category_dir / "test" / defect / Path(image_id).name
        if len(set(targets.values())) < len(targets):
            raise ValueError(f"Two images of {category} share a file name within one MVTec folder; "
                             "rename them in the VisA copy before converting.")
        for image_id, target in sorted(targets.items()):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dataset.paths[image_id], target)
        for image_id, mask_path in sorted(dataset.mask_paths.items()):
            stem = Path(image_id).stem
            _write_binary_mask(mask_path, category_dir / "ground_truth" / "bad" / f"{stem}_mask.png")
    logger.info("Wrote the MVTec-layout copy of %d VisA categories to %s", len(categories), target_root)
    return target_root


def _write_binary_mask(source: Path, target: Path) -> None:
    with Image.open(source) as mask:
        # Palette images are read as indices, so index 0 is the background.
        values = np.asarray(mask if mask.mode in ("1", "L", "P") else mask.convert("L"))
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(values > 0, 255, 0).astype(np.uint8)).save(target)


def load_category(dataset: str, category: str, data_root: str | Path | None = None, *,
                  download: bool = False, require_masks: bool = False) -> AnomalyDataset:
    """Load one category of MVTec-AD, VisA or ELPV.

    Parameters
    ----------
    dataset : {"mvtec_ad", "visa", "elpv"}
    category : str
        A name from :data:`MVTEC_CATEGORIES`, :data:`VISA_CATEGORIES` or
        ``adlib.data.ELPV_CATEGORIES``.
    data_root : path, optional
        Folder that contains one folder per dataset: ``mvtec_ad/<category>`` and
        ``visa/``. Not used for ELPV, which comes from the ``elpv-dataset`` package.
    download : bool, default=False
        Download and extract a missing copy (see :func:`adlib.download.ensure_dataset`).
    require_masks : bool, default=False
        Raise instead of warning when an anomalous test image has no mask.

    Raises
    ------
    ValueError
        If ``dataset`` or ``category`` is unknown, ``data_root`` is missing, or
        ``require_masks`` is set for ELPV, which has no masks.
    FileNotFoundError
        If the copy is missing or incomplete (the message names the expected
        folder), or masks are missing while ``require_masks`` is set.
    """
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}.")
    if dataset == "elpv":
        if require_masks:
            raise ValueError("ELPV has no pixel masks; pass require_masks=False.")
        return load_elpv(category)
    if data_root is None:
        raise ValueError(f"{dataset} needs data_root, the folder that contains the {dataset}/ folder.")
    # Imported here because adlib.download reads this module's category lists.
    from .download import ensure_dataset

    if dataset == "visa":
        root = ensure_dataset("visa", data_root, download=download)
        return load_visa_category(root, category, require_masks=require_masks)
    if category not in MVTEC_CATEGORIES:
        raise ValueError(f"Unknown MVTec-AD category {category!r}; expected one of {', '.join(MVTEC_CATEGORIES)}.")
    root = ensure_dataset(f"mvtec_ad/{category}", data_root, download=download)
    loaded = load_mvtec_category(root, category)
    unmasked = [image_id for image_id, label in zip(loaded.test_ids, loaded.test_labels)
                if label == 1 and image_id not in loaded.mask_paths]
    if require_masks and unmasked:
        raise FileNotFoundError(f"{len(unmasked)} anomalous test images of {category} have no mask in "
                                f"{root / category / 'ground_truth'}; add the masks or pass require_masks=False.")
    return loaded
