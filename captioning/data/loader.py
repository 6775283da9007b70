"""The streaming loader: WebDataset shards -> batches of images and captions, with DDP invariants.

One pipeline per split, as a list of named stages (open_clip's ``data.py`` is the model)::

    plan            shard list from sizes.json (never by scanning; one build's or several), seeded
                    per-epoch shard shuffle (train), cut into one contiguous run of samples per
                    (rank, worker) stream (``captioning.data.epoch``)
    split_by_node   keep this rank's streams
    split_by_worker keep this DataLoader worker's stream
    tar             read the stream's shard ranges (webdataset tar iteration, any gopen URL)
    shuffle         sample shuffle buffer (train)
    decode          Pillow JPEG + JSON metadata
    transform       resize (train: optional light crop, never a flip, and colour jitter factors)
    captions        random: seq_per_img references per image; all: every reference
    pad             train: top the stream up to its planned length with flagged copies
    batch           collate into a ``Batch`` of uint8 images (in the worker; ``captioning.data.batch``)
    normalize       in the main process: to the delivery device (pinned, non-blocking for CUDA), then
                    float, colour jitter and ImageNet normalisation batched there (``prepare_images``)

Usage::

    dist = DistInfo.from_env()
    loader = build_loader(cfg.data.loader, "data/shards", "train", train=True, dist=dist,
                          image_size=256, seed=0, device=dist.device)
    for epoch in range(epochs):
        loader.set_epoch(epoch)              # before iterating: workers start afresh each epoch
        for batch in loader:                 # len(loader) batches on every rank, on dist.device
            weight = (~batch.is_pad).float() # padding samples carry zero loss weight

``build_loader`` reads the ``data.loader`` config section; ``CaptionLoader`` takes plain values
(``LoaderSpec``). Sizes come only from sizes.json (``captioning.data.format``); a shard holding
fewer samples than it says is an error (a silent shortfall would leave ranks with different batch
counts), and so is a rank that yields a batch count other than planned. ``s3://bucket/prefix``
locations go through ``captioning.storage`` (``register_webdataset_s3`` for the tars).

Workers: a fresh ``DataLoader`` per epoch (``persistent_workers=False``) so workers see the epoch;
``worker_init_fn`` clears ``threading._threading_atexits`` (a Prefect 3.8.8 atexit hook otherwise
kills forked workers) and seeds every RNG from (seed, epoch, rank, worker). Randomness that
shapes the data (shuffles, caption choice, augmentation) uses its own seeded generators, so an
epoch is reproducible for the same seed and independent of the global RNGs.
"""

from __future__ import annotations

import functools
import io
import json
import random
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from captioning import storage
from captioning.config import LoaderConfig
from captioning.data.batch import (
    CAPTION_MODES,
    Batch,
    CaptionMode,
    Sample,
    augment_image,
    choose_captions,
    collate,
    resize_square,
)
from captioning.data.epoch import EpochPlan, ShardRange, plan_epoch
from captioning.data.format import read_split_sizes, shard_url
from captioning.training.dist import DistInfo

# ---------------------- the stages (module-level callables, so pipelines pickle under spawn too)


@dataclass(frozen=True)
class StreamInfo:
    """Which stream the current process runs: its rank and DataLoader worker."""

    rank: int
    worker: int
    num_workers: int


def current_stream(dist: DistInfo) -> StreamInfo:
    """This process's (rank, worker); worker 0 of 1 outside DataLoader workers."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return StreamInfo(dist.rank, 0, 1)
    return StreamInfo(dist.rank, info.id, info.num_workers)


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a pipeline needs besides the plan; plain values only."""

    location: str
    split: str
    train: bool
    batch_size: int
    num_workers: int
    dist: DistInfo
    seed: int
    shuffle_buffer: int
    caption_mode: CaptionMode
    seq_per_img: int
    image_size: int
    augment: bool


@dataclass(frozen=True)
class ShardTask:
    """One shard range of one stream, as it flows from ``plan`` to ``tar``."""

    stream: int
    rank: int
    worker: int
    url: str
    shard: ShardRange


def stage_plan(plan: EpochPlan, location: str) -> Iterator[ShardTask]:
    """Every stream's shard ranges, in plan order (every rank and worker sees the whole plan)."""
    for stream, ranges in enumerate(plan.streams):
        rank, worker = divmod(stream, plan.workers_per_rank)
        for r in ranges:
            yield ShardTask(stream, rank, worker, shard_url(location, r.name), r)


