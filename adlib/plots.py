"""Figures of the study. Each function takes result tables and returns a matplotlib Figure."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from sklearn.metrics import roc_curve

from .calibration import reliability_table


def save_figure(figure: plt.Figure, path: str | Path, *, provenance: str = "") -> Path:
    """Save a figure as PNG atomically, with ``provenance`` as a footnote and in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if provenance:
        figure.text(0.01, 0.005, provenance, fontsize=7, color="0.35", ha="left", va="bottom")
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(descriptor)
    try:
        figure.savefig(temporary, dpi=110, bbox_inches="tight", metadata={"Description": provenance})
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _panel_label(row) -> str:
    return f"{row['dataset']}/{row['category']}, {row['shots']}-shot"


def score_distributions(scores: pd.DataFrame) -> plt.Figure:
    """Histograms of clean evaluation scores, normal vs anomalous, one panel per category and shot count."""
    clean = scores[(scores.epsilon == 0) & (scores.split == "evaluation")].copy()
    clean["panel"] = clean.apply(_panel_label, axis=1)
    clean["class"] = np.where(clean.label == 1, "anomalous", "normal")
    grid = sns.displot(clean, x="score", hue="class", col="panel", col_wrap=3, common_bins=False,
                       facet_kws={"sharex": False, "sharey": False}, height=2.6, aspect=1.3, element="step")
    grid.set_titles("{col_name}")
    grid.set_xlabels("image score (mean top-1 % cosine distance)")
    return grid.figure


def roc_curves(scores: pd.DataFrame, *, seed: int) -> plt.Figure:
    """ROC curves of clean and attacked evaluation images for one seed, one panel per category and shot count."""
    subset = scores[(scores.split == "evaluation") & (scores.seed == seed)].copy()
    subset["panel"] = subset.apply(_panel_label, axis=1)
    panels = sorted(subset.panel.unique())
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        for epsilon, group in subset[subset.panel == panel].groupby("epsilon"):
            false_positive, true_positive, _ = roc_curve(group.label, group.score)
            axis.plot(false_positive, true_positive, label=f"eps={epsilon:g}/255")
        axis.plot([0, 1], [0, 1], color="0.7", linestyle=":")
        axis.set(title=panel, xlabel="false positive rate", ylabel="true positive rate")
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def metric_vs_epsilon(tidy: pd.DataFrame, metrics: list[str]) -> plt.Figure:
    """Mean (over seeds) of each metric against epsilon, one panel per metric."""
    subset = tidy[tidy.metric.isin(metrics)].copy()
    subset["setting"] = subset.dataset + "/" + subset.category + ", " + subset.shots.astype(str) + "-shot"
    grid = sns.relplot(subset, x="epsilon", y="value", hue="setting", col="metric", col_wrap=min(4, len(metrics)),
                       kind="line", marker="o", errorbar="sd", height=2.8, facet_kws={"sharey": False})
    grid.set_titles("{col_name}")
    grid.set_xlabels("epsilon (1/255)")
    return grid.figure


def reliability_diagrams(scores: pd.DataFrame, *, epsilons: list[float], n_bins: int = 15) -> plt.Figure:
    """Reliability diagrams of raw (min-max) and Platt probabilities on evaluation images, pooled over seeds.

    Rows are categories and shot counts; columns are probability kinds at each epsilon.
    """
    evaluation = scores[scores.split == "evaluation"].copy()
    evaluation["panel"] = evaluation.apply(_panel_label, axis=1)
    panels = sorted(evaluation.panel.unique())
    columns = [(kind, eps) for eps in epsilons for kind in ("raw", "platt")]
    figure, axes = plt.subplots(len(panels), len(columns), figsize=(2.4 * len(columns), 2.4 * len(panels)),
                                squeeze=False)
    for row, panel in enumerate(panels):
        for column, (kind, epsilon) in enumerate(columns):
            group = evaluation[(evaluation.panel == panel) & (evaluation.epsilon == epsilon)]
            _draw_reliability(axes[row, column], group.label.to_numpy(), group[f"p_{kind}"].to_numpy(), n_bins)
            axes[row, column].set_title(f"{panel}\n{kind}, eps={epsilon:g}/255", fontsize=8)
    figure.tight_layout()
    return figure


def _draw_reliability(axis, labels, probabilities, n_bins) -> None:
    table = reliability_table(labels, probabilities, n_bins=n_bins)
    axis.bar(table["center"], table["frequency"], width=1 / n_bins, edgecolor="k", alpha=0.7)
    axis.plot([0, 1], [0, 1], color="tab:red", linestyle="--", linewidth=1)
    axis.set(xlim=(0, 1), ylim=(0, 1), xlabel="P(anomalous)", ylabel="observed frequency")


def entropy_histograms(scores: pd.DataFrame, *, epsilons: list[float]) -> plt.Figure:
    """Histograms of Platt-posterior entropy on clean and attacked evaluation images."""
    subset = scores[(scores.split == "evaluation") & scores.epsilon.isin(epsilons)].copy()
    subset["panel"] = subset.apply(_panel_label, axis=1)
    subset["input"] = np.where(subset.epsilon == 0, "clean", "eps=" + subset.epsilon.map("{:g}".format) + "/255")
    grid = sns.displot(subset, x="entropy_platt", hue="input", col="panel", col_wrap=3, element="step",
                       stat="density", common_norm=False, bins=np.linspace(0, np.log(2), 21), height=2.6, aspect=1.3)
    grid.set_titles("{col_name}")
    grid.set_xlabels("predictive entropy (nats)")
    return grid.figure


def image_rows(rows: list[tuple[str, np.ndarray]], *, titles: list[str], cmap_rows=()) -> plt.Figure:
    """Show rows of images side by side: each row is (label, array of shape (n, H, W[, 3]))."""
    n_columns = len(rows[0][1])
    figure, axes = plt.subplots(len(rows), n_columns, figsize=(2.2 * n_columns, 2.2 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n_columns):
            axis = axes[r, c]
            axis.imshow(images[c], cmap="inferno" if label in cmap_rows else None)
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(titles[c], fontsize=7)
        axes[r, 0].set_ylabel(label)
    figure.tight_layout()
    return figure
