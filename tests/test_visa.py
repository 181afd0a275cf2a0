"""Tests of the VisA reader, the VisA-to-MVTec converter and load_category."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from PIL import Image

from adlib import data
from adlib.visa import (
    MVTEC_CATEGORIES,
    MVTEC_MASKED,
    VISA_CATEGORIES,
    convert_visa_to_mvtec,
    load_category,
    load_visa_category,
    read_visa_split,
)
from fixtures_data import HEIGHT, WIDTH, defect_region, make_mvtec_category, make_visa_tree, write_split


@pytest.fixture
def visa_root(tmp_path):
    return make_visa_tree(tmp_path / "visa")


def test_category_constants():
    assert len(MVTEC_CATEGORIES) == 15
    assert len(VISA_CATEGORIES) == 12
    assert set(MVTEC_MASKED) <= set(MVTEC_CATEGORIES)
    assert len(set(MVTEC_CATEGORIES)) == 15
    assert len(set(VISA_CATEGORIES)) == 12


def test_read_split_rows(visa_root):
    rows = read_visa_split(visa_root)
    assert len(rows) == 2 * (3 + 2 + 2)
    first = [row for row in rows if row.image == "candle/Data/Images/Anomaly/000.JPG"][0]
    assert (first.object, first.split, first.label) == ("candle", "test", "anomaly")
    assert first.mask == "candle/Data/Masks/Anomaly/000.png"


def test_load_visa_category(visa_root):
    dataset = load_visa_category(visa_root, "candle")
    assert dataset.name == "visa"
    assert dataset.train_ids == tuple(f"candle/Data/Images/Normal/{i:04d}.JPG" for i in range(3))
    assert dataset.test_ids == ("candle/Data/Images/Anomaly/000.JPG", "candle/Data/Images/Anomaly/001.JPG",
                                "candle/Data/Images/Normal/0003.JPG", "candle/Data/Images/Normal/0004.JPG")
    assert dataset.test_labels.tolist() == [1, 1, 0, 0]
    assert dataset.test_defects == ("bad", "bad", "good", "good")
    assert dataset.has_masks
    assert all(path.is_file() for path in dataset.paths.values())


def test_visa_palette_masks_load_as_defect(visa_root):
    dataset = load_visa_category(visa_root, "pcb1")
    masks = data.load_masks(dataset, dataset.test_ids, image_size=HEIGHT, multiple=8)
    assert masks.shape == (4, HEIGHT, WIDTH)
    np.testing.assert_array_equal(masks[0], defect_region())
    assert not masks[2].any()


def test_visa_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"VisA folder {re.escape(str(tmp_path / 'nope'))} not found"):
        load_visa_category(tmp_path / "nope", "candle")


def test_visa_missing_split_file(tmp_path):
    (tmp_path / "candle").mkdir()
    with pytest.raises(FileNotFoundError, match=r"split_csv/1cls\.csv not found"):
        load_visa_category(tmp_path, "candle")


def test_visa_unknown_category(visa_root):
    with pytest.raises(ValueError, match="Unknown VisA category 'bottle'"):
        load_visa_category(visa_root, "bottle")


def test_visa_category_without_rows(visa_root):
    with pytest.raises(FileNotFoundError, match="lists no images of cashew"):
        load_visa_category(visa_root, "cashew")


def test_visa_missing_image_file(visa_root):
    (visa_root / "candle" / "Data" / "Images" / "Normal" / "0001.JPG").unlink()
    with pytest.raises(FileNotFoundError, match="1 images of candle .* missing .*Normal/0001.JPG"):
        load_visa_category(visa_root, "candle")


def test_visa_missing_masks(tmp_path, caplog):
    root = make_visa_tree(tmp_path, ("candle",), without_masks=("candle",))
    with caplog.at_level(logging.WARNING, logger="adlib.visa"):
        dataset = load_visa_category(root, "candle")
    assert dataset.mask_paths == {}
    assert "2 anomalous test images of candle have no mask" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"no mask in .*candle/Data/Masks/Anomaly"):
        load_visa_category(root, "candle", require_masks=True)


def test_visa_empty_train_split(tmp_path):
    root = make_visa_tree(tmp_path, ("candle",), n_train=0)
    with pytest.raises(FileNotFoundError, match="No normal training images of candle"):
        load_visa_category(root, "candle")


def test_visa_ignores_anomalous_train_rows(tmp_path, caplog):
    root = make_visa_tree(tmp_path, ("candle",))
    rows = [[r.object, r.split, r.label, r.image, r.mask] for r in read_visa_split(root)]
    rows.append(["candle", "train", "anomaly", "candle/Data/Images/Anomaly/000.JPG", ""])
    write_split(root, rows)
    with caplog.at_level(logging.WARNING, logger="adlib.visa"):
        dataset = load_visa_category(root, "candle")
    assert len(dataset.train_ids) == 3
    assert "Ignoring 1 anomalous train rows" in caplog.text


@pytest.mark.parametrize("header, rows, message", [
    (("object", "split", "label", "image"), [], r"has columns \['object', 'split', 'label', 'image'\]"),
    (None, [["candle", "val", "normal", "candle/a.JPG", ""]], "line 2: split must be 'train' or 'test', got 'val'"),
    (None, [["candle", "test", "bad", "candle/a.JPG", ""]], "line 2: label must be 'normal' or 'anomaly', got 'bad'"),
    (None, [["candle", "test", "normal", "../a.JPG", ""]], r"path '\.\./a\.JPG' must be relative"),
    (None, [["candle", "test", "normal", "/a.JPG", ""]], r"path '/a\.JPG' must be relative"),
    (None, [["candle", "test", "normal", "", ""]], "line 2: the image path is empty"),
    (None, [["candle", "test", "normal"]], "line 2 has 3 fields, expected 5"),
])
def test_visa_invalid_split_file(tmp_path, header, rows, message):
    if header is None:
        write_split(tmp_path, rows)
    else:
        write_split(tmp_path, rows, header=header)
    with pytest.raises(ValueError, match=message):
        read_visa_split(tmp_path)


def test_convert_visa_to_mvtec(visa_root, tmp_path):
    target = convert_visa_to_mvtec(visa_root, tmp_path / "converted", categories=("candle",), progress=False)
    converted = data.load_mvtec_category(target, "candle", name="visa")
    original = load_visa_category(visa_root, "candle")
    assert [p.split("/")[-1] for p in converted.train_ids] == [p.split("/")[-1] for p in original.train_ids]
    assert sorted(converted.test_labels.tolist()) == sorted(original.test_labels.tolist())
    assert converted.has_masks
    mask = np.asarray(Image.open(target / "candle" / "ground_truth" / "bad" / "000_mask.png"))
    assert set(np.unique(mask).tolist()) == {0, 255}
    np.testing.assert_array_equal(mask == 255, defect_region())
    assert not (target / "pcb1").exists()


def test_convert_rejects_name_clash(tmp_path):
    root = make_visa_tree(tmp_path / "visa", ("candle",))
    rows = [[r.object, r.split, r.label, r.image, r.mask] for r in read_visa_split(root)]
    (root / "candle" / "Data" / "Images" / "Extra").mkdir()
    (root / "candle" / "Data" / "Images" / "Extra" / "0000.JPG").write_bytes(
        (root / "candle" / "Data" / "Images" / "Normal" / "0000.JPG").read_bytes())
    rows.append(["candle", "train", "normal", "candle/Data/Images/Extra/0000.JPG", ""])
    write_split(root, rows)
    with pytest.raises(ValueError, match="share a file name"):
        convert_visa_to_mvtec(root, tmp_path / "converted", categories=("candle",), progress=False)


# --- load_category -------------------------------------------------------------------

@pytest.fixture
def data_root(tmp_path):
    """data_root with MVTec bottle (RGB), grid (grayscale), screw (no masks) and a VisA copy."""
    make_mvtec_category(tmp_path / "mvtec_ad", "bottle", defects=("broken_large", "contamination"))
    make_mvtec_category(tmp_path / "mvtec_ad", "grid", grayscale=True)
    make_mvtec_category(tmp_path / "mvtec_ad", "screw", masks=False)
    make_visa_tree(tmp_path / "visa", VISA_CATEGORIES, n_train=2, n_test_normal=1, n_anomalous=1)
    return tmp_path


def test_load_category_mvtec(data_root):
    dataset = load_category("mvtec_ad", "bottle", data_root)
    assert dataset.name == "mvtec_ad"
    assert dataset.train_ids == ("train/good/000.png", "train/good/001.png", "train/good/002.png")
    assert dataset.test_labels.sum() == 4
    assert dataset.has_masks


def test_load_category_grayscale(data_root):
    dataset = load_category("mvtec_ad", "grid", data_root)
    images = data.load_images([dataset.paths[i] for i in dataset.test_ids], image_size=HEIGHT, multiple=8)
    assert images.shape == (4, HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_load_category_missing_masks(data_root, caplog):
    with caplog.at_level(logging.WARNING, logger="adlib.data"):
        dataset = load_category("mvtec_ad", "screw", data_root)
    assert not dataset.has_masks
    assert "have no mask" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"2 anomalous test images of screw have no mask in .*screw/ground_truth"):
        load_category("mvtec_ad", "screw", data_root, require_masks=True)


def test_load_category_visa(data_root):
    dataset = load_category("visa", "pcb4", data_root, require_masks=True)
    assert dataset.category == "pcb4"
    assert len(dataset.train_ids) == 2


def test_load_category_elpv():
    dataset = load_category("elpv", "mono")
    assert dataset.name == "elpv"
    assert len(dataset.train_ids) > 0
    with pytest.raises(ValueError, match="ELPV has no pixel masks"):
        load_category("elpv", "mono", require_masks=True)


def test_load_category_missing_copy(tmp_path):
    expected = re.escape(str(tmp_path / "mvtec_ad"))
    with pytest.raises(FileNotFoundError, match=f"mvtec_ad/capsule is missing or incomplete in {expected}"):
        load_category("mvtec_ad", "capsule", tmp_path)
    with pytest.raises(FileNotFoundError, match=f"visa is missing or incomplete in {re.escape(str(tmp_path / 'visa'))}"):
        load_category("visa", "candle", tmp_path)


def test_load_category_empty_train(data_root):
    for path in (data_root / "mvtec_ad" / "bottle" / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match="bottle/train/good images"):
        load_category("mvtec_ad", "bottle", data_root)


@pytest.mark.parametrize("dataset, category, root, message", [
    ("btad", "01", "x", "Unknown dataset 'btad'"),
    ("mvtec_ad", "widget", "x", "Unknown MVTec-AD category 'widget'"),
    ("visa", "candle", None, "visa needs data_root"),
])
def test_load_category_invalid_arguments(dataset, category, root, message):
    with pytest.raises(ValueError, match=message):
        load_category(dataset, category, root)
