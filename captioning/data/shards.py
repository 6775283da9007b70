"""Write Karpathy records as WebDataset shards (local or s3://), resumably, in parallel; verify and inspect them.

Usage::

    manifest = write_shards(dataset.records, vocab, DirSource("data/raw"), "data/shards",
                            image_size=256, resize_mode="squash", num_procs=0)
    manifest.num_built, manifest.num_skipped          # a re-run of a finished build skips every shard
    problems = verify_shards("data/shards")           # [] when every tar matches its sha256
    report = inspect_shards("data/shards", split="val", n=2)

``write_shards`` is three public steps, so an orchestrator can map the middle one over groups of
shards (one task per group, on any machine that reaches the output location)::

    plan = plan_shard_build(dataset.records, vocab, source, "s3://bucket/shards", image_size=256)
    results = [write_shard_group(group, num_procs=4) for group in plan.groups(8)]   # picklable
    manifest = finish_shard_build(plan, vocab, results)   # ShardError if a group is missing

The format (a contract with the loader). One sample per image, key ``f"{image_id:012d}"``, members
``KEY.jpg`` (the resized RGB JPEG) and ``KEY.json``::

    {"image_id": int, "split": str, "path": str, "orig_size": [w, h],
     "captions": [{"raw": str, "tokens": [str], "ids": [int]}, ...]}    # every reference caption

``ids = vocab.encode(tokens, max_len=max_caption_len)`` (``<start> ... <end>``). The train split
goes through ``apply_length_policy`` first (overlong captions dropped or truncated, counted); val and
test keep every reference. Under the output location: ``{split}-{index:06d}.tar`` holding the split's
records ``[index*n, (index+1)*n)`` in file order (images that fail are skipped, so a shard can hold
fewer), ``{split}-{index:06d}.stats.json`` next to each, and at the end ``sizes.json``,
``references.json``, ``vocab.json`` and ``manifest.json`` (written last: its presence means the
build finished).

Resumable and atomic: a tar is written under a hidden temporary name and renamed, then its stats
(which carry the tar's sha256 and a hash of the job that made it) are written the same way; a
shard whose stats match its job and its bytes is not rebuilt, so a build killed at any moment and
re-run gives the same bytes as an uninterrupted one. Tars are byte-reproducible: fixed member order,
mtime, owner and mode, and deterministic image bytes (``captioning.data.images``). One build per
output location at a time (the groups of that one build may run at once: they share no file).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from PIL import Image
from tqdm import tqdm

from captioning import storage
from captioning.data.images import ImageSettings, ImageSkipped, prepare_image
from captioning.data.records import SPLITS, ImageRecord
from captioning.data.sources import ImageSource
from captioning.data.vocab import LengthStats, Vocab, apply_length_policy

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SIZES_FILE, VOCAB_FILE, MANIFEST_FILE = "sizes.json", "vocab.json", "manifest.json"
REFERENCES_FILE = "references.json"  # split -> image id -> every stored caption's ids (SCST's CIDEr-D corpus)
Executor = Literal["process", "dask"]

# Fixed tar header fields, so the same samples always give the same bytes.
_TAR_MTIME = 0
_TAR_MODE = 0o444
# Hidden temporaries a killed build may leave: ".train-000003.tar.<hex>.tmp" (write_shard),
# ".sizes.json.<random>.tmp" (storage's atomic writes), ".vocab-<random>.tmp" (Vocab.save).
_TMP_PATTERN = re.compile(
    r"^\.(?:[a-z]+-\d{6}\.(?:tar|stats\.json)|sizes\.json|manifest\.json|vocab\.json|references\.json)\..+\.tmp$"
    r"|^\.vocab-.+\.tmp$"
)
_SHARD_FILE_PATTERN = re.compile(r"^[a-z]+-\d{6}\.(?:tar|stats\.json)$")
_HASH_CHUNK = 1 << 20


class ShardError(RuntimeError):
    """Some shards could not be built (I/O errors, crashed workers); the message names each."""


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


@dataclass
class ShardStats:
    """What writing one shard did; saved as ``{split}-{index:06d}.stats.json`` next to the tar."""

    shard: str  # tar file name
    split: str
    count: int  # samples written
    failures: dict[str, int]  # skip reason -> images
    failed: list[dict[str, Any]]  # {"image_id", "path", "reason", "detail"} per skipped image
    converted: dict[str, int]  # conversion (cmyk, grayscale, ...) -> images
    sha256: str
    bytes: int
    duration_s: float
    job_hash: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ShardStats:
        """Rebuild from ``to_json`` output; raises ValueError when a field is missing or mistyped."""
        if not isinstance(data, dict):
            raise ValueError(f"shard stats must be a JSON object, got {type(data).__name__}")
        try:
            stats = cls(**{f: data[f] for f in cls.__dataclass_fields__})
        except KeyError as e:
            raise ValueError(f"shard stats are missing field {e}") from None
        if not isinstance(stats.sha256, str) or not isinstance(stats.bytes, int):
            raise ValueError("shard stats have a malformed sha256 or bytes field")
        return stats


@dataclass(frozen=True)
class SplitSummary:
    """Per-split totals of a build."""

    num_samples: int
    num_shards: int
    failures: dict[str, int]
    converted: dict[str, int]


@dataclass(frozen=True)
class ShardManifest:
    """What a build (``write_shards``, ``finish_shard_build``) produced; ``to_json()`` is manifest.json."""

    out: str
    config_hash: str
    vocab_sha256: str
    splits: dict[str, SplitSummary]
    shards: dict[str, str]  # tar name -> sha256
    sizes: dict[str, dict[str, int]]  # split -> tar name -> samples (the content of sizes.json)
    length_policy: dict[str, Any]
    image: dict[str, Any]  # the ImageSettings used
    samples_per_shard: int
    num_built: int  # shards written by this call
    num_skipped: int  # shards found complete and left alone
    duration_s: float
    stats: dict[str, ShardStats] = field(repr=False, default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "config_hash": self.config_hash,
            "vocab_sha256": self.vocab_sha256,
            "splits": {name: asdict(summary) for name, summary in self.splits.items()},
            "shards": self.shards,
            "length_policy": self.length_policy,
            "image": self.image,
            "samples_per_shard": self.samples_per_shard,
        }


def shard_name(split: str, index: int) -> str:
    """``train-000003``: the stem of a shard's tar and stats files."""
    return f"{split}-{index:06d}"


