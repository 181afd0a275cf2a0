"""The study runner, the metric tables built on it, the notebook runner's dry run and the report."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from adlib import evaluation, notebooks, report, study


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    return study.StudyConfig(datasets=("elpv/mono",), image_size=64, shots=(1, 2), seeds=(0,), epsilons=(0, 8),
                             max_test_per_class=6, output_dir=str(tmp_path_factory.mktemp("run")), progress=False)


@pytest.fixture(scope="module")
def tiny_run(tiny_config):
    return study.run_jobs(tiny_config)


def test_scores_table_layout(tiny_run):
    scores, pixel = tiny_run
    clean = scores[scores.epsilon == 0]
    attacked = scores[scores.epsilon == 8]
    assert set(scores.shots) == {1, 2}
    assert len(clean) == 2 * 12
    assert set(attacked.split) == {"evaluation"}
    assert len(attacked) == 2 * 6
    assert np.allclose(attacked.linf, 8 / 255, atol=1e-6)
    assert np.isinf(clean.psnr).all()
    assert pixel.empty


def test_rerun_reuses_job_files(tiny_config, tiny_run):
    paths = [study.job_paths(tiny_config, job)[0] for job in study.expand_jobs(tiny_config)]
    modified = [p.stat().st_mtime_ns for p in paths]
    scores, _ = study.run_jobs(tiny_config)
    assert [p.stat().st_mtime_ns for p in paths] == modified
    pd.testing.assert_frame_equal(scores, tiny_run[0], check_dtype=False)


def test_changed_setting_changes_fingerprint(tiny_config):
    job = study.expand_jobs(tiny_config)[0]
    changed = study.with_overrides(tiny_config, image_size=96)
    assert study.job_fingerprint(tiny_config, job) != study.job_fingerprint(changed, job)
    assert study.job_fingerprint(tiny_config, job) == study.job_fingerprint(
        study.with_overrides(tiny_config, progress=True, batch_size=3), job)


def test_no_partial_files_left(tiny_config, tiny_run):
    assert list(Path(tiny_config.output_dir).rglob("*.tmp")) == []


def test_metric_tables_have_tidy_columns(tiny_run):
    scores, _ = tiny_run
    tables = [evaluation.detection_metrics(scores), evaluation.calibration_table(scores),
              evaluation.flagging_table(scores), evaluation.perturbation_table(scores)]
    for table in tables:
        assert list(table.columns) == study.TIDY_COLUMNS
        assert not table.empty
    flagging = tables[2]
    assert set(flagging.epsilon) == {8.0}


def test_report_reads_written_results(tiny_config, tiny_run, tmp_path):
    scores, _ = tiny_run
    tables = [evaluation.detection_metrics(scores), evaluation.detection_metrics(scores),
              evaluation.calibration_table(scores), evaluation.flagging_table(scores)]
    for name, table in zip(report.RESULT_FILES, tables):
        study.write_csv_atomic(table, tmp_path / name)
    headline = report.headline_table(report.read_results(tmp_path), shots=2)
    assert list(headline.epsilon) == ["clean", "8/255"]
    assert "entropy-flag AUROC" in headline.columns


def test_report_missing_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the four notebooks first"):
        report.read_results(tmp_path)


@pytest.mark.parametrize("params, message", [
    ({"colour": 1}, "Unknown study parameters"),
    ({"datasets": ["elpv"]}, "must be written 'name/category'"),
    ({"epsilons": [4, 8]}, "include 0"),
    ({"shots": [0]}, "shots must be positive"),
    ({"preset": "fancy"}, "preset must be"),
    ({"knn": "magic"}, "knn must be one of"),
])
def test_invalid_params_raise(params, message):
    with pytest.raises(ValueError, match=message):
        study.config_from_params(params)


def test_too_many_shots_raise(tmp_path):
    config = study.StudyConfig(datasets=("elpv/mono",), shots=(200,), seeds=(1,), output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="lower shots or seeds"):
        study.prepare_dataset(config, "elpv", "mono")


def test_missing_data_root_skips_category(tmp_path, caplog):
    config = study.StudyConfig(datasets=("mvtec_ad/bottle", "elpv/mono"), data_root=str(tmp_path),
                               seeds=(0,), epsilons=(0,), output_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        jobs = study.available_jobs(config)
    assert [job.dataset for job in jobs] == ["elpv"]
    assert "Skipping mvtec_ad/bottle" in caplog.text


def test_paper_params_dry_run(caplog):
    params = notebooks.read_params(notebooks.REPO_ROOT / "params" / "paper_mvtec.yaml")
    with caplog.at_level(logging.INFO):
        notebooks.dry_run(params)
    assert "No pretrained weights for dinov2_vits14" in caplog.text or "hf-cache" in caplog.text
