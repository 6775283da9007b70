"""Loader throughput vs a bare tar + Pillow loop over the same shards, with the same process count.

Makes --num-images photo-like 256x256 JPEGs (smooth gradients, low-frequency texture, fine noise;
quality 90) and writes them as shards in the loader's format with ``webdataset.TarWriter``, in a
temporary folder. Then measures, alternating, best of --repeats, in images/s:

- loader: ``build_loader(LoaderConfig(num_workers=W), ..., train=True, batch_size=32)``, one epoch
  end to end as a GPU run's main process sees it: worker start, tar reading, shuffle buffer, Pillow
  decode, caption choice, padding, collation and the hand-over of uint8 batches to the main process
  all included; the float work (conversion, colour jitter, normalisation) is the training device's
  (``Batch.normalized`` there: kernels queued behind the step, no host time);
- loader + CPU float work: the same, normalising in the main process as a CPU-only run does;
- bare: a ``multiprocessing.Pool(W)`` over the shards, each task iterating its tar with ``tarfile``,
  Pillow-decoding every JPEG and converting it with torchvision's ``to_tensor``; nothing is sent back.

The same pair also runs in one process (loader ``num_workers=0``, bare without a pool): that ratio
is the pipeline's own cost; the difference to the first is handing batches from the workers to the
main process (shared memory).

Last line: ``RESULT loader_vs_bare=R loader_cpu_float_vs_bare=C`` (loader images/s over bare
images/s; goal R >= 0.8). Run::

    .venv/bin/python benchmarks/loader.py                      # 1024 images, W = cores
    .venv/bin/python benchmarks/loader.py --num-images 2048 --workers 4
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from captioning.config import LoaderConfig
from captioning.data.loader import build_loader
from captioning.training.dist import DistInfo
from captioning.vision import import_torchvision

SIZE = 256
QUALITY = 90
# Imported here, before any pool forks, so no worker pays for the import inside a timed run.
TO_TENSOR = import_torchvision().transforms.functional.to_tensor


def make_photo(rng: np.random.Generator) -> bytes:
    """A 256x256 JPEG with photo-like statistics (so its size and decode cost are realistic)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) / (2 * SIZE) + 0.5
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    pixels = c0 * (1 - t)[..., None] + c1 * t[..., None]  # (H, W, 3)
    low = Image.fromarray(np.clip(128 + rng.normal(0, 40, (8, 8, 3)), 0, 255).astype(np.uint8))
    pixels += np.asarray(low.resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.float32) - 128
    pixels += rng.normal(0, 6, pixels.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=QUALITY)
    return buf.getvalue()


def write_benchmark_shards(root: Path, num_images: int, per_shard: int) -> int:
    """Train shards in the loader's format; returns the total JPEG bytes."""
    rng = np.random.default_rng(0)
    sizes: dict[str, int] = {}
    total_bytes = 0
    for index in range(math.ceil(num_images / per_shard)):
        name = f"train-{index:06d}.tar"
        ids = range(index * per_shard + 1, min(num_images, (index + 1) * per_shard) + 1)
        with wds.TarWriter(str(root / name)) as writer:
            for image_id in ids:
                jpg = make_photo(rng)
                total_bytes += len(jpg)
                captions = []
                for k in range(5):
                    tokens = ["a", "photo", "of", "thing", str(k)][: 2 + (image_id + k) % 4]
                    ids_ = [1, *(4 + len(t) for t in tokens), 2]
                    captions.append({"raw": " ".join(tokens), "tokens": tokens, "ids": ids_})
                meta = {
                    "image_id": image_id,
                    "split": "train",
                    "path": f"train/{image_id}.jpg",
                    "orig_size": [SIZE, SIZE],
                    "captions": captions,
                }
                writer.write({"__key__": f"{image_id:012d}", "jpg": jpg, "json": json.dumps(meta).encode()})
        sizes[name] = len(ids)
    (root / "sizes.json").write_text(json.dumps({"train": sizes}))
    return total_bytes


