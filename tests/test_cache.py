"""Content-keyed feature cache: keys, atomic entries, corruption, and its use by the study."""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adlib import backbones, cache, data, features, study
from adlib.cache import FeatureCache, cached_patch_features, feature_key

from conftest import write_png

IMAGE_SIZE = 32
MULTIPLE = 16


@pytest.fixture
def image_paths(tmp_path, rng) -> list[Path]:
    """Three random RGB PNG files of 40 x 48 pixels."""
    return [write_png(tmp_path / "images" / f"{index}.png", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
            for index in range(3)]


@pytest.fixture
def feature_cache(tmp_path) -> FeatureCache:
    return FeatureCache(tmp_path / "cache")


def some_key(label: str = "a") -> str:
    return cache.digest_fields({"test": label})


def test_store_load_roundtrip(feature_cache, rng):
    array = rng.normal(size=(4, 5, 6)).astype(np.float32)
    feature_cache.store(some_key(), array)
    loaded = feature_cache.load(some_key())
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, array)
    assert feature_cache.stats.hits == 1
    assert feature_cache.stats.writes == 1


def test_load_missing_key(feature_cache):
    assert feature_cache.load(some_key()) is None
    assert feature_cache.stats.misses == 1


def test_store_leaves_no_temporary_file(feature_cache):
    feature_cache.store(some_key(), np.zeros((2, 2), np.float32))
    leftovers = [p for p in feature_cache.root.rglob("*") if p.is_file() and p.suffix != ".npz"]
    assert leftovers == []


def test_failed_store_leaves_nothing(feature_cache, monkeypatch):
    def failing_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        feature_cache.store(some_key(), np.zeros((2, 2), np.float32))
    assert [p for p in feature_cache.root.rglob("*") if p.is_file()] == []


def test_truncated_entry_is_discarded(feature_cache):
    feature_cache.store(some_key(), np.arange(1000, dtype=np.float32))
    path = feature_cache.path_for(some_key())
    path.write_bytes(path.read_bytes()[:300])
    assert feature_cache.load(some_key()) is None
    assert feature_cache.stats.corrupt == 1
    assert not path.exists()


def test_checksum_mismatch_is_discarded(feature_cache):
    path = feature_cache.path_for(some_key())
    path.parent.mkdir(parents=True)
    wrong = cache.array_sha256(np.ones(3, np.float32))
    np.savez(path, features=np.zeros(3, np.float32), key=np.array(some_key()), sha256=np.array(wrong))
    assert feature_cache.load(some_key()) is None
    assert feature_cache.stats.corrupt == 1


def test_entry_under_wrong_key_is_discarded(feature_cache):
    feature_cache.store(some_key("a"), np.zeros(3, np.float32))
    moved = feature_cache.path_for(some_key("b"))
    moved.parent.mkdir(parents=True, exist_ok=True)
    feature_cache.path_for(some_key("a")).rename(moved)
    assert feature_cache.load(some_key("b")) is None
    assert feature_cache.stats.corrupt == 1


def test_invalid_key_rejected(feature_cache):
    with pytest.raises(ValueError, match="64-character"):
        feature_cache.path_for("../escape")


def test_stale_temporary_files_removed(feature_cache):
    feature_cache.store(some_key(), np.zeros(3, np.float32))
    stale = feature_cache.path_for(some_key()).parent / ".0123456789abcdef.x.tmp"
    stale.write_bytes(b"partial")
    assert feature_cache.remove_stale_temporary_files() == 1
    assert not stale.exists()
    assert feature_cache.load(some_key()) is not None


