"""One shard: the jobs a build is cut into, and writing one shard (or recognising it as complete).

    jobs, length_stats = plan_shards(records, vocab, source, "data/shards", settings=settings,
                                     samples_per_shard=1000, max_caption_len=50, overlong="drop")
    stats = completed_stats(jobs[0]) or write_shard(jobs[0])

``plan_shards`` splits records by split (file order kept) into small, picklable ``ShardJob``s, each
carrying a hash of what decides its bytes. ``write_shard`` writes a job's tar in the format of
``captioning.data.format`` under a hidden temporary name and renames it, then its stats (which carry
the tar's sha256 and the job hash) the same way; ``completed_stats`` returns those stats only when
they match the job and the tar's bytes, so a build killed at any moment and re-run gives the same
bytes as an uninterrupted one. Tars are byte-reproducible: fixed member order, mtime, owner and
mode, and deterministic image bytes (``captioning.data.images``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

from captioning import storage
from captioning.data.format import (
    FORMAT_VERSION,
    ShardStats,
    read_json_or_none,
    sha256_file,
    shard_name,
    write_stable_json,
)
from captioning.data.images import ImageSettings, ImageSkipped, prepare_image
from captioning.data.records import SPLITS, ImageRecord
from captioning.data.sources import ImageSource, UnreadableImage
from captioning.data.vocab import LengthStats, Vocab, apply_length_policy

# Fixed tar header fields, so the same samples always give the same bytes.
_TAR_MTIME = 0
_TAR_MODE = 0o444


# ------------------------------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class ShardCaption:
    """One reference caption as stored: raw text, tokens, and ids with <start>/<end>."""

    raw: str
    tokens: tuple[str, ...]
    ids: tuple[int, ...]


@dataclass(frozen=True)
class ShardItem:
    """One image of a shard job; no captions means it is skipped as "no_captions"."""

    image_id: int
    split: str
    path: str
    captions: tuple[ShardCaption, ...]


@dataclass(frozen=True)
class ShardJob:
    """Everything one worker needs to write one shard (small and picklable: one shard's records)."""

    split: str
    index: int
    items: tuple[ShardItem, ...]
    source: ImageSource
    out: str  # the output location: local folder or s3://bucket/prefix
    settings: ImageSettings
    job_hash: str  # sha256 of what decides the shard's bytes (items + settings), stored in the stats

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def tar_name(self) -> str:
        return f"{self.name}.tar"

    @property
    def stats_name(self) -> str:
        return f"{self.name}.stats.json"


# --------------------------------------------------------------------------------------- plan


def plan_shards(
    records: Iterable[ImageRecord],
    vocab: Vocab,
    source: ImageSource,
    out: str,
    *,
    settings: ImageSettings,
    samples_per_shard: int,
    max_caption_len: int,
    overlong: str,
) -> tuple[list[ShardJob], LengthStats]:
    """Split records by split (file order kept) into shard jobs; apply the length policy to train.

    Train images left without captions by the policy stay in their job and are skipped there as
    "no_captions", so shard k always covers the same records whatever the policy does.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    by_split: dict[str, list[ImageRecord]] = {split: [] for split in SPLITS}
    seen: set[int] = set()
    for record in records:
        if record.split not in by_split:
            raise ValueError(
                f"record {record.image_id} has split {record.split!r}; valid splits: {', '.join(SPLITS)}"
            )
        if record.image_id in seen:
            raise ValueError(f"duplicate image id {record.image_id}: shard keys must be unique")
        seen.add(record.image_id)
        by_split[record.split].append(record)

    kept, length_stats = apply_length_policy(
        by_split["train"], max_caption_len=max_caption_len, overlong=overlong
    )
    train_captions = {record.image_id: record.captions for record in kept}

    jobs: list[ShardJob] = []
    for split in SPLITS:
        items = []
        for record in by_split[split]:
            captions = train_captions.get(record.image_id, ()) if split == "train" else record.captions
            items.append(
                ShardItem(
                    image_id=record.image_id,
                    split=split,
                    path=record.path,
                    captions=tuple(
                        ShardCaption(
                            raw=c.raw,
                            tokens=tuple(c.tokens),
                            ids=tuple(vocab.encode(c.tokens, max_len=max_caption_len)),
                        )
                        for c in captions
                    ),
                )
            )
        for index, begin in enumerate(range(0, len(items), samples_per_shard)):
            chunk = tuple(items[begin : begin + samples_per_shard])
            jobs.append(
                ShardJob(
                    split=split,
                    index=index,
                    items=chunk,
                    source=source,
                    out=out,
                    settings=settings,
                    job_hash=_job_hash(shard_name(split, index), chunk, settings),
                )
            )
    return jobs, length_stats


def _job_hash(name: str, items: Sequence[ShardItem], settings: ImageSettings) -> str:
    """sha256 of everything that decides a shard's bytes apart from the image files themselves."""
    payload = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "settings": asdict(settings),
        "items": [
            [
                item.image_id,
                item.split,
                item.path,
                [[c.raw, list(c.tokens), list(c.ids)] for c in item.captions],
            ]
            for item in items
        ],
    }
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


