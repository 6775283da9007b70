"""The ResNet encoder: shapes, weights (file, ImageNet enum), fine-tuning and frozen BatchNorm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from captioning.model.encoder import BLOCKS, ResNetEncoder, imagenet_weights
from captioning.vision import import_torchvision

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def resnet18() -> ResNetEncoder:
    return ResNetEncoder("resnet18", weights=None, encoded_image_size=3)


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("resnet50", 2048)])
def test_output_is_batch_pixels_channels(name: str, dim: int) -> None:
    encoder = ResNetEncoder(name, weights=None, encoded_image_size=3).eval()
    with torch.no_grad():
        features = encoder(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 9, dim)
    assert encoder.encoder_dim == dim and encoder.num_pixels == 9


def test_grid_is_the_adaptive_pool_of_the_trunk(resnet18: ResNetEncoder) -> None:
    resnet18.eval()
    images = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        trunk = resnet18.backbone(images)  # (1, 512, 3, 3): already a 3x3 grid at 96 px
        features = resnet18(images)
    assert torch.equal(features, trunk.flatten(2).transpose(1, 2))


def test_unknown_encoder_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="resnet101"):
        ResNetEncoder("vgg16")


def test_imagenet_weights_come_from_torchvisions_enums() -> None:
    tv = import_torchvision()
    assert imagenet_weights("resnet101") is tv.models.ResNet101_Weights.IMAGENET1K_V2
    assert imagenet_weights("resnet18") is tv.models.ResNet18_Weights.IMAGENET1K_V1


def _trainable_prefixes(encoder: ResNetEncoder) -> set[str]:
    return {name.split(".")[0] for name, p in encoder.backbone.named_parameters() if p.requires_grad}


def test_frozen_by_default_and_when_disabled(resnet18: ResNetEncoder) -> None:
    fresh = ResNetEncoder("resnet18", weights=None)
    assert _trainable_prefixes(fresh) == set()
    resnet18.set_fine_tuning(True, 1)
    resnet18.set_fine_tuning(False)
    assert _trainable_prefixes(resnet18) == set()


@pytest.mark.parametrize("from_block", [1, 2, 3, 4])
def test_fine_tuning_trains_blocks_from_the_given_one(resnet18: ResNetEncoder, from_block: int) -> None:
    resnet18.set_fine_tuning(True, from_block)
    assert _trainable_prefixes(resnet18) == set(BLOCKS[from_block - 1 :])  # the stem never trains
    resnet18.set_fine_tuning(False)


def test_fine_tuning_block_out_of_range(resnet18: ResNetEncoder) -> None:
    with pytest.raises(ValueError, match=r"1\.\.4"):
        resnet18.set_fine_tuning(True, 5)


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics() -> None:
    encoder = ResNetEncoder("resnet18", weights=None, encoded_image_size=2)
    encoder.set_fine_tuning(True, from_block=3)
    encoder.train()
    before = {k: v.clone() for k, v in encoder.state_dict().items() if "running" in k}
    encoder(torch.randn(4, 3, 32, 32))
    after = encoder.state_dict()
    for name, module in encoder.backbone.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            trainable = name.split(".")[0] in ("layer3", "layer4")
            assert module.training == trainable, name
            moved = not torch.equal(
                before[f"backbone.{name}.running_mean"], after[f"backbone.{name}.running_mean"]
            )
            assert moved == trainable, name
    assert encoder.training  # the module itself is in train mode
    encoder.set_fine_tuning(False)  # freezing again puts every BatchNorm back in eval mode
    assert not any(m.training for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))
    encoder.eval().train()
    assert not any(m.training for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))


def test_loads_a_local_weights_file(tmp_path: Path) -> None:
    tv = import_torchvision()
    source = tv.models.resnet18(weights=None)  # stands in for downloaded ImageNet weights
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)  # fc.* included, as torchvision ships it
    encoder = ResNetEncoder("resnet18", weights=str(path))
    for name, value in encoder.backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[name]), name


def test_weights_file_must_fit(tmp_path: Path) -> None:
    tv = import_torchvision()
    state = tv.models.resnet18(weights=None).state_dict()
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.1.")}, missing)
    with pytest.raises(ValueError, match=r"missing keys \['layer4\.1\."):
        ResNetEncoder("resnet18", weights=str(missing))
    unexpected = tmp_path / "unexpected.pth"
    torch.save({**state, "head.weight": torch.zeros(1)}, unexpected)
    with pytest.raises(ValueError, match=r"unexpected keys \['head\.weight'\]"):
        ResNetEncoder("resnet18", weights=str(unexpected))
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        ResNetEncoder("resnet18", weights=str(tmp_path / "nope.pth"))