# ---------------------------------------------------------------------------------- one shard


def write_shard(job: ShardJob) -> ShardStats:
    """Write one shard (tar, then stats, each atomically) and return its stats.

    Unreadable or undecodable images are skipped and counted; only errors of the source other than
    FileNotFoundError (and output I/O errors) raise. With an s3:// output the tar is built in a
    local staging folder, uploaded, and the staging folder removed.
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
        _write_json(storage.join(job.out, job.stats_name), stats.to_json())
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


# -------------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class ShardPlan:
    """Every shard job of one build and the settings the manifest records (picklable).

    ``plan_shard_build`` makes it; ``groups(n)`` splits the jobs for ``write_shard_group`` calls that
    may run anywhere (one Prefect task each); ``finish_shard_build`` turns their results into the
    manifest.
    """

    out: str
    jobs: tuple[ShardJob, ...]
    settings: ImageSettings
    samples_per_shard: int
    length_policy: dict[str, Any]  # applies_to, max_caption_len, overlong, and the LengthStats counts
    config_hash: str

    def groups(self, num_groups: int) -> list[tuple[ShardJob, ...]]:
        """The jobs in at most ``num_groups`` contiguous, non-empty groups whose sizes differ by <= 1.

        Deterministic: the same plan and ``num_groups`` always give the same groups, in job order
        (the first ``len(jobs) % k`` groups hold one job more). No jobs give no groups.
        """
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        k = min(num_groups, len(self.jobs))
        if k == 0:
            return []
        size, extra = divmod(len(self.jobs), k)
        groups = []
        begin = 0
        for g in range(k):
            end = begin + size + (1 if g < extra else 0)
            groups.append(self.jobs[begin:end])
            begin = end
        return groups


@dataclass(frozen=True)
class ShardGroupResult:
    """What ``write_shard_group`` did: the stats of every job of the group, built or found complete."""

    stats: dict[str, ShardStats]  # shard name ("train-000003") -> its stats, in job order
    num_built: int  # shards written by this call
    num_skipped: int  # shards found complete and left alone


def plan_shard_build(
    records: Iterable[ImageRecord],
    vocab: Vocab,
    source: ImageSource,
    out: str,
    *,
    image_size: int = 256,
    resize_mode: str = "squash",
    jpeg_quality: int = 90,
    samples_per_shard: int = 1000,
    max_image_pixels: int = 178_956_970,
    max_caption_len: int = 50,
    overlong: str = "drop",
    config_hash: str = "",
) -> ShardPlan:
    """Plan a build into ``out`` and make the location ready for ``write_shard_group`` calls.

    Validates the settings, splits the records into shard jobs (``plan_shards``), creates a local
    output folder and removes what a killed build left there, and removes manifest.json: its
    presence means "finished", and shards may change underneath it until ``finish_shard_build``.
    """
    out = os.fspath(out)
    settings = ImageSettings(
        size=image_size, resize_mode=resize_mode, jpeg_quality=jpeg_quality, max_image_pixels=max_image_pixels
    )
    jobs, length_stats = plan_shards(
        records,
        vocab,
        source,
        out,
        settings=settings,
        samples_per_shard=samples_per_shard,
        max_caption_len=max_caption_len,
        overlong=overlong,
    )
    if not storage.is_s3(out):
        os.makedirs(out, exist_ok=True)
        _clean_leftovers(out, planned={name for job in jobs for name in (job.tar_name, job.stats_name)})
    storage.remove(storage.join(out, MANIFEST_FILE))
    return ShardPlan(
        out=out,
        jobs=tuple(jobs),
        settings=settings,
        samples_per_shard=samples_per_shard,
        length_policy={
            "applies_to": ["train"],
            "max_caption_len": max_caption_len,
            "overlong": overlong,
            **asdict(length_stats),
        },
        config_hash=config_hash,
    )


def write_shard_group(
    jobs: Sequence[ShardJob],
    *,
    num_procs: int = 0,
    executor: Executor = "process",
    dask_address: str | None = None,
    progress: bool = True,
) -> ShardGroupResult:
    """Write the shards of ``jobs`` (one group of a ``ShardPlan``, or all of it); return their stats.

    Shards already complete (stats present, matching this job, tar sha256 matching) are skipped.
    The rest run in parallel through ``write_shard``: ``executor="process"`` uses a process pool of
    ``num_procs`` (0 = all cores; 1 runs in this process), ``"dask"`` a distributed Client at
    ``dask_address`` or, without one, a LocalCluster of ``num_procs`` single-threaded workers.
    Raises ShardError naming each failed shard after the group's other shards finished (a re-run
    resumes). Groups of one plan share nothing but the output location, so they may run at once.
    """
    _check_executor(executor, num_procs)
    jobs = list(jobs)
    done: dict[str, ShardStats] = {}
    todo: list[ShardJob] = []
    for job in jobs:
        stats = _completed_stats(job)
        if stats is None:
            todo.append(job)
        else:
            done[job.name] = stats
    num_skipped = len(done)
    if num_skipped:
        outs = ", ".join(sorted({job.out for job in jobs}))
        logger.info("%d of %d shards already complete in %s; skipping them", num_skipped, len(jobs), outs)

    errors: list[str] = []
    with tqdm(total=len(jobs), initial=num_skipped, desc="shards", unit="shard", disable=not progress) as bar:
        for job, result in _run(
            todo, num_procs=_resolve_procs(num_procs), executor=executor, dask_address=dask_address
        ):
            if isinstance(result, BaseException):
                errors.append(f"{job.tar_name}: {type(result).__name__}: {result}")
            else:
                done[job.name] = result
            bar.update(1)
    if errors:
        raise ShardError(
            f"{len(errors)} of {len(todo)} shards failed (re-run to resume): " + "; ".join(errors)
        )
    return ShardGroupResult(
        stats={job.name: done[job.name] for job in jobs}, num_built=len(todo), num_skipped=num_skipped
    )


def finish_shard_build(
    plan: ShardPlan, vocab: Vocab, results: Sequence[ShardGroupResult], *, start: float | None = None
) -> ShardManifest:
    """Merge the groups' results; write sizes.json, references.json, vocab.json and (last) manifest.json.

    Raises ShardError, writing nothing, when a planned shard has no stats in ``results`` (a group
    that was not written) or when a result's stats belong to another plan. ``num_built`` and
    ``num_skipped`` are the groups' sums. ``start`` is a ``time.perf_counter()`` reading taken in
    this process before planning; without it ``duration_s`` times this step alone.
    """
    start = time.perf_counter() if start is None else start
    planned = {job.name: job for job in plan.jobs}
    stats: dict[str, ShardStats] = {}
    foreign: list[str] = []
    for result in results:
        for name, shard in result.stats.items():
            job = planned.get(name)
            if job is None or shard.job_hash != job.job_hash:
                foreign.append(name)
            else:
                stats[name] = shard
    if foreign:
        raise ShardError(
            f"{len(foreign)} shard results are not part of this plan (another build's groups?): "
            + _name_list(sorted(set(foreign)))
        )
    missing = [job.name for job in plan.jobs if job.name not in stats]
    if missing:
        raise ShardError(
            f"{len(missing)} of {len(plan.jobs)} planned shards have no stats (a group was not "
            "written?): " + _name_list(missing)
        )
    manifest = _finish(
        plan.out,
        list(plan.jobs),
        {job.name: stats[job.name] for job in plan.jobs},
        vocab,
        settings=plan.settings,
        samples_per_shard=plan.samples_per_shard,
        length_policy=plan.length_policy,
        config_hash=plan.config_hash,
        num_built=sum(result.num_built for result in results),
        num_skipped=sum(result.num_skipped for result in results),
        start=start,
    )
    logger.info(
        "shards in %s: %d built, %d skipped, %s",
        plan.out,
        manifest.num_built,
        manifest.num_skipped,
        ", ".join(f"{s}={v.num_samples}" for s, v in manifest.splits.items()),
    )
    return manifest


def write_shards(
    records: Iterable[ImageRecord],
    vocab: Vocab,
    source: ImageSource,
    out: str,
    *,
    image_size: int = 256,
    resize_mode: str = "squash",
    jpeg_quality: int = 90,
    samples_per_shard: int = 1000,
    max_image_pixels: int = 178_956_970,
    max_caption_len: int = 50,
    overlong: str = "drop",
    num_procs: int = 0,
    executor: Executor = "process",
    dask_address: str | None = None,
    config_hash: str = "",
    progress: bool = True,
) -> ShardManifest:
    """Write every split's shards to ``out`` (local folder or s3://bucket/prefix), then the manifest.

    ``plan_shard_build``, one ``write_shard_group`` over every job, ``finish_shard_build``: complete
    shards are skipped, the rest written in parallel (see ``write_shard_group`` for ``num_procs``,
    ``executor`` and ``dask_address``). Raises ShardError after the other shards finished when some
    could not be written (a re-run resumes); the manifest is then not written.
    """
    start = time.perf_counter()
    _check_executor(executor, num_procs)
    plan = plan_shard_build(
        records,
        vocab,
        source,
        out,
        image_size=image_size,
        resize_mode=resize_mode,
        jpeg_quality=jpeg_quality,
        samples_per_shard=samples_per_shard,
        max_image_pixels=max_image_pixels,
        max_caption_len=max_caption_len,
        overlong=overlong,
        config_hash=config_hash,
    )
    result = write_shard_group(
        plan.jobs, num_procs=num_procs, executor=executor, dask_address=dask_address, progress=progress
    )
    return finish_shard_build(plan, vocab, [result], start=start)


def _check_executor(executor: str, num_procs: int) -> None:
    if executor not in ("process", "dask"):
        raise ValueError(f"unknown executor {executor!r}; valid: process, dask")
    if num_procs < 0:
        raise ValueError(f"num_procs must be >= 0 (0 = all cores), got {num_procs}")


def _name_list(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _resolve_procs(num_procs: int) -> int:
    if num_procs > 0:
        return num_procs
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _completed_stats(job: ShardJob) -> ShardStats | None:
    """The stats of a finished shard for exactly this job, or None when it must be (re)built."""
    data = _read_json(storage.join(job.out, job.stats_name))
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


def _run(
    jobs: list[ShardJob], *, num_procs: int, executor: Executor, dask_address: str | None
) -> Iterator[tuple[ShardJob, ShardStats | BaseException]]:
    """Run write_shard over jobs; yield (job, stats or the exception it raised) as each finishes."""
    if not jobs:
        return
    if executor == "dask":
        yield from _run_dask(jobs, num_procs=num_procs, dask_address=dask_address)
    elif num_procs == 1:
        for job in jobs:
            yield job, _call(write_shard, job)
    else:
        methods = multiprocessing.get_all_start_methods()
        # Never fork: the parent may hold threads (tqdm, boto3, Dask) and open handles.
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        # A forkserver outlives this call and keeps the environment it started with; hand the
        # workers today's (S3 credentials and endpoint set in-process by a caller or a test).
        with ProcessPoolExecutor(
            max_workers=min(num_procs, len(jobs)),
            mp_context=context,
            initializer=_adopt_environment,
            initargs=(dict(os.environ),),
        ) as pool:
            futures = {pool.submit(write_shard, job): job for job in jobs}
            try:
                for future in as_completed(futures):
                    error = future.exception()
                    yield futures[future], error if error is not None else future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def _adopt_environment(environ: dict[str, str]) -> None:
    """Pool initializer: make the worker's environment the parent's at submission time."""
    os.environ.clear()
    os.environ.update(environ)


def _run_dask(
    jobs: list[ShardJob], *, num_procs: int, dask_address: str | None
) -> Iterator[tuple[ShardJob, ShardStats | BaseException]]:
    from distributed import Client, LocalCluster
    from distributed import as_completed as dask_as_completed

    cluster = None
    if dask_address is None:
        cluster = LocalCluster(
            n_workers=min(num_procs, len(jobs)), threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    else:
        client = Client(dask_address)
    try:
        run_id = uuid.uuid4().hex[:12]  # keys unique per build: a shared cluster must not reuse results
        futures = {
            client.submit(write_shard, job, key=f"write_shard-{job.name}-{run_id}", retries=0): job
            for job in jobs
        }
        for future in dask_as_completed(list(futures)):
            job = futures[future]
            try:
                yield job, future.result()
            except Exception as e:
                yield job, e
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _call(fn: Callable[[ShardJob], ShardStats], job: ShardJob) -> ShardStats | BaseException:
    try:
        return fn(job)
    except Exception as e:
        return e


def _finish(
    out: str,
    jobs: list[ShardJob],
    stats: dict[str, ShardStats],
    vocab: Vocab,
    *,
    settings: ImageSettings,
    samples_per_shard: int,
    length_policy: dict[str, Any],
    config_hash: str,
    num_built: int,
    num_skipped: int,
    start: float,
) -> ShardManifest:
    """Write sizes.json, vocab.json and (last) manifest.json; return the manifest."""
    sizes: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    shards: dict[str, str] = {}
    failures: dict[str, Counter[str]] = {split: Counter() for split in SPLITS}
    converted: dict[str, Counter[str]] = {split: Counter() for split in SPLITS}
    for job in jobs:
        shard = stats[job.name]
        sizes[job.split][job.tar_name] = shard.count
        shards[job.tar_name] = shard.sha256
        failures[job.split].update(shard.failures)
        converted[job.split].update(shard.converted)
    splits = {
        split: SplitSummary(
            num_samples=sum(sizes[split].values()),
            num_shards=len(sizes[split]),
            failures=dict(sorted(failures[split].items())),
            converted=dict(sorted(converted[split].items())),
        )
        for split in SPLITS
    }
    _write_json(storage.join(out, SIZES_FILE), sizes)
    _write_references(out, jobs, stats)
    vocab_sha256 = _save_vocab(vocab, out)
    manifest = ShardManifest(
        out=out,
        config_hash=config_hash,
        vocab_sha256=vocab_sha256,
        splits=splits,
        shards=shards,
        sizes=sizes,
        length_policy=length_policy,
        image=asdict(settings),
        samples_per_shard=samples_per_shard,
        num_built=num_built,
        num_skipped=num_skipped,
        duration_s=round(time.perf_counter() - start, 3),
        stats=stats,
    )
    _write_json(storage.join(out, MANIFEST_FILE), manifest.to_json())
    return manifest


def _write_references(out: str, jobs: list[ShardJob], stats: dict[str, ShardStats]) -> None:
    """references.json: per split, each stored image's captions as ids without <start>/<end>.

    SCST's CIDEr-D reward needs every training image's references (and their document
    frequencies) without opening the image shards; skipped images are left out, as in the tars.
    """
    refs: dict[str, dict[str, list[list[int]]]] = {split: {} for split in SPLITS}
    for job in jobs:
        skipped = {int(f["image_id"]) for f in stats[job.name].failed}
        for item in job.items:
            if item.image_id not in skipped and item.captions:
                refs[job.split][str(item.image_id)] = [list(c.ids[1:-1]) for c in item.captions]
    storage.write_json(storage.join(out, REFERENCES_FILE), {"format": "token-ids", "splits": refs})


def read_references(out: str, split: str) -> dict[int, list[list[int]]]:
    """``references.json``'s captions of ``split`` (ids without <start>/<end>), by image id."""
    uri = storage.join(os.fspath(out), REFERENCES_FILE)
    try:
        data = storage.read_json(uri)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {REFERENCES_FILE} under {out}: the shards predate it; re-run the shard build"
        ) from None
    if not isinstance(data, dict) or split not in data.get("splits", {}):
        raise ValueError(f"{uri}: no split {split!r}")
    return {int(k): v for k, v in data["splits"][split].items()}


