"""Content-keyed on-disk cache of patch features.

An entry contains the patch features of one image seen through one backbone. Its
key is a SHA-256 digest of everything that changes those numbers:

* the bytes of the image file,
* the backbone name, the extractor class and a digest of its weights and its
  input normalisation,
* the preprocessing (resize edge, crop multiple, resampling, colour mode),
* the rotation applied to the preprocessed image, in degrees.

Changing any of them gives another key, so a stale entry is never read. Each
entry is one ``.npz`` file that also stores its own key and a SHA-256 checksum
of the feature bytes. A file that cannot be read, or whose key or checksum does
not match, is deleted and recomputed. Entries are written to a temporary file in
the same folder and renamed into place, so a killed process leaves no
half-written entry under a valid name. Several processes can share one cache
folder: two writers of the same key write the same numbers, and the last rename
wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import weakref
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data, features

logger = logging.getLogger(__name__)

# Bump when the feature definition or the preprocessing in adlib.data changes in a
# way that the key fields below do not capture. Old entries then stop matching.
FEATURE_FORMAT_VERSION = 1
CACHE_DIR_VARIABLE = "ADLIB_CACHE_DIR"

_weights_digests: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
_file_digests: dict[tuple[str, int, int], str] = {}


def default_cache_dir() -> Path:
    """Return the shared cache folder: ``$ADLIB_CACHE_DIR``, else ``$XDG_CACHE_HOME/adlib/features``.

    ``XDG_CACHE_HOME`` defaults to ``~/.cache``, so notebooks and sweeps started
    from any working directory find the same entries.
    """
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "adlib" / "features"


@dataclass
class CacheStats:
    """Counts of cache lookups since the cache object was created."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    writes: int = 0


class FeatureCache:
    """Folder of content-keyed feature arrays.

    Parameters
    ----------
    root : path
        Cache folder, created on the first write. ``~`` is expanded.

    Examples
    --------
    >>> import tempfile
    >>> cache = FeatureCache(tempfile.mkdtemp())
    >>> key = digest_fields({"example": 1})
    >>> cache.load(key) is None
    True
    >>> cache.store(key, np.ones((2, 2, 3), np.float32))
    >>> cache.load(key).shape
    (2, 2, 3)
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.stats = CacheStats()

    def path_for(self, key: str) -> Path:
        """Return the entry file of ``key``, in a subfolder named by its first two characters."""
        _check_key(key)
        return self.root / key[:2] / f"{key}.npz"

    def load(self, key: str) -> np.ndarray | None:
        """Return the stored array of ``key``, or None when it is absent or corrupt.

        A corrupt entry (unreadable file, wrong key, checksum mismatch) is
        logged, deleted and counted in ``stats.corrupt``.
        """
        path = self.path_for(key)
        if not path.is_file():
            self.stats.misses += 1
            return None
        try:
            array = _read_entry(path, key)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            logger.warning("Discarding corrupt cache entry %s: %s", path, error)
            path.unlink(missing_ok=True)
            self.stats.corrupt += 1
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return array

    def store(self, key: str, array: np.ndarray) -> None:
        """Write ``array`` under ``key`` atomically, replacing any older entry."""
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.ascontiguousarray(array)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(descriptor, "wb") as handle:
                np.savez(handle, features=array, key=np.array(key), sha256=np.array(array_sha256(array)))
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        self.stats.writes += 1

    def remove_stale_temporary_files(self) -> int:
        """Delete temporary files left by killed writers and return how many were removed.

        Run it only when no other process writes to this cache, because a live
        writer's temporary file looks the same.
        """
        removed = 0
        for temporary in sorted(self.root.glob("*/.*.tmp")):
            temporary.unlink(missing_ok=True)
            removed += 1
        return removed


def array_sha256(array: np.ndarray) -> str:
    """Return the hex SHA-256 of an array's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def digest_fields(fields: dict) -> str:
    """Return the hex SHA-256 of a JSON-serialisable mapping, independent of key order."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Return the hex SHA-256 of a file's bytes, memoised by path, size and modification time."""
    status = os.stat(path)
    memo_key = (os.fspath(path), status.st_size, status.st_mtime_ns)
    if memo_key not in _file_digests:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        _file_digests[memo_key] = digest.hexdigest()
    return _file_digests[memo_key]


