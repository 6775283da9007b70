"""Training state that a checkpoint must carry to resume exactly: counters, best score, RNG states.

    state = TrainState(stage="xe")
    ckpt_extra = {"train_state": state.state_dict(), "rng": all_gather_object(dist, capture_rng(gen))}
    ...
    state.load_state_dict(ckpt["train_state"]); restore_rng(ckpt["rng"][dist.rank], gen)

Everything here is plain data (ints, floats, lists, tensors) so that checkpoints load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Where a stage is: the epoch in progress, batches done in it, optimiser steps, the best score."""

    stage: str
    epoch: int = 0  # the epoch in progress (or the next one, at an epoch boundary)
    batch_in_epoch: int = 0  # batches of ``epoch`` already trained on
    step: int = 0  # optimiser steps in this stage
    best_score: float | None = None
    best_epoch: int | None = None
    epochs_since_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)  # per finished epoch
    epoch_windows: list[dict[str, float]] = field(default_factory=list)  # the epoch's logged windows so far

    def improved(self, score: float) -> bool:
        """Record an epoch's validation score; True when it is the new best."""
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch = score, self.epoch
            self.epochs_since_improvement = 0
            return True
        self.epochs_since_improvement += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["stage"] != self.stage:
            raise ValueError(f"checkpoint is of stage {state['stage']!r}, not {self.stage!r}")
        for key, value in state.items():
            setattr(self, key, value)


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """This process's RNG states: Python, NumPy, torch CPU (+ CUDA) and ``generator``'s."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state() if generator is not None else None,
    }
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Inverse of ``capture_rng``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])
