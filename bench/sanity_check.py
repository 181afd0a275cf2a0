"""Recompute few-shot image AUROC with a brute-force nearest-neighbour search.

This is an independent check of adlib's detector. It uses adlib only to read the
datasets, load images and build the EfficientNet-Lite0 backbone. The scoring is
done here without faiss. Every test patch is compared with every reference patch
by cosine distance (1 - cosine similarity), and the nearest one gives the patch
distance. The image score is the mean of the top 1 % patch distances.

Categories: MVTec-AD bottle (from --data-root), ELPV mono and ELPV poly (from
the elpv-dataset package). References for seed s with k shots are the sorted
normal pool entries [s*k, (s+1)*k), as in adlib.

Example, from the repository root:

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/sanity_check.py --shots 4 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from adlib.backbones import load_backbone
from adlib.data import AnomalyDataset, load_elpv, load_images, load_mvtec_category

logger = logging.getLogger("sanity_check")

REPO_ROOT = Path(__file__).resolve().parents[1]
TOP_FRACTION = 0.01
# Upper bound on the entries of one similarity matrix (test patches x bank
# patches), so that memory stays near 400 MB of float32 per chunk.
MAX_SIMILARITY_ENTRIES = 100_000_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, default=4, help="Number of reference images per seed (default: 4).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="Seeds. Seed s uses the sorted normal pool entries [s*shots, (s+1)*shots) "
                             "(default: 0 1 2).")
    parser.add_argument("--image-size", type=int, default=224,
                        help="Length in pixels of the smaller image edge after resizing (default: 224).")
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data/mvtec_ad"),
                        help="Folder that contains the MVTec-AD category folders. A relative path is "
                             "resolved against the repository root (default: ../shared/data/mvtec_ad).")
    parser.add_argument("--categories", nargs="+", default=["mvtec_ad/bottle", "elpv/mono", "elpv/poly"],
                        help="Categories to check as dataset/category (default: mvtec_ad/bottle elpv/mono "
                             "elpv/poly).")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per backbone forward pass (default: 32).")
    return parser.parse_args()


def load_category(spec: str, data_root: Path) -> AnomalyDataset:
    dataset_name, _, category = spec.partition("/")
    if dataset_name == "elpv":
        return load_elpv(category)
    if dataset_name == "mvtec_ad":
        return load_mvtec_category(data_root, category)
    raise ValueError(f"Invalid category {spec!r}, expected mvtec_ad/<category> or elpv/<mono|poly>.")


@torch.no_grad()
def extract_features(extractor, paths: list[Path], image_size: int, batch_size: int) -> torch.Tensor:
    """Return L2-normalised patch features of shape (n_images, n_patches, channels)."""
    multiple = extractor.info.patch_size
    batches = []
    for start in range(0, len(paths), batch_size):
        images = load_images(paths[start:start + batch_size], image_size=image_size, multiple=multiple)
        grid = extractor(torch.from_numpy(images).permute(0, 3, 1, 2))
        batches.append(F.normalize(grid.flatten(1, 2), dim=-1))
    return torch.cat(batches)


def image_scores(test_features: torch.Tensor, bank: torch.Tensor) -> np.ndarray:
    """Score images by the mean of their top 1 % nearest-neighbour cosine distances.

    ``test_features`` has shape (n_images, n_patches, channels) and ``bank`` has
    shape (n_bank_patches, channels). Both must be L2-normalised.
    """
    n_patches = test_features.shape[1]
    top_count = max(1, int(round(TOP_FRACTION * n_patches)))
    images_per_chunk = max(1, MAX_SIMILARITY_ENTRIES // (n_patches * bank.shape[0]))
    scores = []
    for start in range(0, len(test_features), images_per_chunk):
        similarity = test_features[start:start + images_per_chunk] @ bank.T
        distances = 1.0 - similarity.max(dim=-1).values
        scores.append(distances.topk(top_count, dim=-1).values.mean(dim=-1))
    return torch.cat(scores).numpy()


def check_category(spec: str, extractor, args: argparse.Namespace, data_root: Path) -> list[float]:
    dataset = load_category(spec, data_root)
    needed = (max(args.seeds) + 1) * args.shots
    if needed > len(dataset.train_ids):
        raise ValueError(f"{spec} has {len(dataset.train_ids)} normal pool images, but seeds up to "
                         f"{max(args.seeds)} with {args.shots} shots need {needed}. Use fewer seeds or shots.")

    started = time.perf_counter()
    test_paths = [dataset.paths[i] for i in dataset.test_ids]
    test_features = extract_features(extractor, test_paths, args.image_size, args.batch_size)
    logger.info("%s: extracted %d test images (%d normal, %d anomalous) in %.0f s", spec,
                len(test_paths), int((dataset.test_labels == 0).sum()), int(dataset.test_labels.sum()),
                time.perf_counter() - started)

    aurocs = []
    for seed in args.seeds:
        reference_ids = dataset.train_ids[seed * args.shots:(seed + 1) * args.shots]
        reference_paths = [dataset.paths[i] for i in reference_ids]
        bank = extract_features(extractor, reference_paths, args.image_size, args.batch_size)
        bank = bank.reshape(-1, bank.shape[-1])
        auroc = roc_auc_score(dataset.test_labels, image_scores(test_features, bank))
        aurocs.append(auroc)
        logger.info("%s seed %d (%d shots, %d bank patches): image AUROC %.4f",
                    spec, seed, args.shots, bank.shape[0], auroc)
    return aurocs


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    data_root = args.data_root if args.data_root.is_absolute() else REPO_ROOT / args.data_root
    extractor = load_backbone("efficientnet_lite0")
    logger.info("Checking %s at %d px, %d shots, seeds %s", ", ".join(args.categories),
                args.image_size, args.shots, args.seeds)

    summary = {}
    for spec in args.categories:
        summary[spec] = check_category(spec, extractor, args, data_root)
    for spec, aurocs in summary.items():
        logger.info("%s: image AUROC %.4f ± %.4f over seeds %s (%d shots, %d px)", spec,
                    np.mean(aurocs), np.std(aurocs), args.seeds, args.shots, args.image_size)


if __name__ == "__main__":
    main()