def weights_sha256(extractor: torch.nn.Module) -> str:
    """Return the hex SHA-256 of every parameter and buffer of ``extractor``, memoised per object.

    Non-persistent buffers count too, so the input mean and std of a
    :class:`adlib.backbones.PatchFeatureExtractor` are part of the digest.
    """
    if extractor not in _weights_digests:
        digest = hashlib.sha256()
        tensors = dict(extractor.named_parameters())
        tensors.update(extractor.named_buffers())
        for name in sorted(tensors):
            tensor = tensors[name].detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
        _weights_digests[extractor] = digest.hexdigest()
    return _weights_digests[extractor]


def extractor_fields(extractor) -> dict:
    """Return the key fields that identify what ``extractor`` computes."""
    return {
        "backbone": extractor.info.name,
        "extractor": f"{type(extractor).__module__}.{type(extractor).__qualname__}",
        "weights_sha256": weights_sha256(extractor),
        "feature_format": FEATURE_FORMAT_VERSION,
    }


def preprocessing_fields(*, image_size: int, multiple: int) -> dict:
    """Return the key fields of :func:`adlib.data.load_image`'s preprocessing."""
    return {"image_size": int(image_size), "crop_multiple": int(multiple), "resize": "bicubic-antialias",
            "crop": "center", "color": "RGB", "scale": "float32 [0, 1]"}


def feature_key(image_sha256: str, extractor_info: dict, preprocessing: dict,
                rotation: float | None = None) -> str:
    """Return the cache key of one image's patch features.

    Parameters
    ----------
    image_sha256 : str
        Digest of the image file's bytes, from :func:`file_sha256`.
    extractor_info : dict
        From :func:`extractor_fields`.
    preprocessing : dict
        From :func:`preprocessing_fields`.
    rotation : float or None, default=None
        Degrees of the bilinear, zero-filled rotation by
        :func:`adlib.features.rotated_views`, or None for an image that was not
        resampled. A rotation by 0 degrees still resamples, which changes
        pixels by about 1e-6, so it has its own key.
    """
    rotation_fields = None if rotation is None else {"degrees": float(rotation), "interpolation": "bilinear",
                                                     "fill": 0}
    return digest_fields({"image_sha256": image_sha256, "extractor": extractor_info,
                          "preprocessing": preprocessing, "rotation": rotation_fields})


def cached_patch_features(extractor, paths: Sequence[str | os.PathLike], *, cache: FeatureCache | None,
                          image_size: int, multiple: int, angles: Sequence[float] = (),
                          batch_size: int = 16, progress: bool = True,
                          description: str = "features") -> np.ndarray:
    """Return patch features of the images, or of their rotated views, computing only cache misses.

    The images are read with :func:`adlib.data.load_image`, rotated with
    :func:`adlib.features.rotated_views` when ``angles`` is not empty, and passed
    through ``extractor``. With ``cache=None`` everything is computed and
    nothing is stored.

    Parameters
    ----------
    angles : sequence of float, default=()
        Rotations in degrees. Empty means the images are used unrotated.

    Returns
    -------
    ndarray of shape (n_views, grid_h, grid_w, dim), float32
        ``n_views`` is ``len(paths)`` without rotation, else
        ``len(angles) * len(paths)`` ordered like
        :func:`adlib.features.rotated_views`: all images at the first angle,
        then all images at the second angle, and so on.
    """
    if len(paths) == 0:
        raise ValueError("paths is empty; pass at least one image file.")
    rotations = tuple(angles) if len(angles) else (None,)
    if cache is None and rotations == (None,):
        return extract_features_from_files(extractor, paths, image_size=image_size, multiple=multiple,
                                           batch_size=batch_size, progress=progress, description=description)
    if cache is None:
        images = features.rotated_views(data.load_images(paths, image_size=image_size, multiple=multiple), rotations)
        return features.extract_patch_features(extractor, images, batch_size=batch_size,
                                               progress=progress, description=description)
    keys = _feature_keys(extractor, paths, image_size=image_size, multiple=multiple, rotations=rotations)
    found = {key: cache.load(key) for key in dict.fromkeys(keys)}
    missing_images = sorted({index % len(paths) for index, key in enumerate(keys) if found[key] is None})
    if missing_images:
        computed = _compute_missing(extractor, paths, missing_images, keys, found, image_size=image_size,
                                    multiple=multiple, rotations=rotations, batch_size=batch_size,
                                    progress=progress, description=description)
        for key, array in computed.items():
            cache.store(key, array)
            found[key] = array
    return np.stack([found[key] for key in keys])


