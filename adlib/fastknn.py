"""Faster nearest-neighbour search for large memory banks, measured against exact search.

Exact search compares every test patch with every bank patch. At 16 shots with 8
rotations a ViT-S/14 bank at 448 px contains 131,072 patches of 384 dimensions, and
exact search then costs about as much as the backbone itself. Two approximate
indexes are offered:

* ``"ivf"``: a faiss inverted-file index (``IndexIVFFlat``). k-means splits the
  bank into lists, and a query scans only the ``n_probe`` lists whose centroids
  are nearest.
* ``"coreset"``: greedy k-center subsampling of the bank, as in PatchCore
  (Roth et al., CVPR 2022), searched exactly.

Both return the distance to some bank patch, so an approximate distance is never
below the exact one. :class:`FastKNNDetector` uses that bound to search each
image's highest patches again exactly and to prove that its image score equals
exact search (see :func:`refine_top_patches`). ``"auto"`` keeps exact search up
to :data:`EXACT_MAX_BANK_SIZE` patches and uses ``"ivf"`` above it.
:func:`search_quality` and :func:`rank_agreement` measure what an approximation
changes: neighbour recall, distance error and the rank correlation of image
scores.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import faiss
import numpy as np
import torch
from scipy.stats import spearmanr

from .detector import KNNDetector, build_index, normalize_rows

logger = logging.getLogger(__name__)

KNNMethod = Literal["auto", "exact", "ivf", "coreset"]
KNN_METHODS = ("auto", "exact", "ivf", "coreset")

# Bank size (patches) above which "auto" switches from exact search to IVF.
# Measured with EfficientNet-Lite0 features of MVTec-AD bottle on 2 CPU cores: from
# about 3,000 patches on, IVF with exact refinement searched 2 to 7 times faster
# than exact search, depending on the background load. Its build paid for itself
# after 10 to 20 test images. Below that the gain was small.
# bench/run_benchmarks.py repeats this scan.
EXACT_MAX_BANK_SIZE = 4_096
# Lists per square root of the bank size. A query compares itself with every list
# centroid and then with n_probe * n / n_lists bank patches, and the two costs are
# equal when n_lists is sqrt(n_probe * n).
LISTS_PER_SQRT = 4
# Lists scanned per query. With the exact refinement of each image's top patches,
# one list already gave exact image scores without a single full-search fallback
# on the bottle banks of bench/run_benchmarks.py, and it searched about twice as
# fast as two lists. More lists only make the anomaly maps closer to exact.
DEFAULT_N_PROBE = 1
DEFAULT_CANDIDATE_FACTOR = 4
# k-means trains on at most this many bank patches per list (faiss 1.15 defaults
# to 256), which bounds the build time.
TRAINING_POINTS_PER_LIST = 64
# Query count from which exact_cosine_distances hands the search to faiss.
FAISS_MIN_QUERIES = 1024
KMEANS_ITERATIONS = 10


def choose_method(bank_size: int, *, exact_max_bank_size: int = EXACT_MAX_BANK_SIZE) -> Literal["exact", "ivf"]:
    """Pick exact search for banks up to ``exact_max_bank_size`` patches, else IVF."""
    if bank_size < 1:
        raise ValueError(f"bank_size must be positive, got {bank_size}.")
    return "exact" if bank_size <= exact_max_bank_size else "ivf"


def ivf_list_count(bank_size: int) -> int:
    """Return the IVF list count: the power of two nearest to ``LISTS_PER_SQRT * sqrt(bank_size)``.

    Examples
    --------
    >>> ivf_list_count(131_072)
    1024
    """
    target = LISTS_PER_SQRT * math.sqrt(bank_size)
    return int(2 ** round(math.log2(max(target, 1.0))))


def build_ivf_index(memory_bank: np.ndarray, *, n_lists: int | None = None, n_probe: int = DEFAULT_N_PROBE,
                    seed: int = 0) -> faiss.IndexIVFFlat:
    """Build a faiss IVF-Flat index over the L2-normalised bank of shape (n, dim).

    Parameters
    ----------
    memory_bank : ndarray of shape (n_patches, dim)
    n_lists : int, optional
        Number of k-means lists; by default :func:`ivf_list_count`.
    n_probe : int, default=1
        Lists scanned per query. More lists give higher recall and slower search.
    seed : int, default=0
        Seed of the k-means initialisation and of the training subsample.
    """
    bank = _check_bank(memory_bank)
    n_lists = ivf_list_count(len(bank)) if n_lists is None else n_lists
    if not 1 <= n_lists <= len(bank):
        raise ValueError(f"n_lists must lie in [1, {len(bank)}] for a bank of {len(bank)} patches, got {n_lists}.")
    if n_probe < 1:
        raise ValueError(f"n_probe must be at least 1, got {n_probe}.")
    quantizer = faiss.IndexFlatL2(bank.shape[1])
    index = faiss.IndexIVFFlat(quantizer, bank.shape[1], n_lists, faiss.METRIC_L2)
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.seed = seed
    index.cp.max_points_per_centroid = TRAINING_POINTS_PER_LIST
    # faiss warns below 39 training points per list; tiny banks simply train on everything.
    index.cp.min_points_per_centroid = 1
    index.train(bank)
    index.add(bank)
    index.nprobe = min(n_probe, n_lists)
    return index


def greedy_coreset_indices(memory_bank: np.ndarray, *, size: int, projection_dim: int = 128,
                           seed: int = 0) -> np.ndarray:
    """Select ``size`` bank rows by greedy k-center search (farthest point first).

    The first row is drawn at random. Each further step adds the row farthest
    from all rows chosen so far, which greedily minimises the covering radius.
    Distances are computed after a Gaussian random projection to
    ``projection_dim`` dimensions, which preserves them approximately
    (Johnson-Lindenstrauss) and makes each step cheaper, as PatchCore does.

    Returns
    -------
    ndarray of shape (size,), int64
        Row indices in the order they were chosen.
    """
    bank = _check_bank(memory_bank)
    if not 1 <= size <= len(bank):
        raise ValueError(f"size must lie in [1, {len(bank)}], got {size}.")
    generator = torch.Generator().manual_seed(seed)
    points = torch.from_numpy(bank)
    if projection_dim < bank.shape[1]:
        projection = torch.randn(bank.shape[1], projection_dim, generator=generator) / math.sqrt(projection_dim)
        points = points @ projection
    squared_norms = (points * points).sum(dim=1)
    chosen = torch.empty(size, dtype=torch.int64)
    chosen[0] = int(torch.randint(len(bank), (1,), generator=generator))
    nearest = torch.full((len(bank),), float("inf"))
    for step in range(size):
        if step:
            chosen[step] = torch.argmax(nearest)
        center = points[chosen[step]]
        distances = squared_norms - 2 * (points @ center) + squared_norms[chosen[step]]
        torch.minimum(nearest, distances, out=nearest)
    return chosen.numpy()


def build_coreset_index(memory_bank: np.ndarray, *, fraction: float = 0.1, seed: int = 0) -> faiss.IndexFlatL2:
    """Return an exact index over a greedy k-center coreset holding ``fraction`` of the bank."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
    bank = _check_bank(memory_bank)
    size = max(1, int(round(fraction * len(bank))))
    return build_index(bank[greedy_coreset_indices(bank, size=size, seed=seed)])


