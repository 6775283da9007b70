"""Build shards: plan the jobs, write them in groups (in parallel), finish with sizes.json and the manifest.

Usage::

    manifest = write_shards(dataset.records, vocab, DirSource("data/raw"), "data/shards",
                            image_size=256, resize_mode="squash", jpeg_quality=90,
                            samples_per_shard=1000, max_image_pixels=178_956_970, max_caption_len=50,
                            overlong="drop", num_procs=0, executor="process", dask_address=None)
    manifest.num_built, manifest.num_skipped          # a re-run of a finished build skips every shard

``write_shards`` is three public steps, so an orchestrator can map the middle one over groups of
shards (one task per group, on any machine that reaches the output location)::

    plan = plan_shard_build(dataset.records, vocab, source, "s3://bucket/shards", image_size=256, ...)
    results = [write_shard_group(group, num_procs=4, executor="process", dask_address=None)
               for group in plan.groups(8)]                 # picklable
    manifest = finish_shard_build(plan, vocab, results)   # ShardError if a group is missing

Every setting is a required argument: their defaults live in ``captioning.config`` (``data.shards``,
``data.max_caption_len``, ``data.overlong_captions``), which ``captioning.data.prepare`` reads. What a
build writes is the contract in ``captioning.data.format``; one shard is ``shard_writer``'s job, the
parallel executors ``shard_executors``'. Resumable: a shard whose stats match its job and its bytes
is skipped, so a build killed at any moment and re-run gives the same bytes as an uninterrupted one.
One build per output location at a time (the groups of that one build may run at once: they share
no file).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from captioning import storage
from captioning.data.format import (
    HOLDOUT_SPLIT,
    MANIFEST_FILE,
    REFERENCES_FILE,
    SIZES_FILE,
    ShardManifest,
    ShardStats,
    SplitSummary,
    holdout_of,
    read_json_or_none,
    write_stable_json,
    write_vocab,
)
from captioning.data.images import ImageSettings
from captioning.data.records import SPLITS, ImageRecord
from captioning.data.shard_executors import Executor, check_executor, run_shard_jobs
from captioning.data.shard_writer import ShardJob, completed_stats, plan_shards
from captioning.data.sources import ImageSource, raise_source_error
from captioning.data.vocab import Vocab
from captioning.progress import show_progress

logger = logging.getLogger(__name__)

# Hidden temporaries a killed build may leave: ".train-000003.tar.<hex>.tmp" (write_shard),
# ".sizes.json.<random>.tmp" (storage's atomic writes), ".vocab-<random>.tmp" (an older Vocab.save).
_TMP_PATTERN = re.compile(
    r"^\.(?:[a-z]+-\d{6}\.(?:tar|stats\.json)|sizes\.json|manifest\.json|vocab\.json|references\.json)\..+\.tmp$"
    r"|^\.vocab-.+\.tmp$"
)
_SHARD_FILE_PATTERN = re.compile(r"^[a-z]+-\d{6}\.(?:tar|stats\.json)$")


class ShardError(RuntimeError):
    """Some shards could not be built (I/O errors, crashed workers); the message names each."""


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
    image_size: int,
    resize_mode: str,
    jpeg_quality: int,
    samples_per_shard: int,
    max_image_pixels: int,
    max_caption_len: int,
    overlong: str,
    config_hash: str = "",
) -> ShardPlan:
    """Plan a build into ``out`` and make the location ready for ``write_shard_group`` calls.

    Validates the settings, splits the records into shard jobs (``plan_shards``), creates a local
    output folder and removes what a killed build left there. A manifest.json of this same build
    (same non-empty ``config_hash`` and settings) stays: shards are rebuilt to the bytes it lists,
    and a reader meanwhile finds it. Another build's is removed: shards change underneath it.
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
    plan = ShardPlan(
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
    if not _records_plan(read_json_or_none(storage.join(out, MANIFEST_FILE)), plan):
        storage.remove(storage.join(out, MANIFEST_FILE))
    return plan


def _records_plan(manifest: Any, plan: ShardPlan) -> bool:
    """Whether a manifest.json's content records ``plan``'s build (a build key is what says so)."""
    ours = (plan.config_hash, asdict(plan.settings), plan.samples_per_shard, plan.length_policy)
    fields = ("config_hash", "image", "samples_per_shard", "length_policy")
    return bool(plan.config_hash) and isinstance(manifest, dict) and tuple(map(manifest.get, fields)) == ours


def write_shard_group(
    jobs: Sequence[ShardJob],
    *,
    num_procs: int,
    executor: Executor,
    dask_address: str | None,
    progress: bool = True,
) -> ShardGroupResult:
    """Write the shards of ``jobs`` (one group of a ``ShardPlan``, or all of it); return their stats.

    Shards already complete (stats present, matching this job, tar sha256 matching) are skipped.
    The rest run in parallel through ``write_shard`` (``shard_executors``): ``executor="process"``
    uses a process pool of ``num_procs`` (0 = all cores; 1 runs in this process), ``"dask"`` a
    distributed Client at ``dask_address`` or, without one, a LocalCluster of ``num_procs``
    single-threaded workers.
    Raises ShardError naming each failed shard after the group's other shards finished (a re-run
    resumes). Groups of one plan share nothing but the output location, so they may run at once.
    """
    check_executor(executor, num_procs)
    jobs = list(jobs)
    done: dict[str, ShardStats] = {}
    todo: list[ShardJob] = []
    for job in jobs:
        stats = completed_stats(job)
        if stats is None:
            todo.append(job)
        else:
            done[job.name] = stats
    num_skipped = len(done)
    if num_skipped:
        outs = ", ".join(sorted({job.out for job in jobs}))
        logger.info("%d of %d shards already complete in %s; skipping them", num_skipped, len(jobs), outs)

    errors: list[str] = []
    with show_progress(len(jobs), "shards", unit="shard", initial=num_skipped, enabled=progress) as bar:
        for job, result in run_shard_jobs(
            todo, num_procs=num_procs, executor=executor, dask_address=dask_address
        ):
            if isinstance(result, BaseException):
                raise_source_error(result)  # an image zip that does not open: once, not once per shard
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
    """Merge the groups' results; write sizes.json, references.json, vocab.json and (last) manifest.json,
    each only when its bytes change (``write_if_changed``: a re-run of a finished build rewrites none).

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
    image_size: int,
    resize_mode: str,
    jpeg_quality: int,
    samples_per_shard: int,
    max_image_pixels: int,
    max_caption_len: int,
    overlong: str,
    num_procs: int,
    executor: Executor,
    dask_address: str | None,
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
    check_executor(executor, num_procs)
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


def _name_list(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


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
    """Write sizes.json, references.json, vocab.json and (last) manifest.json; return the manifest."""
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
    write_stable_json(storage.join(out, SIZES_FILE), sizes)
    holdout = _write_references(out, jobs, stats)
    vocab_sha256 = write_vocab(out, vocab.to_json())
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
        holdout=holdout,
        stats=stats,
    )
    write_stable_json(storage.join(out, MANIFEST_FILE), manifest.to_json())
    return manifest


def _write_references(out: str, jobs: list[ShardJob], stats: dict[str, ShardStats]) -> dict[str, Any]:
    """references.json: per split, each stored image's captions as ids without <start>/<end>; returns
    the test split's ``holdout_of`` (its images' ids and reference tokens, what scoring compares with).

    SCST's CIDEr-D reward needs every training image's references (and their document
    frequencies) without opening the image shards; skipped images are left out, as in the tars.
    """
    refs: dict[str, dict[str, list[list[int]]]] = {split: {} for split in SPLITS}
    held: dict[int, list[list[str]]] = {}
    for job in jobs:
        skipped = {int(f["image_id"]) for f in stats[job.name].failed}
        for item in job.items:
            if item.image_id not in skipped and item.captions:
                refs[job.split][str(item.image_id)] = [list(c.ids[1:-1]) for c in item.captions]
                if job.split == HOLDOUT_SPLIT:
                    held[item.image_id] = [list(c.tokens) for c in item.captions]
    write_stable_json(storage.join(out, REFERENCES_FILE), {"format": "token-ids", "splits": refs}, indent=2)
    return holdout_of(held)


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
            _name_list(stale, 5),
        )
