"""Sweep runner: grid expansion, Dask execution, failures, resumption and aggregation."""

import numpy as np
import pandas as pd
import pytest
import yaml

from adlib import sweep
from adlib.study import StudyConfig

from conftest import write_png

BROKEN_CATEGORY = "screw"  # any MVTec-AD category name; its files are generated


def tiny_params(tmp_path, **changes) -> dict:
    """One ELPV category at 64 px with 4 test images per label, 1 shot, 1 seed, eps 0 and 8."""
    params = {"datasets": {"elpv": ["mono"]}, "backbones": ["efficientnet_lite0"], "image_size": 64,
              "shots": [1], "seeds": [0], "epsilons": [0, 8], "max_test_per_class": 4,
              "output_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache")}
    return {**params, **changes}


@pytest.fixture
def broken_root(tmp_path, rng):
    """An MVTec-layout category whose test set contains an unreadable PNG, so every job of it fails."""
    category = tmp_path / "data" / "mvtec_ad" / BROKEN_CATEGORY
    for index in range(2):
        write_png(category / "train" / "good" / f"{index:03d}.png", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    for defect in ("good", "crack"):
        for index in range(3):
            write_png(category / "test" / defect / f"{index:03d}.png",
                      rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    (category / "test" / "crack" / "002.png").write_bytes(b"this is not a PNG")
    return tmp_path / "data" / "mvtec_ad"


def outcomes_by_job(result) -> dict:
    return {(o.parameters["dataset"], o.parameters["epsilon"]): o for o in result.outcomes}


def test_dataset_specs_forms():
    assert sweep.dataset_specs({"mvtec_ad": ["bottle"], "elpv": ["poly", "mono"]}) == [
        "elpv/mono", "elpv/poly", "mvtec_ad/bottle"]
    assert sweep.dataset_specs(["elpv/poly", "elpv/mono"]) == ["elpv/mono", "elpv/poly"]
    with pytest.raises(ValueError, match="non-empty list of categories"):
        sweep.dataset_specs({"elpv": "mono"})
    with pytest.raises(ValueError, match="got the string"):
        sweep.dataset_specs("elpv/mono")


def test_sweep_configs_one_per_backbone(tmp_path):
    configs = sweep.sweep_configs(tiny_params(tmp_path, backbones=["efficientnet_lite0", "dinov2_vits14"]))
    assert [c.backbone for c in configs] == ["efficientnet_lite0", "dinov2_vits14"]
    assert all(c.datasets == ("elpv/mono",) for c in configs)
    assert all(not c.progress for c in configs)


def test_sweep_configs_single_backbone_and_run_name(tmp_path):
    params = tiny_params(tmp_path, run_name="trial")
    del params["backbones"], params["output_dir"]
    params["backbone"] = "efficientnet_lite0"
    (config,) = sweep.sweep_configs(params)
    assert config.backbone == "efficientnet_lite0"
    assert config.output_dir == "results/trial"


def test_sweep_configs_reject_bad_params(tmp_path):
    with pytest.raises(ValueError, match="either backbone or backbones"):
        sweep.sweep_configs(tiny_params(tmp_path, backbone="efficientnet_lite0"))
    with pytest.raises(ValueError, match="non-empty list of backbone names"):
        sweep.sweep_configs(tiny_params(tmp_path, backbones="efficientnet_lite0"))
    with pytest.raises(ValueError, match="Unknown study parameters"):
        sweep.sweep_configs(tiny_params(tmp_path, learning_rate=0.1))


def test_expand_sweep_grid(tmp_path):
    params = tiny_params(tmp_path, datasets={"elpv": ["mono", "poly"]}, seeds=[0, 1])
    jobs = sweep.expand_sweep(sweep.sweep_configs(params))
    assert len(jobs) == 2 * 2 * 2
    assert jobs[0].parameters() == {"backbone": "efficientnet_lite0", "dataset": "elpv", "category": "mono",
                                    "seed": 0, "epsilon": 0.0, "shots": "1"}


def test_load_params_requires_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- just a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        sweep.load_params(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        sweep.load_params(tmp_path / "absent.yaml")


def test_sweep_resumes_and_reports_failures(tmp_path, broken_root):
    params = tiny_params(tmp_path, datasets={"elpv": ["mono"], "mvtec_ad": [BROKEN_CATEGORY]},
                         data_root=str(broken_root.parent))
    configs = sweep.sweep_configs(params)

    first = sweep.run_sweep(configs, workers=2, processes=False, progress=False)
    outcomes = outcomes_by_job(first)
    assert first.count("computed") == 2
    assert first.count("failed") == 2
    assert outcomes[("elpv", 0.0)].status == "computed"
    assert outcomes[("elpv", 8.0)].status == "computed"
    failure = outcomes[("mvtec_ad", 8.0)]
    assert failure.status == "failed"
    assert failure.parameters["category"] == BROKEN_CATEGORY
    assert "Cannot read image" in failure.error
    assert "002.png" in failure.error

    # Failed jobs leave no result files; finished ones leave both.
    for sweep_job in sweep.expand_sweep(configs):
        expected = sweep_job.job.dataset == "elpv"
        assert [p.is_file() for p in sweep_job.result_paths()] == [expected, expected]

    # The aggregate covers the finished category, and the failed jobs are listed.
    assert set(first.metrics.category) == {"mono"}
    auroc = first.metrics[first.metrics.metric == "auroc"]
    assert sorted(auroc.epsilon) == [0.0, 8.0]
    jobs_table = pd.read_csv(tmp_path / "results" / "sweep" / "jobs.csv")
    assert sorted(jobs_table.status) == ["computed", "computed", "failed", "failed"]
    assert jobs_table.error.fillna("").str.contains("Cannot read image").sum() == 2
    figures = sorted(p.name for p in (tmp_path / "results" / "sweep" / "figures").iterdir())
    assert figures == ["ece_before_after.png", "metrics_vs_eps_elpv.png"]

    # Simulate an interruption: one finished job's results are gone and a killed
    # writer left a temporary file.
    elpv_jobs = [j for j in sweep.expand_sweep(configs) if j.job.dataset == "elpv"]
    clean_scores = elpv_jobs[0].result_paths()[0]
    clean_mtime = clean_scores.stat().st_mtime_ns
    for path in elpv_jobs[1].result_paths():
        path.unlink()
    stale = clean_scores.parent / f".{clean_scores.name}.abc.tmp"
    stale.write_text("partial")

    second = sweep.run_sweep(configs, workers=2, processes=False, progress=False)
    outcomes = outcomes_by_job(second)
    assert outcomes[("elpv", 0.0)].status == "reused"
    assert outcomes[("elpv", 8.0)].status == "computed"
    assert second.count("computed") == 1
    assert second.count("failed") == 2
    assert clean_scores.stat().st_mtime_ns == clean_mtime
    assert not stale.exists()
    pd.testing.assert_frame_equal(second.metrics, first.metrics)


def test_cli_runs_finished_grid(tmp_path, capsys):
    params = tiny_params(tmp_path, epsilons=[0])
    configs = sweep.sweep_configs(params)
    sweep.run_sweep(configs, workers=1, processes=False, progress=False)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    # Every job is finished, so the command only aggregates and starts no cluster.
    assert sweep.main([str(path), "--no-progress"]) == 0
    assert "1 jobs: 0 computed, 1 finished earlier, 0 failed" in capsys.readouterr().out


def test_run_sweep_requires_one_output_dir(tmp_path):
    configs = [StudyConfig(output_dir=str(tmp_path / "a")), StudyConfig(output_dir=str(tmp_path / "b"))]
    with pytest.raises(ValueError, match="share one output_dir"):
        sweep.run_sweep(configs)


def test_sweep_on_given_scheduler(tmp_path):
    from distributed import LocalCluster

    configs = sweep.sweep_configs(tiny_params(tmp_path, epsilons=[0]))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        result = sweep.run_sweep(configs, scheduler=cluster.scheduler_address, progress=False)
        # The cluster outlives the sweep: run_sweep closes only clusters it started.
        assert cluster.status.name == "running"
    assert result.count("computed") == 1
    assert set(result.metrics.metric) >= {"auroc", "ece_platt"}
