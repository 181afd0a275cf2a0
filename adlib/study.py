"""Run the study: score clean and attacked test images, reusing finished work.

The unit of work is a *job*: one dataset category, one seed and one epsilon,
for every shot count at once (the attacked images do not depend on the shot
count). A job writes one CSV of per-image scores and one of pixel metrics. The
file names carry a digest of every setting that changes the numbers, so a rerun
with the same settings reads them back and a changed setting recomputes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import attacks, backbones, data, fastknn, features, masking, metrics, presets, sampling, visa
from .cache import FeatureCache, cached_patch_features
from .detector import KNNDetector, anomaly_maps

logger = logging.getLogger(__name__)

CONDITION_COLUMNS = ["dataset", "category", "backbone", "weights", "shots", "seed"]
TIDY_COLUMNS = [*CONDITION_COLUMNS, "epsilon", "split", "metric", "value"]
DATASETS_NEEDING_ROOT = ("mvtec_ad", "visa")


@dataclass(frozen=True)
class StudyConfig:
    """Settings of one study run, read from a params YAML file.

    ``epsilons`` are L-infinity budgets in units of 1/255 of the [0, 1] pixel
    range; the ``epsilon`` column of every results table uses the same unit.
    ``datasets`` lists ``"name/category"`` strings such as ``"elpv/mono"``.
    ``max_test_per_class`` caps the test images per label (seeded), or keeps
    them all when it is None. ``data_root`` is the folder that contains
    ``mvtec_ad/<category>`` and ``visa/``. ``preset`` selects AnomalyDINO's
    "agnostic" or "informed" rotation and masking choices per category; with
    "none", only ``rotations`` applies and no test image is masked.
    ``reference_order`` is passed to :func:`adlib.sampling.reference_block`.
    ``download`` fetches a missing MVTec-AD or VisA copy into ``data_root``. ``cache_dir`` is a :class:`adlib.cache.FeatureCache`
    folder shared by runs, or None to compute every feature. ``knn`` is the
    search method of :class:`adlib.fastknn.FastKNNDetector`; ``"exact"``
    searches the whole bank.
    """

    datasets: tuple[str, ...] = ("elpv/mono",)
    data_root: str | None = None
    backbone: str = backbones.EFFICIENTNET_LITE0
    weights: str = "pretrained"
    backbone_checkpoint: str | None = None
    image_size: int = 224
    shots: tuple[int, ...] = (1, 4, 16)
    seeds: tuple[int, ...] = (0, 1, 2)
    epsilons: tuple[float, ...] = attacks.EPSILONS_255
    rotations: bool = False
    preset: str = "none"
    reference_order: str = "sorted"
    download: bool = False
    calibration_fraction: float = 0.5
    max_test_per_class: int | None = None
    batch_size: int = 16
    output_dir: str = "results/default"
    cache_dir: str | None = None
    knn: str = "exact"
    progress: bool = field(default=True, compare=False)

    def __post_init__(self):
        for name in ("datasets", "shots", "seeds", "epsilons"):
            value = getattr(self, name)
            if isinstance(value, (str, int, float)):
                raise ValueError(f"{name} must be a list, got {value!r}; write e.g. {name}: [{value}].")
            object.__setattr__(self, name, tuple(value))
        _validate(self)


def config_from_params(params: dict, **overrides) -> StudyConfig:
    """Build a :class:`StudyConfig` from a params mapping, rejecting unknown keys."""
    merged = {**params, **overrides}
    known = {f.name for f in fields(StudyConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"Unknown study parameters {unknown}; expected a subset of {sorted(known)}.")
    return StudyConfig(**merged)


def _validate(config: StudyConfig) -> None:
    for name in ("shots", "seeds"):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in getattr(config, name)):
            raise ValueError(f"{name} must be whole numbers, got {list(getattr(config, name))}.")
    if not isinstance(config.image_size, int):
        raise ValueError(f"image_size must be a whole number of pixels, got {config.image_size!r}.")
    if not 0 < config.calibration_fraction < 1:
        raise ValueError(f"calibration_fraction must lie in (0, 1), got {config.calibration_fraction}.")
    if config.max_test_per_class is not None and config.max_test_per_class < 2:
        raise ValueError(f"max_test_per_class must be at least 2 or null, got {config.max_test_per_class}.")
    if not config.datasets:
        raise ValueError("datasets is empty; list at least one 'name/category', e.g. 'elpv/mono'.")
    for spec in config.datasets:
        if spec.count("/") != 1:
            raise ValueError(f"Dataset {spec!r} must be written 'name/category', e.g. 'mvtec_ad/bottle'.")
    if config.image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {config.image_size}.")
    if any(s < 1 for s in config.shots) or not config.shots:
        raise ValueError(f"shots must be positive integers, got {list(config.shots)}.")
    if any(s < 0 for s in config.seeds) or not config.seeds:
        raise ValueError(f"seeds must be non-negative integers, got {list(config.seeds)}.")
    if any(e < 0 or e > 255 for e in config.epsilons) or 0 not in config.epsilons:
        raise ValueError(f"epsilons (units of 1/255) must lie in [0, 255] and include 0 for the "
                         f"clean baseline, got {list(config.epsilons)}.")
    if config.reference_order not in ("sorted", "shuffled"):
        raise ValueError(f"reference_order must be 'sorted' or 'shuffled', got {config.reference_order!r}.")
    if config.preset not in ("none", *presets.PRESETS):
        raise ValueError(f"preset must be 'none' or one of {', '.join(presets.PRESETS)}, got {config.preset!r}.")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {config.batch_size}.")
    if config.knn not in fastknn.KNN_METHODS:
        raise ValueError(f"knn must be one of {', '.join(fastknn.KNN_METHODS)}, got {config.knn!r}.")


@dataclass(frozen=True)
class Job:
    """One dataset category, seed and epsilon (in 1/255 units) of a study."""

    dataset: str
    category: str
    seed: int
    epsilon: float


def expand_jobs(config: StudyConfig) -> list[Job]:
    """List the study's jobs in a fixed order: datasets, then seeds, then epsilons."""
    jobs = []
    for spec in sorted(config.datasets):
        name, category = spec.split("/")
        jobs += [Job(name, category, seed, float(eps)) for seed in sorted(config.seeds)
                 for eps in sorted(config.epsilons)]
    return jobs


