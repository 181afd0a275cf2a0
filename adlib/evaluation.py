"""Metrics tables computed from per-image scores.

Every function takes the scores table of :func:`adlib.study.run_jobs` and returns
a tidy table with the columns ``adlib.study.TIDY_COLUMNS``. Thresholds,
calibrators and the flagging threshold are fitted on the clean calibration
split of the same condition; every reported value is on the evaluation split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import calibration, metrics, uncertainty
from .study import CONDITION_COLUMNS, TIDY_COLUMNS


def detection_metrics(scores: pd.DataFrame) -> pd.DataFrame:
    """AUROC, AP, F1-max, and F1 and G-mean at the calibration split's F1-optimal threshold."""
    rows = []
    for condition, group in _conditions(scores):
        clean_calibration = _select(group, epsilon=0, split="calibration")
        threshold = metrics.f1_optimal_threshold(clean_calibration.label, clean_calibration.score)
        for epsilon, evaluation in _evaluation_by_epsilon(group):
            values = metrics.image_metrics(evaluation.label, evaluation.score, threshold)
            rows += _tidy(condition, epsilon, values)
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


def add_probabilities(scores: pd.DataFrame) -> pd.DataFrame:
    """Add ``p_raw`` (min-max), ``p_platt`` and their entropies, fitted per condition on clean calibration scores."""
    parts = []
    for _, group in _conditions(scores):
        clean_calibration = _select(group, epsilon=0, split="calibration")
        low, high = calibration.fit_minmax(clean_calibration.score)
        slope, intercept = calibration.fit_platt(clean_calibration.score, clean_calibration.label)
        group = group.copy()
        group["p_raw"] = calibration.minmax_probabilities(group.score, low, high)
        group["p_platt"] = calibration.platt_probabilities(group.score, slope, intercept)
        group["entropy_raw"] = uncertainty.binary_entropy(group.p_raw)
        group["entropy_platt"] = uncertainty.binary_entropy(group.p_platt)
        parts.append(group)
    return pd.concat(parts, ignore_index=True)


def calibration_table(scores: pd.DataFrame, *, n_bins: int = 15) -> pd.DataFrame:
    """ECE, NLL and Brier of raw (min-max) and Platt probabilities, plus F1 and G-mean at p >= 0.5.

    Metric names carry the suffix ``_raw`` or ``_platt``.
    """
    scores = scores if "p_platt" in scores else add_probabilities(scores)
    rows = []
    for condition, group in _conditions(scores):
        for epsilon, evaluation in _evaluation_by_epsilon(group):
            for kind in ("raw", "platt"):
                probabilities = evaluation[f"p_{kind}"].to_numpy()
                values = calibration.calibration_metrics(evaluation.label, probabilities, n_bins=n_bins)
                values.update({k: v for k, v in metrics.threshold_metrics(evaluation.label, probabilities, 0.5).items()
                               if k in ("f1", "gmean")})
                rows += _tidy(condition, epsilon, {f"{k}_{kind}": v for k, v in values.items()})
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


def flagging_table(scores: pd.DataFrame, *, target_fpr: float = 0.05) -> pd.DataFrame:
    """Entropy of the Platt posterior as an attack flag: AUROC, TPR and FPR, and mean entropies."""
    scores = scores if "p_platt" in scores else add_probabilities(scores)
    rows = []
    for condition, group in _conditions(scores):
        calibration_entropy = _select(group, epsilon=0, split="calibration").entropy_platt.to_numpy()
        clean = _select(group, epsilon=0, split="evaluation").set_index("image_id")
        for epsilon, attacked in _evaluation_by_epsilon(group):
            if epsilon == 0:
                continue
            attacked = attacked.set_index("image_id").loc[clean.index]
            values = uncertainty.flagging_metrics(clean.entropy_platt.to_numpy(), attacked.entropy_platt.to_numpy(),
                                                  calibration_entropy, target_fpr=target_fpr)
            values.update(mean_entropy_clean=float(clean.entropy_platt.mean()),
                          mean_entropy_attacked=float(attacked.entropy_platt.mean()))
            rows += _tidy(condition, epsilon, values)
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


def perturbation_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean and maximum L-infinity norm (in 1/255 units) and mean PSNR (dB) of the attacks."""
    rows = []
    for condition, group in _conditions(scores):
        for epsilon, evaluation in _evaluation_by_epsilon(group):
            if epsilon == 0:
                continue
            rows += _tidy(condition, epsilon, {
                "linf_max_255": float(evaluation.linf.max() * 255),
                "linf_mean_255": float(evaluation.linf.mean() * 255),
                "psnr_mean_db": float(evaluation.psnr.mean())})
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


def summarize(tidy: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of a tidy table, one row per metric and setting."""
    keys = ["dataset", "category", "backbone", "weights", "shots", "epsilon", "split", "metric"]
    return tidy.groupby(keys, sort=True)["value"].agg(["mean", "std", "count"]).reset_index()


def _conditions(scores: pd.DataFrame):
    yield from scores.groupby(CONDITION_COLUMNS, sort=True)


def _select(group: pd.DataFrame, *, epsilon: float, split: str) -> pd.DataFrame:
    selected = group[(group.epsilon == epsilon) & (group.split == split)]
    if selected.empty:
        raise ValueError(f"No {split} rows at epsilon={epsilon}; run the clean (epsilon 0) job first.")
    return selected


def _evaluation_by_epsilon(group: pd.DataFrame):
    evaluation = group[group.split == "evaluation"]
    yield from evaluation.groupby("epsilon", sort=True)


def _tidy(condition: tuple, epsilon: float, values: dict) -> list[dict]:
    base = dict(zip(CONDITION_COLUMNS, condition))
    return [{**base, "epsilon": float(epsilon), "split": "evaluation", "metric": name, "value": float(value)}
            for name, value in values.items()]
