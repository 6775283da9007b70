"""Raw dataset -> records -> vocabulary -> WebDataset shards + manifest: the data half of the DAG.

``prepare_data(cfg)`` is what ``captioning shards`` and the ``prepare-data`` flow run; each step is
also a function of its own (``fetch``, ``build_records``, ``build_vocabulary``, ``build_shards``) so
the Prefect tasks can wrap them one by one::

    cfg = load_config("demo")
    result = prepare_data(cfg)          # re-running on unchanged inputs skips every finished shard
    print(result.manifest.splits)

``build_shards`` is itself three steps, so a flow can map the middle one over groups of shards::

    plan = plan_shards_for(records, vocab, raw, cfg)
    results = [write_shard_group_for(group, cfg) for group in plan.groups(4)]   # one task each
    manifest = finish_shards(plan, vocab, results)

The shard location is ``cfg.data.shard_dir`` (a local folder or ``s3://bucket/prefix``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from captioning.config import Config
from captioning.data.download import RawDataset, build_raw_dataset
from captioning.data.records import ImageRecord, KarpathyDataset, read_karpathy
from captioning.data.shards import (
    ShardGroupResult,
    ShardJob,
    ShardManifest,
    ShardPlan,
    finish_shard_build,
    plan_shard_build,
    write_shard_group,
)
from captioning.data.vocab import LengthStats, Vocab, apply_length_policy, build_vocab


def shard_fingerprint(cfg: Config) -> str:
    """Hash of every setting that changes shard bytes (not download or loader settings)."""
    sections = [
        "data.dataset",
        "data.restval_split",
        "data.min_word_freq",
        "data.max_caption_len",
        "data.overlong_captions",
        "data.shards.image_size",
        "data.shards.resize_mode",
        "data.shards.jpeg_quality",
        "data.shards.samples_per_shard",
        "data.shards.max_image_pixels",
    ]
    if cfg.data.dataset == "synthetic":
        sections.append("data.synthetic")
    if cfg.data.dataset == "local":
        sections.append("data.local")
    return cfg.fingerprint(*sections)


def fetch(cfg: Config, *, progress: bool = True) -> RawDataset:
    """Download (or generate, or take from a local archive) the raw dataset into data.raw_dir.

    dataset=local fetches nothing: data.local names a Karpathy-format split file and its images.
    """
    return build_raw_dataset(cfg.data, progress=progress)


def build_records(karpathy_json: Path, cfg: Config) -> KarpathyDataset:
    """Read and validate the Karpathy split file (restval mapped per data.restval_split)."""
    return read_karpathy(karpathy_json, restval_split=cfg.data.restval_split)


def build_vocabulary(dataset: KarpathyDataset, cfg: Config) -> tuple[Vocab, LengthStats]:
    """Vocabulary from the train split after the caption length policy."""
    train, stats = apply_length_policy(
        dataset.split("train"), max_caption_len=cfg.data.max_caption_len, overlong=cfg.data.overlong_captions
    )
    return build_vocab(train, min_word_freq=cfg.data.min_word_freq), stats


def plan_shards_for(
    records: list[ImageRecord], vocab: Vocab, raw: RawDataset, cfg: Config, *, config_hash: str | None = None
) -> ShardPlan:
    """Plan the shard build into data.shard_dir with data.shards' image settings (see plan_shard_build).

    The manifest records ``config_hash``: ``shard_fingerprint(cfg)`` unless another key is given.
    """
    sh = cfg.data.shards
    return plan_shard_build(
        records,
        vocab,
        raw.images,
        cfg.data.shard_dir,
        image_size=sh.image_size,
        resize_mode=sh.resize_mode,
        jpeg_quality=sh.jpeg_quality,
        samples_per_shard=sh.samples_per_shard,
        max_image_pixels=sh.max_image_pixels,
        max_caption_len=cfg.data.max_caption_len,
        overlong=cfg.data.overlong_captions,
        config_hash=shard_fingerprint(cfg) if config_hash is None else config_hash,
    )


def write_shard_group_for(
    jobs: Sequence[ShardJob], cfg: Config, *, progress: bool = True
) -> ShardGroupResult:
    """Write one group of a plan's shards with data.shards' num_procs, executor and dask_address."""
    sh = cfg.data.shards
    return write_shard_group(
        jobs, num_procs=sh.num_procs, executor=sh.executor, dask_address=sh.dask_address, progress=progress
    )


def finish_shards(
    plan: ShardPlan, vocab: Vocab, results: Sequence[ShardGroupResult], *, start: float | None = None
) -> ShardManifest:
    """Write sizes.json, references.json, vocab.json and manifest.json once every group is written."""
    return finish_shard_build(plan, vocab, results, start=start)


def build_shards(
    records: list[ImageRecord], vocab: Vocab, raw: RawDataset, cfg: Config, *, progress: bool = True
) -> ShardManifest:
    """Write the shards and the manifest to data.shard_dir: plan, every job as one group, finish."""
    start = time.perf_counter()
    plan = plan_shards_for(records, vocab, raw, cfg)
    result = write_shard_group_for(plan.jobs, cfg, progress=progress)
    return finish_shards(plan, vocab, [result], start=start)


@dataclass(frozen=True)
class PrepareResult:
    """What ``prepare_data`` produced."""

    shard_dir: str
    karpathy_json: str
    vocab_size: int
    length_policy: dict[str, int]
    manifest: ShardManifest


def prepare_data(cfg: Config, *, progress: bool = True) -> PrepareResult:
    """fetch -> records -> vocabulary -> shards + manifest, for cfg.data."""
    raw = fetch(cfg, progress=progress)
    dataset = build_records(raw.karpathy_json, cfg)
    vocab, stats = build_vocabulary(dataset, cfg)
    manifest = build_shards(list(dataset.records), vocab, raw, cfg, progress=progress)
    return PrepareResult(
        shard_dir=cfg.data.shard_dir,
        karpathy_json=str(raw.karpathy_json),
        vocab_size=len(vocab),
        length_policy=asdict(stats),
        manifest=manifest,
    )
