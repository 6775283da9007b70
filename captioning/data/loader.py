"""The streaming loader: WebDataset shards -> batches of images and captions, with DDP invariants.

One pipeline per split, as a list of named stages (open_clip's ``data.py`` is the model)::

    plan            shard list from sizes.json (never by scanning), seeded per-epoch shard shuffle
                    (train), cut into one contiguous run of samples per (rank, worker) stream
    split_by_node   keep this rank's streams
    split_by_worker keep this DataLoader worker's stream
    tar             read the stream's shard ranges (webdataset tar iteration, any gopen URL)
    shuffle         sample shuffle buffer (train)
    decode          Pillow JPEG + JSON metadata
    transform       resize (train: optional light crop/colour jitter, never a flip)
    captions        random: seq_per_img references per image; all: every reference
    pad             train: top the stream up to its planned length with flagged copies
    batch           collate into a ``Batch`` of uint8 images (in the worker)
    normalize       ImageNet normalisation, once per batch, in the main process on the delivery device

Usage::

    dist = DistInfo.from_env()
    loader = build_loader("data/shards", "train", train=True, batch_size=32, num_workers=2,
                          dist=dist, image_size=256, device=dist.device)
    for epoch in range(epochs):
        loader.set_epoch(epoch)              # before iterating: workers start afresh each epoch
        for batch in loader:                 # len(loader) batches on every rank, on dist.device
            weight = (~batch.is_pad).float() # padding samples carry zero loss weight

The plan (who reads what) is computed from sizes.json alone, identically on every rank:

- Train: shards are shuffled with ``(seed, epoch)``, laid end to end, and the N samples are cut
  into S = world_size x max(num_workers, 1) contiguous runs of N // S or N // S + 1 samples; a
  shard may be shared by neighbouring streams (a later one reads past the earlier ones' samples
  without decoding them). Stream ``rank * W + worker`` reads run number ``rank * W + worker``. Every
  stream yields exactly K = ceil(ceil(N / S) / B) full batches, padding its tail with copies of its
  own last samples (``is_pad=True``), so every rank yields W * K batches without communication,
  every sample appears exactly once among non-padding entries, and the total padding S*K*B - N is
  less than S*B. Training needs at least S non-empty shards (STYLE habit 9).
- Eval (``train=False``): the same cut without shuffle or padding: every image exactly once over
  all ranks, in a fixed order; ranks may yield different numbers of batches (one fewer at most
  per worker), so evaluation runs no collective per step and gathers its results with
  ``all_gather_object`` at the end. Fewer shards than streams is fine here (runs share shards).

Sizes come only from sizes.json; a shard holding fewer samples than it says is an error (a silent
shortfall would leave ranks with different batch counts), and so is a rank that yields a batch
count other than planned. ``s3://bucket/prefix`` locations go through ``captioning.storage``
(imported only then): ``read_json`` for sizes.json, ``register_webdataset_s3`` for the tars.

In ``caption_mode="all"`` every reference is its own row (the image repeated, S=1). The number of
references per shard is not in sizes.json, so ``batch_size`` counts *images* in both modes: an
all-mode batch holds the rows of B images (about 5B rows for COCO), which keeps batch counts equal
across ranks without reading the shards first. Padding images then contribute all their rows.

Images leave the workers as uint8 and are normalised in the main process, on ``device`` when one
is given (a quarter of the bytes through shared memory and PCIe; benchmarks/loader.py).

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
import math
import os
import random
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageEnhance
from webdataset.tariterators import group_by_keys, tar_file_expander

from captioning.data.vocab import PAD_ID
from captioning.training.dist import DistInfo

if TYPE_CHECKING:
    from captioning.config import LoaderConfig

CaptionMode = Literal["random", "all"]
CAPTION_MODES: tuple[str, ...] = ("random", "all")
SIZES_FILE = "sizes.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Light augmentation only: captions describe the whole scene and say "left"/"right", so no flips
# and crops that keep most of the picture.
CROP_SCALE = (0.8, 1.0)  # fraction of the image area kept by the random-resized crop
CROP_RATIO = (0.9, 1.1)  # aspect ratio range of the crop
JITTER = 0.1  # brightness, contrast and saturation factors drawn from [1 - JITTER, 1 + JITTER]

Sample = dict[str, Any]  # one image flowing through the stages


# --------------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """What the trainer gets. B rows (images), S captions per row, L the longest caption.

    In caption_mode="all" each row is one (image, reference) pair: S=1, and an image with R
    references appears in R consecutive rows.

    ``images`` leave the DataLoader workers as uint8 (a quarter of the bytes through shared memory
    and over PCIe); ``CaptionLoader`` normalises them on its delivery device before yielding, so
    what the trainer sees is always float and ImageNet-normalised.
    """

    images: torch.Tensor  # (B, 3, H, W) float, ImageNet-normalised (uint8 0..255 before `normalized`)
    captions: torch.Tensor  # (B, S, L) long: <start> ... <end> then PAD_ID
    lengths: torch.Tensor  # (B, S) long: tokens from <start> to <end> inclusive
    image_ids: torch.Tensor  # (B,) long
    is_pad: torch.Tensor  # (B,) bool: padding copies that must get zero loss weight
    references: list[list[list[str]]] = field(default_factory=list)  # per row: every reference's tokens

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_real(self) -> int:
        """Rows that are not padding."""
        return int((~self.is_pad).sum())

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return replace(
            self,
            images=fn(self.images),
            captions=fn(self.captions),
            lengths=fn(self.lengths),
            image_ids=fn(self.image_ids),
            is_pad=fn(self.is_pad),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with every tensor on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread when ``pin_memory=True`` (CUDA runs)."""
        return self._map(lambda t: t.pin_memory())

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Crossing from a DataLoader worker: the small tensors travel inline as numpy arrays; only
        # the images take a shared-memory segment (each segment costs a socket round trip).
        small = [_inline(t) for t in (self.captions, self.lengths, self.image_ids, self.is_pad)]
        return (_rebuild_batch, (self.images, *small, self.references))

    def normalized(self) -> Batch:
        """uint8 images -> float ImageNet-normalised, on the images' device (no-op if already float)."""
        if self.images.dtype != torch.uint8:
            return self
        return replace(self, images=normalize_images(self.images))