def _save_vocab(vocab: Vocab, out: str) -> str:
    """Save vocab.json with Vocab.save (uploading it for s3://); return the file's sha256."""
    if not storage.is_s3(out):
        path = os.path.join(out, VOCAB_FILE)
        vocab.save(path)
        return sha256_file(path)
    with tempfile.TemporaryDirectory(prefix="vocab-") as tmp:
        path = os.path.join(tmp, VOCAB_FILE)
        vocab.save(path)
        storage.upload_file(path, storage.join(out, VOCAB_FILE))
        return sha256_file(path)


def _clean_leftovers(out: str, planned: set[str]) -> None:
    """Remove temporaries a killed build left in a local output folder; warn about stale shards.

    Shards of an earlier build with more shards (e.g. a smaller samples_per_shard) are left alone:
    sizes.json and manifest.json list only the current ones, which is what loaders read.
    """
    stale = []
    for name in sorted(os.listdir(out)):
        if _TMP_PATTERN.match(name):
            storage.remove(os.path.join(out, name))
            logger.info("removed leftover temporary %s", name)
        elif _SHARD_FILE_PATTERN.match(name) and name not in planned:
            stale.append(name)
    if stale:
        logger.warning(
            "%d shard files in %s are not part of this build (left alone): %s",
            len(stale),
            out,
            ", ".join(stale[:5]) + (", ..." if len(stale) > 5 else ""),
        )