def stage_split_by_node(
    tasks: Iterable[ShardTask], *, dist: DistInfo, plan: EpochPlan
) -> Iterator[ShardTask]:
    """Keep this rank's streams (explicit: never inferred from torch.distributed state)."""
    if plan.world_size != dist.world_size:
        raise RuntimeError(f"plan is for world size {plan.world_size}, this process has {dist.world_size}")
    return (t for t in tasks if t.rank == dist.rank)


def stage_split_by_worker(
    tasks: Iterable[ShardTask], *, dist: DistInfo, plan: EpochPlan
) -> Iterator[ShardTask]:
    """Keep this DataLoader worker's stream; the worker count must be the planned one."""
    me = current_stream(dist)
    if me.num_workers != plan.workers_per_rank:
        raise RuntimeError(
            f"plan has {plan.workers_per_rank} stream(s) per rank but the DataLoader runs "
            f"{me.num_workers} worker(s); batch counts would differ across ranks"
        )
    return (t for t in tasks if t.worker == me.worker)


_S3_REGISTERED = False


def _open_shard(url: str) -> Any:
    global _S3_REGISTERED
    if storage.is_s3(url) and not _S3_REGISTERED:
        storage.register_webdataset_s3()  # per process: spawned workers do not inherit the registration
        _S3_REGISTERED = True
    return wds.gopen(url)


def stage_tar(tasks: Iterable[ShardTask]) -> Iterator[Sample]:
    """Read each shard range: the raw ``{"__key__", "jpg", "json"}`` samples it promises.

    Samples before ``skip`` are read but never decoded. A shard holding fewer samples than
    sizes.json says is an error here: a silent shortfall would unbalance the ranks.
    """
    for task in tasks:
        stream = _open_shard(task.url)
        try:
            samples = group_by_keys(tar_file_expander([{"url": task.url, "stream": stream}]))
            got = 0
            for sample in islice(samples, task.shard.skip, task.shard.skip + task.shard.take):
                got += 1
                yield sample
        finally:
            stream.close()
        if got != task.shard.take:
            raise RuntimeError(
                f"{task.url}: expected samples {task.shard.skip}..{task.shard.skip + task.shard.take - 1} "
                f"but the shard ended after {task.shard.skip + got}; sizes.json does not match the shards"
            )


def stage_shuffle(samples: Iterable[Sample], *, spec: LoaderSpec, epoch: int) -> Iterator[Sample]:
    """Sample shuffle buffer over raw (undecoded) samples, seeded by (seed, epoch, rank, worker)."""
    me = current_stream(spec.dist)
    rng = random.Random(f"samples:{spec.seed}:{epoch}:{me.rank}:{me.worker}")
    size = spec.shuffle_buffer
    return iter(wds.shuffle(size, initial=size, rng=rng)(iter(samples)))


def stage_decode(samples: Iterable[Sample], *, spec: LoaderSpec) -> Iterator[Sample]:
    """Pillow-decode ``jpg`` to RGB and parse ``json``; check the key and split against the metadata."""
    for raw in samples:
        key = raw.get("__key__")
        if "jpg" not in raw or "json" not in raw:
            raise ValueError(f"sample {key} in {raw.get('__url__')} lacks jpg or json: {sorted(raw)}")
        meta = json.loads(raw["json"])
        image_id = int(meta["image_id"])
        if key != f"{image_id:012d}":
            raise ValueError(f"sample key {key} does not match image_id {image_id} ({raw.get('__url__')})")
        opened = Image.open(io.BytesIO(raw["jpg"]))
        # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale when the target is that much smaller.
        opened.draft("RGB", (spec.image_size, spec.image_size))
        opened.load()
        image = opened if opened.mode == "RGB" else opened.convert("RGB")  # convert() always copies
        yield {"image_id": image_id, "image": image, "meta": meta, "is_pad": False}


def stage_transform(samples: Iterable[Sample], *, spec: LoaderSpec, epoch: int) -> Iterator[Sample]:
    """Geometry on the Pillow image (it stays one) and, when augmenting, the colour jitter's factors:
    the jitter itself is the last stage's, batched on the delivery device (``Batch.normalized``)."""
    me = current_stream(spec.dist)
    rng = random.Random(f"augment:{spec.seed}:{epoch}:{me.rank}:{me.worker}")
    augment = spec.train and spec.augment
    for sample in samples:
        if not augment:
            yield {**sample, "image": resize_square(sample["image"], spec.image_size)}
            continue
        image, jitter = augment_image(sample["image"], spec.image_size, rng)
        yield {**sample, "image": image, "jitter": jitter}