def build_search_index(memory_bank: np.ndarray, *, method: KNNMethod = "auto", n_probe: int = DEFAULT_N_PROBE,
                       coreset_fraction: float = 0.1, seed: int = 0) -> faiss.Index:
    """Build the index that ``method`` names over a (n_patches, dim) bank.

    ``"auto"`` resolves through :func:`choose_method`. Every returned index
    takes L2-normalised queries and returns squared L2 distances, so
    :func:`adlib.detector.nearest_cosine_distances` works with all of them.
    """
    if method not in KNN_METHODS:
        raise ValueError(f"Unknown kNN method {method!r}; expected one of {', '.join(KNN_METHODS)}.")
    if method == "auto":
        method = choose_method(len(memory_bank))
    if method == "exact":
        return build_index(memory_bank)
    if method == "ivf":
        return build_ivf_index(memory_bank, n_probe=n_probe, seed=seed)
    return build_coreset_index(memory_bank, fraction=coreset_fraction, seed=seed)


class FastKNNDetector(KNNDetector):
    """:class:`adlib.detector.KNNDetector` with a faster search for large banks.

    With an approximate method, every test patch is first searched in the
    approximate index. Both approximations return the distance to a bank patch
    that is not always the nearest, so each approximate distance is an upper
    bound of the exact one. Then each image's ``candidate_factor * k`` highest
    patches, where ``k`` is the number of patches averaged into the image
    score, are searched again exactly. The image score is certified exact when
    the k-th highest exact distance among those candidates is at least the
    highest approximate distance outside them, because no other patch can then
    enter the top k. Images that fail the check are searched exactly in full.
    Image scores therefore equal exact search up to float rounding. Patch
    scores outside each image's candidates stay approximate, which changes
    anomaly maps slightly.

    Parameters
    ----------
    method : {"auto", "exact", "ivf", "coreset"}, default="auto"
        ``"auto"`` uses :func:`choose_method` on the bank size.
    top_fraction : float, default=0.01
    n_probe : int, default=1
        IVF lists scanned per query.
    coreset_fraction : float, default=0.1
        Share of the bank kept by the coreset.
    candidate_factor : int, default=4
        Candidates re-searched exactly per image, as a multiple of ``k``.

    Attributes
    ----------
    method_ : str
        The method used after resolving ``"auto"``, set by :meth:`fit`.
    fallback_images_ : int
        Images of the last :meth:`patch_scores` call searched exactly in full.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> detector = FastKNNDetector().fit(rng.normal(size=(2, 4, 4, 8)))
    >>> detector.method_
    'exact'
    """

    def __init__(self, *, method: KNNMethod = "auto", top_fraction: float = 0.01, n_probe: int = DEFAULT_N_PROBE,
                 coreset_fraction: float = 0.1, candidate_factor: int = DEFAULT_CANDIDATE_FACTOR):
        super().__init__(top_fraction=top_fraction)
        if method not in KNN_METHODS:
            raise ValueError(f"Unknown kNN method {method!r}; expected one of {', '.join(KNN_METHODS)}.")
        if candidate_factor < 1:
            raise ValueError(f"candidate_factor must be at least 1, got {candidate_factor}.")
        self.method = method
        self.n_probe = n_probe
        self.coreset_fraction = coreset_fraction
        self.candidate_factor = candidate_factor
        self.method_ = None
        self.memory_bank_ = None
        self.fallback_images_ = 0

    def fit(self, reference_features: np.ndarray) -> "FastKNNDetector":
        """Index every patch of the (n_refs, grid_h, grid_w, dim) reference features."""
        bank = reference_features.reshape(-1, reference_features.shape[-1])
        self.method_ = choose_method(len(bank)) if self.method == "auto" else self.method
        self.index_ = build_search_index(bank, method=self.method_, n_probe=self.n_probe,
                                         coreset_fraction=self.coreset_fraction)
        self.memory_bank_ = normalize_rows(bank) if self.method_ != "exact" else None
        logger.debug("Indexed %d bank patches with %s search", len(bank), self.method_)
        return self

    def patch_scores(self, features: np.ndarray, *, foreground: np.ndarray | None = None) -> np.ndarray:
        """Return cosine distances of shape (n, grid_h, grid_w) for (n, grid_h, grid_w, dim) features.

        Each image's highest patches are exact (see the class description), so
        :meth:`image_scores` of the result matches exact search.

        Parameters
        ----------
        features : ndarray of shape (n, grid_h, grid_w, dim)
        foreground : ndarray of shape (n, grid_h, grid_w), bool, optional
            Patches that keep their score after
            :func:`adlib.masking.apply_foreground_masks`. When given, the
            highest foreground patches are the ones made exact, so the image
            score of the masked scores matches exact search too.
        """
        approximate = super().patch_scores(features)
        self.fallback_images_ = 0
        if self.method_ == "exact":
            return approximate
        if foreground is not None and foreground.shape != approximate.shape:
            raise ValueError(f"foreground must have shape {approximate.shape}, got {foreground.shape}.")
        n_images = len(features)
        patches = features.reshape(n_images, -1, features.shape[-1])
        top_count = max(1, int(patches.shape[1] * self.top_fraction))
        eligible = None if foreground is None else foreground.reshape(n_images, -1)
        refined, self.fallback_images_ = refine_top_patches(
            approximate.reshape(n_images, -1), patches, self.memory_bank_, top_count=top_count,
            candidate_count=self.candidate_factor * top_count, eligible=eligible)
        return refined.reshape(approximate.shape)


