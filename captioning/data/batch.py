"""What a training or evaluation step gets: the ``Batch``, collation, and the per-image steps.

    batch = collate(samples, caption_mode="random")   # uint8 images, padded caption ids, lengths, flags
    batch = batch.to(device).normalized()             # colour jitter + ImageNet-normalised, on the device

Images leave the DataLoader workers as uint8 (a quarter of the bytes through shared memory and
PCIe; pinned and copied without blocking for CUDA): the workers do what must run per image (JPEG
decode, the crop's resize) and draw the colour jitter's factors; the float work that runs batched
(conversion, colour jitter, normalisation) happens on the training device (``Batch.normalized``,
``prepare_images``). benchmarks/loader.py measures that hand-over against bare decoding.

In ``caption_mode="all"`` every reference is its own row (the image repeated, S=1). The number of
references per shard is not in sizes.json, so ``batch_size`` counts *images* in both modes: an
all-mode batch holds the rows of B images (about 5B rows for COCO), which keeps batch counts equal
across ranks without reading the shards first. Padding images then contribute all their rows.

``resize_square`` (evaluation geometry), ``stack_planes`` and ``normalize_images`` are also
caption-time inference's preprocessing, so a served model sees its images as evaluation did.
``augment_image`` is the light train-time augmentation (the crop in the worker, the jitter's factors
for the device), ``choose_captions`` the seeded draw of a row's ``seq_per_img`` references. The
loader's stages call these; no webdataset here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from captioning.data.vocab import PAD_ID

CaptionMode = Literal["random", "all"]
CAPTION_MODES: tuple[str, ...] = ("random", "all")
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
    and over PCIe), with ``jitter`` when training augments; ``CaptionLoader`` applies both on its
    delivery device before yielding, so what the trainer sees is always float and ImageNet-normalised.
    """

    images: torch.Tensor  # (B, 3, H, W) float, ImageNet-normalised (uint8 0..255 before `normalized`)
    captions: torch.Tensor  # (B, S, L) long: <start> ... <end> then PAD_ID
    lengths: torch.Tensor  # (B, S) long: tokens from <start> to <end> inclusive
    image_ids: torch.Tensor  # (B,) long
    is_pad: torch.Tensor  # (B,) bool: padding copies that must get zero loss weight
    references: list[list[list[str]]] = field(default_factory=list)  # per row: every reference's tokens
    jitter: torch.Tensor | None = None  # (B, 3) float32 brightness, contrast, saturation factors

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
            jitter=None if self.jitter is None else fn(self.jitter),
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
        jitter = None if self.jitter is None else _inline(self.jitter)
        return (_rebuild_batch, (self.images, *small, self.references, jitter))

    def normalized(self) -> Batch:
        """uint8 images -> float, colour-jittered (``jitter``) and ImageNet-normalised, on the images'
        device (no-op if already float)."""
        if self.images.dtype != torch.uint8:
            return self
        return replace(self, images=prepare_images(self.images, self.jitter), jitter=None)


def _inline(t: torch.Tensor) -> torch.Tensor | np.ndarray:
    return t.numpy() if t.device.type == "cpu" else t


def _rebuild_batch(images: torch.Tensor, *rest: Any) -> Batch:
    *small, references, jitter = rest
    captions, lengths, image_ids, is_pad = (torch.as_tensor(x) for x in small)
    return Batch(
        images,
        captions,
        lengths,
        image_ids,
        is_pad,
        references,
        None if jitter is None else torch.as_tensor(jitter),
    )


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


# ITU-R 601 luma, as Pillow's convert("L"), which ImageEnhance's contrast and colour blend towards.
_LUMA = (0.299, 0.587, 0.114)
_LUMA_NP = np.array(_LUMA, dtype=np.float32).reshape(1, 3, 1, 1)


def prepare_images(images: torch.Tensor, jitter: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32, colour-jittered by ``jitter`` (B, 3) when given, normalised.

    The jitter is ``augment_image``'s, batched: per image, brightness (blend with black), contrast
    (with the image's mean luma) and saturation (with each pixel's luma), in that order, clipped to
    0..255 after each, as Pillow's ``ImageEnhance`` does. Pillow truncates to integers after each
    step, this does not: the two agree within 3 levels of 255 (tests/test_loader.py). On a CUDA device
    with torch; on the CPU with numpy (see ``normalize_images``), the same arithmetic on both.
    """
    if jitter is None:
        return normalize_images(images)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
    if tuple(jitter.shape) != (images.shape[0], 3):
        raise ValueError(f"jitter must be (B, 3) = ({images.shape[0]}, 3), got {tuple(jitter.shape)}")
    on_cpu = images.device.type == "cpu"
    x: Any = images.numpy().astype(np.float32) if on_cpu else images.float()  # (B, 3, H, W)
    factors: Any = jitter.numpy() if on_cpu else jitter.to(x.device, x.dtype)  # (B, 3)
    luma: Any = _LUMA_NP if on_cpu else x.new_tensor(_LUMA).view(1, 3, 1, 1)
    brightness, contrast, saturation = (factors[:, k].reshape(-1, 1, 1, 1) for k in range(3))
    x = (x * brightness).clip(0.0, 255.0)
    mean = (x * luma).sum(axis=1, keepdims=True).mean(axis=(2, 3), keepdims=True)  # (B, 1, 1, 1)
    x = (mean + contrast * (x - mean)).clip(0.0, 255.0)
    gray = (x * luma).sum(axis=1, keepdims=True)  # (B, 1, H, W)
    x = (gray + saturation * (x - gray)).clip(0.0, 255.0)
    scale = _SCALE_NP if on_cpu else x.new_tensor(_SCALE).view(1, 3, 1, 1)
    shift = _SHIFT_NP if on_cpu else x.new_tensor(_SHIFT).view(1, 3, 1, 1)
    x = x * scale + shift
    return torch.from_numpy(x) if on_cpu else x


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
    jitters = [s.get("jitter") for s in owners]
    if any(j is not None for j in jitters) and any(j is None for j in jitters):
        raise ValueError("either every sample of a batch has colour jitter factors or none has")
    return Batch(
        images=stack_planes([s["image"] for s in owners]),  # (B, 3, H, W) uint8
        captions=torch.from_numpy(captions),
        lengths=torch.from_numpy(lengths),
        image_ids=torch.tensor([s["image_id"] for s in owners], dtype=torch.long),
        is_pad=torch.tensor([s["is_pad"] for s in owners], dtype=torch.bool),
        references=[s["references"] for s in owners],
        jitter=None if jitters[0] is None else torch.tensor(jitters, dtype=torch.float32),  # (B, 3)
    )


# ------------------------------------------------------------------------- per image, per sample


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Eval geometry: the stored image resized to size x size (shards are already square)."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BILINEAR)


def augment_image(
    image: Image.Image, size: int, rng: random.Random
) -> tuple[Image.Image, tuple[float, float, float]]:
    """Train geometry and colour: a mild random-resized crop, never a flip, done here (it shrinks what
    crosses to the device), and the colour jitter's factors (brightness, contrast, saturation), which
    ``prepare_images`` applies batched on the training device."""
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
    brightness, contrast, saturation = (rng.uniform(1.0 - JITTER, 1.0 + JITTER) for _ in range(3))
    return image, (brightness, contrast, saturation)


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
