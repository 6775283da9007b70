"""What the epoch loop keeps between its logging steps: the window of step metrics and the checkpoint clock.

window = MetricWindow()
window.add(step_fn(batch))            # device scalars summed on the device: no wait per step
means = window.pooled(dist)           # at a logging step (collective): read once, pooled over ranks
clock = CheckpointClock(300.0)
if clock.due(dist): ...               # rank 0's clock decides for every rank (collective)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from captioning.training.dist import DistInfo, all_reduce_sum

# A step's sums over its rows (``training.steps``), pooled over ranks and steps when logged. Scalars
# stay on the device (no host synchronisation per step); the window reads its sums once, when it logs.
StepMetrics = dict[str, torch.Tensor | float]


class MetricWindow:
    """Step metrics summed over a logging window, pooled over ranks when logged."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, metrics: StepMetrics) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def pooled(self, dist: DistInfo) -> dict[str, float]:
        """Means over the window's steps and ranks (collective: every rank calls it at the same step).
        The device's sums are read here, in one transfer: the window's only wait for the device."""
        keys = sorted(self.sums)
        local = host_values([self.sums[k] for k in keys])
        *pooled, steps = all_reduce_sum(dist, [*local, float(self.steps)])
        totals = dict(zip(keys, pooled, strict=True))
        steps = max(steps, 1.0)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"loss": totals["loss"] / steps, "grad_norm": totals["grad_norm"] / steps}
        if "tokens" in totals:
            out["ce"] = totals["ce_sum"] / max(totals["tokens"], 1.0)
            out["attention"] = totals["attention"] / steps
        if "samples" in totals:
            out["reward"] = totals["reward_sum"] / max(totals["samples"], 1.0)
            out["baseline"] = totals["baseline_sum"] / max(totals["samples"], 1.0)
            out["sample_len"] = totals["sample_len_sum"] / max(totals["samples"], 1.0)
        out["images_per_s"] = totals["images"] / elapsed  # all ranks together
        return out


def host_values(values: list[torch.Tensor | float]) -> list[float]:
    """Scalars (device tensors or floats) as floats, with one device-to-host copy for the tensors."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    read = iter(torch.stack([t.detach().double() for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


class CheckpointClock:
    """Whether a periodic checkpoint is due by wall clock: rank 0's clock decides for every rank (one
    tiny collective, asked only at logging steps, where metrics are pooled anyway)."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self.last = clock()

    def due(self, dist: DistInfo) -> bool:
        """Collective: every rank calls it at the same step."""
        if self.every_s <= 0:
            return False
        mine = 1.0 if dist.is_main and self.clock() - self.last >= self.every_s else 0.0
        return all_reduce_sum(dist, [mine])[0] > 0

    def reset(self) -> None:
        """A checkpoint was just written."""
        self.last = self.clock()
