"""Headline table of a finished run: ``python -m adlib.report results/study --shots 4``.

Reads the tidy CSVs that the four notebooks wrote and prints a Markdown table
with mean ± standard deviation over seeds, one row per category and epsilon.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

RESULT_FILES = ("01_baseline.csv", "02_fgsm_attack.csv", "03_platt_calibration.csv", "04_entropy_detection.csv")
COLUMNS = {"auroc": "AUROC", "ap": "AP", "f1": "F1", "gmean": "G-mean", "ece_raw": "ECE raw",
           "ece_platt": "ECE Platt", "flag_auroc": "entropy-flag AUROC"}


def read_results(results_dir: str | Path, *, files=RESULT_FILES) -> pd.DataFrame:
    """Concatenate the tidy CSVs of a run folder, dropping rows repeated across notebooks."""
    results_dir = Path(results_dir)
    missing = [name for name in files if not (results_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{results_dir} lacks {missing}; run the four notebooks first (make study).")
    tables = [pd.read_csv(results_dir / name) for name in files]
    return pd.concat(tables, ignore_index=True).drop_duplicates()


def headline_table(tidy: pd.DataFrame, *, shots: int, epsilons=(0, 4, 8)) -> pd.DataFrame:
    """Mean ± std over seeds of the headline metrics, one row per category and epsilon."""
    subset = tidy[(tidy.shots == shots) & tidy.epsilon.isin(epsilons) & tidy.metric.isin(COLUMNS)]
    if subset.empty:
        raise ValueError(f"No results at shots={shots} and epsilons={list(epsilons)}.")
    keys = ["dataset", "category", "backbone", "weights", "epsilon"]
    stats = subset.groupby([*keys, "metric"])["value"].agg(["mean", "std", "count"]).reset_index()
    stats["cell"] = [_format(m, s, n) for m, s, n in zip(stats["mean"], stats["std"], stats["count"])]
    table = stats.pivot_table(index=keys, columns="metric", values="cell", aggfunc="first").reset_index()
    table = table.rename(columns=COLUMNS)
    table["epsilon"] = table["epsilon"].map(lambda e: "clean" if e == 0 else f"{e:g}/255")
    ordered = [c for c in ["dataset", "category", "backbone", "weights", "epsilon", *COLUMNS.values()] if c in table]
    return table[ordered].fillna("–")


BASELINE_COLUMNS = {"auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "au_pro": "AU-PRO (FPR ≤ 0.3)"}


def baseline_table(tidy: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds of clean image AUROC, pixel AUROC and AU-PRO, one row per category and shot count."""
    subset = tidy[(tidy.epsilon == 0) & tidy.metric.isin(BASELINE_COLUMNS)]
    if subset.empty:
        raise ValueError("No clean (epsilon 0) image AUROC, pixel AUROC or AU-PRO rows in the results.")
    keys = ["dataset", "category", "backbone", "weights", "shots"]
    stats = subset.groupby([*keys, "metric"])["value"].agg(["mean", "std", "count"]).reset_index()
    stats["cell"] = [_format(m, s, n) for m, s, n in zip(stats["mean"], stats["std"], stats["count"])]
    table = stats.pivot_table(index=keys, columns="metric", values="cell", aggfunc="first").reset_index()
    table = table.rename(columns=BASELINE_COLUMNS)
    ordered = [c for c in [*keys, *BASELINE_COLUMNS.values()] if c in table]
    return table[ordered].fillna("–")


def to_markdown(table: pd.DataFrame) -> str:
    """Render a DataFrame as a GitHub Markdown table without extra dependencies."""
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _format(mean: float, std: float, count: int) -> str:
    return f"{mean:.3f}" if count < 2 else f"{mean:.3f} ± {std:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", help="Run folder with the notebooks' CSVs, e.g. results/study.")
    parser.add_argument("--shots", type=int, default=4, help="Shot count of the headline table (default: 4).")
    parser.add_argument("--table", choices=("headline", "baseline"), default="headline",
                        help="headline: clean vs attacked, calibration and flagging at one shot count (needs all "
                             "four notebooks); baseline: clean image and pixel metrics per shot count (notebook 01).")
    args = parser.parse_args(argv)
    if args.table == "baseline":
        table = baseline_table(read_results(args.results_dir, files=RESULT_FILES[:1]))
    else:
        table = headline_table(read_results(args.results_dir), shots=args.shots)
    sys.stdout.write(to_markdown(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