def stage_captions(samples: Iterable[Sample], *, spec: LoaderSpec, epoch: int) -> Iterator[Sample]:
    """Attach the caption ids used for training and every reference's tokens (for scoring)."""
    for sample in samples:
        meta = sample.pop("meta")
        captions = meta["captions"]
        ids = [c["ids"] for c in captions]
        if spec.caption_mode == "all":
            chosen = [list(i) for i in ids]
        else:
            chosen = choose_captions(
                ids, spec.seq_per_img, seed=spec.seed, epoch=epoch, image_id=sample["image_id"]
            )
        yield {**sample, "captions": chosen, "references": [list(c["tokens"]) for c in captions]}


def stage_pad(samples: Iterable[Sample], *, spec: LoaderSpec, plan: EpochPlan) -> Iterator[Sample]:
    """Yield exactly K*B samples: the stream's own, then copies of its last ones flagged ``is_pad``."""
    me = current_stream(spec.dist)
    stream = plan.stream_index(me.rank, me.worker)
    expected = plan.samples_per_stream[stream]
    recent: deque[Sample] = deque(maxlen=spec.batch_size)
    count = 0
    for sample in samples:
        count += 1
        recent.append(sample)
        yield sample
    if count != expected:
        raise RuntimeError(f"stream {stream} read {count} samples, the plan says {expected}")
    padding = plan.padding_of_stream(stream)
    if padding and not recent:
        raise RuntimeError(f"stream {stream} has no samples to pad with")
    for i in range(padding):
        yield {**recent[i % len(recent)], "is_pad": True}


def stage_batch(samples: Iterable[Sample], *, spec: LoaderSpec) -> Iterator[Batch]:
    """Group ``batch_size`` images and collate (a stream's last eval batch may be smaller)."""
    collate_fn = functools.partial(collate, caption_mode=spec.caption_mode)
    return iter(wds.batched(spec.batch_size, collation_fn=collate_fn, partial=True)(iter(samples)))


Stage = Callable[..., Iterator[Any]]


def build_stages(spec: LoaderSpec, plan: EpochPlan, epoch: int) -> list[tuple[str, Stage]]:
    """The named stages of one epoch's pipeline, in order (see the module doc)."""
    p = functools.partial
    stages: list[tuple[str, Stage]] = [
        ("plan", p(stage_plan, plan, spec.location)),
        ("split_by_node", p(stage_split_by_node, dist=spec.dist, plan=plan)),
        ("split_by_worker", p(stage_split_by_worker, dist=spec.dist, plan=plan)),
        ("tar", stage_tar),
    ]
    if spec.train and spec.shuffle_buffer > 1:
        stages.append(("shuffle", p(stage_shuffle, spec=spec, epoch=epoch)))
    stages += [
        ("decode", p(stage_decode, spec=spec)),
        ("transform", p(stage_transform, spec=spec, epoch=epoch)),
        ("captions", p(stage_captions, spec=spec, epoch=epoch)),
    ]
    if spec.train:
        stages.append(("pad", p(stage_pad, spec=spec, plan=plan)))
    stages.append(("batch", p(stage_batch, spec=spec)))
    return stages


# ------------------------------------------------------------------------- workers and the loader


def worker_seed(seed: int, epoch: int, rank: int, worker: int) -> int:
    """A 32-bit seed per (seed, epoch, rank, worker)."""
    return random.Random(f"worker:{seed}:{epoch}:{rank}:{worker}").getrandbits(32)


def init_worker(worker_id: int, *, seed: int, epoch: int, rank: int) -> None:
    """DataLoader ``worker_init_fn``: survive forked Prefect processes; seed every global RNG."""
    # Prefect 3.8.8 registers a threading atexit hook that fails in forked workers (fixed in 3.9.1).
    atexits = getattr(threading, "_threading_atexits", None)
    if isinstance(atexits, list):
        atexits.clear()
    s = worker_seed(seed, epoch, rank, worker_id)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


