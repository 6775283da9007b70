"""Joining a gloo process group from a test's ``mp.spawn`` child, as a torchrun worker would."""

from __future__ import annotations

import multiprocessing
import os

import captioning.training.dist as D
from captioning.training.dist import DistInfo


def join_gloo(rank: int, world: int, port: int) -> DistInfo:
    """Export torchrun's variables for ``rank`` of ``world`` (master on loopback:port) and join gloo.

    mp.spawn's children default to "spawn", so their DataLoader workers would re-import torch
    (seconds each); torchrun's ranks are fresh interpreters whose default is fork, as set here.
    """
    multiprocessing.set_start_method("fork", force=True)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    dist = DistInfo.from_env()
    D.init_process_group(dist, backend="gloo")
    return dist
