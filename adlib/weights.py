"""Fetch DINOv2 weights into the Hugging Face cache, or check a local checkpoint.

Usage::

    python -m adlib.weights dinov2_vits14
    python -m adlib.weights dinov2_vits14 --checkpoint dinov2_vits14_pretrain.pth

Without ``--checkpoint``, the command downloads ``model.safetensors`` of
``timm/<timm name>`` with :func:`huggingface_hub.hf_hub_download`, which respects
``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``, loads it into the backbone
and logs the file's path. Offline and without cached weights it exits with
status 1 and the message of :func:`adlib.backbones.missing_weights_message`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from .backbones import DINOV2_MODELS, WeightsNotFoundError, load_backbone, missing_weights_message

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


def fetch_weights(name: str) -> Path:
    """Download (or find in the cache) the timm weights of DINOv2 backbone ``name``.

    Returns
    -------
    Path
        The cached ``model.safetensors``.

    Raises
    ------
    ValueError
        If ``name`` is not a key of :data:`adlib.backbones.DINOV2_MODELS`.
    WeightsNotFoundError
        If the file is neither cached nor reachable, for example offline, or the
        Hub answers with an HTTP error.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if name not in DINOV2_MODELS:
        raise ValueError(f"Unknown DINOv2 backbone {name!r}; expected one of {', '.join(DINOV2_MODELS)}.")
    repo_id = f"timm/{DINOV2_MODELS[name]}"
    try:
        return Path(hf_hub_download(repo_id, WEIGHTS_FILE))
    except LocalEntryNotFoundError as error:
        raise WeightsNotFoundError(missing_weights_message(name)) from error
    except HfHubHTTPError as error:
        raise WeightsNotFoundError(f"Download of {WEIGHTS_FILE} from {repo_id} failed: {error}") from error


def check_weights(name: str, *, checkpoint: str | Path | None = None) -> str:
    """Load pretrained weights into backbone ``name`` and return their provenance string.

    Without ``checkpoint`` the Hugging Face cache is read. Raises what
    :func:`adlib.backbones.load_backbone` raises for missing or mismatched weights.
    """
    return load_backbone(name, weights="pretrained", checkpoint=checkpoint).info.weights


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m adlib.weights``."""
    parser = argparse.ArgumentParser(
        prog="python -m adlib.weights",
        description="Download DINOv2 weights into the Hugging Face cache, or check that a local "
                    "checkpoint loads into the architecture.",
    )
    parser.add_argument("model", choices=sorted(DINOV2_MODELS), help="DINOv2 backbone name.")
    parser.add_argument("--checkpoint", type=Path,
                        help="Local timm .safetensors file or Meta *_pretrain.pth to check instead of "
                             "downloading.")
    parser.add_argument("--no-load-check", action="store_true",
                        help="After downloading, skip loading the weights into the model. The check "
                             "keeps the model and the loaded file in memory, about twice the file size.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status: 0 on success, 1 on failure."""
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if arguments.checkpoint is not None:
            source = check_weights(arguments.model, checkpoint=arguments.checkpoint)
            logger.info("Checkpoint %s loads into %s: %s", arguments.checkpoint, arguments.model, source)
            return 0
        path = fetch_weights(arguments.model)
        if not arguments.no_load_check:
            check_weights(arguments.model)
    except (WeightsNotFoundError, ValueError, RuntimeError) as error:
        # RuntimeError: torch raises it when cached weights have tensors of the wrong shape.
        logger.error("%s", error)
        return 1
    logger.info("Weights of %s are at %s", arguments.model, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
