"""All distributed facts in one place: who am I (``DistInfo``) and the few collectives we use.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and ``GROUP_RANK`` (the
node); without them this is a single process of world size 1, and every helper here still works,
without a process group::

    dist = DistInfo.from_env()
    init_process_group(dist)              # gloo on CPU, nccl with CUDA; no-op at world size 1
    results = all_gather_object(dist, my_results)   # [my_results] at world size 1
    if dist.is_main:
        ...                               # side effects (files, MLflow) on rank 0 only
    destroy_process_group(dist)

Nothing else in the library reads these environment variables or calls ``torch.distributed``
for facts; it takes a ``DistInfo``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as tdist

# The variables torchrun exports to each process it starts.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: global rank, world size, rank on its node, node index."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"local_rank must be in [0, {self.local_world_size}), got {self.local_rank}")
        if self.node_rank < 0:
            raise ValueError(f"node_rank must be >= 0, got {self.node_rank}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistInfo:
        """Read torchrun's variables (from ``os.environ`` unless ``env`` is given).

        Without ``WORLD_SIZE`` (a plain ``python`` run) this is rank 0 of 1. ``WORLD_SIZE`` without
        ``RANK`` is an error: half a launcher environment would silently train on one rank.
        """
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env and "RANK" not in env:
            return cls()
        missing = [name for name in ("RANK", "WORLD_SIZE") if name not in env]
        if missing:
            raise ValueError(f"incomplete distributed environment: {', '.join(missing)} not set")
        try:
            rank = int(env["RANK"])
            world_size = int(env["WORLD_SIZE"])
            local_rank = int(env.get("LOCAL_RANK", rank))
            local_world_size = int(env.get("LOCAL_WORLD_SIZE", world_size))
            node_rank = int(env.get("GROUP_RANK", env.get("NODE_RANK", 0)))
        except ValueError as exc:
            raise ValueError(f"distributed environment variables must be integers: {exc}") from None
        return cls(rank, world_size, local_rank, local_world_size, node_rank)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process with side effects (logging, checkpoints, MLflow)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """More than one process: gradients and results must be communicated."""
        return self.world_size > 1

    @property
    def device(self) -> torch.device:
        """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def default_backend() -> str:
    """nccl where CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() and tdist.is_nccl_available() else "gloo"


def is_initialized() -> bool:
    """True when a default process group exists."""
    return tdist.is_available() and tdist.is_initialized()


def init_process_group(dist: DistInfo, backend: str | None = None, *, timeout_s: float = 1800.0) -> None:
    """Join the default process group (``env://``: MASTER_ADDR/MASTER_PORT from torchrun).

    No-op at world size 1 and when a group already exists. With nccl the current CUDA device is
    set to ``local_rank`` first, so collectives and ``.to(dist.device)`` agree.
    """
    if not dist.is_distributed or is_initialized():
        return
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(dist.local_rank)
    tdist.init_process_group(
        backend=backend, rank=dist.rank, world_size=dist.world_size, timeout=timedelta(seconds=timeout_s)
    )


def destroy_process_group(dist: DistInfo) -> None:
    """Leave the default process group, if there is one."""
    if is_initialized():
        tdist.destroy_process_group()


def _require_group(dist: DistInfo, what: str) -> bool:
    """True when ``what`` must communicate; raise if it should but cannot."""
    if not dist.is_distributed:
        return False
    if not is_initialized():
        raise RuntimeError(
            f"{what}: world size {dist.world_size} but no process group; call init_process_group"
        )
    return True


def barrier(dist: DistInfo) -> None:
    """Wait for every rank (no-op at world size 1)."""
    if _require_group(dist, "barrier"):
        tdist.barrier()


def all_gather_object(dist: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), indexed by rank; ``[obj]`` at world size 1."""
    if not _require_group(dist, "all_gather_object"):
        return [obj]
    gathered: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(dist: DistInfo, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. rank 0's early-stopping decision)."""
    if not _require_group(dist, "broadcast_object"):
        return obj
    box = [obj if dist.rank == src else None]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(dist: DistInfo, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64; ``values`` itself at world size 1)."""
    if not _require_group(dist, "all_reduce_sum"):
        return [float(v) for v in values]
    device = dist.device if default_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return [float(v) for v in tensor.tolist()]


def die_with_launcher() -> bool:
    """Under torchrun, have the kernel SIGKILL this worker when its launcher dies (Linux).

    torchrun starts each worker in a session of its own, so killing the launcher (SIGKILL, a
    cancelled orchestration task, a lost node agent) would otherwise leave its workers running:
    orphans that keep training, writing checkpoints and holding GPUs. Returns True when armed.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() == 1:  # the launcher died before the request was armed
        os.kill(os.getpid(), signal.SIGKILL)
    return True
