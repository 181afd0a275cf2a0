"""Run a grid of study jobs in parallel on Dask, resuming where an earlier run stopped.

``python -m adlib.sweep PARAMS.yaml [--scheduler ADDRESS] [--workers N]``

A sweep's params file is a study params file (the keys of
:class:`adlib.study.StudyConfig`) with two additions: ``backbones`` may list
several backbones in place of one ``backbone``, and ``datasets`` may also be a
mapping from dataset name to categories, for example
``{elpv: [mono, poly], mvtec_ad: [bottle]}``. ``run_name`` names the default
output folder ``results/<run_name>``. The grid datasets x categories x seeds x
epsilons x backbones expands into :class:`adlib.study.Job` s, and each job
computes every shot count.

A job whose result files exist is skipped, so a sweep that was interrupted
resumes where it stopped. Result files are written atomically, so an
interrupted job leaves nothing that looks finished. The other jobs run on a
Dask cluster: a ``LocalCluster`` on 127.0.0.1 by default, or the scheduler at
``--scheduler``, whose workers must see the params' paths (data, results,
feature cache) at the same place. A job that raises is reported with its
parameters and error, and the others go on. At the end every finished job's
scores are turned into one tidy metrics table, a summary over seeds and
figures, under ``<output_dir>/sweep/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from . import evaluation, study
from .study import Job, StudyConfig, TIDY_COLUMNS

logger = logging.getLogger(__name__)

SWEEP_ONLY_KEYS = ("backbones", "run_name")
DETECTION_METRICS = ("auroc", "ap", "f1_max", "gmean")
JobStatus = Literal["computed", "reused", "failed"]


@dataclass(frozen=True)
class SweepJob:
    """One study job together with the configuration (and so the backbone) it belongs to."""

    config: StudyConfig
    job: Job

    def parameters(self) -> dict:
        """Return the job's grid coordinates, as reported in progress, logs and ``jobs.csv``."""
        return {"backbone": self.config.backbone, "dataset": self.job.dataset, "category": self.job.category,
                "seed": self.job.seed, "epsilon": self.job.epsilon,
                "shots": " ".join(str(s) for s in self.config.shots)}

    def result_paths(self) -> tuple[Path, Path]:
        """Return the job's per-image scores CSV and pixel-metrics CSV."""
        return study.job_paths(self.config, self.job)

    def is_done(self) -> bool:
        """True when both result files exist, which :func:`adlib.study.run_job` writes last."""
        return all(path.is_file() for path in self.result_paths())


@dataclass(frozen=True)
class JobOutcome:
    """Status, run time and error of one job of a sweep run."""

    parameters: dict
    status: JobStatus
    seconds: float = 0.0
    error: str = ""
    traceback: str = field(default="", repr=False)

    def as_row(self) -> dict:
        return {**self.parameters, "status": self.status, "seconds": round(self.seconds, 2), "error": self.error}


@dataclass
class SweepResult:
    """Outcome of :func:`run_sweep`.

    Attributes
    ----------
    outcomes : list of JobOutcome
        One per job of the grid: ``"reused"`` for jobs finished before this run,
        ``"computed"`` or ``"failed"`` for the others.
    metrics : DataFrame
        Tidy metrics (``adlib.study.TIDY_COLUMNS``) of every finished job.
    summary : DataFrame
        Mean, standard deviation and count over seeds, from
        :func:`adlib.evaluation.summarize`.
    files : list of Path
        Tables and figures written under ``<output_dir>/sweep/``.
    """

    outcomes: list[JobOutcome]
    metrics: pd.DataFrame
    summary: pd.DataFrame
    files: list[Path]

    def count(self, status: JobStatus) -> int:
        """Return how many jobs ended with ``status``."""
        return sum(outcome.status == status for outcome in self.outcomes)

    @property
    def failed(self) -> list[JobOutcome]:
        return [outcome for outcome in self.outcomes if outcome.status == "failed"]


