"""Shard build throughput vs a bare Pillow loop over the same photo-sized JPEGs, per core.

Makes --num-images natural-looking 640x480 JPEGs (smooth gradients, low-frequency texture, shapes,
sensor-like noise; quality 90) in a temporary folder, then measures in the same run:

- shard build: ``write_shards`` (256 px squash, quality 90) with one process per core, and in one
  process; end to end (pool start, tar writing, hashing, stats and manifest included);
- bare loop: open -> convert RGB -> resize 256x256 bicubic -> encode JPEG q90 into memory, the naive
  loop without ``draft``; in one process, and one process per core.

- re-run: ``prepare_data`` (what ``captioning shards`` runs) builds a dataset=local copy of the same
  images, then runs again over the finished shards; the second run must change no file's mtime.
  ``rerun_vs_build`` is its wall time over the first's. A ``write_shards`` re-run (which checks
  every tar's sha256 instead of trusting the manifest) is printed beside it.

Each measurement is repeated --rounds times, interleaved, and the best kept.

Per-core rates are images/s divided by processes. The bare per-core rate used for the ratio is the
better of its single-process and all-cores figures, so the comparison never flatters the shards.
Last line: ``RESULT shard_vs_bare=R images_per_s_per_core=N rerun_vs_build=F`` (N: the shard build's
per-core rate with all cores; F: the ``prepare_data`` re-run's time over its build's). Run::

    .venv/bin/python benchmarks/shards.py                  # 1000 images, all cores
    .venv/bin/python benchmarks/shards.py --num-images 2000 --procs 2
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from captioning.config import Config, DataConfig, apply_overrides
from captioning.data.prepare import prepare_data
from captioning.data.records import Caption, ImageRecord
from captioning.data.shard_build import write_shards
from captioning.data.sources import DirSource
from captioning.data.vocab import build_vocab

SIZE = 256
QUALITY = 90
DATA = DataConfig()  # the other settings: the config's defaults


def make_photo(seed: int, width: int, height: int) -> bytes:
    """A JPEG with photo-like statistics: gradients, soft texture, blurred shapes, fine noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) / (width + height) + 0.5
    c0, c1 = rng.uniform(20, 235, 3).astype(np.float32), rng.uniform(20, 235, 3).astype(np.float32)
    pixels = c0 * (1 - t)[..., None] + c1 * t[..., None]
    low = Image.fromarray(np.clip(128 + rng.normal(0, 30, (9, 12, 3)), 0, 255).astype(np.uint8))
    pixels += np.asarray(low.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) - 128
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(6, 16))):
        x0, y0 = rng.uniform(-50, width), rng.uniform(-50, height)
        w, h = rng.uniform(20, width / 2), rng.uniform(20, height / 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (x0, y0, x0 + w, y0 + h)
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    image = image.filter(ImageFilter.BoxBlur(1))  # soft edges, like a lens
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * 5
    noisy = np.asarray(image, dtype=np.float32) + noise
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=QUALITY)
    return buffer.getvalue()


def _write_photo(args: tuple[str, int, int, int]) -> None:
    path, seed, width, height = args
    Path(path).write_bytes(make_photo(seed, width, height))


def bare_loop(paths: Sequence[str]) -> int:
    """The naive Pillow loop: open -> RGB -> 256x256 bicubic -> JPEG bytes. Returns bytes written."""
    total = 0
    for path in paths:
        with Image.open(path) as image:
            small = image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=QUALITY)
        total += len(buffer.getvalue())
    return total


def _context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def bare_pool(paths: Sequence[str], procs: int) -> float:
    """Wall seconds for the bare loop split over procs processes (pool start included)."""
    chunks = [list(paths[i::procs]) for i in range(procs)]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=procs, mp_context=_context()) as pool:
        list(pool.map(bare_loop, chunks))
    return time.perf_counter() - start


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under folder: name -> (mtime in ns, inode); equal snapshots mean nothing was touched."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir())}


def local_config(work: Path, names: Sequence[str], shard_dir: Path, procs: int, per_shard: int) -> Config:
    """A dataset=local config over the benchmark's images (a Flickr-style Karpathy file, all train)."""
    karpathy = work / "dataset_bench.json"
    if not karpathy.exists():
        entries = [
            {
                "filename": name,
                "imgid": i,
                "split": "train",
                "sentences": [
                    {
                        "tokens": ["a", "photo", "of", "shapes"],
                        "raw": "a photo of shapes",
                        "imgid": i,
                        "sentid": i,
                    }
                ],
            }
            for i, name in enumerate(names)
        ]
        karpathy.write_text(json.dumps({"dataset": "flickr8k", "images": entries}))
    overrides = {
        "data.dataset": "local",
        "data.local.karpathy_json": str(karpathy),
        "data.local.image_dir": str(work / "images"),
        "data.shard_dir": str(shard_dir),
        "data.min_word_freq": "1",
        "data.shards.image_size": str(SIZE),
        "data.shards.jpeg_quality": str(QUALITY),
        "data.shards.samples_per_shard": str(per_shard),
        "data.shards.num_procs": str(procs),
    }
    return apply_overrides(Config(), overrides)


