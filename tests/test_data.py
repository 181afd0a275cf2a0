"""Dataset readers and image loading, on a generated MVTec folder and on the real ELPV."""

import logging
import re

import numpy as np
import pandas as pd
import pytest

from adlib import data
from conftest import DEFECT_COLUMNS, DEFECT_ROWS, FIXTURE_HEIGHT, FIXTURE_WIDTH, defect_image, write_png

# 40 x 60 images with the smaller edge resized to 28: 28 x 42, already a multiple of 14.
IMAGE_SIZE, MULTIPLE = 28, 14


def test_mvtec_ids_and_labels(mvtec_root):
    widget = data.load_mvtec_category(mvtec_root, "widget")

    assert widget.name == "mvtec_ad"
    assert widget.category == "widget"
    assert widget.train_ids == ("train/good/000.png", "train/good/001.png",
                                "train/good/002.png", "train/good/003.png")
    assert widget.test_ids == ("test/crack/000.png", "test/crack/001.png", "test/good/000.png")
    np.testing.assert_array_equal(widget.test_labels, [1, 1, 0])
    assert widget.test_defects == ("crack", "crack", "good")


def test_mvtec_paths_and_masks(mvtec_root):
    widget = data.load_mvtec_category(mvtec_root, "widget")
    category = mvtec_root / "widget"

    assert widget.paths["test/crack/001.png"] == category / "test" / "crack" / "001.png"
    assert sorted(widget.mask_paths) == ["test/crack/000.png", "test/crack/001.png"]
    assert widget.mask_paths["test/crack/000.png"] == category / "ground_truth" / "crack" / "000_mask.png"
    assert widget.has_masks


def test_mvtec_missing_mask_warns(mvtec_root, caplog):
    (mvtec_root / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()

    with caplog.at_level(logging.WARNING, logger="adlib.data"):
        widget = data.load_mvtec_category(mvtec_root, "widget")

    assert "test/crack/001.png" in widget.test_ids
    assert "test/crack/001.png" not in widget.mask_paths
    assert not widget.has_masks
    assert "1 anomalous images of widget have no mask" in caplog.text


def test_mvtec_missing_category(mvtec_root):
    with pytest.raises(FileNotFoundError, match="Category folder .*gadget not found"):
        data.load_mvtec_category(mvtec_root, "gadget")


def test_mvtec_missing_train_folder(mvtec_root):
    for path in (mvtec_root / "widget" / "train" / "good").iterdir():
        path.unlink()

    with pytest.raises(FileNotFoundError, match="No normal training images in .*good; the folder is missing or empty"):
        data.load_mvtec_category(mvtec_root, "widget")


def test_mvtec_missing_test_folder(tmp_path):
    write_png(tmp_path / "widget" / "train" / "good" / "000.png", defect_image())

    with pytest.raises(FileNotFoundError, match="No test images in .*test; expected test/good"):
        data.load_mvtec_category(tmp_path, "widget")


def test_grayscale_image_becomes_rgb(mvtec_root):
    widget = data.load_mvtec_category(mvtec_root, "widget")
    image = data.load_image(widget.paths["train/good/003.png"], image_size=IMAGE_SIZE, multiple=MULTIPLE)

    assert image.shape == (28, 42, 3)
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image[..., 0], image[..., 1])
    np.testing.assert_array_equal(image[..., 0], image[..., 2])
    assert image.min() >= 0.0
    assert image.max() <= 1.0


def test_image_values_in_unit_range(mvtec_root):
    image = data.load_image(mvtec_root / "widget" / "test" / "good" / "000.png", image_size=40, multiple=1)

    # At the original size the image is not resampled, so pixel 30 reads as 30 / 255.
    assert image.shape == (FIXTURE_HEIGHT, FIXTURE_WIDTH, 3)
    np.testing.assert_allclose(image, 30 / 255, atol=1e-6)


def test_mask_matches_image_geometry(mvtec_root):
    widget = data.load_mvtec_category(mvtec_root, "widget")
    image_id = "test/crack/000.png"
    image = data.load_image(widget.paths[image_id], image_size=IMAGE_SIZE, multiple=MULTIPLE)
    mask = data.load_masks(widget, [image_id], image_size=IMAGE_SIZE, multiple=MULTIPLE)[0]

    assert mask.dtype == bool
    assert mask.shape == image.shape[:2]
    # The mask and the bright defect were drawn on the same pixels, so after the
    # same resize and crop they overlap almost exactly.
    bright = image[..., 0] > 0.5
    intersection = np.sum(mask & bright)
    union = np.sum(mask | bright)
    assert intersection / union > 0.9