def load_params(path: str | os.PathLike) -> dict:
    """Read a sweep params YAML file into a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Params file {path} not found.")
    params = yaml.safe_load(path.read_text())
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a mapping of parameter names to values, got {type(params).__name__}.")
    return params


def sweep_configs(params: dict) -> list[StudyConfig]:
    """Return one :class:`adlib.study.StudyConfig` per backbone of the grid, in the listed order.

    Progress bars inside jobs are switched off, because the sweep shows its own.
    """
    study_params = {key: value for key, value in params.items() if key not in SWEEP_ONLY_KEYS}
    backbones = params.get("backbones")
    if backbones is None:
        backbones = [params.get("backbone", StudyConfig.backbone)]
    if isinstance(backbones, str) or not backbones:
        raise ValueError(f"backbones must be a non-empty list of backbone names, got {backbones!r}.")
    if "backbone" in params and "backbones" in params:
        raise ValueError("Give either backbone or backbones in the params, not both.")
    study_params.pop("backbone", None)
    if "datasets" in study_params:
        study_params["datasets"] = dataset_specs(study_params["datasets"])
    if "output_dir" not in study_params and "run_name" in params:
        study_params["output_dir"] = f"results/{params['run_name']}"
    study_params["progress"] = False
    return [study.config_from_params(study_params, backbone=backbone) for backbone in backbones]


def dataset_specs(datasets: Sequence[str] | dict) -> list[str]:
    """Normalise ``datasets`` to sorted ``"name/category"`` strings.

    Examples
    --------
    >>> dataset_specs({"elpv": ["poly", "mono"], "mvtec_ad": ["bottle"]})
    ['elpv/mono', 'elpv/poly', 'mvtec_ad/bottle']
    >>> dataset_specs(["elpv/mono"])
    ['elpv/mono']
    """
    if isinstance(datasets, dict):
        specs = []
        for name, categories in datasets.items():
            if isinstance(categories, str) or not categories:
                raise ValueError(f"datasets.{name} must be a non-empty list of categories, got {categories!r}.")
            specs += [f"{name}/{category}" for category in categories]
        return sorted(specs)
    if isinstance(datasets, str):
        raise ValueError(f"datasets must be a list of 'name/category' strings, got the string {datasets!r}.")
    return sorted(datasets)


def expand_sweep(configs: Iterable[StudyConfig]) -> list[SweepJob]:
    """List the jobs of every configuration whose data is present, in a fixed order.

    Datasets whose data root is absent are skipped with one warning each, as in
    :func:`adlib.study.available_jobs`.
    """
    return [SweepJob(config, job) for config in configs for job in study.available_jobs(config)]


def run_sweep(configs: Sequence[StudyConfig], *, scheduler: str | None = None, workers: int | None = None,
              processes: bool = True, progress: bool = True) -> SweepResult:
    """Run every unfinished job of the grid on Dask, then aggregate all finished jobs.

    Parameters
    ----------
    configs : sequence of StudyConfig
        From :func:`sweep_configs`; all must share one ``output_dir``.
    scheduler : str, optional
        Address of a running Dask scheduler, for example ``"tcp://10.0.0.5:8786"``.
        Without it a ``LocalCluster`` bound to 127.0.0.1 is started and closed.
    workers : int, optional
        Workers of the local cluster; by default one per available CPU core.
        Torch in each local worker uses the cores divided by the workers.
        Ignored with ``scheduler``.
    processes : bool, default=True
        Local workers as processes. ``False`` runs them as threads of this
        process, which starts faster and suits small grids and tests.
    progress : bool, default=True
        Show a progress bar over the jobs.

    Returns
    -------
    SweepResult
        A failed job does not raise: it is logged and listed in
        ``SweepResult.failed`` with its parameters and error.
    """
    output_dir = _common_output_dir(configs)
    sweep_jobs = expand_sweep(configs)
    if not sweep_jobs:
        raise ValueError("The grid has no job that can run: every dataset was skipped. "
                         "Check datasets and data_root in the params.")
    _remove_stale_temporary_files(output_dir)
    outcomes = {index: JobOutcome(sweep_job.parameters(), "reused")
                for index, sweep_job in enumerate(sweep_jobs) if sweep_job.is_done()}
    pending = {index: sweep_job for index, sweep_job in enumerate(sweep_jobs) if index not in outcomes}
    logger.info("Sweep of %d jobs: %d finished earlier, %d to run", len(sweep_jobs), len(outcomes), len(pending))
    if pending:
        outcomes.update(_run_on_dask(pending, scheduler=scheduler, workers=workers, processes=processes,
                                     progress=progress))
    ordered = [outcomes[index] for index in range(len(sweep_jobs))]
    metrics, problems = aggregate(sweep_jobs)
    summary = evaluation.summarize(metrics) if not metrics.empty else pd.DataFrame()
    files = write_sweep_outputs(output_dir, ordered, metrics, summary, problems, configs)
    return SweepResult(ordered, metrics, summary, files)


def _run_on_dask(pending: dict[int, SweepJob], *, scheduler, workers, processes, progress) -> dict[int, JobOutcome]:
    """Submit the pending jobs and collect one outcome per job, failed ones included."""
    from distributed import Client, LocalCluster, as_completed

    cores = len(os.sched_getaffinity(0))
    workers = workers or cores
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}.")
    # Local workers split this machine's cores. Remote workers keep torch's own
    # default, because their core count is unknown here.
    torch_threads = max(1, cores // workers) if scheduler is None else 0
    cluster = None
    if scheduler is None:
        # Process workers talk over TCP bound to 127.0.0.1. Thread workers use
        # Dask's in-process transport, which opens no socket and takes no host.
        network = {"host": "127.0.0.1"} if processes else {}
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes,
                               dashboard_address=None, **network)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    logger.info("Running %d jobs on %s", len(pending), scheduler or f"a local cluster of {workers} workers")
    futures = {}
    outcomes: dict[int, JobOutcome] = {}
    try:
        for index, sweep_job in pending.items():
            key = f"adlib-{sweep_job.result_paths()[0].stem}-{uuid.uuid4().hex[:8]}"
            futures[client.submit(execute_job, sweep_job, torch_threads, key=key, pure=False)] = index
        bar = tqdm(total=len(futures), desc="sweep jobs", disable=not progress)
        for future in as_completed(futures):
            index = futures[future]
            outcomes[index] = _outcome_of(future, pending[index])
            bar.update()
            bar.set_postfix(failed=sum(o.status == "failed" for o in outcomes.values()))
        bar.close()
    finally:
        # On an interrupt the unfinished jobs are cancelled; their result files
        # are absent, so the next run computes them.
        client.cancel(list(futures))
        client.close()
        if cluster is not None:
            cluster.close()
    return outcomes


def _outcome_of(future, sweep_job: SweepJob) -> JobOutcome:
    """Turn a finished future into an outcome, also when the worker itself died."""
    if future.status == "finished":
        outcome = future.result()
    else:
        error = future.exception()
        outcome = JobOutcome(sweep_job.parameters(), "failed", error=f"{type(error).__name__}: {error}",
                             traceback="".join(traceback.format_exception(error)))
    if outcome.status == "failed":
        logger.error("Job %s failed: %s", _describe(outcome.parameters), outcome.error)
    return outcome


_context_lock = threading.Lock()
# Backbones and datasets kept per worker process, most recent configuration last.
_contexts: "OrderedDict[StudyConfig, study._RunContext]" = OrderedDict()
_MAX_CONTEXTS = 2


def execute_job(sweep_job: SweepJob, torch_threads: int = 0) -> JobOutcome:
    """Run one job on a worker and return its outcome; exceptions become ``"failed"`` outcomes.

    A failed job's result files are removed, so no partial result remains.
    ``torch_threads`` sets torch's CPU threads in this worker, and 0 keeps
    torch's default.
    """
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    started = time.perf_counter()
    parameters = sweep_job.parameters()
    try:
        if sweep_job.is_done():
            return JobOutcome(parameters, "reused", time.perf_counter() - started)
        context = _worker_context(sweep_job)
        study.run_job(sweep_job.config, sweep_job.job, context=context)
    except Exception as error:  # noqa: BLE001 - every job error is reported, none stops the sweep
        for path in sweep_job.result_paths():
            path.unlink(missing_ok=True)
        return JobOutcome(parameters, "failed", time.perf_counter() - started,
                          error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    return JobOutcome(parameters, "computed", time.perf_counter() - started)


def _worker_context(sweep_job: SweepJob) -> "study._RunContext":
    """Return this process's shared backbone and datasets for the job's configuration."""
    with _context_lock:
        config = sweep_job.config
        if config in _contexts:
            _contexts.move_to_end(config)
        else:
            _contexts[config] = study._RunContext(config)
            while len(_contexts) > _MAX_CONTEXTS:
                _contexts.popitem(last=False)
        context = _contexts[config]
        # Load under the lock so that threads of one worker never load a backbone twice.
        context.extractor
        context.dataset(sweep_job.job)
    return context


def aggregate(sweep_jobs: Sequence[SweepJob]) -> tuple[pd.DataFrame, list[str]]:
    """Compute tidy metrics of every finished job of the grid.

    Thresholds and calibrators are fitted per condition on the clean (epsilon 0)
    calibration split, so a condition is evaluated per backbone, dataset
    category and seed, over all its finished epsilons. A condition whose clean
    job is missing is skipped and named in the returned problems.

    Returns
    -------
    metrics : DataFrame
        Columns ``adlib.study.TIDY_COLUMNS``: detection, calibration, flagging,
        perturbation and pixel metrics.
    problems : list of str
        One message per condition that could not be evaluated.
    """
    groups: dict[tuple, list[SweepJob]] = {}
    for sweep_job in sweep_jobs:
        if sweep_job.is_done():
            job = sweep_job.job
            groups.setdefault((sweep_job.config.backbone, job.dataset, job.category, job.seed), []).append(sweep_job)
    tables, problems = [], []
    for group_key in sorted(groups):
        members = groups[group_key]
        scores = pd.concat([pd.read_csv(m.result_paths()[0]) for m in members], ignore_index=True)
        pixel = [pd.read_csv(m.result_paths()[1]) for m in members]
        try:
            tables += condition_metrics(scores)
        except ValueError as error:
            problems.append(f"{_describe(dict(zip(('backbone', 'dataset', 'category', 'seed'), group_key)))}: {error}")
            logger.warning("Not evaluated: %s", problems[-1])
            continue
        tables += [table for table in pixel if not table.empty]
    if not tables:
        return pd.DataFrame(columns=TIDY_COLUMNS), problems
    return pd.concat(tables, ignore_index=True)[TIDY_COLUMNS], problems


def condition_metrics(scores: pd.DataFrame) -> list[pd.DataFrame]:
    """Return the detection, calibration, flagging and perturbation tables of one condition's scores."""
    if not (scores.epsilon == 0).any():
        raise ValueError("the clean (epsilon 0) job is missing, and thresholds and calibrators are fitted on it")
    scores = evaluation.add_probabilities(scores)
    tables = [evaluation.detection_metrics(scores), evaluation.calibration_table(scores),
              evaluation.flagging_table(scores), evaluation.perturbation_table(scores)]
    return [table for table in tables if not table.empty]