def available_jobs(config: StudyConfig) -> list[Job]:
    """Drop jobs whose data root is absent, logging one clear message per dataset."""
    jobs = []
    for job in expand_jobs(config):
        if job.dataset in DATASETS_NEEDING_ROOT and not config.download and not _data_root_exists(config, job):
            continue
        jobs.append(job)
    return jobs


def expected_folder(config: StudyConfig, dataset: str, category: str) -> Path | None:
    """Return the folder a category is read from, or None without a data root."""
    if config.data_root is None:
        return None
    root = Path(config.data_root) / dataset
    return root / category if dataset == "mvtec_ad" else root


def _data_root_exists(config: StudyConfig, job: Job) -> bool:
    folder = expected_folder(config, job.dataset, job.category)
    if folder is None or not folder.is_dir():
        if job.seed == min(config.seeds) and job.epsilon == 0:
            logger.warning("Skipping %s/%s: folder %s not found. Set data_root in the params to the "
                           "folder that contains %s/, or set download: true.", job.dataset, job.category, folder,
                           job.dataset)
        return False
    return True


def job_fingerprint(config: StudyConfig, job: Job) -> str:
    """Return a short digest of every setting that changes a job's numbers."""
    settings = asdict(config)
    for volatile in ("datasets", "seeds", "epsilons", "output_dir", "progress", "batch_size", "cache_dir", "download"):
        settings.pop(volatile)
    # Exact search was the only method before ``knn`` existed; leaving it out
    # keeps the file names of earlier exact results.
    if settings["knn"] == "exact":
        settings.pop("knn")
    # Settings at their original defaults are left out, so earlier result files keep their names.
    for name, default in (("preset", "none"), ("reference_order", "sorted")):
        if settings[name] == default:
            settings.pop(name)
    settings.update(asdict(job))
    settings["adlib_results_format"] = 1
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def job_paths(config: StudyConfig, job: Job) -> tuple[Path, Path]:
    """Return the per-image scores CSV and the pixel-metrics CSV of a job."""
    stem = f"{job.dataset}-{job.category}-seed{job.seed}-eps{job.epsilon:g}-{job_fingerprint(config, job)}"
    root = Path(config.output_dir)
    return root / "scores" / f"{stem}.csv", root / "pixel" / f"{stem}.csv"