class CaptionLoader:
    """An iterable over one rank's batches of one split; ``len()`` is known before iterating.

    Call ``set_epoch(epoch)`` before each pass (training reshuffles by it; evaluation ignores it
    except for the caption choice). Each ``iter()`` builds that epoch's pipeline and a fresh
    DataLoader, so workers always see the current epoch. Setting ``normalize`` False yields the
    hand-over itself (uint8 images, jitter factors): the consumer calls ``Batch.normalized``.
    """

    def __init__(
        self,
        spec: LoaderSpec,
        sizes: Mapping[str, int],
        *,
        epoch: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if spec.caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {spec.caption_mode!r}")
        if spec.seq_per_img < 1 or spec.image_size < 1 or spec.shuffle_buffer < 0:
            raise ValueError("seq_per_img and image_size must be >= 1 and shuffle_buffer >= 0")
        self.spec = spec
        self.sizes = dict(sizes)
        self.epoch = epoch
        self.device = None if device is None else torch.device(device)
        self.normalize = True  # the "normalize" stage runs here (benchmarks/loader.py turns it off)
        self.plan()  # fail now (too few shards, empty split), not in a worker

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The epoch's plan (the current epoch by default)."""
        s = self.spec
        return plan_epoch(
            self.sizes,
            train=s.train,
            batch_size=s.batch_size,
            num_workers=s.num_workers,
            world_size=s.dist.world_size,
            seed=s.seed,
            epoch=self.epoch if epoch is None else epoch,
        )

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank in training)."""
        return self.plan().batches_for_rank(self.spec.dist.rank)

    @property
    def num_samples(self) -> int:
        """Non-padding images this rank yields per epoch."""
        return self.plan().samples_for_rank(self.spec.dist.rank)

    @property
    def num_padding(self) -> int:
        """Padding images this rank yields per epoch (0 in evaluation)."""
        return self.plan().padding_for_rank(self.spec.dist.rank)

    @property
    def stage_names(self) -> list[str]:
        """The worker stages, then ``normalize`` (main process, on the delivery device)."""
        return [name for name, _ in build_stages(self.spec, self.plan(), self.epoch)] + ["normalize"]

    def pipeline(self) -> wds.DataPipeline:
        """The current epoch's pipeline as a ``wds.DataPipeline`` (one stream per worker)."""
        plan = self.plan()
        return wds.DataPipeline(*[stage for _, stage in build_stages(self.spec, plan, self.epoch)])

    def __iter__(self) -> Iterator[Batch]:
        s = self.spec
        device = self.device
        loader = torch.utils.data.DataLoader(
            self.pipeline(),
            batch_size=None,  # the pipeline batches
            num_workers=s.num_workers,
            worker_init_fn=functools.partial(init_worker, seed=s.seed, epoch=self.epoch, rank=s.dist.rank),
            persistent_workers=False,
            pin_memory=device is not None and device.type == "cuda",
            # Its own generator: creating an iterator must not draw from the global torch RNG
            # (dropout's), or a run resumed mid-epoch would see other dropout masks. The value is
            # unused: init_worker seeds every worker from (seed, epoch, rank, worker).
            generator=torch.Generator().manual_seed(s.seed),
        )
        expected = len(self)
        count = 0
        for batch in loader:
            count += 1
            if device is not None:
                batch = batch.to(device, non_blocking=True)
            yield batch.normalized() if self.normalize else batch  # the "normalize" stage
        if count != expected:  # a broken invariant would hang DDP; fail loudly instead
            raise RuntimeError(f"rank {s.dist.rank} yielded {count} batches, the plan says {expected}")


def build_loader(
    section: LoaderConfig,
    shard_dir: str,
    split: str,
    *,
    train: bool,
    dist: DistInfo,
    image_size: int,
    seed: int,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    extra_dirs: Sequence[str] = (),
) -> CaptionLoader:
    """A loader over ``split`` of the shards at ``shard_dir`` (local path or ``s3://bucket/prefix``),
    set up from the ``data.loader`` config section.

    ``train=True``: shuffled, padded, equal batch counts on every rank, with the section's
    ``caption_mode`` and ``augment``. ``train=False``: every image once over all ranks, fixed order,
    no padding, no augmentation, ``seq_per_img`` references per image (a validation loss).
    ``batch_size`` overrides ``section.batch_size`` (a stage's own batch size). ``device``: where
    batches are delivered (e.g. ``dist.device``); images cross to it as uint8 (pinned, non-blocking
    for CUDA) and are normalised there. ``None`` delivers normalised CPU batches. ``extra_dirs``: more
    builds whose ``split`` joins the plan (``read_split_sizes``: old and new training data together).
    """
    sizes = read_split_sizes(shard_dir, split, extra=extra_dirs)
    spec = LoaderSpec(
        location=shard_dir,
        split=split,
        train=train,
        batch_size=section.batch_size if batch_size is None else batch_size,
        num_workers=section.num_workers,
        dist=dist,
        seed=seed,
        shuffle_buffer=section.shuffle_buffer,
        caption_mode=section.caption_mode if train else "random",
        seq_per_img=section.seq_per_img,
        image_size=image_size,
        augment=section.augment and train,
    )
    return CaptionLoader(spec, sizes, device=device)