def extract_features_from_files(extractor, paths: Sequence[str | os.PathLike], *, image_size: int, multiple: int,
                                batch_size: int = 16, progress: bool = True,
                                description: str = "features") -> np.ndarray:
    """Extract patch features of image files batch by batch, reading the next batch on a second thread.

    Pillow releases the GIL while it decodes, so the next batch is read and
    resized while the backbone runs on the current one.

    Returns
    -------
    ndarray of shape (len(paths), grid_h, grid_w, dim), float32

    Raises
    ------
    ValueError
        If the images do not all end up with the same shape.
    """
    batches = [list(paths[start:start + batch_size]) for start in range(0, len(paths), batch_size)]
    outputs = []
    image_shape = None
    with ThreadPoolExecutor(max_workers=1) as reader:
        next_images = reader.submit(data.load_images, batches[0], image_size=image_size, multiple=multiple)
        for index in tqdm(range(len(batches)), desc=description, disable=not progress, leave=False):
            images = next_images.result()
            if index + 1 < len(batches):
                next_images = reader.submit(data.load_images, batches[index + 1], image_size=image_size,
                                            multiple=multiple)
            if image_shape is not None and images.shape[1:] != image_shape:
                raise ValueError(f"Images have different shapes after resizing: {[image_shape, images.shape[1:]]}; "
                                 "a category must use one aspect ratio.")
            image_shape = images.shape[1:]
            outputs.append(features.extract_patch_features(extractor, images, batch_size=batch_size, progress=False))
    return np.concatenate(outputs)


def _feature_keys(extractor, paths, *, image_size, multiple, rotations) -> list[str]:
    extractor_info = extractor_fields(extractor)
    preprocessing = preprocessing_fields(image_size=image_size, multiple=multiple)
    digests = [file_sha256(path) for path in paths]
    return [feature_key(digest, extractor_info, preprocessing, rotation)
            for rotation in rotations for digest in digests]


def _compute_missing(extractor, paths, missing_images, keys, found, *, image_size, multiple, rotations,
                     batch_size, progress, description) -> dict[str, np.ndarray]:
    """Extract features of the (image, rotation) pairs whose keys were not found."""
    missing_paths = [paths[i] for i in missing_images]
    if rotations == (None,):
        extracted = extract_features_from_files(extractor, missing_paths, image_size=image_size, multiple=multiple,
                                                batch_size=batch_size, progress=progress, description=description)
        return {keys[image_index]: array for image_index, array in zip(missing_images, extracted)}
    images = data.load_images(missing_paths, image_size=image_size, multiple=multiple)
    computed: dict[str, np.ndarray] = {}
    for rotation_index, rotation in enumerate(rotations):
        rows = [row for row, image_index in enumerate(missing_images)
                if found[keys[rotation_index * len(paths) + image_index]] is None]
        if not rows:
            continue
        views = images[rows] if rotation is None else features.rotated_views(images[rows], (rotation,))
        extracted = features.extract_patch_features(extractor, views, batch_size=batch_size,
                                                    progress=progress, description=description)
        for row, array in zip(rows, extracted):
            computed[keys[rotation_index * len(paths) + missing_images[row]]] = array
    return computed


def _read_entry(path: Path, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as entry:
        stored_key = str(entry["key"])
        checksum = str(entry["sha256"])
        array = entry["features"]
    if stored_key != key:
        raise ValueError(f"entry stores key {stored_key[:12]}..., expected {key[:12]}...")
    if array_sha256(array) != checksum:
        raise ValueError("feature checksum does not match")
    return array


def _check_key(key: str) -> None:
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(f"Cache keys are 64-character lowercase hex SHA-256 digests, got {key!r}.")
