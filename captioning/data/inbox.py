"""Newly landed datasets: an inbox folder, the readiness rule, and the check done before announcing one.

A dataset lands as a folder holding a Karpathy-format split file (``dataset*.json``) and its images
(paths in the file are relative to the folder). Whoever copies it in writes ``READY`` last; the
watcher announces each ready folder once (``.announced.json`` records when and what) and the
announcement (the ``captioning.data.landed`` event, emitted by ``flows/watch.py``) starts retraining.

    for split_file in find_ready("data/inbox"):
        report = check_dataset(split_file)     # counts per split, missing images; errors name the entry
    overrides = new_data_overrides(cfg, split_file, None, ["train.xe.epochs=1"])   # its own shards
    dataset_label(split_file)                  # "2026-11": the landed folder's name, for people

Retraining reads the new data's shards and, by default (``data.retrain_on=all``), the existing
training shards too (``data.extra_shard_dirs``): the model learns the new data without forgetting
the old, and only the new part gets shards built. ``data.retrain_on=new`` trains on the new alone.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from captioning.config import Config, without_keys
from captioning.data.format import sha256_file
from captioning.data.records import read_karpathy

NEW_DATA_EVENT = "captioning.data.landed"
READY_FILE = "READY"
ANNOUNCED_FILE = ".announced.json"


def _dataset_json(folder: Path) -> Path | None:
    found = sorted(folder.glob("dataset*.json"))
    return found[0] if found else None


def dataset_id(karpathy_json: str | os.PathLike[str]) -> str:
    """A short stable id for a landed dataset: the start of its split file's sha256."""
    return sha256_file(karpathy_json)[:12]


def find_ready(inbox_dir: str | os.PathLike[str]) -> list[Path]:
    """Split files of inbox sub-folders that hold ``READY`` and were not announced yet, by name."""
    root = Path(inbox_dir)
    if not root.is_dir():
        return []
    ready = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        split_file = _dataset_json(folder)
        if (
            split_file is not None
            and (folder / READY_FILE).exists()
            and not (folder / ANNOUNCED_FILE).exists()
        ):
            ready.append(split_file)
    return ready


def check_dataset(karpathy_json: str | os.PathLike[str], image_dir: str | None = None) -> dict[str, Any]:
    """Validate a landed dataset; raises RecordsError (naming the entry) or FileNotFoundError.

    Returns what the announcement carries: a stable id (hash of the split file), absolute paths,
    images and captions per split, and how many image files are missing (they will be skipped and
    counted by the shard writer; the count is here so nobody is surprised).
    """
    path = Path(karpathy_json).resolve()
    images = Path(image_dir).resolve() if image_dir else path.parent
    dataset = read_karpathy(path)
    counts: dict[str, int] = {}
    captions = 0
    missing: list[str] = []
    for record in dataset.records:
        counts[record.split] = counts.get(record.split, 0) + 1
        captions += len(record.captions)
        if not (images / record.path).is_file():
            missing.append(record.path)
    return {
        "id": dataset_id(path),
        "karpathy_json": str(path),
        "image_dir": str(images),
        "counts": counts,
        "num_captions": captions,
        "num_missing_images": len(missing),
        "missing_examples": missing[:5],
    }


def mark_announced(karpathy_json: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """Record in the dataset's folder that it was announced (the watcher skips it from now on)."""
    marker = Path(karpathy_json).resolve().parent / ANNOUNCED_FILE
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps({"announced_at": time.time(), **report}, indent=1) + "\n")
    os.replace(tmp, marker)
    return marker


def dataset_label(karpathy_json: str | os.PathLike[str]) -> str:
    """What people call a landed dataset: its folder's name (``data/inbox/2026-11/...`` -> ``2026-11``)."""
    return Path(karpathy_json).resolve().parent.name or dataset_id(karpathy_json)


def new_data_overrides(
    cfg: Config, karpathy_json: str, image_dir: str | None, overrides: Sequence[str] | None
) -> list[str]:
    """The run's overrides plus a ``local`` dataset at ``karpathy_json`` with shards of its own
    (``{data.shard_dir}-new/{dataset id}``), so the original shards stay as they are. With
    ``data.retrain_on=all`` (the default) training also reads the original shards' train split
    (``data.extra_shard_dirs``: ``cfg``'s shard_dir and its own extra dirs); ``new``: none of them."""
    if not os.path.isfile(karpathy_json):
        raise FileNotFoundError(f"new data: no split file at {karpathy_json}")
    images = image_dir or os.path.dirname(os.path.abspath(karpathy_json))
    shard_dir = f"{cfg.data.shard_dir.rstrip('/')}-new/{dataset_id(karpathy_json)}"
    kept = without_keys(overrides, "data.dataset", "data.shard_dir", "data.local", "data.extra_shard_dirs")
    old = [cfg.data.shard_dir, *cfg.data.extra_shard_dirs] if cfg.data.retrain_on == "all" else []
    return [
        *kept,
        "--data.dataset=local",
        f"--data.local.karpathy_json={os.path.abspath(karpathy_json)}",
        f"--data.local.image_dir={images}",
        f"--data.shard_dir={shard_dir}",
        *([f"--data.extra_shard_dirs={','.join(old)}"] if old else []),
    ]