def test_mask_of_normal_image_empty(mvtec_root):
    widget = data.load_mvtec_category(mvtec_root, "widget")
    masks = data.load_masks(widget, ["test/good/000.png", "test/crack/001.png"],
                            image_size=IMAGE_SIZE, multiple=MULTIPLE)

    assert masks.shape == (2, 28, 42)
    assert not masks[0].any()
    assert masks[1].any()


def test_mask_crop_to_multiple(mvtec_root):
    # 40 x 60 resized to 30 x 45, then cropped to multiples of 14: 28 x 42.
    mask_path = mvtec_root / "widget" / "ground_truth" / "crack" / "000_mask.png"
    mask = data.load_mask(mask_path, image_size=30, multiple=14)
    image = data.load_image(mvtec_root / "widget" / "test" / "crack" / "000.png", image_size=30, multiple=14)

    assert mask.shape == (28, 42)
    assert image.shape == (28, 42, 3)


def test_mask_without_path_needs_size():
    with pytest.raises(ValueError, match="original_size is required for an image without a mask"):
        data.load_mask(None, image_size=IMAGE_SIZE, multiple=MULTIPLE)


def test_mask_without_path_uses_size():
    mask = data.load_mask(None, image_size=IMAGE_SIZE, multiple=MULTIPLE, original_size=(40, 60))

    assert mask.shape == (28, 42)
    assert not mask.any()


@pytest.mark.parametrize(
    ("height", "width", "image_size", "multiple", "expected"),
    [
        (40, 60, 28, 14, ((28, 42), (28, 42))),
        (300, 300, 64, 16, ((64, 64), (64, 64))),
        # Scale 100 / 900: 900 x 1000 becomes 100 x 111, and both edges crop to 7 * 14 = 98.
        (900, 1000, 100, 14, ((100, 111), (98, 98))),
        # Portrait: scale 448 / 600, so 800 x 600 becomes 597 x 448, cropped to 588 x 448.
        (800, 600, 448, 14, ((597, 448), (588, 448))),
    ],
)
def test_resized_shape_hand_values(height, width, image_size, multiple, expected):
    assert data.resized_shape(height, width, image_size, multiple) == expected


def test_corrupt_image_names_path(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"this is not a png file")

    with pytest.raises(ValueError, match=re.escape(f"Cannot read image {path}")):
        data.load_image(path, image_size=IMAGE_SIZE, multiple=MULTIPLE)


