"""Run the study's notebooks with papermill: ``python -m adlib.notebooks --params FILE``.

Parameters come from a YAML file whose keys are :class:`adlib.study.StudyConfig`
fields plus ``run_name``. Paths in it are relative to the repository root.
Executed notebooks go to ``runs/<run_name>/``, figures to ``figures/<run_name>/``
and tidy CSVs to ``results/<run_name>/``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from . import backbones, study

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("01_baseline", "02_fgsm_attack", "03_platt_calibration", "04_entropy_detection")
PATH_KEYS = ("data_root", "backbone_checkpoint", "cache_dir")


def read_params(path: str | Path) -> dict:
    """Read a params YAML file and resolve its paths against the repository root."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Params file {path} not found; pass e.g. --params params/study.yaml.")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path} must contain a mapping of parameter names to values.")
    run_name = params.pop("run_name", path.stem)
    for key in PATH_KEYS:
        if params.get(key) is not None:
            params[key] = str((REPO_ROOT / params[key]).resolve())
    params["output_dir"] = str(REPO_ROOT / "results" / run_name)
    return {"run_name": run_name, **params}


def notebook_parameters(params: dict) -> dict:
    """Turn resolved params into papermill parameters, with absolute output folders."""
    run_name = params["run_name"]
    parameters = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
    parameters["figures_dir"] = str(REPO_ROOT / "figures" / run_name)
    return parameters


def dry_run(params: dict, *, check_weights: bool = True) -> list[study.Job]:
    """Validate the params and list every job without computing anything.

    With ``check_weights``, a backbone whose weights are missing is reported as a warning.
    """
    # A dry run never downloads, so it checks the data that is already there.
    config = study.config_from_params({k: v for k, v in params.items() if k != "run_name"}, download=False)
    jobs = study.available_jobs(config)
    if not jobs:
        raise ValueError("No job can run: every dataset was skipped. Check datasets and data_root in the params.")
    for job in jobs:
        scores_path, _ = study.job_paths(config, job)
        state = "done" if scores_path.is_file() else "to run"
        logger.info("%s/%s seed=%d eps=%g/255 shots=%s: %s", job.dataset, job.category, job.seed,
                    job.epsilon, list(config.shots), state)
    for spec in sorted({(job.dataset, job.category) for job in jobs}):
        study.prepare_dataset(config, *spec)
    if check_weights:
        try:
            study.load_extractor(config)
        except backbones.WeightsNotFoundError as error:
            logger.warning("Computing would stop here: %s", error)
    logger.info("%d jobs; every available dataset and parameter is valid.", len(jobs))
    return jobs


def run_notebooks(params: dict, *, notebooks=NOTEBOOKS) -> list[Path]:
    """Execute each notebook with papermill and return the executed copies."""
    import papermill

    parameters = notebook_parameters(params)
    output_dir = REPO_ROOT / "runs" / params["run_name"]
    output_dir.mkdir(parents=True, exist_ok=True)
    executed = []
    for name in notebooks:
        output = output_dir / f"{name}.ipynb"
        logger.info("Running %s -> %s", name, output)
        papermill.execute_notebook(str(REPO_ROOT / "notebooks" / f"{name}.ipynb"), str(output),
                                   parameters=parameters, cwd=str(REPO_ROOT / "notebooks"), progress_bar=False)
        executed.append(output)
    return executed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="YAML file of study parameters.")
    parser.add_argument("--dry-run", action="store_true", help="List the jobs and check paths; compute nothing.")
    parser.add_argument("--notebooks", nargs="+", default=list(NOTEBOOKS), choices=NOTEBOOKS,
                        help="Notebooks to run, in order (default: all four).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = read_params(args.params)
        dry_run(params, check_weights=args.dry_run)
        if args.dry_run:
            return 0
        config = study.config_from_params({k: v for k, v in params.items() if k != "run_name"})
        study.load_extractor(config)
    except (ValueError, FileNotFoundError) as error:
        # WeightsNotFoundError is a FileNotFoundError, so a missing backbone stops here too.
        logger.error("%s", error)
        return 2
    run_notebooks(params, notebooks=args.notebooks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