def refine_top_patches(approximate_scores: np.ndarray, patch_features: np.ndarray, memory_bank: np.ndarray, *,
                       top_count: int, candidate_count: int,
                       eligible: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Make each image's ``top_count`` highest patch scores exact, given upper-bound scores.

    Parameters
    ----------
    approximate_scores : ndarray of shape (n_images, n_patches)
        Cosine distances that are never below the exact ones.
    patch_features : ndarray of shape (n_images, n_patches, dim)
    memory_bank : ndarray of shape (n_bank, dim)
        The whole bank, searched exactly by :func:`exact_cosine_distances`.
    top_count : int
        Patches averaged into the image score.
    candidate_count : int
        Highest approximate patches per image that are searched exactly.
    eligible : ndarray of shape (n_images, n_patches), bool, optional
        Patches that can enter the image score. The others are later set to 0
        by foreground masking. By default every patch is eligible.

    Returns
    -------
    refined : ndarray of shape (n_images, n_patches)
        Exact scores for the candidates (or for every patch of an image that
        failed the check), approximate ones elsewhere.
    fallback_images : int
        Images whose candidates did not certify the top ``top_count`` and that
        were searched exactly in full.
    """
    n_images, n_patches = approximate_scores.shape
    candidate_count = min(max(candidate_count, top_count), n_patches)
    if eligible is None:
        eligible = np.ones(approximate_scores.shape, dtype=bool)
    refined = approximate_scores.astype(np.float32, copy=True)
    ranking = np.where(eligible, approximate_scores, -np.inf)
    order = np.argpartition(ranking, n_patches - candidate_count, axis=1)
    candidates = order[:, n_patches - candidate_count:]
    rows = np.repeat(np.arange(n_images), candidate_count)
    exact = exact_cosine_distances(memory_bank, patch_features[rows, candidates.ravel()])
    refined[rows, candidates.ravel()] = exact
    if candidate_count == n_patches:
        return refined, 0
    # Every eligible patch outside the candidates has an exact score at most its
    # approximate one, which is at most the highest approximate score outside
    # (minus infinity when no eligible patch is outside).
    outside_bound = np.take_along_axis(ranking, order[:, :n_patches - candidate_count], axis=1).max(axis=1)
    exact = np.where(np.take_along_axis(eligible, candidates, axis=1), exact.reshape(n_images, candidate_count),
                     -np.inf)
    kth_highest = np.partition(exact, candidate_count - top_count, axis=1)[:, candidate_count - top_count]
    failed = np.flatnonzero(kth_highest < outside_bound)
    if len(failed):
        refined[failed] = exact_cosine_distances(
            memory_bank, patch_features[failed].reshape(-1, patch_features.shape[-1])).reshape(len(failed), -1)
    return refined, len(failed)


def exact_cosine_distances(memory_bank: np.ndarray, queries: np.ndarray, *, block_size: int = 4096) -> np.ndarray:
    """Return each query's exact cosine distance, 1 - cos, to its nearest bank row.

    From :data:`FAISS_MIN_QUERIES` queries on, this is faiss's brute-force
    ``faiss.knn``. Fewer queries use blocked torch matrix products. On 2 cores,
    for a few hundred queries against 10^5 bank rows, faiss-cpu 1.15 ran 3 to
    10 times slower than torch. From about a thousand queries on, it ran up to
    2 times faster.

    Parameters
    ----------
    memory_bank : ndarray of shape (n_bank, dim)
    queries : ndarray of shape (n_queries, dim)
    block_size : int, default=4096
        Rows of the bank and of the queries per torch matrix product, which
        bounds the temporary similarity block to ``block_size ** 2`` floats (64 MiB).

    Returns
    -------
    ndarray of shape (n_queries,), float32, in [0, 2]
    """
    bank, normalised = normalize_rows(memory_bank), normalize_rows(queries)
    if len(normalised) >= FAISS_MIN_QUERIES:
        squared, _ = faiss.knn(normalised, bank, 1)
        # Squared L2 of unit vectors is twice the cosine distance.
        return np.clip(squared[:, 0] / 2.0, 0.0, 2.0)
    bank, normalised = torch.from_numpy(bank), torch.from_numpy(normalised)
    best = torch.full((len(normalised),), -1.0)
    for query_start in range(0, len(normalised), block_size):
        query_block = normalised[query_start:query_start + block_size]
        best_block = best[query_start:query_start + block_size]
        for bank_start in range(0, len(bank), block_size):
            similarity = query_block @ bank[bank_start:bank_start + block_size].T
            torch.maximum(best_block, similarity.max(dim=1).values, out=best_block)
    return np.clip(1.0 - best.numpy(), 0.0, 2.0)


def search_quality(exact_index: faiss.Index, approximate_index: faiss.Index, queries: np.ndarray) -> dict[str, float]:
    """Compare an approximate index with exact search on the same (n, dim) queries.

    Returns
    -------
    dict
        ``recall_at_1``: share of queries whose approximate nearest distance
        equals the exact one (within 1e-6, so ties between bank patches count as
        found). ``mean_distance_error`` and ``max_distance_error``: the
        approximate minus the exact cosine distance.
    """
    normalised = normalize_rows(queries)
    exact, _ = exact_index.search(normalised, 1)
    approximate, _ = approximate_index.search(normalised, 1)
    # Squared L2 of unit vectors is twice the cosine distance.
    error = (approximate[:, 0] - exact[:, 0]) / 2.0
    return {"recall_at_1": float(np.mean(error <= 1e-6)), "mean_distance_error": float(error.mean()),
            "max_distance_error": float(error.max())}


def rank_agreement(exact_scores: np.ndarray, approximate_scores: np.ndarray) -> float:
    """Return the Spearman rank correlation of two image-score vectors of shape (n_images,)."""
    exact_scores, approximate_scores = np.asarray(exact_scores), np.asarray(approximate_scores)
    if exact_scores.shape != approximate_scores.shape or exact_scores.ndim != 1 or len(exact_scores) < 2:
        raise ValueError(f"Expected two score vectors of the same shape (n_images,) with n_images >= 2, "
                         f"got {exact_scores.shape} and {approximate_scores.shape}.")
    return float(spearmanr(exact_scores, approximate_scores).statistic)


def _check_bank(memory_bank: np.ndarray) -> np.ndarray:
    if memory_bank.ndim != 2 or len(memory_bank) == 0:
        raise ValueError(f"memory_bank must have shape (n_patches, dim) with n_patches > 0, got {memory_bank.shape}.")
    return normalize_rows(memory_bank)