def test_truncated_image_names_path(tmp_path):
    complete = write_png(tmp_path / "complete.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(complete.read_bytes()[:400])

    with pytest.raises(ValueError, match=re.escape(f"Cannot read image {truncated}")):
        data.load_image(truncated, image_size=IMAGE_SIZE, multiple=MULTIPLE)


def test_missing_image_file(tmp_path):
    path = tmp_path / "absent.png"

    with pytest.raises(FileNotFoundError, match=re.escape(f"Image {path} not found")):
        data.load_image(path, image_size=IMAGE_SIZE, multiple=MULTIPLE)


def test_load_images_stacks(mvtec_root):
    widget = data.load_mvtec_category(mvtec_root, "widget")
    images = data.load_images([widget.paths[i] for i in widget.train_ids], image_size=IMAGE_SIZE, multiple=MULTIPLE)

    assert images.shape == (4, 28, 42, 3)
    assert images.dtype == np.float32


def test_load_images_empty():
    images = data.load_images([], image_size=IMAGE_SIZE, multiple=MULTIPLE)

    assert images.shape == (0, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_load_images_mixed_shapes(tmp_path):
    wide = write_png(tmp_path / "wide.png", np.zeros((40, 60, 3), np.uint8))
    square = write_png(tmp_path / "square.png", np.zeros((40, 40, 3), np.uint8))

    with pytest.raises(ValueError, match="Images have different shapes after resizing"):
        data.load_images([wide, square], image_size=IMAGE_SIZE, multiple=MULTIPLE)


def test_dataset_rejects_overlap():
    with pytest.raises(ValueError, match="1 images are both train and test, e.g. b"):
        data.AnomalyDataset("toy", "toy", ("a", "b"), ("b", "c"), np.array([0, 1]), ("good", "bad"), {}, {})


def test_dataset_rejects_label_length():
    with pytest.raises(ValueError, match="test_labels and test_ids differ in length"):
        data.AnomalyDataset("toy", "toy", ("a",), ("b", "c"), np.array([0]), ("good", "bad"), {}, {})


def test_dataset_subset(mvtec_root):
    widget = data.load_mvtec_category(mvtec_root, "widget")
    subset = widget.subset([2, 0])

    assert subset.test_ids == ("test/good/000.png", "test/crack/000.png")
    np.testing.assert_array_equal(subset.test_labels, [0, 1])
    assert subset.test_defects == ("good", "crack")
    assert subset.train_ids == widget.train_ids


def read_elpv_table() -> pd.DataFrame:
    """Read ELPV's labels.csv with pandas, independently of adlib's reader."""
    table = pd.read_csv(data.elpv_root() / "labels.csv", sep=r"\s+", header=None,
                        names=["path", "probability", "cell_type"])
    return table


def test_elpv_mono_counts(elpv_mono):
    normal_test = int(np.sum(elpv_mono.test_labels == 0))

    assert elpv_mono.name == "elpv"
    assert elpv_mono.category == "mono"
    assert len(elpv_mono.train_ids) + normal_test == 588
    assert int(np.sum(elpv_mono.test_labels == 1)) == 313
    # train_fraction=0.5 puts half of the 588 normal cells in the reference pool.
    assert len(elpv_mono.train_ids) == 294


def test_elpv_poly_counts(elpv_poly):
    table = read_elpv_table()
    poly = table[table["cell_type"] == "poly"]

    assert len(elpv_poly.train_ids) + np.sum(elpv_poly.test_labels == 0) == np.sum(poly["probability"] == 0)
    assert np.sum(elpv_poly.test_labels == 1) == np.sum(poly["probability"] == 1)


def test_elpv_labels_match_csv(elpv_mono):
    table = read_elpv_table().set_index("path")

    assert set(table.loc[list(elpv_mono.train_ids), "probability"]) == {0.0}
    for image_id, label in zip(elpv_mono.test_ids, elpv_mono.test_labels):
        assert table.loc[image_id, "probability"] == float(label), image_id
        assert table.loc[image_id, "cell_type"] == "mono", image_id


def test_elpv_train_test_disjoint(elpv_mono):
    assert not set(elpv_mono.train_ids) & set(elpv_mono.test_ids)
    assert list(elpv_mono.train_ids) == sorted(elpv_mono.train_ids)


def test_elpv_paths_exist(elpv_mono):
    for image_id in (elpv_mono.train_ids[0], elpv_mono.test_ids[0], elpv_mono.test_ids[-1]):
        assert elpv_mono.paths[image_id].is_file()


def test_elpv_uncertain_as_anomalous():
    table = read_elpv_table()
    mono = table[table["cell_type"] == "mono"]
    dataset = data.load_elpv("mono", uncertain="anomalous")

    # 117 cells at 1/3, 56 at 2/3 and 313 at 1.
    assert np.sum(dataset.test_labels == 1) == np.sum(mono["probability"] > 0) == 486


def test_elpv_train_fraction():
    dataset = data.load_elpv("mono", train_fraction=0.25)

    assert len(dataset.train_ids) == 147
    assert np.sum(dataset.test_labels == 0) == 588 - 147


def test_elpv_image_is_grayscale_cell(elpv_mono):
    image = data.load_image(elpv_mono.paths[elpv_mono.train_ids[0]], image_size=64, multiple=16)

    assert image.shape == (64, 64, 3)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_elpv_rejects_category():
    with pytest.raises(ValueError, match=r"ELPV category must be one of \('mono', 'poly'\), got 'thin'"):
        data.load_elpv("thin")


def test_elpv_rejects_uncertain():
    with pytest.raises(ValueError, match="uncertain must be 'exclude' or 'anomalous', got 'normal'"):
        data.load_elpv("mono", uncertain="normal")


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_elpv_rejects_train_fraction(fraction):
    with pytest.raises(ValueError, match=r"train_fraction must lie in \(0, 1\)"):
        data.load_elpv("mono", train_fraction=fraction)


def test_load_dataset_dispatch(mvtec_root):
    widget = data.load_dataset("mvtec_ad", "widget", data_root=mvtec_root)
    elpv = data.load_dataset("elpv", "poly")

    assert widget.category == "widget"
    assert elpv.name == "elpv"
    assert elpv.category == "poly"


def test_load_dataset_needs_root():
    with pytest.raises(ValueError, match="mvtec_ad needs data_root"):
        data.load_dataset("mvtec_ad", "bottle")


def test_load_dataset_unknown_name():
    with pytest.raises(ValueError, match="Unknown dataset 'kolektor'; expected 'mvtec_ad' or 'elpv'"):
        data.load_dataset("kolektor", "default")


def test_bottle_layout(bottle_root):
    bottle = data.load_mvtec_category(bottle_root, "bottle")

    assert len(bottle.train_ids) == 209
    assert len(bottle.test_ids) == 83
    assert int(bottle.test_labels.sum()) == 63
    assert bottle.has_masks
