"""Optimiser and learning-rate schedules: Adam with separate encoder and decoder rates (seed 004).

    optimizer = build_optimizer(model, lr_decoder=4e-4, lr_encoder=1e-4, train_encoder=True)
    schedule = LrSchedule(optimizer, kind="plateau", decay_factor=0.8, decay_patience=8, total_steps=n)
    ...each step:  schedule.step_batch()
    ...each epoch: schedule.step_epoch(epochs_since_improvement)

``plateau`` is seed 004's rule: after every ``decay_patience`` epochs without improvement of the
validation score, multiply every group's rate by ``decay_factor``. ``cosine`` anneals each group
from its base rate to 0 over the stage's steps. Both keep their state in ``state_dict()``. With
``warmup_steps`` every kind is multiplied by a linear climb from ``warmup_start`` to 1 over those
steps (``training.speed``'s rule: from the configured rate to the one scaled for the world size).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from captioning.model.captioner import Captioner

ScheduleKind = Literal["plateau", "cosine", "constant"]


def build_optimizer(
    model: Captioner, *, lr_decoder: float, lr_encoder: float, train_encoder: bool, fused: bool = False
) -> torch.optim.Adam:
    """Adam over the parameters that require grad, in named groups ``decoder`` and ``encoder``;
    ``fused``: one kernel updates every parameter (``train.gpu.fused_adam``)."""
    groups: list[dict[str, Any]] = [
        {
            "name": "decoder",
            "params": [p for p in model.decoder.parameters() if p.requires_grad],
            "lr": lr_decoder,
        }
    ]
    if train_encoder:
        encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
        if not encoder_params:
            raise ValueError("encoder fine-tuning requested but no encoder parameter requires grad")
        groups.append({"name": "encoder", "params": encoder_params, "lr": lr_encoder})
    if not groups[0]["params"]:
        raise ValueError("no decoder parameter requires grad")
    return torch.optim.Adam(groups, fused=True) if fused else torch.optim.Adam(groups)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``{"lr_decoder": ..., "lr_encoder": ...}`` for the groups present."""
    return {f"lr_{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}


class LrSchedule:
    """plateau / cosine / constant learning rates over one stage."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        kind: ScheduleKind,
        total_steps: int,
        decay_factor: float,
        decay_patience: int,
        warmup_steps: int = 0,
        warmup_start: float = 1.0,
    ) -> None:
        if kind not in ("plateau", "cosine", "constant"):
            raise ValueError(f"unknown lr schedule {kind!r}; valid: plateau, cosine, constant")
        if warmup_steps < 0 or not 0.0 < warmup_start <= 1.0:
            raise ValueError(
                f"warmup needs steps >= 0 and a start in (0, 1], got {warmup_steps}, {warmup_start}"
            )
        self.optimizer = optimizer
        self.kind = kind
        self.total_steps = max(1, total_steps)
        self.decay_factor = decay_factor
        self.decay_patience = decay_patience
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.num_steps = 0
        self.num_decays = 0
        self.warmup_steps, self.warmup_start = warmup_steps, warmup_start
        self._apply()

    def warmup(self) -> float:
        """The warmup's factor at the current step (1 once it is over)."""
        if self.num_steps >= self.warmup_steps:
            return 1.0
        return self.warmup_start + (1.0 - self.warmup_start) * self.num_steps / self.warmup_steps

    def _apply(self) -> None:
        warmup = self.warmup()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            if self.kind == "cosine":
                progress = min(1.0, self.num_steps / self.total_steps)
                group["lr"] = warmup * base * 0.5 * (1.0 + math.cos(math.pi * progress))
            elif self.kind == "plateau":
                group["lr"] = warmup * base * self.decay_factor**self.num_decays
            else:
                group["lr"] = warmup * base

    def step_batch(self) -> None:
        """After each optimiser step."""
        self.num_steps += 1
        if self.kind == "cosine" or self.num_steps <= self.warmup_steps:
            self._apply()

    def step_epoch(self, epochs_since_improvement: int) -> bool:
        """After each epoch's validation; True when the rate was decayed (plateau only)."""
        if self.kind != "plateau" or epochs_since_improvement == 0:
            return False
        if epochs_since_improvement % self.decay_patience != 0:
            return False
        self.num_decays += 1
        self._apply()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "base_lrs": list(self.base_lrs),
            "num_steps": self.num_steps,
            "num_decays": self.num_decays,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "warmup_start": self.warmup_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"checkpoint schedule is {state['kind']!r}, this stage's is {self.kind!r}")
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self.num_steps = int(state["num_steps"])
        self.num_decays = int(state["num_decays"])
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state.get("warmup_steps", 0))  # checkpoints from before the warmup
        self.warmup_start = float(state.get("warmup_start", 1.0))
        self._apply()