# ---------------------------------------------------------------------------- verify, inspect


def read_manifest(out: str) -> dict[str, Any]:
    """The manifest.json of a finished build; FileNotFoundError when there is none."""
    data = _read_json(storage.join(os.fspath(out), MANIFEST_FILE))
    if data is None:
        raise FileNotFoundError(f"no {MANIFEST_FILE} under {out}: the shard build has not finished")
    return dict(data)


def verify_shards(out: str) -> list[str]:
    """Check every shard listed in the manifest (and vocab.json, sizes.json) against it.

    Returns one message per problem; an empty list means the shards are intact.
    """
    out = os.fspath(out)
    try:
        manifest = read_manifest(out)
    except FileNotFoundError as e:
        return [str(e)]
    problems: list[str] = []
    shards: dict[str, str] = manifest.get("shards", {})
    for name, expected in sorted(shards.items()):
        uri = storage.join(out, name)
        try:
            actual = _sha256_uri(uri)
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if actual != expected:
            problems.append(f"{name}: sha256 {actual} does not match the manifest's {expected}")
    try:
        vocab_sha = _sha256_uri(storage.join(out, VOCAB_FILE))
        if vocab_sha != manifest.get("vocab_sha256"):
            problems.append(f"{VOCAB_FILE}: sha256 {vocab_sha} does not match the manifest's")
    except FileNotFoundError:
        problems.append(f"{VOCAB_FILE}: missing")
    sizes = _read_json(storage.join(out, SIZES_FILE))
    if sizes is None:
        problems.append(f"{SIZES_FILE}: missing")
    else:
        listed = {name for split_sizes in sizes.values() for name in split_sizes}
        if listed != set(shards):
            problems.append(f"{SIZES_FILE} lists other shards than {MANIFEST_FILE}")
        for split, summary in manifest.get("splits", {}).items():
            total = sum(sizes.get(split, {}).values())
            if total != summary.get("num_samples"):
                problems.append(
                    f"{split}: {SIZES_FILE} counts {total} samples, the manifest {summary.get('num_samples')}"
                )
    return problems