def test_default_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_DIR_VARIABLE, str(tmp_path / "shared"))
    assert cache.default_cache_dir() == tmp_path / "shared"
    monkeypatch.delenv(cache.CACHE_DIR_VARIABLE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_cache_dir() == tmp_path / "xdg" / "adlib" / "features"


def test_file_digest_follows_bytes(image_paths):
    before = cache.file_sha256(image_paths[0])
    assert before == cache.file_sha256(image_paths[0])
    image_paths[0].write_bytes(image_paths[1].read_bytes())
    assert cache.file_sha256(image_paths[0]) == cache.file_sha256(image_paths[1])
    assert cache.file_sha256(image_paths[0]) != before


def test_feature_key_changes_with_every_field(lite0):
    random_lite0 = backbones.load_backbone(backbones.EFFICIENTNET_LITE0, weights="random")
    base = dict(image_sha256="0" * 64, extractor_info=cache.extractor_fields(lite0),
                preprocessing=cache.preprocessing_fields(image_size=224, multiple=16), rotation=None)
    variants = {
        "image bytes": {"image_sha256": "1" * 64},
        "weights": {"extractor_info": cache.extractor_fields(random_lite0)},
        "backbone name": {"extractor_info": {**base["extractor_info"], "backbone": "dinov2_vits14"}},
        "image size": {"preprocessing": cache.preprocessing_fields(image_size=448, multiple=16)},
        "crop multiple": {"preprocessing": cache.preprocessing_fields(image_size=224, multiple=14)},
        "rotation 0": {"rotation": 0},
        "rotation 45": {"rotation": 45},
    }
    keys = {"base": feature_key(**base)}
    for name, change in variants.items():
        keys[name] = feature_key(**{**base, **change})
    assert len(set(keys.values())) == len(keys), keys
    assert feature_key(**base) == keys["base"]


def test_weights_digest_covers_normalisation(lite0):
    before = cache.weights_sha256(lite0)
    other = backbones.load_backbone(backbones.EFFICIENTNET_LITE0)
    assert cache.weights_sha256(other) == before
    other.mean.add_(0.1)
    cache._weights_digests.pop(other)
    assert cache.weights_sha256(other) != before


def test_cached_features_match_uncached(lite0, image_paths, feature_cache):
    settings = dict(image_size=IMAGE_SIZE, multiple=MULTIPLE, progress=False)
    uncached = cached_patch_features(lite0, image_paths, cache=None, **settings)
    first = cached_patch_features(lite0, image_paths, cache=feature_cache, **settings)
    second = cached_patch_features(lite0, image_paths, cache=feature_cache, **settings)
    np.testing.assert_allclose(first, uncached, atol=1e-5)
    np.testing.assert_array_equal(second, first)
    assert feature_cache.stats.writes == 3
    assert feature_cache.stats.hits == 3


def test_batched_file_extraction_matches_one_batch(lite0, image_paths):
    settings = dict(image_size=IMAGE_SIZE, multiple=MULTIPLE, progress=False)
    one_batch = cache.extract_features_from_files(lite0, image_paths, batch_size=3, **settings)
    batched = cache.extract_features_from_files(lite0, image_paths, batch_size=1, **settings)
    assert batched.shape == one_batch.shape
    np.testing.assert_allclose(batched, one_batch, atol=1e-5)


def test_batched_file_extraction_rejects_mixed_shapes(lite0, image_paths, rng):
    wide = write_png(image_paths[0].parent / "wide.png", rng.integers(0, 256, (40, 120, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="different shapes"):
        cache.extract_features_from_files(lite0, [*image_paths, wide], image_size=IMAGE_SIZE, multiple=MULTIPLE,
                                          batch_size=3, progress=False)


def test_rotated_views_keep_rotated_views_order(lite0, image_paths, feature_cache):
    settings = dict(image_size=IMAGE_SIZE, multiple=MULTIPLE, progress=False, angles=(0, 90))
    images = data.load_images(image_paths, image_size=IMAGE_SIZE, multiple=MULTIPLE)
    expected = features.extract_patch_features(lite0, features.rotated_views(images, (0, 90)), progress=False)
    cached = cached_patch_features(lite0, image_paths, cache=feature_cache, **settings)
    assert cached.shape[0] == 6
    np.testing.assert_allclose(cached, expected, atol=1e-5)


def test_only_missing_images_computed(lite0, image_paths, feature_cache):
    settings = dict(image_size=IMAGE_SIZE, multiple=MULTIPLE, progress=False)
    cached_patch_features(lite0, image_paths[:2], cache=feature_cache, **settings)
    cached_patch_features(lite0, image_paths, cache=feature_cache, **settings)
    assert feature_cache.stats.writes == 3
    assert feature_cache.stats.hits == 2


def test_changed_setting_misses(lite0, image_paths, feature_cache):
    cached_patch_features(lite0, image_paths, cache=feature_cache, image_size=IMAGE_SIZE, multiple=MULTIPLE,
                          progress=False)
    cached_patch_features(lite0, image_paths, cache=feature_cache, image_size=48, multiple=MULTIPLE,
                          progress=False)
    cached_patch_features(lite0, image_paths, cache=feature_cache, image_size=IMAGE_SIZE, multiple=MULTIPLE,
                          angles=(45,), progress=False)
    assert feature_cache.stats.hits == 0
    assert feature_cache.stats.writes == 9


def test_corrupt_entry_recomputed(lite0, image_paths, feature_cache):
    settings = dict(image_size=IMAGE_SIZE, multiple=MULTIPLE, progress=False)
    first = cached_patch_features(lite0, image_paths, cache=feature_cache, **settings)
    entry = sorted(feature_cache.root.rglob("*.npz"))[0]
    entry.write_bytes(b"not an npz file")
    again = cached_patch_features(lite0, image_paths, cache=feature_cache, **settings)
    np.testing.assert_allclose(again, first, atol=1e-5)
    assert feature_cache.stats.corrupt == 1
    assert feature_cache.stats.writes == 4


def test_empty_paths_rejected(lite0, feature_cache):
    with pytest.raises(ValueError, match="paths is empty"):
        cached_patch_features(lite0, [], cache=feature_cache, image_size=IMAGE_SIZE, multiple=MULTIPLE)


def tiny_study(tmp_path, **changes) -> study.StudyConfig:
    settings = dict(datasets=("elpv/mono",), image_size=64, shots=(1,), seeds=(0,), epsilons=(0, 8),
                    max_test_per_class=4, output_dir=str(tmp_path / "results"), progress=False)
    return study.StudyConfig(**{**settings, **changes})


def test_fingerprint_ignores_cache_dir(tmp_path):
    config = tiny_study(tmp_path)
    job = study.expand_jobs(config)[0]
    with_cache = dataclasses.replace(config, cache_dir=str(tmp_path / "cache"))
    assert study.job_fingerprint(with_cache, job) == study.job_fingerprint(config, job)
    approximate = dataclasses.replace(config, knn="ivf")
    assert study.job_fingerprint(approximate, job) != study.job_fingerprint(config, job)


def test_invalid_knn_rejected(tmp_path):
    with pytest.raises(ValueError, match="knn must be one of"):
        tiny_study(tmp_path, knn="annoy")


def test_study_with_cache_matches_without(tmp_path):
    plain, _ = study.run_jobs(tiny_study(tmp_path / "plain"))
    cached_config = tiny_study(tmp_path / "cold", cache_dir=str(tmp_path / "cache"))
    cold, _ = study.run_jobs(cached_config)
    warm_config = dataclasses.replace(cached_config, output_dir=str(tmp_path / "warm" / "results"))
    context = study._RunContext(warm_config)
    warm = pd.concat([study.run_job(warm_config, job, context=context)[0] for job in study.expand_jobs(warm_config)])
    for scores in (cold, warm.reset_index(drop=True)):
        np.testing.assert_allclose(scores.score, plain.score, rtol=1e-4)
    # The warm run reads every clean feature (8 test images, 1 reference) from the cache.
    assert context.cache.stats.writes == 0
    assert context.cache.stats.hits > 0
