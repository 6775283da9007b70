"""A training step of each kind, and the optimisation it updates: what ``train_one_epoch`` calls per batch.

    opt, step_fn = build_step(setup, model, dist, generator, reward, len(train_loader))   # from a StageSetup
    metrics = step_fn(batch)                                            # forward, loss, backward, update

``XeStep`` (stages 1-2): encode once per image, teacher-force its captions, masked cross-entropy plus
the doubly stochastic attention term. ``ScstStep`` (stage 3): sample K captions per image, CIDEr-D
rewards, baseline (mean of the other samples, or the greedy caption's), policy gradient. Both run
under bf16/fp16 autocast on CUDA (fp32 on the CPU) and return sums that the logger pools over ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from captioning.data.batch import Batch
from captioning.model.captioner import Captioner
from captioning.training.dist import DistInfo
from captioning.training.objective import CaptionObjective, XeForward
from captioning.training.optim import LrSchedule, build_optimizer
from captioning.training.scst import CiderReward, ScstForward, greedy_baseline, mean_of_others, scst_loss
from captioning.training.speed import LrPlan, apply_speed, lr_plan, resolve_speed
from captioning.training.stage import ScstSettings, StageSetup
from captioning.training.windows import StepMetrics


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16/fp16 autocast on CUDA; CPU always runs fp32."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@dataclass
class Optimization:
    """Optimiser, schedule and gradient scaler of a stage, and how a step updates the weights."""

    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    scaler: torch.amp.GradScaler
    grad_clip: float | None
    params: list[nn.Parameter]

    def update(self, loss: torch.Tensor) -> torch.Tensor:
        """backward, clip gradient values (seed 004), step; returns the gradient norm before clipping
        (a scalar on the device: nothing here waits for the device)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = (
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if grads
            else loss.new_zeros(())
        )
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_value_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step_batch()
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class XeStep:
    """One cross-entropy step: encode once per image, teacher-force its S captions, update."""

    def __init__(
        self,
        forward: nn.Module,
        objective: CaptionObjective,
        opt: Optimization,
        precision: str,
        device: torch.device,
    ) -> None:
        self.forward, self.objective, self.opt = forward, objective, opt
        self.precision, self.device = precision, device
        self.scheduled_sampling = 0.0
        self.generator: torch.Generator | None = None

    def __call__(self, batch: Batch) -> StepMetrics:
        with autocast(self.device, self.precision):
            out = self.forward(
                batch.images, batch.captions, batch.lengths, self.scheduled_sampling, self.generator
            )
            parts = self.objective(out, batch.captions, batch.lengths, batch.is_pad)
        grad_norm = self.opt.update(parts.loss)
        return {
            "loss": parts.loss.detach(),
            "ce_sum": parts.ce_sum,
            "tokens": parts.num_tokens,
            "attention": parts.attention,
            "grad_norm": grad_norm,
            "images": (~batch.is_pad).sum(),
        }


class ScstStep:
    """One self-critical step: K samples per image, CIDEr-D rewards, baseline, policy gradient."""

    def __init__(
        self,
        forward: nn.Module,
        model: Captioner,
        reward: CiderReward,
        opt: Optimization,
        settings: ScstSettings,
        precision: str,
        device: torch.device,
        generator: torch.Generator,
    ) -> None:
        if settings.baseline == "mean" and settings.num_samples < 2:
            raise ValueError("train.scst.baseline='mean' needs train.scst.num_samples >= 2")
        self.forward, self.model, self.reward, self.opt = forward, model, reward, opt
        self.num_samples, self.baseline = settings.num_samples, settings.baseline
        self.temperature, self.max_len = settings.temperature, settings.max_len
        self.precision, self.device, self.generator = precision, device, generator

    def __call__(self, batch: Batch) -> StepMetrics:
        with autocast(self.device, self.precision):
            gen, features = self.forward(
                batch.images, self.num_samples, self.max_len, self.temperature, self.generator
            )
        rewards = self.reward(gen.tokens, gen.lengths, batch.image_ids)  # (B, K)
        if self.baseline == "mean":
            baseline = mean_of_others(rewards)  # (B, K)
        else:
            baseline = greedy_baseline(
                self.model, features, self.reward, batch.image_ids, self.max_len
            )  # (B, 1)
            baseline = baseline.expand_as(rewards)
        assert gen.token_logprobs is not None
        loss = scst_loss(gen.token_logprobs.float(), gen.mask, rewards - baseline, batch.is_pad)
        grad_norm = self.opt.update(loss)
        real = (~batch.is_pad).float().view(-1, 1)  # (B, 1)
        return {
            "loss": loss.detach(),
            "reward_sum": (rewards * real).sum(),
            "baseline_sum": (baseline * real).sum(),
            "samples": real.sum() * rewards.shape[1],
            "sample_len_sum": (gen.lengths.float() * real).sum(),
            "grad_norm": grad_norm,
            "images": real.sum(),
        }