def bare_shard(path: str) -> int:
    """tarfile iteration + Pillow decode + torchvision ``to_tensor`` for one shard; returns the count."""
    count = 0
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            if not member.name.endswith(".jpg"):
                continue
            f = tar.extractfile(member)
            assert f is not None
            image = Image.open(io.BytesIO(f.read())).convert("RGB")
            tensor = TO_TENSOR(image)  # (3, H, W) float in [0, 1]
            count += int(tensor.shape[0] == 3)
    return count


def run_bare(root: Path, workers: int) -> tuple[int, float]:
    shards = sorted(str(p) for p in root.glob("train-*.tar"))
    start = time.perf_counter()
    if workers == 0:
        count = sum(bare_shard(s) for s in shards)
    else:
        with multiprocessing.get_context("fork").Pool(
            workers, initializer=torch.set_num_threads, initargs=(1,)
        ) as pool:
            count = sum(pool.map(bare_shard, shards, chunksize=1))
    return count, time.perf_counter() - start


def run_loader(root: Path, workers: int, batch_size: int, normalize: bool = False) -> tuple[int, float]:
    """One epoch; ``normalize``: the float work in this process (a CPU run) instead of on a device."""
    loader = build_loader(
        LoaderConfig(num_workers=workers),  # data.loader's defaults otherwise (shuffle buffer 1000)
        str(root),
        "train",
        train=True,
        dist=DistInfo(),
        image_size=SIZE,
        seed=0,
        batch_size=batch_size,
    )
    loader.normalize = normalize
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += batch.num_real
    return count, time.perf_counter() - start


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-images", type=int, default=1024)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="loader-bench-"))
    try:
        start = time.perf_counter()
        jpeg_bytes = write_benchmark_shards(root, args.num_images, args.per_shard)
        print(
            f"shards: {args.num_images} images {SIZE}x{SIZE}, {math.ceil(args.num_images / args.per_shard)} shards, "
            f"mean JPEG {jpeg_bytes / args.num_images / 1024:.1f} KiB, written in {time.perf_counter() - start:.1f}s"
        )
        print(f"processes: {args.workers} (cores: {os.cpu_count()}), batch {args.batch_size}")
        # (name, what runs, processes doing the work): the headline pair, then the same in one
        # process (loader num_workers=0), which separates pipeline cost from worker hand-over cost.
        runs = [
            ("bare", lambda: run_bare(root, args.workers)),
            ("loader", lambda: run_loader(root, args.workers, args.batch_size)),
            ("loader+cpu-float", lambda: run_loader(root, args.workers, args.batch_size, normalize=True)),
            ("bare-1proc", lambda: run_bare(root, 0)),
            ("loader-0workers", lambda: run_loader(root, 0, args.batch_size)),
        ]
        best = dict.fromkeys([name for name, _ in runs], 0.0)
        for repeat in range(args.repeats):
            for name, run in runs:
                count, seconds = run()
                assert count == args.num_images, (name, count)
                rate = count / seconds
                best[name] = max(best[name], rate)
                print(
                    f"  run {repeat + 1} {name:16s}: {count} images in {seconds:.2f}s = {rate:7.1f} images/s"
                )
        ratio = best["loader"] / best["bare"]
        cpu_float = best["loader+cpu-float"] / best["bare"]
        in_process = best["loader-0workers"] / best["bare-1proc"]
        print(
            f"best bare, {args.workers} processes:  {best['bare']:7.1f} images/s (tar + Pillow + to_tensor)"
        )
        print(
            f"best loader, {args.workers} workers:  {best['loader']:7.1f} images/s (uint8 hand-over to the main process)"
        )
        print(
            f"best loader+cpu-float:     {best['loader+cpu-float']:7.1f} images/s (normalised in the main process)"
        )
        print(
            f"loader/bare with {args.workers} processes: {ratio:.2f} (with the float work on the CPU: {cpu_float:.2f})"
        )
        print(f"loader/bare in one process:  {in_process:.2f} (the rest is the worker -> main hand-over)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"RESULT loader_vs_bare={ratio:.2f} loader_cpu_float_vs_bare={cpu_float:.2f}")
    return ratio


if __name__ == "__main__":
    main()