# ---------------------------------------------------------------------------------- one shard


def write_shard(job: ShardJob) -> ShardStats:
    """Write one shard (tar, then stats, each atomically) and return its stats.

    Unreadable or undecodable images are skipped and counted (damaged archive members too, their
    detail naming the archive); only other errors of the source (and output I/O errors) raise.
    With an s3:// output the tar is built in a local staging folder, uploaded, and the staging
    folder removed.
    """
    start = time.perf_counter()
    remote = storage.is_s3(job.out)
    staging = tempfile.mkdtemp(prefix="shard-") if remote else job.out
    if not remote:
        os.makedirs(staging, exist_ok=True)
    tmp_path = os.path.join(staging, _tmp_name(job.tar_name))
    failures: Counter[str] = Counter()
    converted: Counter[str] = Counter()
    failed: list[dict[str, Any]] = []
    count = 0
    try:
        with open(tmp_path, "wb") as raw:
            sink = _HashingWriter(raw)
            # Stream mode ("w|") writes straight through the hashing sink; same bytes as mode "w".
            with tarfile.open(fileobj=sink, mode="w|", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
                for item in job.items:
                    try:
                        jpeg, meta, conversions = _make_sample(item, job.source, job.settings)
                    except ImageSkipped as e:
                        failures[e.reason] += 1
                        failed.append(
                            {
                                "image_id": item.image_id,
                                "path": item.path,
                                "reason": e.reason,
                                "detail": e.detail,
                            }
                        )
                        continue
                    key = f"{item.image_id:012d}"
                    _add_member(tar, f"{key}.jpg", jpeg)  # members sorted by extension, as TarWriter does
                    _add_member(tar, f"{key}.json", meta)
                    converted.update(conversions)
                    count += 1
            raw.flush()
            os.fsync(raw.fileno())
        final_path = os.path.join(staging, job.tar_name)
        os.replace(tmp_path, final_path)
        stats = ShardStats(
            shard=job.tar_name,
            split=job.split,
            count=count,
            failures=dict(sorted(failures.items())),
            failed=failed,
            converted=dict(sorted(converted.items())),
            sha256=sink.sha256.hexdigest(),
            bytes=sink.size,
            duration_s=round(time.perf_counter() - start, 3),
            job_hash=job.job_hash,
        )
        if remote:
            storage.upload_file(final_path, storage.join(job.out, job.tar_name))
            os.remove(final_path)
        # The stats go last: stats present and matching means the tar is complete.
        write_stable_json(storage.join(job.out, job.stats_name), stats.to_json())
        return stats
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if remote:
            shutil.rmtree(staging, ignore_errors=True)


def _make_sample(
    item: ShardItem, source: ImageSource, settings: ImageSettings
) -> tuple[bytes, bytes, tuple[str, ...]]:
    """(jpeg, json bytes, conversions) for one image; raises ImageSkipped when it cannot be stored."""
    if not item.captions:
        raise ImageSkipped("no_captions", "every caption was dropped by the length policy")
    try:
        data = source.read(item.path)
    except FileNotFoundError as e:
        raise ImageSkipped("missing", str(e)) from None
    except UnreadableImage as e:  # a damaged archive member: this image only, with the archive named
        raise ImageSkipped(e.reason, e.detail) from None
    image = prepare_image(data, settings)
    meta = {
        "image_id": item.image_id,
        "split": item.split,
        "path": item.path,
        "orig_size": list(image.orig_size),
        "captions": [{"raw": c.raw, "tokens": list(c.tokens), "ids": list(c.ids)} for c in item.captions],
    }
    text = json.dumps(meta, ensure_ascii=False, separators=(",", ":"))
    return image.jpeg, text.encode("utf-8"), image.conversions


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _TAR_MTIME
    info.mode = _TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through to the real file."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._file.write(data)


def completed_stats(job: ShardJob) -> ShardStats | None:
    """The stats of a finished shard for exactly this job, or None when it must be (re)built."""
    data = read_json_or_none(storage.join(job.out, job.stats_name))
    if data is None:
        return None
    try:
        stats = ShardStats.from_json(data)
    except ValueError:
        return None
    if stats.job_hash != job.job_hash or stats.shard != job.tar_name:
        return None
    tar_uri = storage.join(job.out, job.tar_name)
    try:
        if storage.size(tar_uri) != stats.bytes:
            return None
    except FileNotFoundError:
        return None
    if storage.is_s3(job.out):
        # Remote stats are uploaded only after their tar, so they vouch for it (no download).
        return stats
    return stats if sha256_file(tar_uri) == stats.sha256 else None


def _tmp_name(name: str) -> str:
    return f".{name}.{uuid.uuid4().hex}.tmp"