def run_jobs(config: StudyConfig, *, epsilons: tuple[float, ...] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run (or read back) every available job, optionally only some epsilons.

    Returns
    -------
    scores : DataFrame
        One row per image, shot count and epsilon: the condition columns,
        ``epsilon``, ``image_id``, ``split`` ("calibration" or "evaluation"),
        ``label``, ``defect``, ``score``, ``linf`` and ``psnr``.
    pixel : DataFrame
        Tidy pixel metrics (``TIDY_COLUMNS``) where masks exist.
    """
    jobs = [j for j in available_jobs(config) if epsilons is None or j.epsilon in epsilons]
    if not jobs:
        raise ValueError("No job can run: every dataset was skipped or no epsilon matched. "
                         "Check datasets, data_root and epsilons in the params.")
    context = _RunContext(config)
    score_tables, pixel_tables = [], []
    for job in tqdm(jobs, desc="jobs", disable=not config.progress):
        scores, pixel = run_job(config, job, context=context)
        score_tables.append(scores)
        pixel_tables.append(pixel)
    return pd.concat(score_tables, ignore_index=True), pd.concat(pixel_tables, ignore_index=True)


def run_job(config: StudyConfig, job: Job, *, context: "_RunContext | None" = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compute one job, or read it back when its result files exist."""
    scores_path, pixel_path = job_paths(config, job)
    if scores_path.is_file() and pixel_path.is_file():
        logger.info("Reusing %s", scores_path)
        return pd.read_csv(scores_path), pd.read_csv(pixel_path)
    context = context or _RunContext(config)
    scores, pixel = _compute_job(config, job, context)
    write_csv_atomic(pixel, pixel_path)
    write_csv_atomic(scores, scores_path)
    write_json_atomic({"config": asdict(config), "job": asdict(job)}, scores_path.with_suffix(".json"))
    return scores, pixel


class _RunContext:
    """Backbone and datasets loaded once and shared by the jobs of one run."""

    def __init__(self, config: StudyConfig):
        self.config = config
        self._extractor = None
        self._datasets: dict[tuple[str, str], data.AnomalyDataset] = {}
        self.cache = FeatureCache(config.cache_dir) if config.cache_dir is not None else None

    @property
    def extractor(self) -> backbones.PatchFeatureExtractor:
        if self._extractor is None:
            self._extractor = load_extractor(self.config)
        return self._extractor

    def dataset(self, job: Job) -> data.AnomalyDataset:
        key = (job.dataset, job.category)
        if key not in self._datasets:
            self._datasets[key] = prepare_dataset(self.config, job.dataset, job.category)
        return self._datasets[key]


def load_extractor(config: StudyConfig) -> backbones.PatchFeatureExtractor:
    """Load the configured backbone."""
    return backbones.load_backbone(config.backbone, weights=config.weights, checkpoint=config.backbone_checkpoint)


def dataset_summary(config: StudyConfig) -> pd.DataFrame:
    """Image counts per available dataset category: reference pool, test normal and anomalous, masks."""
    rows = []
    for spec in sorted(config.datasets):
        name, category = spec.split("/")
        if name in DATASETS_NEEDING_ROOT and not _data_root_exists(config, Job(name, category, min(config.seeds), 0)):
            continue
        dataset = prepare_dataset(config, name, category)
        rows.append({"dataset": name, "category": category, "reference_pool": len(dataset.train_ids),
                     "test_normal": int((dataset.test_labels == 0).sum()),
                     "test_anomalous": int(dataset.test_labels.sum()), "masks": dataset.has_masks})
    return pd.DataFrame(rows)


def describe(config: StudyConfig, weights: str) -> str:
    """Return one line that names the data, backbone, weights source, shots, seeds and epsilons."""
    return (f"data: {', '.join(sorted(config.datasets))} | backbone: {config.backbone} @ {config.image_size}px | "
            f"weights: {weights} | shots: {list(config.shots)} | seeds: {list(config.seeds)} | "
            f"eps: {[f'{e:g}/255' for e in config.epsilons]}")


def prepare_dataset(config: StudyConfig, name: str, category: str) -> data.AnomalyDataset:
    """Load a category and apply the study's optional cap on test images per label."""
    dataset = visa.load_category(name, category, config.data_root, download=config.download)
    needed = (max(config.seeds) + 1) * max(config.shots)
    if needed > len(dataset.train_ids):
        raise ValueError(f"{name}/{category} has {len(dataset.train_ids)} normal training images, but "
                         f"shots={max(config.shots)} with seed={max(config.seeds)} needs {needed}; "
                         "lower shots or seeds.")
    if config.max_test_per_class is not None:
        dataset = dataset.subset(sampling.cap_per_class(dataset.test_labels, max_per_class=config.max_test_per_class))
    return dataset


def _compute_job(config: StudyConfig, job: Job, context: _RunContext) -> tuple[pd.DataFrame, pd.DataFrame]:
    dataset = context.dataset(job)
    extractor = context.extractor
    calibration, evaluation = sampling.calibration_split(
        dataset.test_labels, calibration_fraction=config.calibration_fraction, seed=job.seed)
    if job.epsilon == 0:
        query_indices = np.arange(len(dataset.test_ids))
        query_features = image_features(config, dataset, dataset.test_ids, extractor, cache=context.cache,
                                        description="test features")
        perturbation = {"linf": np.zeros(len(query_indices)), "psnr": np.full(len(query_indices), np.inf)}
    else:
        query_indices = evaluation
        test_images = load_split_images(config, dataset, dataset.test_ids, extractor)
        calibration_features = None
        if context.cache is not None:
            calibration_features = image_features(config, dataset, [dataset.test_ids[i] for i in calibration],
                                                  extractor, cache=context.cache, description="surrogate features")
        query_images = attack_evaluation_images(config, extractor, test_images, dataset.test_labels,
                                                calibration, evaluation, job.epsilon,
                                                calibration_features=calibration_features)
        perturbation = attacks.perturbation_stats(test_images[evaluation], query_images)
        query_features = features.extract_patch_features(
            extractor, query_images, batch_size=config.batch_size, progress=config.progress,
            description="test features")
    split = np.where(np.isin(query_indices, calibration), "calibration", "evaluation")
    preprocessing = preprocessing_for(config, dataset)
    # Test images are masked from their own patch features; reference images never are.
    foreground = masking.foreground_masks(query_features) if preprocessing.mask_test_images else None
    score_rows, pixel_rows = [], []
    for shots in config.shots:
        detector = fit_detector(config, dataset, extractor, shots=shots, seed=job.seed, cache=context.cache)
        if preprocessing.mask_test_images and isinstance(detector, fastknn.FastKNNDetector):
            # The fast detector then makes the highest foreground patches exact.
            patch_scores = detector.patch_scores(query_features, foreground=foreground)
        else:
            patch_scores = detector.patch_scores(query_features)
        if preprocessing.mask_test_images:
            patch_scores = masking.apply_foreground_masks(patch_scores, foreground)
        condition = _condition(config, dataset, extractor, shots, job)
        score_rows.append(pd.DataFrame({
            **condition, "epsilon": job.epsilon, "image_id": [dataset.test_ids[i] for i in query_indices],
            "split": split, "label": dataset.test_labels[query_indices],
            "defect": [dataset.test_defects[i] for i in query_indices],
            "score": detector.image_scores(patch_scores), **perturbation}))
        pixel_rows += pixel_metric_rows(config, dataset, query_indices, split, patch_scores, condition, job.epsilon,
                                      multiple=extractor.info.patch_size)
    return pd.concat(score_rows, ignore_index=True), pd.DataFrame(pixel_rows, columns=TIDY_COLUMNS)


def _condition(config, dataset, extractor, shots, job) -> dict:
    return {"dataset": dataset.name, "category": dataset.category, "backbone": extractor.info.name,
            "weights": extractor.info.weights, "shots": shots, "seed": job.seed}


def load_split_images(config: StudyConfig, dataset: data.AnomalyDataset, ids, extractor) -> np.ndarray:
    """Load images of ``ids`` at the study's size, cropped to the backbone's patch multiple."""
    return data.load_images([dataset.paths[i] for i in ids], image_size=config.image_size,
                            multiple=extractor.info.patch_size)


def image_features(config: StudyConfig, dataset: data.AnomalyDataset, ids, extractor, *,
                   cache: FeatureCache | None = None, description: str = "features") -> np.ndarray:
    """Return patch features of the images ``ids``, read from ``cache`` where it has them.

    Returns
    -------
    ndarray of shape (len(ids), grid_h, grid_w, dim), float32
    """
    return cached_patch_features(extractor, [dataset.paths[i] for i in ids], cache=cache,
                                 image_size=config.image_size, multiple=extractor.info.patch_size,
                                 batch_size=config.batch_size, progress=config.progress, description=description)


def preprocessing_for(config: StudyConfig, dataset: data.AnomalyDataset) -> presets.Preprocessing:
    """Return the rotation and masking choices of the configured preset for a category."""
    if config.preset == "none":
        return presets.Preprocessing(rotate_references=config.rotations, mask_test_images=False)
    return presets.preprocessing_for(dataset.name, dataset.category, preset=config.preset)


def fit_detector(config: StudyConfig, dataset: data.AnomalyDataset, extractor, *, shots: int, seed: int,
                 cache: FeatureCache | None = None) -> KNNDetector:
    """Build the kNN memory bank from the seed's few-shot references (rotated when enabled).

    Bank features are read from ``cache`` where it has them. The search index
    follows ``config.knn``.
    """
    references = sampling.reference_block(dataset.train_ids, shots=shots, seed=seed, order=config.reference_order)
    rotate = config.rotations or preprocessing_for(config, dataset).rotate_references
    angles = features.ROTATION_ANGLES if rotate else ()
    bank = cached_patch_features(extractor, [dataset.paths[i] for i in references], cache=cache,
                                 image_size=config.image_size, multiple=extractor.info.patch_size, angles=angles,
                                 batch_size=config.batch_size, progress=False)
    detector = KNNDetector() if config.knn == "exact" else fastknn.FastKNNDetector(method=config.knn)
    return detector.fit(bank)


def attack_evaluation_images(config, extractor, test_images, labels, calibration, evaluation, epsilon, *,
                             calibration_features: np.ndarray | None = None) -> np.ndarray:
    """Fit the surrogate head on the calibration images, then FGSM-attack the evaluation images.

    The head is never fitted on the images it attacks. ``epsilon`` is in units of 1/255.
    ``calibration_features`` are the calibration images' patch features when the
    caller already has them; otherwise they are extracted here.
    """
    if calibration_features is None:
        calibration_features = features.extract_patch_features(
            extractor, test_images[calibration], batch_size=config.batch_size, progress=config.progress,
            description="surrogate features")
    head = attacks.fit_linear_head(calibration_features.mean(axis=(1, 2)), labels[calibration])
    model = attacks.SurrogateClassifier(extractor, head)
    return features.attack_in_batches(model, test_images[evaluation], labels[evaluation], epsilon / 255.0,
                                      batch_size=config.batch_size, progress=config.progress)


def pixel_metric_rows(config, dataset, query_indices, split, patch_scores, condition, epsilon, *,
                      multiple: int) -> list[dict]:
    """Pixel AUROC and AU-PRO (FPR up to 0.3) of the evaluation images, when every anomalous one has a mask."""
    if not dataset.has_masks:
        return []
    selected = np.flatnonzero(split == "evaluation")
    ids = [dataset.test_ids[query_indices[i]] for i in selected]
    masks = data.load_masks(dataset, ids, image_size=config.image_size, multiple=multiple)
    maps = anomaly_maps(patch_scores[selected], masks.shape[1:])
    values = {"pixel_auroc": metrics.pixel_auroc(masks, maps), "au_pro": metrics.au_pro(masks, maps, max_fpr=0.3)}
    return [{**condition, "epsilon": epsilon, "split": "evaluation", "metric": name, "value": value}
            for name, value in values.items()]


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write a CSV through a temporary file in the same folder, then rename it into place."""
    _write_atomic(path, lambda handle: frame.to_csv(handle, index=False))


def write_json_atomic(payload: dict, path: Path) -> None:
    """Write JSON atomically, like :func:`write_csv_atomic`."""
    _write_atomic(path, lambda handle: json.dump(payload, handle, indent=2, sort_keys=True, default=str))


def _write_atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", newline="") as handle:
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def set_threads(count: int | None = None) -> None:
    """Limit torch's CPU threads, by default to the number of available cores."""
    torch.set_num_threads(count or len(os.sched_getaffinity(0)))


def with_overrides(config: StudyConfig, **changes) -> StudyConfig:
    """Return a copy of ``config`` with some settings replaced."""
    return replace(config, **changes)