def inspect_shards(
    out: str, split: str | None = None, n: int = 1, images_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Per-split counts from the manifest and the first n samples of each split, decoded.

    Returns ``{"out", "splits": {split: {num_samples, num_shards, failures, converted}},
    "samples": {split: [{"key", "shard", "image_id", "path", "image_size", "orig_size", "captions"}]}}``
    (captions as raw strings). ``split`` limits both to one split. With ``images_dir`` each sample's
    stored JPEG is also written there as ``{split}-{key}.jpg`` (its path under ``"image_file"``).
    """
    out = os.fspath(out)
    manifest = read_manifest(out)
    sizes = _read_json(storage.join(out, SIZES_FILE)) or {}
    known = manifest.get("splits", {})
    if split is not None and split not in known:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(known)}")
    names = [split] if split is not None else sorted(known, key=_split_order)
    report: dict[str, Any] = {
        "out": out,
        "splits": {name: manifest["splits"][name] for name in names},
        "samples": {},
    }
    for name in names:
        samples: list[dict[str, Any]] = []
        for tar_name in sorted(sizes.get(name, {})):
            if len(samples) >= n:
                break
            samples.extend(_read_samples(storage.join(out, tar_name), tar_name, n - len(samples), images_dir))
        report["samples"][name] = samples
    return report


def _split_order(split: str) -> tuple[int, str]:
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


def _read_samples(
    uri: str, tar_name: str, n: int, images_dir: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """Decode up to n samples of one tar (saving their JPEGs into ``images_dir`` when given)."""
    samples: list[dict[str, Any]] = []
    if n <= 0:
        return samples
    with storage.open_read(uri) as fileobj, tarfile.open(fileobj=fileobj, mode="r|") as tar:
        pending: dict[str, dict[str, bytes]] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            handle = tar.extractfile(member)
            if handle is None:
                continue
            pending.setdefault(key, {})[ext] = handle.read()
            if {"jpg", "json"} <= pending[key].keys():
                parts = pending.pop(key)
                meta = json.loads(parts["json"])
                with Image.open(io.BytesIO(parts["jpg"])) as image:
                    image_size = list(image.size)
                samples.append(
                    {
                        "key": key,
                        "shard": tar_name,
                        "image_id": meta["image_id"],
                        "path": meta["path"],
                        "image_size": image_size,
                        "orig_size": meta["orig_size"],
                        "captions": [c["raw"] for c in meta["captions"]],
                    }
                )
                if images_dir is not None:
                    image_file = Path(images_dir) / f"{meta['split']}-{key}.jpg"
                    image_file.parent.mkdir(parents=True, exist_ok=True)
                    image_file.write_bytes(parts["jpg"])
                    samples[-1]["image_file"] = str(image_file)
                if len(samples) >= n:
                    break
    return samples


# ------------------------------------------------------------------------- local or s3 files


def _tmp_name(name: str) -> str:
    return f".{name}.{uuid.uuid4().hex}.tmp"


def _read_json(uri: str) -> Any | None:
    """Parsed JSON, or None when the file is missing or not valid JSON (a torn leftover)."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _write_json(uri: str, obj: Any) -> None:
    """Stable JSON text (sorted keys), written atomically locally and in one PUT on S3."""
    storage.write_json(uri, obj, indent=1)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_uri(uri: str) -> str:
    """sha256 of a local file or S3 object; FileNotFoundError when it does not exist."""
    if storage.is_s3(uri):
        return hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    return sha256_file(uri)
