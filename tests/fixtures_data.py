"""Builders of tiny datasets in MVTec-AD's and VisA's folder layouts, and archives of them.

Images are 24 x 32 pixels (height x width, not square, so swapped axes show up).
Every anomalous image has a bright rectangle at ``DEFECT_ROWS`` x ``DEFECT_COLUMNS``,
and its mask marks exactly that rectangle.
"""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 24, 32
DEFECT_ROWS, DEFECT_COLUMNS = slice(6, 18), slice(8, 24)


def plain_pixels(shade: int, *, grayscale: bool = False) -> np.ndarray:
    """Uniform dark image, shape (HEIGHT, WIDTH) or (HEIGHT, WIDTH, 3), uint8."""
    pixels = np.full((HEIGHT, WIDTH), shade, dtype=np.uint8)
    return pixels if grayscale else np.repeat(pixels[..., None], 3, axis=2)


def defect_pixels(*, grayscale: bool = False) -> np.ndarray:
    """Dark image with the bright defect rectangle."""
    pixels = plain_pixels(30, grayscale=True)
    pixels[DEFECT_ROWS, DEFECT_COLUMNS] = 230
    return pixels if grayscale else np.repeat(pixels[..., None], 3, axis=2)


def defect_region() -> np.ndarray:
    """Bool array of shape (HEIGHT, WIDTH), True inside the defect rectangle."""
    region = np.zeros((HEIGHT, WIDTH), dtype=bool)
    region[DEFECT_ROWS, DEFECT_COLUMNS] = True
    return region


def save_image(path: Path, pixels: np.ndarray) -> Path:
    """Save a uint8 array; the format follows the suffix (PNG, JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_mvtec_category(root: Path, category: str, *, grayscale: bool = False, masks: bool = True,
                        n_train: int = 3, defects: Sequence[str] = ("crack",)) -> Path:
    """Write ``root/category`` in MVTec-AD's layout and return that folder.

    train/good gets ``n_train`` images, test/good two, and every defect folder two
    anomalous images. With ``masks`` each anomalous image gets
    ``ground_truth/<defect>/<stem>_mask.png`` (0/255); without, there is no
    ground_truth folder.
    """
    category_dir = root / category
    for index in range(n_train):
        save_image(category_dir / "train" / "good" / f"{index:03d}.png", plain_pixels(30 + index, grayscale=grayscale))
    for index in range(2):
        save_image(category_dir / "test" / "good" / f"{index:03d}.png", plain_pixels(40 + index, grayscale=grayscale))
    for defect in defects:
        for index in range(2):
            save_image(category_dir / "test" / defect / f"{index:03d}.png", defect_pixels(grayscale=grayscale))
            if masks:
                mask = np.where(defect_region(), 255, 0).astype(np.uint8)
                save_image(category_dir / "ground_truth" / defect / f"{index:03d}_mask.png", mask)
    return category_dir


def palette_mask(index: int = 1) -> Image.Image:
    """Palette ("P") mask whose defect pixels hold ``index`` and the rest 0.

    Index 1 is dark red, whose luminance (38) is below 127, so a reader that
    thresholds gray values at 127 instead of reading indices would miss it.
    """
    values = np.where(defect_region(), index, 0).astype(np.uint8)
    mask = Image.frombytes("P", (WIDTH, HEIGHT), values.tobytes())
    mask.putpalette([0, 0, 0, 128, 0, 0] + [255, 255, 255] * 254)
    return mask


def make_visa_tree(root: Path, categories: Sequence[str] = ("candle", "pcb1"), *, n_train: int = 3,
                   n_test_normal: int = 2, n_anomalous: int = 2,
                   without_masks: Sequence[str] = ()) -> Path:
    """Write a VisA copy with ``split_csv/1cls.csv`` under ``root`` and return ``root``.

    Normal images are ``<category>/Data/Images/Normal/NNNN.JPG``, anomalous ones
    ``<category>/Data/Images/Anomaly/NNN.JPG`` with palette masks of index 1 in
    ``<category>/Data/Masks/Anomaly/NNN.png``. The rows are written in reverse
    order so that readers must sort. Categories in ``without_masks`` keep their
    mask column but get no mask files.
    """
    rows = []
    for category in categories:
        for index in range(n_train + n_test_normal):
            image = f"{category}/Data/Images/Normal/{index:04d}.JPG"
            save_image(root / image, plain_pixels(30 + index))
            rows.append([category, "train" if index < n_train else "test", "normal", image, ""])
        for index in range(n_anomalous):
            image = f"{category}/Data/Images/Anomaly/{index:03d}.JPG"
            mask = f"{category}/Data/Masks/Anomaly/{index:03d}.png"
            save_image(root / image, defect_pixels())
            if category not in without_masks:
                (root / mask).parent.mkdir(parents=True, exist_ok=True)
                palette_mask().save(root / mask)
            rows.append([category, "test", "anomaly", image, mask])
    write_split(root, rows[::-1])
    return root


def write_split(root: Path, rows: Sequence[Sequence[str]],
                header: Sequence[str] = ("object", "split", "label", "image", "mask")) -> Path:
    """Write ``root/split_csv/1cls.csv`` with ``header`` and ``rows``."""
    path = root / "split_csv" / "1cls.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def tar_bytes(source: Path, *, mode: str = "w:gz") -> bytes:
    """Return a tar archive of the contents of ``source``, with paths relative to it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for path in sorted(source.rglob("*")):
            tar.add(path, arcname=path.relative_to(source).as_posix(), recursive=False)
    return buffer.getvalue()


def tar_with_members(members: Sequence[tarfile.TarInfo], *, content: bytes = b"data") -> bytes:
    """Return an uncompressed tar of hand-made members; regular files get ``content``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in members:
            if member.isreg():
                member.size = len(content)
                tar.addfile(member, io.BytesIO(content))
            else:
                tar.addfile(member)
    return buffer.getvalue()


def link_member(name: str, target: str, *, hard: bool = False) -> tarfile.TarInfo:
    """Tar member ``name`` that is a symlink (or hard link) to ``target``."""
    member = tarfile.TarInfo(name)
    member.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    member.linkname = target
    return member


def zip_bytes(files: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> bytes:
    """Return a zip archive with ``files`` (name to content) and symlink entries (name to target)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # S_IFLNK with rwx permissions
            archive.writestr(info, target)
    return buffer.getvalue()


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()
