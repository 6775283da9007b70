"""Raw dataset -> records -> vocabulary -> WebDataset shards + manifest: the data half of the DAG.

``prepare_data(cfg)`` is what ``captioning shards`` and the ``prepare-data`` flow run; each step is
also a function of its own (``fetch``, ``build_records``, ``build_vocabulary``, ``build_shards``) so
the Prefect tasks can wrap them one by one::

    cfg = load_config("demo")
    result = prepare_data(cfg)          # re-running on unchanged inputs skips every finished shard
    print(result.manifest["splits"])

The shard location is ``cfg.data.shard_dir`` (a local folder or ``s3://bucket/prefix``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from captioning.config import Config
from captioning.data.download import RawDataset, fetch_dataset
from captioning.data.records import ImageRecord, KarpathyDataset, read_karpathy
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
    return cfg.fingerprint(*sections)


def fetch(cfg: Config) -> RawDataset:
    """Download (or generate, or take from a local archive) the raw dataset into data.raw_dir."""
    d = cfg.data
    s = d.synthetic
    return fetch_dataset(
        d.dataset,
        Path(d.raw_dir),
        base_url=d.download.base_url,
        flickr30k_archive=Path(d.download.flickr30k_archive) if d.download.flickr30k_archive else None,
        num_retries=d.download.num_retries,
        timeout_s=d.download.timeout_s,
        verify_checksums=d.download.verify_checksums,
        synthetic=dict(
            num_train=s.num_train,
            num_val=s.num_val,
            num_test=s.num_test,
            num_restval=s.num_restval,
            image_size=s.image_size,
            captions_per_image=s.captions_per_image,
            style=s.style,
            seed=s.seed,
        ),
    )


def build_records(karpathy_json: Path, cfg: Config) -> KarpathyDataset:
    """Read and validate the Karpathy split file (restval mapped per data.restval_split)."""
    return read_karpathy(karpathy_json, restval_split=cfg.data.restval_split)


def build_vocabulary(dataset: KarpathyDataset, cfg: Config) -> tuple[Vocab, LengthStats]:
    """Vocabulary from the train split after the caption length policy."""
    train, stats = apply_length_policy(
        dataset.split("train"), max_caption_len=cfg.data.max_caption_len, overlong=cfg.data.overlong_captions
    )
    return build_vocab(train, min_word_freq=cfg.data.min_word_freq), stats


def build_shards(
    records: list[ImageRecord], vocab: Vocab, raw: RawDataset, cfg: Config, *, progress: bool = True
) -> Any:
    """Write the shards and the manifest (sizes.json, vocab.json, manifest.json) to data.shard_dir."""
    from captioning.data.shards import write_shards

    sh = cfg.data.shards
    return write_shards(
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
        num_procs=sh.num_procs,
        config_hash=shard_fingerprint(cfg),
        progress=progress,
    )


@dataclass(frozen=True)
class PrepareResult:
    """What ``prepare_data`` produced."""

    shard_dir: str
    karpathy_json: str
    vocab_size: int
    length_policy: dict[str, int]
    manifest: Any


def prepare_data(cfg: Config, *, progress: bool = True) -> PrepareResult:
    """fetch -> records -> vocabulary -> shards + manifest, for cfg.data."""
    raw = fetch(cfg)
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