def stage_lr_plan(setup: StageSetup, world_size: int, steps_per_epoch: int) -> LrPlan:
    """The stage's rates scaled for its captions per step (``training.speed``'s rule)."""
    return lr_plan(
        lr_decoder=setup.lr_decoder,
        lr_encoder=setup.lr_encoder,
        images_per_rank=setup.batch_size,
        captions_per_image=setup.captions_per_image,
        world_size=world_size,
        reference=setup.lr_reference_captions,
        scaling=setup.lr_scaling,
        warmup_epochs=setup.lr_warmup_epochs,
        steps_per_epoch=steps_per_epoch,
        train_encoder=setup.train_encoder,
    )


def build_step(
    setup: StageSetup,
    model: Captioner,
    dist: DistInfo,
    generator: torch.Generator,
    reward: CiderReward | None,
    steps_per_epoch: int,
) -> tuple[Optimization, XeStep | ScstStep]:
    """The stage's optimisation (Adam over the trainable groups at the rates ``stage_lr_plan`` scales,
    schedule, gradient scaler) and its step function, with the forward module wrapped in DDP when the
    run is distributed; the ``train.gpu`` switches applied to the model first."""
    device = dist.device
    speed = resolve_speed(setup.gpu, device)
    apply_speed(model, speed)
    plan = stage_lr_plan(setup, dist.world_size, steps_per_epoch)
    optimizer = build_optimizer(
        model,
        lr_decoder=plan.lr_decoder,
        lr_encoder=plan.lr_encoder,
        train_encoder=setup.train_encoder,
        fused=speed.fused_adam,
    )
    opt = Optimization(
        optimizer=optimizer,
        schedule=LrSchedule(
            optimizer,
            kind=setup.lr_schedule,
            total_steps=setup.epochs * steps_per_epoch,
            decay_factor=setup.decay_factor,
            decay_patience=setup.decay_patience,
            warmup_steps=plan.warmup_steps,
            warmup_start=plan.warmup_start,
        ),
        scaler=torch.amp.GradScaler(device.type, enabled=setup.precision == "fp16" and device.type == "cuda"),
        grad_clip=setup.grad_clip,
        params=[p for g in optimizer.param_groups for p in g["params"]],
    )
    objective = setup.objective
    forward: nn.Module
    if isinstance(objective, ScstSettings):
        forward = ScstForward(model, train_encoder=setup.train_encoder)
    else:
        forward = XeForward(model, train_encoder=setup.train_encoder)
    ddp: nn.Module = forward
    if dist.is_distributed:
        ddp = DistributedDataParallel(
            forward,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=speed.ddp_bucket_view,
        )
    if not isinstance(objective, ScstSettings):
        step = XeStep(ddp, CaptionObjective(objective.alpha_c), opt, setup.precision, device)
        step.generator = generator
        return opt, step
    if reward is None:
        raise ValueError("an SCST stage needs a CiderReward")
    return opt, ScstStep(ddp, model, reward, opt, objective, setup.precision, device, generator)
