"""Tests of ``python -m adlib.weights``, all offline.

Only the first test starts the real command, because importing timm in a new
process takes seconds. It points HF_HOME and HF_HUB_CACHE at a temporary folder
and sets HF_HUB_OFFLINE=1, so it never reads the machine's cache or reaches the network.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from adlib.backbones import DINOV2_MODELS, missing_weights_message
from adlib.weights import build_parser, fetch_weights, main

REPOSITORY = Path(__file__).resolve().parents[1]
SMALL = "dinov2_vits14"


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """Randomly initialised ViT-S/14 weights saved as a timm safetensors file."""
    torch.manual_seed(0)
    model = timm.create_model(DINOV2_MODELS[SMALL], pretrained=False, num_classes=0, dynamic_img_size=True)
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(path))
    return path


def run_cli(arguments: list[str], hf_home: Path) -> subprocess.CompletedProcess:
    environment = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"),
                       HF_HUB_OFFLINE="1", PYTHONPATH=str(REPOSITORY))
    return subprocess.run([sys.executable, "-m", "adlib.weights", *arguments], cwd=REPOSITORY,
                          env=environment, capture_output=True, text=True, timeout=120)


def test_cli_offline_without_weights(tmp_path):
    result = run_cli([SMALL], tmp_path / "hf")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == missing_weights_message(SMALL)


def test_cli_reports_cached_weights(tmp_path, small_checkpoint, monkeypatch, caplog):
    # huggingface_hub reads constants.HF_HUB_CACHE at call time, so the test can point it at
    # tmp_path. A cache entry is refs/main naming the snapshot folder that contains the file.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    entry = tmp_path / "hub" / f"models--timm--{DINOV2_MODELS[SMALL]}"
    snapshot = entry / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123456789abcdef")
    (snapshot / "model.safetensors").write_bytes(small_checkpoint.read_bytes())
    with caplog.at_level(logging.INFO, logger="adlib.weights"):
        status = main([SMALL])
    assert status == 0
    assert caplog.records[-1].getMessage() == f"Weights of {SMALL} are at {snapshot / 'model.safetensors'}"


def test_cli_checks_checkpoint(small_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="adlib.weights"):
        status = main([SMALL, "--checkpoint", str(small_checkpoint)])
    assert status == 0
    assert f"Checkpoint {small_checkpoint} loads into {SMALL}: checkpoint model.safetensors sha256:" in caplog.text


def test_cli_rejects_unrelated_checkpoint(tmp_path, caplog):
    path = tmp_path / "other.safetensors"
    save_file({"head.weight": torch.zeros(2, 2)}, str(path))
    with caplog.at_level(logging.ERROR, logger="adlib.weights"):
        status = main([SMALL, "--checkpoint", str(path)])
    assert status == 1
    assert f"Checkpoint {path} does not match" in caplog.text


def test_cli_missing_checkpoint(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="adlib.weights"):
        status = main([SMALL, "--checkpoint", str(tmp_path / "absent.pth")])
    assert status == 1
    assert "absent.pth does not exist" in caplog.text


def test_cli_unknown_model(capsys):
    with pytest.raises(SystemExit) as raised:
        build_parser().parse_args(["efficientnet_lite0"])
    assert raised.value.code == 2
    assert "invalid choice: 'efficientnet_lite0'" in capsys.readouterr().err


def test_fetch_rejects_unknown_model():
    with pytest.raises(ValueError, match="Unknown DINOv2 backbone 'efficientnet_lite0'"):
        fetch_weights("efficientnet_lite0")
