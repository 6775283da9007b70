"""Raw dataset -> records -> vocabulary -> WebDataset shards + manifest: the data half of the DAG.

``prepare_data(cfg)`` is what ``captioning shards`` and ``captioning demo`` run; the ``prepare-data``
flow runs the same steps one task each (``fetch``, ``build_records``, ``build_vocabulary``,
``build_key`` + ``up_to_date_manifest``, then plan / write groups / finish)::

    cfg = load_config("demo")
    result = prepare_data(cfg)          # nothing is rebuilt when the manifest records this build key
    print(result.manifest.splits, result.summary["num_built"])

The build key (``build_key``) is what decides a shard build, the same for the command line and the
flow: every setting that changes shard bytes, the split file's bytes and the vocabulary. It is
recorded as the manifest's ``config_hash``; a build whose manifest holds the key and whose shards all
have their recorded sizes is up to date (``up_to_date_manifest``) and is not touched. Otherwise the
build runs; complete shards are skipped, so an interrupted build resumes::

    plan = plan_shards_for(records, vocab, raw, cfg)          # key: build_key(cfg, split file, vocab)
    results = [write_shard_group_for(group, cfg) for group in plan.groups(4)]   # one task each
    manifest = finish_shards(plan, vocab, results)

The shard location is ``cfg.data.shard_dir`` (a local folder or ``s3://bucket/prefix``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from captioning import storage
from captioning.config import Config, apply_overrides
from captioning.data.datasets import RawDataset, build_raw_dataset
from captioning.data.format import MANIFEST_FILE, ShardManifest, SplitSummary, read_sizes, sha256_file
from captioning.data.records import ImageRecord, KarpathyDataset, read_karpathy
from captioning.data.shard_build import (
    ShardGroupResult,
    ShardPlan,
    finish_shard_build,
    plan_shard_build,
    write_shard_group,
)
from captioning.data.shard_writer import ShardJob
from captioning.data.vocab import LengthStats, Vocab, apply_length_policy, build_vocab


def settings_fingerprint(cfg: Config) -> str:
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


def build_key(cfg: Config, karpathy_json: str | os.PathLike[str], vocab: Vocab) -> str:
    """What decides a shard build: the shard settings, the split file's bytes and the vocabulary.

    Recorded as the manifest's ``config_hash``; image bytes are not hashed (too costly for COCO) - a
    dataset whose images change under an unchanged split file needs a new ``data.shard_dir``.
    """
    payload = {
        "settings": settings_fingerprint(cfg),
        "karpathy_json": sha256_file(karpathy_json),
        "vocab": hashlib.sha256(json.dumps(vocab.to_json(), sort_keys=True).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def up_to_date_manifest(shard_dir: str, key: str) -> dict[str, Any] | None:
    """The finished build's manifest when it was made with ``key`` and every shard it lists is there
    as the manifest says: its stats file records the manifest's sha256 for it, and the tar has the
    size the stats record (a stat and a small read per shard, no hashing); else None.

    Sizes, not mtimes: a copied shard folder stays up to date. The stats' sha256 catches a rebuild
    that wrote new shards but was stopped before it wrote their manifest. A manifest without a
    ``holdout`` (older builds) is not up to date: the build then skips every complete shard and
    rewrites only the metadata."""
    try:
        manifest = storage.read_json(storage.join(shard_dir, MANIFEST_FILE))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("config_hash") != key:
        return None
    holdout = manifest.get("holdout")
    if not isinstance(holdout, dict) or not holdout.get("id"):  # from before holdout ids: finish it again
        return None
    for tar_name, sha256 in (manifest.get("shards") or {}).items():
        stem = tar_name.removesuffix(".tar")
        try:
            stats = storage.read_json(storage.join(shard_dir, f"{stem}.stats.json"))
            if stats.get("sha256") != sha256:
                return None
            if storage.size(storage.join(shard_dir, tar_name)) != stats.get("bytes"):
                return None
        except (FileNotFoundError, ValueError, AttributeError):
            return None
    return manifest


def kept_manifest(shard_dir: str, manifest: dict[str, Any], duration_s: float = 0.0) -> ShardManifest:
    """The ShardManifest of a build found up to date (nothing built, every shard kept)."""
    return ShardManifest(
        out=shard_dir,
        config_hash=manifest["config_hash"],
        vocab_sha256=manifest["vocab_sha256"],
        splits={name: SplitSummary(**split) for name, split in manifest["splits"].items()},
        shards=dict(manifest["shards"]),
        sizes=read_sizes(shard_dir),
        length_policy=dict(manifest["length_policy"]),
        image=dict(manifest["image"]),
        samples_per_shard=int(manifest["samples_per_shard"]),
        num_built=0,
        num_skipped=len(manifest["shards"]),
        duration_s=duration_s,
        holdout=dict(manifest["holdout"]),
    )


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
    records: list[ImageRecord], vocab: Vocab, raw: RawDataset, cfg: Config, *, key: str | None = None
) -> ShardPlan:
    """Plan the shard build into data.shard_dir with data.shards' image settings (see plan_shard_build);
    the manifest records ``key`` (default: ``build_key`` of these inputs)."""
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
        config_hash=build_key(cfg, raw.karpathy_json, vocab) if key is None else key,
    )


def group_config(cfg: Config, num_groups: int) -> Config:
    """Shard groups are written at the same time: split the process pool between them (a Dask
    cluster schedules for itself, so its settings stay)."""
    sh = cfg.data.shards
    if sh.executor != "process" or num_groups <= 1:
        return cfg
    total = sh.num_procs or len(os.sched_getaffinity(0))
    return apply_overrides(cfg, {"data.shards.num_procs": str(max(1, total // num_groups))})


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


def manifest_summary(
    shard_dir: str, manifest: Mapping[str, Any], *, num_built: int = 0, num_skipped: int | None = None
) -> dict[str, Any]:
    """What a prepare run reports: samples and skipped images per split, shards built or kept
    (``num_skipped`` defaults to every shard: nothing was rebuilt)."""
    splits = manifest.get("splits") or {}
    kept = len(manifest.get("shards") or {}) if num_skipped is None else num_skipped
    return {
        "shard_dir": shard_dir,
        "build_key": manifest.get("config_hash"),
        "rebuilt": num_skipped is not None,
        "num_built": num_built,
        "num_skipped": kept,
        "samples": {split: v.get("num_samples", 0) for split, v in splits.items()},
        "skipped_images": {split: v.get("failures", {}) for split, v in splits.items()},
    }


def data_report(summary: Mapping[str, Any]) -> str:
    """Markdown for the orchestrator's UI: samples and skipped images per split."""
    lines = [
        f"Shards in `{summary.get('shard_dir')}`: "
        + (
            f"{summary['num_built']} built, {summary['num_skipped']} kept"
            if summary.get("rebuilt")
            else "up to date"
        ),
        "",
        "| split | samples | skipped images |",
        "|---|---|---|",
    ]
    for split, count in (summary.get("samples") or {}).items():
        skipped = (summary.get("skipped_images") or {}).get(split) or {}
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
        lines.append(f"| {split} | {count} | {reasons} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class PrepareResult:
    """What ``prepare_data`` produced (or found up to date)."""

    shard_dir: str
    karpathy_json: str
    vocab_size: int
    length_policy: dict[str, int]
    manifest: ShardManifest
    summary: dict[str, Any]  # manifest_summary: samples per split, shards built or kept


def prepare_data(cfg: Config, *, progress: bool = True, vocab: Vocab | None = None) -> PrepareResult:
    """fetch -> records -> vocabulary (or ``vocab``: a model's own) -> shards + manifest, for cfg.data.

    Nothing is written when the manifest already records this build key and every shard is complete.
    """
    start = time.perf_counter()
    raw = fetch(cfg, progress=progress)
    dataset = build_records(raw.karpathy_json, cfg)
    built_vocab, stats = build_vocabulary(dataset, cfg)
    vocab = vocab or built_vocab
    key = build_key(cfg, raw.karpathy_json, vocab)
    found = up_to_date_manifest(cfg.data.shard_dir, key)
    if found is not None:
        manifest = kept_manifest(cfg.data.shard_dir, found, time.perf_counter() - start)
        summary = manifest_summary(cfg.data.shard_dir, found)
    else:
        plan = plan_shards_for(list(dataset.records), vocab, raw, cfg, key=key)
        group = write_shard_group_for(plan.jobs, cfg, progress=progress)
        manifest = finish_shards(plan, vocab, [group], start=start)
        summary = manifest_summary(
            cfg.data.shard_dir,
            manifest.to_json(),
            num_built=manifest.num_built,
            num_skipped=manifest.num_skipped,
        )
    return PrepareResult(
        shard_dir=cfg.data.shard_dir,
        karpathy_json=str(raw.karpathy_json),
        vocab_size=len(vocab),
        length_policy=asdict(stats),
        manifest=manifest,
        summary=summary,
    )
