"""GPU habits, each a switch of ``train.gpu`` resolved for the stage's device, and the learning-rate rule.

    speed = resolve_speed(cfg.train.gpu, device)       # Speed(channels_last=True, fused_adam=True, ...)
    apply_speed(model, speed)                          # before the optimiser and DDP are built
    torch.optim.Adam(groups, fused=speed.fused_adam)
    DistributedDataParallel(module, gradient_as_bucket_view=speed.ddp_bucket_view)

``auto`` means on for CUDA and off on the CPU. ``compile``'s default is ``off`` everywhere (compiling
takes minutes at every stage start; ``benchmarks/gpu.py`` measures what it gains). None of the
switches changes what is computed, only how: tests/test_speed.py trains with every switch on and off
on the CPU and compares losses and weights within float tolerance.

The learning-rate rule (``scaled_lr``): a stage's rates are set for ``lr_reference_captions``
captions per optimizer step (the anchors': seed 004's 80 captions per step in stage 1 and 32 in stage
2, ruotianluo's 10 images x 5 samples in SCST). A run with C captions per step (images per rank x
captions per image x world size) uses ``lr x (C / reference) ** p``, p = 1 (``linear``, the
default: Goyal et al. 2017's rule), 1/2 (``sqrt``: Malladi et al. 2022's rule for Adam in the limit
where gradient noise dominates) or 0 (``none``). Measured on the demo recipe (benchmarks/world_size.py,
BENCHMARKS.md), linear held the learning curve from 2 processes to 1, sqrt halfway. A raised rate is
reached by a linear warmup from the configured one (``LrSchedule``'s ``warmup_steps``), as Goyal et
al. do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from captioning.config import GpuConfig
from captioning.model.captioner import Captioner

Scaling = Literal["sqrt", "linear", "none"]
_EXPONENT: dict[str, float] = {"sqrt": 0.5, "linear": 1.0, "none": 0.0}


@dataclass(frozen=True)
class Speed:
    """``train.gpu`` resolved for one device: every switch a plain bool."""

    channels_last: bool
    fused_adam: bool
    compile: bool
    cudnn_benchmark: bool
    ddp_bucket_view: bool

    def describe(self) -> str:
        """``channels_last on, fused_adam on, compile off, ...`` for the stage's first line."""
        return ", ".join(f"{name} {'on' if on else 'off'}" for name, on in vars(self).items())


def resolve_speed(section: GpuConfig, device: torch.device) -> Speed:
    """Each switch: ``on``, ``off``, or ``auto`` (on for CUDA, off elsewhere)."""
    cuda = device.type == "cuda"

    def on(value: str) -> bool:
        return value == "on" or (value == "auto" and cuda)

    return Speed(
        channels_last=on(section.channels_last),
        fused_adam=on(section.fused_adam),
        compile=on(section.compile),
        cudnn_benchmark=on(section.cudnn_benchmark),
        ddp_bucket_view=on(section.ddp_bucket_view),
    )


def apply_speed(model: Captioner, speed: Speed) -> None:
    """Set the model's layout and compilation for ``speed`` (in place; the state dict's keys and
    values are unchanged), and cuDNN's algorithm search."""
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    if speed.channels_last:
        model.encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        model.encoder.channels_last = True
    if speed.compile:
        # In place (nn.Module.compile): parameters and state-dict keys stay the module's own.
        model.encoder.compile(dynamic=False)
        model.decoder.step = torch.compile(model.decoder.step, dynamic=True)  # type: ignore[method-assign]


def captions_per_step(images_per_rank: int, captions_per_image: int, world_size: int) -> int:
    """Captions one optimizer step sees over all ranks."""
    return images_per_rank * captions_per_image * world_size


def scaled_lr(lr: float, captions: int, reference: int, scaling: Scaling) -> tuple[float, float]:
    """(the rate for ``captions`` per step, its factor over ``lr``) under ``scaling`` (module doc)."""
    if scaling not in _EXPONENT:
        raise ValueError(f"unknown lr_scaling {scaling!r}; valid: {', '.join(_EXPONENT)}")
    if captions < 1 or reference < 1:
        raise ValueError(f"captions per step and the reference must be >= 1, got {captions}, {reference}")
    factor = (captions / reference) ** _EXPONENT[scaling]
    return lr * factor, factor


def warmup_steps(factor: float, warmup_epochs: float, steps_per_epoch: int) -> int:
    """Steps of the linear climb to a raised rate; none when the rule did not raise it."""
    if factor <= 1.0:
        return 0
    return math.ceil(warmup_epochs * steps_per_epoch)


@dataclass(frozen=True)
class LrPlan:
    """A stage's rates for its world size: what ``build_step`` uses and the stage's first line shows."""

    captions_per_step: int
    reference: int
    scaling: Scaling
    factor: float  # over the configured rates
    lr_decoder: float
    lr_encoder: float
    warmup_steps: int
    train_encoder: bool = True

    @property
    def warmup_start(self) -> float:
        """The warmup's first factor: from the configured rates (1 without a warmup)."""
        return 1.0 / self.factor if self.warmup_steps else 1.0

    def describe(self, unit: str = "captions") -> str:
        """``640 captions per step; lr decoder 3.20e-03 = set x (640/80) = x8, warmup over 886 steps``
        (``unit``: what a step's rows bring, SCST's are samples)."""
        rates = f"lr decoder {self.lr_decoder:.2e}"
        if self.train_encoder:
            rates += f" encoder {self.lr_encoder:.2e}"
        if self.scaling == "none" or self.factor == 1.0:
            rule = "as set" if self.scaling == "none" else f"as set ({self.reference} {unit} per step)"
        else:
            ratio = f"{self.captions_per_step}/{self.reference}"
            rule = f"set x {'sqrt' if self.scaling == 'sqrt' else ''}({ratio}) = x{self.factor:.3g}"
        warmup = f", warmup over {self.warmup_steps} steps" if self.warmup_steps else ""
        return f"{self.captions_per_step} {unit} per step; {rates} = {rule}{warmup}"


def lr_plan(
    *,
    lr_decoder: float,
    lr_encoder: float,
    images_per_rank: int,
    captions_per_image: int,
    world_size: int,
    reference: int,
    scaling: Scaling,
    warmup_epochs: float,
    steps_per_epoch: int,
    train_encoder: bool = True,
) -> LrPlan:
    """The rule of the module doc applied to a stage's configured rates."""
    captions = captions_per_step(images_per_rank, captions_per_image, world_size)
    decoder, factor = scaled_lr(lr_decoder, captions, reference, scaling)
    return LrPlan(
        captions_per_step=captions,
        reference=reference,
        scaling=scaling,
        factor=factor,
        lr_decoder=decoder,
        lr_encoder=lr_encoder * factor,
        warmup_steps=warmup_steps(factor, warmup_epochs, steps_per_epoch),
        train_encoder=train_encoder,
    )
