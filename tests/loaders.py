"""Test-only loader helpers: a stage's two loaders from the config section, and a batch count from
sizes.json alone (no shard opened). The package builds one loader at a time (``build_loader``).
"""

from __future__ import annotations

import torch

from captioning.config import LoaderConfig
from captioning.data.epoch import plan_epoch
from captioning.data.format import read_sizes, split_sizes
from captioning.data.loader import CaptionLoader, build_loader
from captioning.training.dist import DistInfo


def build_loaders(
    cfg: LoaderConfig,
    location: str,
    *,
    dist: DistInfo,
    image_size: int,
    seed: int,
    batch_size: int | None = None,
    train_split: str = "train",
    eval_split: str = "val",
    device: torch.device | str | None = None,
) -> dict[str, CaptionLoader]:
    """The training and evaluation loaders from ``data.loader`` (``cfg``), keyed by split.

    ``batch_size`` overrides ``cfg.batch_size`` (a stage's own batch size). The evaluation loader
    draws ``seq_per_img`` references per image (for a validation loss) and never augments.
    """
    return {
        split: build_loader(
            cfg,
            location,
            split,
            train=train,
            dist=dist,
            image_size=image_size,
            seed=seed,
            batch_size=batch_size,
            device=device,
        )
        for split, train in ((train_split, True), (eval_split, False))
    }


def count_batches(
    location: str,
    split: str,
    *,
    train: bool,
    batch_size: int,
    num_workers: int,
    dist: DistInfo,
) -> int:
    """Batches rank ``dist.rank`` yields per epoch, from sizes.json alone (no shard is opened)."""
    plan = plan_epoch(
        split_sizes(read_sizes(location), split),
        train=train,
        batch_size=batch_size,
        num_workers=num_workers,
        world_size=dist.world_size,
        seed=0,
        epoch=0,
    )
    return plan.batches_for_rank(dist.rank)