def _inline(t: torch.Tensor) -> torch.Tensor | np.ndarray:
    return t.numpy() if t.device.type == "cpu" else t


def _rebuild_batch(images: torch.Tensor, *rest: Any) -> Batch:
    *small, references = rest
    captions, lengths, image_ids, is_pad = (torch.as_tensor(x) for x in small)
    return Batch(images, captions, lengths, image_ids, is_pad, references)


# (x / 255 - mean) / std = x * scale + shift, per channel
_SCALE = tuple(1.0 / (255.0 * sd) for sd in IMAGENET_STD)
_SHIFT = tuple(-m / sd for m, sd in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
_SCALE_NP = np.array(_SCALE, dtype=np.float32).reshape(1, 3, 1, 1)
_SHIFT_NP = np.array(_SHIFT, dtype=np.float32).reshape(1, 3, 1, 1)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 ``(x / 255 - mean) / std`` with ImageNet statistics.

    On the CPU with numpy, which never starts threads: torch's intra-op threads would spin against
    the DataLoader workers for the same cores (measured 10x slower on 2 cores with 2 workers).
    About 0.07 ms per 256x256 image; on a GPU, torch (free next to the model).
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
    if images.device.type != "cpu":
        out = images.float()  # (B, 3, H, W)
        for c in range(3):
            out[:, c].mul_(_SCALE[c]).add_(_SHIFT[c])
        return out
    dst = images.numpy().astype(np.float32)  # (B, 3, H, W)
    dst *= _SCALE_NP
    dst += _SHIFT_NP
    return torch.from_numpy(dst)


def _empty_batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory (as default_collate does),
    so handing the batch to the main process costs no extra copy."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def stack_planes(images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) uint8 from B RGB Pillow images of one size, written straight into the batch.

    Pillow's ``split`` gives the colour planes, so channels-first costs no strided transpose.
    The same image object appearing again (all mode, padding) is copied, not decoded twice.
    """
    width, height = images[0].size
    out = _empty_batch_tensor((len(images), 3, height, width), torch.uint8)  # (B, 3, H, W)
    planes = out.numpy()
    first: dict[int, int] = {}
    for row, image in enumerate(images):
        if image.size != (width, height):
            raise ValueError(f"images of one batch must share a size: {image.size} vs {(width, height)}")
        if id(image) in first:
            planes[row] = planes[first[id(image)]]
            continue
        first[id(image)] = row
        for channel, band in enumerate(image.split()):
            planes[row, channel] = np.asarray(band)
    return out


def collate(samples: Sequence[Sample], caption_mode: CaptionMode = "random") -> Batch:
    """Stack transformed samples (``image``: RGB Pillow image, ``image_id``, ``captions``,
    ``references``, ``is_pad``) into a ``Batch`` with uint8 images (``Batch.normalized`` follows).

    ``captions`` of a sample is a list of id lists: seq_per_img of them in random mode (S each),
    every reference in all mode (flattened into one row each, the image repeated).
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    if caption_mode == "all":
        rows_of = [[[c] for c in s["captions"]] for s in samples]
    else:
        rows_of = [[s["captions"]] for s in samples]
    owners = [s for s, rows in zip(samples, rows_of, strict=True) for _ in rows]  # one per row
    rows: list[list[list[int]]] = [row for rows in rows_of for row in rows]
    num_rows, per_row = len(rows), len(rows[0])
    if any(len(r) != per_row for r in rows):
        raise ValueError("every sample of a batch must have the same number of captions")
    lengths = np.array([[len(c) for c in r] for r in rows], dtype=np.int64)  # (B, S)
    captions = np.full((num_rows, per_row, int(lengths.max())), PAD_ID, dtype=np.int64)  # (B, S, L)
    for i, r in enumerate(rows):
        for j, c in enumerate(r):
            captions[i, j, : len(c)] = c
    return Batch(
        images=stack_planes([s["image"] for s in owners]),  # (B, 3, H, W) uint8
        captions=torch.from_numpy(captions),
        lengths=torch.from_numpy(lengths),
        image_ids=torch.tensor([s["image_id"] for s in owners], dtype=torch.long),
        is_pad=torch.tensor([s["is_pad"] for s in owners], dtype=torch.bool),
        references=[s["references"] for s in owners],
    )


# --------------------------------------------------------------------------------------------------
# sizes.json and the plan
# --------------------------------------------------------------------------------------------------


def _is_s3(location: str) -> bool:
    return location.startswith("s3://")


def shard_url(location: str, name: str) -> str:
    """Where shard ``name`` lives: a local path or an ``s3://`` URL."""
    if _is_s3(location):
        return location.rstrip("/") + "/" + name
    return os.path.join(location, name)


def read_sizes(location: str) -> dict[str, dict[str, int]]:
    """Read and check ``sizes.json`` at ``location``: ``{split: {shard name: images}}``."""
    uri = shard_url(location, SIZES_FILE)
    if _is_s3(location):
        from captioning.storage import read_json  # lazy: boto3 only for s3 locations

        data = read_json(uri)
    else:
        try:
            with open(uri, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri} not found: write the shards first (captioning shards)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{uri}: expected an object of splits, got {type(data).__name__}")
    for split, shards in data.items():
        if not isinstance(shards, dict):
            raise ValueError(f"{uri}: split {split!r} must map shard names to sizes")
        for name, size in shards.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(
                    f"{uri}: size of {split}/{name} must be a non-negative integer, got {size!r}"
                )
    return data


def split_sizes(sizes: Mapping[str, Mapping[str, int]], split: str) -> dict[str, int]:
    """The shard sizes of one split; raises ValueError naming the splits that exist."""
    if split not in sizes:
        raise ValueError(f"no split {split!r} in {SIZES_FILE}; it has {sorted(sizes)}")
    return dict(sizes[split])


@dataclass(frozen=True)
class ShardRange:
    """``take`` consecutive samples of shard ``name``, after skipping its first ``skip``."""

    name: str
    skip: int
    take: int


@dataclass(frozen=True)
class EpochPlan:
    """Who reads what in one epoch: one tuple of shard ranges per (rank, worker) stream.

    Stream ``rank * workers_per_rank + worker`` belongs to that rank's DataLoader worker.
    ``batches_per_stream`` is what each stream yields: K for every stream in training (padded),
    ceil(samples / B) in evaluation.
    """

    train: bool
    world_size: int
    workers_per_rank: int
    batch_size: int
    shard_order: tuple[str, ...]
    streams: tuple[tuple[ShardRange, ...], ...]
    samples_per_stream: tuple[int, ...]
    batches_per_stream: tuple[int, ...]

    @property
    def num_streams(self) -> int:
        return self.world_size * self.workers_per_rank

    @property
    def num_samples(self) -> int:
        """Images in the split (each exactly once per epoch among non-padding entries)."""
        return sum(self.samples_per_stream)

    def stream_index(self, rank: int, worker: int) -> int:
        return rank * self.workers_per_rank + worker

    def rank_streams(self, rank: int) -> range:
        return range(rank * self.workers_per_rank, (rank + 1) * self.workers_per_rank)

    def padding_of_stream(self, stream: int) -> int:
        """Padding images stream ``stream`` appends (0 in evaluation)."""
        if not self.train:
            return 0
        return self.batches_per_stream[stream] * self.batch_size - self.samples_per_stream[stream]

    def batches_for_rank(self, rank: int) -> int:
        return sum(self.batches_per_stream[s] for s in self.rank_streams(rank))

    def samples_for_rank(self, rank: int) -> int:
        """Non-padding images rank ``rank`` yields."""
        return sum(self.samples_per_stream[s] for s in self.rank_streams(rank))

    def padding_for_rank(self, rank: int) -> int:
        return sum(self.padding_of_stream(s) for s in self.rank_streams(rank))

    @property
    def total_padding(self) -> int:
        return sum(self.padding_of_stream(s) for s in range(self.num_streams))


def shuffle_shards(names: Sequence[str], *, seed: int, epoch: int) -> list[str]:
    """The epoch's shard order: a permutation seeded by (seed, epoch), the same on every rank."""
    order = sorted(names)
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def plan_epoch(
    sizes: Mapping[str, int],
    *,
    train: bool,
    batch_size: int,
    num_workers: int,
    world_size: int,
    seed: int = 0,
    epoch: int = 0,
) -> EpochPlan:
    """Cut one split's samples into per-(rank, worker) streams (see the module doc).

    ``sizes`` maps shard names to image counts (one split of sizes.json). Pure and cheap: every
    rank calls it with the same arguments and gets the same plan, without communication.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0 or world_size < 1:
        raise ValueError(f"need num_workers >= 0 and world_size >= 1, got {num_workers} and {world_size}")
    workers = max(num_workers, 1)
    num_streams = world_size * workers
    nonempty = [name for name, n in sizes.items() if n > 0]
    total = sum(sizes[name] for name in nonempty)
    if total == 0:
        raise ValueError(f"the split has no samples (shards: {sorted(sizes)})")
    if train and len(nonempty) < num_streams:
        raise ValueError(
            f"too few shards: {len(nonempty)} non-empty shard(s) for {world_size} rank(s) x "
            f"{workers} loader worker(s) = {num_streams} streams; every stream needs a shard of its own. "
            f"Write more, smaller shards (lower data.shards.samples_per_shard) or use fewer workers "
            f"(data.loader.num_workers) or ranks."
        )
    order = shuffle_shards(nonempty, seed=seed, epoch=epoch) if train else sorted(nonempty)

    # Quotas differ by at most one sample; cut the concatenated shards into runs of those lengths.
    base, extra = divmod(total, num_streams)
    quotas = [base + (1 if s < extra else 0) for s in range(num_streams)]
    streams: list[tuple[ShardRange, ...]] = []
    shard_i, offset = 0, 0  # position in the concatenated order: shard index, samples used of it
    for quota in quotas:
        ranges: list[ShardRange] = []
        need = quota
        while need > 0:
            name = order[shard_i]
            take = min(need, sizes[name] - offset)
            ranges.append(ShardRange(name, offset, take))
            need -= take
            offset += take
            if offset == sizes[name]:
                shard_i, offset = shard_i + 1, 0
        streams.append(tuple(ranges))
    assert shard_i == len(order) and offset == 0, "the plan must use every sample exactly once"

    if train:
        # Every stream pads to K full batches: K*B >= max quota, and S*(K-1)*B < N, so the total
        # padding S*K*B - N is below S*B.
        k = math.ceil(math.ceil(total / num_streams) / batch_size)
        batches = [k] * num_streams
    else:
        batches = [math.ceil(q / batch_size) for q in quotas]
    return EpochPlan(
        train=train,
        world_size=world_size,
        workers_per_rank=workers,
        batch_size=batch_size,
        shard_order=tuple(order),
        streams=tuple(streams),
        samples_per_stream=tuple(quotas),
        batches_per_stream=tuple(batches),
    )


# --------------------------------------------------------------------------------------------------
# The stages (module-level callables, so pipelines pickle under spawn too)
# --------------------------------------------------------------------------------------------------


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
    if _is_s3(url) and not _S3_REGISTERED:
        from captioning.storage import register_webdataset_s3  # lazy: boto3 only for s3 locations

        register_webdataset_s3()  # per process: spawned workers do not inherit the registration
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


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Eval geometry: the stored image resized to size x size (shards are already square)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BILINEAR)


def augment_image(image: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """Train geometry and colour: a mild random-resized crop and colour jitter, never a flip."""
    width, height = image.size
    area = width * height
    box = (0.0, 0.0, float(width), float(height))
    for _ in range(10):  # torchvision's RandomResizedCrop recipe, with light ranges
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if w <= width and h <= height:
            left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
            box = (left, top, left + w, top + h)
            break
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(rng.uniform(1.0 - JITTER, 1.0 + JITTER))
    return image


def stage_transform(samples: Iterable[Sample], *, spec: LoaderSpec, epoch: int) -> Iterator[Sample]:
    """Geometry (and colour when augmenting) on the Pillow image; it stays a Pillow image.

    ``collate`` writes its planes into the uint8 batch; ImageNet normalisation is the last stage,
    once per batch on the delivery device (``Batch.normalized``).
    """
    me = current_stream(spec.dist)
    rng = random.Random(f"augment:{spec.seed}:{epoch}:{me.rank}:{me.worker}")
    augment = spec.train and spec.augment
    for sample in samples:
        image = sample["image"]
        image = (
            augment_image(image, spec.image_size, rng) if augment else resize_square(image, spec.image_size)
        )
        yield {**sample, "image": image}


def choose_captions(
    ids: Sequence[Sequence[int]], seq_per_img: int, *, seed: int, epoch: int, image_id: int
) -> list[list[int]]:
    """``seq_per_img`` of an image's references, drawn afresh per (seed, epoch, image id).

    Without replacement when the image has enough; otherwise every reference once and the rest
    drawn with replacement, in random order.
    """
    if not ids:
        raise ValueError(f"image {image_id} has no captions")
    rng = random.Random(f"captions:{seed}:{epoch}:{image_id}")
    n = len(ids)
    if n >= seq_per_img:
        picks = rng.sample(range(n), seq_per_img)
    else:
        picks = list(range(n)) + rng.choices(range(n), k=seq_per_img - n)
        rng.shuffle(picks)
    return [list(ids[i]) for i in picks]


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


# --------------------------------------------------------------------------------------------------
# Workers and the loader
# --------------------------------------------------------------------------------------------------


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
    DataLoader, so workers always see the current epoch.
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
            yield batch.normalized()  # the "normalize" stage
        if count != expected:  # a broken invariant would hang DDP; fail loudly instead
            raise RuntimeError(f"rank {s.dist.rank} yielded {count} batches, the plan says {expected}")


def build_loader(
    location: str,
    split: str,
    *,
    train: bool,
    batch_size: int,
    num_workers: int,
    dist: DistInfo,
    image_size: int,
    epoch: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    caption_mode: CaptionMode = "random",
    seq_per_img: int = 5,
    augment: bool = False,
    device: torch.device | str | None = None,
) -> CaptionLoader:
    """A loader over ``split`` of the shards at ``location`` (local path or ``s3://bucket/prefix``).

    ``train=True``: shuffled, padded, equal batch counts on every rank. ``train=False``: every
    image once over all ranks, fixed order, no padding, no augmentation. ``device``: where batches
    are delivered (e.g. ``dist.device``); images cross to it as uint8 (pinned, non-blocking for
    CUDA) and are normalised there. ``None`` delivers normalised CPU batches.
    """
    sizes = split_sizes(read_sizes(location), split)
    spec = LoaderSpec(
        location=location,
        split=split,
        train=train,
        batch_size=batch_size,
        num_workers=num_workers,
        dist=dist,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        caption_mode=caption_mode,
        seq_per_img=seq_per_img,
        image_size=image_size,
        augment=augment and train,
    )
    return CaptionLoader(spec, sizes, epoch=epoch, device=device)


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
    b = batch_size or cfg.batch_size
    common: dict[str, Any] = dict(
        batch_size=b, num_workers=cfg.num_workers, dist=dist, image_size=image_size, seed=seed, device=device
    )
    return {
        train_split: build_loader(
            location,
            train_split,
            train=True,
            shuffle_buffer=cfg.shuffle_buffer,
            caption_mode=cfg.caption_mode,
            seq_per_img=cfg.seq_per_img,
            augment=cfg.augment,
            **common,
        ),
        eval_split: build_loader(
            location, eval_split, train=False, caption_mode="random", seq_per_img=cfg.seq_per_img, **common
        ),
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
    )
    return plan.batches_for_rank(dist.rank)
