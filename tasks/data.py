"""Data tasks: download -> records -> vocabulary -> shards (mapped over groups) -> manifest -> publish.

Each task is a few lines around one ``captioning`` call. I/O tasks retry; the shard build is skipped
as a whole when the manifest already records this build key (settings + split file + vocabulary),
and a re-run after a failure skips every complete shard, so finished work is never redone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from captioning import storage
from captioning.config import Config
from captioning.data import prepare
from captioning.data.datasets import RawDataset
from captioning.data.format import ShardManifest
from captioning.data.records import KarpathyDataset
from captioning.data.shard_build import ShardGroupResult, ShardPlan
from captioning.data.shard_writer import ShardJob
from captioning.data.vocab import Vocab
from captioning.model.checkpoint import vocab_of_checkpoint
from captioning.model_uri import resolve_model

RETRY_DELAYS_S: list[float] = [10, 60, 300]  # I/O tasks: three more attempts, backing off


@task(name="download-dataset", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=RETRY_DELAYS_S)
def download_dataset(cfg: Config) -> RawDataset:
    """Fetch (or generate) the raw dataset; verified files are not fetched again."""
    return prepare.fetch(cfg, progress=False)


@task(name="read-records", cache_policy=NO_CACHE)
def read_records(raw: RawDataset, cfg: Config) -> KarpathyDataset:
    """The split file, validated (a malformed entry is an error naming it)."""
    return prepare.build_records(raw.karpathy_json, cfg)


@task(name="build-vocabulary", cache_policy=NO_CACHE)
def build_vocabulary(dataset: KarpathyDataset, cfg: Config) -> Vocab:
    vocab, _ = prepare.build_vocabulary(dataset, cfg)
    return vocab


@task(name="vocabulary-of-checkpoint", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=RETRY_DELAYS_S)
def vocabulary_of_checkpoint(source: str) -> Vocab:
    """The vocabulary a model was trained with (any model source: a checkpoint path or s3:// URI,
    ``runs:/...``, ``models:/NAME@ALIAS``): new data for it is encoded with the same ids."""
    return vocab_of_checkpoint(resolve_model(source).checkpoint)


@task(name="check-shards", cache_policy=NO_CACHE)
def check_shards(cfg: Config, raw: RawDataset, vocab: Vocab) -> tuple[str, dict[str, Any] | None]:
    """(build key, the finished manifest when the shards are already built with it, else None)."""
    key = prepare.build_key(cfg, raw.karpathy_json, vocab)
    return key, prepare.up_to_date_manifest(cfg.data.shard_dir, key)


@task(name="plan-shards", cache_policy=NO_CACHE)
def plan_shards(dataset: KarpathyDataset, vocab: Vocab, raw: RawDataset, cfg: Config, key: str) -> ShardPlan:
    return prepare.plan_shards_for(list(dataset.records), vocab, raw, cfg, key=key)


@task(name="write-shards", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=30)
def write_shards(jobs: Sequence[ShardJob], cfg: Config) -> ShardGroupResult:
    """One group of shards; complete ones are skipped, so a retry resumes."""
    return prepare.write_shard_group_for(jobs, cfg, progress=False)


@task(name="finish-shards", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=RETRY_DELAYS_S)
def finish_shards(plan: ShardPlan, vocab: Vocab, results: Sequence[ShardGroupResult]) -> ShardManifest:
    """sizes.json, references.json, vocab.json and, last, manifest.json."""
    return prepare.finish_shards(plan, vocab, results)


@task(name="publish-shards", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=RETRY_DELAYS_S)
def publish_shards(shard_dir: str, destination: str) -> dict[str, int]:
    """Copy a finished shard folder to ``destination`` (s3://...); files already there are skipped."""
    return storage.sync_tree(shard_dir, destination)