def write_sweep_outputs(output_dir: Path, outcomes: Sequence[JobOutcome], metrics: pd.DataFrame,
                        summary: pd.DataFrame, problems: Sequence[str], configs: Sequence[StudyConfig]) -> list[Path]:
    """Write ``jobs.csv``, ``metrics.csv``, ``summary.csv``, ``sweep.json`` and figures under ``output_dir/sweep``."""
    folder = output_dir / "sweep"
    jobs_path, metrics_path, summary_path = folder / "jobs.csv", folder / "metrics.csv", folder / "summary.csv"
    study.write_csv_atomic(pd.DataFrame([o.as_row() for o in outcomes]), jobs_path)
    study.write_csv_atomic(metrics, metrics_path)
    study.write_csv_atomic(summary, summary_path)
    provenance = {"configs": [asdict(c) for c in configs], "problems": list(problems),
                  "jobs": {status: sum(o.status == status for o in outcomes)
                           for status in ("computed", "reused", "failed")}}
    study.write_json_atomic(provenance, folder / "sweep.json")
    files = [jobs_path, metrics_path, summary_path, folder / "sweep.json"]
    if not summary.empty:
        files += write_figures(summary, folder / "figures")
    return files


def write_figures(summary: pd.DataFrame, folder: Path) -> list[Path]:
    """Draw metric-vs-epsilon curves per dataset and ECE before and after Platt scaling.

    ``summary`` comes from :func:`adlib.evaluation.summarize`. Points are means
    over seeds and error bars one standard deviation.
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for dataset_name, table in summary.groupby("dataset", sort=True):
        files.append(_plot_metric_curves(table, DETECTION_METRICS, folder / f"metrics_vs_eps_{dataset_name}.png",
                                         title=f"{dataset_name}: detection under FGSM"))
    calibration = summary[summary.metric.isin(["ece_raw", "ece_platt"])]
    if not calibration.empty:
        files.append(_plot_ece_before_after(calibration, folder / "ece_before_after.png"))
    return files


def _plot_ece_before_after(summary: pd.DataFrame, path: Path) -> Path:
    """Draw one panel per category: ECE of min-max (dashed) and Platt (solid) probabilities against epsilon."""
    from matplotlib.figure import Figure

    categories = sorted(summary.groupby(["dataset", "category"]).groups)
    figure = Figure(figsize=(max(7.0, 3.6 * len(categories)), 3.4), layout="constrained")
    axes = figure.subplots(1, len(categories), squeeze=False)[0]
    colours = {}
    for axis, (dataset_name, category) in zip(axes, categories):
        selected = summary[(summary.dataset == dataset_name) & (summary.category == category)]
        for (backbone, shots, metric), line in selected.groupby(["backbone", "shots", "metric"], sort=True):
            label = f"{backbone}, {shots}-shot"
            colour = colours.setdefault(label, f"C{len(colours) % 10}")
            line = line.sort_values("epsilon")
            after = metric == "ece_platt"
            axis.errorbar(line.epsilon, line["mean"], yerr=line["std"].fillna(0), color=colour, capsize=2,
                          marker="o" if after else "x", markersize=3, linestyle="-" if after else "--",
                          label=f"{label}, {'Platt' if after else 'min-max'}")
        axis.set_title(f"{dataset_name}/{category}", fontsize=9)
        axis.set_xlabel("epsilon (1/255)")
        axis.set_ylabel("ECE (15 bins)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    weights = ", ".join(sorted(summary.weights.unique()))
    figure.suptitle(f"ECE before (min-max, dashed) and after Platt scaling (solid)\n"
                    f"weights: {weights}; mean ± std over seeds", fontsize=10)
    figure.savefig(path, dpi=110)
    return path


def _plot_metric_curves(summary: pd.DataFrame, metric_names: Sequence[str], path: Path, *, title: str) -> Path:
    """Draw one panel per category (rows) and metric (columns), with one line per backbone and shot count."""
    from matplotlib.figure import Figure

    categories = sorted(summary.groupby(["dataset", "category"]).groups)
    figure = Figure(figsize=(3.2 * len(metric_names), 1.2 + 2.6 * len(categories)), layout="constrained")
    axes = np.atleast_2d(figure.subplots(len(categories), len(metric_names), squeeze=False))
    for row, (dataset_name, category) in enumerate(categories):
        for column, metric in enumerate(metric_names):
            axis = axes[row, column]
            selected = summary[(summary.dataset == dataset_name) & (summary.category == category)
                               & (summary.metric == metric)]
            for (backbone, weights, shots), line in selected.groupby(["backbone", "weights", "shots"], sort=True):
                line = line.sort_values("epsilon")
                axis.errorbar(line.epsilon, line["mean"], yerr=line["std"].fillna(0), marker="o", markersize=3,
                              capsize=2, label=f"{backbone}, {shots}-shot")
            axis.set_title(f"{dataset_name}/{category}: {metric}", fontsize=9)
            axis.set_xlabel("epsilon (1/255)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=8)
    weights = ", ".join(sorted(summary.weights.unique()))
    figure.suptitle(f"{title}\nweights: {weights}; mean ± std over seeds", fontsize=10)
    figure.savefig(path, dpi=110)
    return path


def _common_output_dir(configs: Sequence[StudyConfig]) -> Path:
    if not configs:
        raise ValueError("configs is empty; pass at least one StudyConfig.")
    folders = sorted({c.output_dir for c in configs})
    if len(folders) != 1:
        raise ValueError(f"All configurations of a sweep must share one output_dir, got {folders}.")
    return Path(folders[0])


def _remove_stale_temporary_files(output_dir: Path) -> None:
    """Delete temporary result files that a killed run left behind."""
    stale = sorted(output_dir.glob("*/.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        logger.info("Removed %d temporary files of an interrupted run under %s", len(stale), output_dir)


def _describe(parameters: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in parameters.items())


def _raise_keyboard_interrupt(signal_number, frame) -> None:
    raise KeyboardInterrupt(f"signal {signal_number}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status: 1 when a job failed, 130 when interrupted, else 0."""
    parser = argparse.ArgumentParser(prog="python -m adlib.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("params", help="sweep params YAML file")
    parser.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://10.0.0.5:8786; "
                                            "default: a local cluster on 127.0.0.1")
    parser.add_argument("--workers", type=int, help="local cluster workers (default: one per CPU core)")
    parser.add_argument("--threads-as-workers", action="store_true",
                        help="run local workers as threads of this process instead of processes")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configs = sweep_configs(load_params(arguments.params))
    # A termination request stops the sweep like Ctrl-C, so the cluster is closed.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        result = run_sweep(configs, scheduler=arguments.scheduler, workers=arguments.workers,
                           processes=not arguments.threads_as_workers, progress=not arguments.no_progress)
    except KeyboardInterrupt:
        logger.warning("Sweep interrupted. Finished jobs keep their results; run the same command to resume.")
        return 130
    print(f"{len(result.outcomes)} jobs: {result.count('computed')} computed, {result.count('reused')} "
          f"finished earlier, {result.count('failed')} failed")
    for outcome in result.failed:
        print(f"FAILED {_describe(outcome.parameters)}: {outcome.error}", file=sys.stderr)
    print("Wrote " + ", ".join(str(path) for path in result.files))
    return 1 if result.failed else 0


if __name__ == "__main__":
    # Run the imported module's main, so that Dask pickles execute_job by its
    # importable name adlib.sweep.execute_job and not by value from __main__.
    from adlib.sweep import main as imported_main

    sys.exit(imported_main())
