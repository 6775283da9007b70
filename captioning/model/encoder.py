"""The image encoder: a torchvision ResNet without its pool and classifier, pooled to a fixed grid.

Shapes: B images, H x W input pixels, G grid side, P = G^2 pixels, E encoder dim (512 for
ResNet-18/34, 2048 for ResNet-50/101/152).

    encoder = ResNetEncoder("resnet101", weights="imagenet", encoded_image_size=14)
    features = encoder(images)                      # (B, 3, H, W) -> (B, 196, 2048)
    encoder.set_fine_tuning(True, from_block=2)     # layer2..layer4 trainable (seed 004)

Weights: ``"imagenet"`` (torchvision's weights enum: the download cache under $TORCH_HOME), a path
to a state dict of the torchvision model (local or s3://; ``fc.*`` keys are ignored, anything else
must match exactly), or None (random init).

Frozen parts keep their BatchNorm layers in eval mode even under ``train()``: a frozen block's
running statistics never move, so "frozen" means the same function in both stages.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from captioning.vision import import_torchvision

ENCODER_DIMS: dict[str, int] = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "resnet152": 2048,
}
# The best ImageNet weights torchvision has for each (V2 where it exists).
IMAGENET_WEIGHTS: dict[str, str] = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
    "resnet101": "ResNet101_Weights.IMAGENET1K_V2",
    "resnet152": "ResNet152_Weights.IMAGENET1K_V2",
}
STEM = ("conv1", "bn1", "relu", "maxpool")
BLOCKS = ("layer1", "layer2", "layer3", "layer4")


class ResNetEncoder(nn.Module):
    """ResNet trunk -> AdaptiveAvgPool2d(G) -> (B, P, E) features."""

    def __init__(self, name: str = "resnet101", weights: str | None = None, encoded_image_size: int = 14):
        super().__init__()
        if name not in ENCODER_DIMS:
            raise ValueError(f"unknown encoder {name!r}; valid: {', '.join(ENCODER_DIMS)}")
        imagenet = weights == "imagenet"
        # torchvision downloads the weights into its cache on first use (the real loading code).
        resnet = getattr(import_torchvision().models, name)(
            weights=imagenet_weights(name) if imagenet else None
        )
        # The same module names as torchvision's ResNet, so its state dicts load key for key.
        self.backbone = nn.Sequential(OrderedDict((n, getattr(resnet, n)) for n in (*STEM, *BLOCKS)))
        self.pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))
        self.name = name
        self.encoder_dim = ENCODER_DIMS[name]
        self.encoded_image_size = encoded_image_size
        self.trainable_blocks: tuple[str, ...] = ()
        self.channels_last = False  # images cross to NHWC first (``training.speed``); same values
        if weights is not None and not imagenet:
            load_backbone_weights(self.backbone, weights)
        self.set_fine_tuning(False)

    @property
    def num_pixels(self) -> int:
        return self.encoded_image_size**2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) ImageNet-normalised images -> (B, P, E)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        x = self.backbone(images)  # (B, E, H/32, W/32)
        x = self.pool(x)  # (B, E, G, G)
        return x.flatten(2).transpose(1, 2)  # (B, P, E)

    def set_fine_tuning(self, enabled: bool, from_block: int = 2) -> None:
        """Freeze everything, or train ResNet blocks ``layer{from_block}``..``layer4`` (the stem stays frozen).

        Seed 004 trains blocks 2-4: the first block's edges and textures are kept as learned.
        """
        if not 1 <= from_block <= len(BLOCKS):
            raise ValueError(f"from_block must be 1..{len(BLOCKS)}, got {from_block}")
        self.trainable_blocks = BLOCKS[from_block - 1 :] if enabled else ()
        for name, module in self.backbone.named_children():
            for p in module.parameters():
                p.requires_grad_(name in self.trainable_blocks)
        self.train(self.training)  # re-pin the BatchNorm modes of what is frozen now

    def train(self, mode: bool = True) -> ResNetEncoder:
        """Like ``nn.Module.train``, but BatchNorm layers of frozen parts always stay in eval mode."""
        super().train(mode)
        for name, module in self.backbone.named_children():
            if name in self.trainable_blocks:
                continue
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def imagenet_weights(name: str) -> Any:
    """torchvision's weights enum member for ``name`` (e.g. ``ResNet101_Weights.IMAGENET1K_V2``)."""
    return import_torchvision().models.get_weight(IMAGENET_WEIGHTS[name])


def load_backbone_weights(backbone: nn.Module, uri: str) -> None:
    """Load a torchvision ResNet state dict from ``uri`` (local path or s3://) into ``backbone``.

    ``fc.*`` (the classifier we drop) is ignored; any other missing or unexpected key is an error.
    """
    from captioning import storage  # lazy: boto3 only when a weights file is read

    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"encoder weights file {uri} not found (model.encoder_weights takes 'imagenet', a state-dict file, or none)"
        ) from None
    state: Any = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{uri}: expected a state dict (a mapping of names to tensors)")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{uri} does not fit the encoder: missing keys {sorted(missing)[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {sorted(unexpected)[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )
