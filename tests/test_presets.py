"""Tests of the agnostic and informed preprocessing presets."""

from __future__ import annotations

import pytest

from adlib.data import ELPV_CATEGORIES
from adlib.presets import PRESETS, Preprocessing, preprocessing_for
from adlib.visa import MVTEC_CATEGORIES, VISA_CATEGORIES

ALL_CATEGORIES = [("mvtec_ad", c) for c in MVTEC_CATEGORIES] + [("visa", c) for c in VISA_CATEGORIES] + \
                 [("elpv", c) for c in ELPV_CATEGORIES]


def test_masked_categories_are_published_ones():
    for preset in PRESETS:
        masked = {(d, c) for d, c in ALL_CATEGORIES if preprocessing_for(d, c, preset=preset).mask_test_images}
        expected = {("mvtec_ad", c) for c in ("capsule", "hazelnut", "pill", "screw", "toothbrush")}
        expected |= {("visa", c) for c in VISA_CATEGORIES}
        assert masked == expected, preset


def test_agnostic_rotates_everything():
    assert all(preprocessing_for(d, c, preset="agnostic").rotate_references for d, c in ALL_CATEGORIES)


def test_informed_rotates_hazelnut_and_screw():
    rotated = {(d, c) for d, c in ALL_CATEGORIES if preprocessing_for(d, c, preset="informed").rotate_references}
    assert rotated == {("mvtec_ad", "hazelnut"), ("mvtec_ad", "screw")}


def test_references_never_masked():
    for preset in PRESETS:
        for dataset, category in ALL_CATEGORIES:
            assert preprocessing_for(dataset, category, preset=preset).mask_references is False


def test_default_preset_is_agnostic():
    assert preprocessing_for("mvtec_ad", "bottle") == Preprocessing(rotate_references=True, mask_test_images=False)


@pytest.mark.parametrize("arguments, message", [
    (("mvtec_ad", "bottle", "tuned"), "Unknown preset 'tuned'"),
    (("btad", "01", "agnostic"), "Unknown dataset 'btad'"),
    (("visa", "bottle", "agnostic"), "Unknown visa category 'bottle'"),
])
def test_presets_invalid_arguments(arguments, message):
    dataset, category, preset = arguments
    with pytest.raises(ValueError, match=message):
        preprocessing_for(dataset, category, preset=preset)