def rerun(cfg: Config) -> tuple[float, float]:
    """(build s, re-run s) of prepare_data into cfg.data.shard_dir; the re-run must touch no file."""
    begin = time.perf_counter()
    first = prepare_data(cfg, progress=False)
    build_s = time.perf_counter() - begin
    assert first.manifest.num_built > 0, first.summary
    before = snapshot(Path(cfg.data.shard_dir))
    begin = time.perf_counter()
    second = prepare_data(cfg, progress=False)
    rerun_s = time.perf_counter() - begin
    assert second.manifest.num_built == 0 and snapshot(Path(cfg.data.shard_dir)) == before, second.summary
    return build_s, rerun_s


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-images", type=int, default=1000, help="JPEGs to make and process")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument(
        "--procs", type=int, default=0, help="processes for the all-cores runs; 0 = all cores"
    )
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the best is kept")
    parser.add_argument(
        "--workdir", default=None, help="keep the images and shards here (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    procs = args.procs or len(os.sched_getaffinity(0))
    n = args.num_images

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        image_dir = work / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        names = [f"photo_{i:06d}.jpg" for i in range(n)]
        start = time.perf_counter()
        jobs = [(str(image_dir / name), i, args.width, args.height) for i, name in enumerate(names)]
        with ProcessPoolExecutor(max_workers=procs, mp_context=_context()) as pool:
            list(pool.map(_write_photo, jobs, chunksize=16))
        mean_kb = sum((image_dir / name).stat().st_size for name in names) / n / 1024
        print(
            f"made {n} {args.width}x{args.height} JPEGs (q{QUALITY}, mean {mean_kb:.0f} KiB) "
            f"in {time.perf_counter() - start:.1f} s; {procs} cores"
        )

        records = [
            ImageRecord(
                image_id=i,
                path=name,
                split="train",
                source_split="train",
                captions=(
                    Caption(raw="a photo of shapes", tokens=("a", "photo", "of", "shapes"), sent_id=i),
                ),
            )
            for i, name in enumerate(names)
        ]
        vocab = build_vocab(records, min_word_freq=1)
        source = DirSource(image_dir)
        paths = [str(image_dir / name) for name in names]

        def shard_build(out: str, num_procs: int) -> float:  # a second call over out re-runs it
            begin = time.perf_counter()
            manifest = write_shards(
                records,
                vocab,
                source,
                str(work / out),
                image_size=SIZE,
                resize_mode="squash",
                jpeg_quality=QUALITY,
                samples_per_shard=args.samples_per_shard,
                max_image_pixels=DATA.shards.max_image_pixels,
                max_caption_len=DATA.max_caption_len,
                overlong=DATA.overlong_captions,
                num_procs=num_procs,
                executor="process",
                dask_address=None,
                progress=False,
            )
            seconds = time.perf_counter() - begin
            assert manifest.splits["train"].num_samples == n, manifest.splits
            return seconds

        # Interleaved rounds, best of each: other load on the machine hits every pipeline alike.
        keys = ("bare_1", "bare_n", "shard_1", "shard_n", "resume", "build", "rerun")
        times: dict[str, list[float]] = {key: [] for key in keys}
        for r in range(args.rounds):
            start = time.perf_counter()
            bare_loop(paths)
            times["bare_1"].append(time.perf_counter() - start)
            times["bare_n"].append(bare_pool(paths, procs))
            times["shard_n"].append(shard_build(f"shards-all-{r}", procs))
            times["resume"].append(shard_build(f"shards-all-{r}", procs))
            times["shard_1"].append(shard_build(f"shards-one-{r}", 1))
            cfg = local_config(work, names, work / f"prepared-{r}", procs, args.samples_per_shard)
            build_s, rerun_s = rerun(cfg)
            times["build"].append(build_s)
            times["rerun"].append(rerun_s)
        bare_1, bare_n, shard_1, shard_n, resume, build, rerun_s = (min(times[k]) for k in keys)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("bare Pillow loop", 1, bare_1),
        ("bare Pillow loop", procs, bare_n),
        ("write_shards", 1, shard_1),
        ("write_shards", procs, shard_n),
    ]
    print(f"\n{'pipeline':<18} {'procs':>5} {'wall s':>8} {'images/s':>9} {'per core':>9}")
    for name, p, seconds in rows:
        print(f"{name:<18} {p:>5} {seconds:>8.2f} {n / seconds:>9.1f} {n / seconds / p:>9.1f}")
    bare_per_core = max(n / bare_1, n / bare_n / procs)
    shard_per_core = n / shard_n / procs
    single_ratio = (n / shard_1) / (n / bare_1)
    ratio = shard_per_core / bare_per_core
    print(f"\nsingle process: write_shards / bare = {single_ratio:.2f}")
    print(f"all cores, per core: write_shards / best bare per core = {ratio:.2f}")
    rerun_ratio = rerun_s / build
    print(
        f"prepare_data: build {build:.2f} s, re-run over the finished shards {rerun_s:.3f} s (no mtime changed)"
    )
    print(
        f"write_shards re-run (every tar's sha256 checked): {resume:.3f} s = {resume / shard_n:.4f} of its build"
    )
    print(
        f"RESULT shard_vs_bare={ratio:.2f} images_per_s_per_core={shard_per_core:.1f} "
        f"rerun_vs_build={rerun_ratio:.4f}"
    )
    return {"shard_vs_bare": ratio, "images_per_s_per_core": shard_per_core, "rerun_vs_build": rerun_ratio}


if __name__ == "__main__":
    main()
