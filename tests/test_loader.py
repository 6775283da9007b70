"""The WebDataset loader: plan invariants, stages, collation, and DDP runs of 2 ranks x 2 workers.

Shards are written here with ``webdataset.TarWriter`` in the shard contract's format (tiny 32x32
JPEGs, uneven shard sizes, captions of varying number and length).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import random
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import webdataset as wds
from gloo import join_gloo
from loaders import build_loaders, count_batches
from PIL import Image
from s3server import free_port

from captioning.config import LoaderConfig
from captioning.data.batch import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JITTER,
    Batch,
    augment_image,
    choose_captions,
    collate,
    normalize_images,
    prepare_images,
    stack_planes,
)
from captioning.data.epoch import plan_epoch
from captioning.data.loader import build_loader
from captioning.data.vocab import END_ID, PAD_ID, START_ID
from captioning.training import dist as D
from captioning.training.dist import DistInfo

TRAIN_SIZES = (10, 10, 10, 10, 10, 10, 3)  # 63 images in 7 uneven shards
VAL_SIZES = (7, 7, 3)  # 17 images in 3 shards: fewer shards than 2 ranks x 2 workers
SIDE = 32


def num_refs(image_id: int) -> int:
    """3 to 6 references per image, so with- and without-replacement draws both happen."""
    return 3 + image_id % 4


def caption_ids(image_id: int, k: int) -> list[int]:
    """Reference k of an image: <start> w... <end>, 1 to 5 words, word ids encoding (image, k)."""
    words = [10 + k] * (1 + (image_id + k) % 5)
    return [START_ID, *words, END_ID]


def write_split(root: Path, split: str, sizes: tuple[int, ...], first_id: int) -> dict[str, int]:
    rng = np.random.default_rng(first_id)
    image_id = first_id
    out = {}
    for index, n in enumerate(sizes):
        name = f"{split}-{index:06d}.tar"
        with wds.TarWriter(str(root / name)) as writer:
            for _ in range(n):
                pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                captions = []
                for k in range(num_refs(image_id)):
                    ids = caption_ids(image_id, k)
                    tokens = [f"w{i}" for i in ids[1:-1]]
                    captions.append({"raw": " ".join(tokens), "tokens": tokens, "ids": ids})
                meta = {
                    "image_id": image_id,
                    "split": split,
                    "path": f"{split}/{image_id}.jpg",
                    "orig_size": [SIDE, SIDE],
                    "captions": captions,
                }
                writer.write(
                    {"__key__": f"{image_id:012d}", "jpg": buf.getvalue(), "json": json.dumps(meta).encode()}
                )
                image_id += 1
        out[name] = n
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("shards")
    sizes = {
        "train": write_split(root, "train", TRAIN_SIZES, first_id=1),
        "val": write_split(root, "val", VAL_SIZES, first_id=1001),
    }
    (root / "sizes.json").write_text(json.dumps(sizes))
    return str(root)


TRAIN_IDS = list(range(1, 1 + sum(TRAIN_SIZES)))
VAL_IDS = list(range(1001, 1001 + sum(VAL_SIZES)))


def seen(loader: Any) -> tuple[list[tuple[int, bool]], int, list[Batch]]:
    pairs: list[tuple[int, bool]] = []
    batches = []
    for batch in loader:
        pairs += [(int(i), bool(p)) for i, p in zip(batch.image_ids, batch.is_pad, strict=True)]
        batches.append(batch)
    return pairs, len(batches), batches


# --------------------------------------------------------------------------------------------------
# The plan: pure, so its invariants are checked over many shapes
# --------------------------------------------------------------------------------------------------


def plan_cases() -> list[tuple[dict[str, int], int, int, int]]:
    rng = random.Random(0)
    cases = []
    for _ in range(150):
        world, workers, batch = rng.randint(1, 4), rng.randint(0, 3), rng.randint(1, 9)
        streams = world * max(workers, 1)
        num_shards = rng.randint(streams, streams + 6)
        sizes = {f"train-{i:06d}.tar": rng.randint(1, 40) for i in range(num_shards)}
        if rng.random() < 0.3:
            sizes["train-999999.tar"] = 0  # empty shards are skipped
        cases.append((sizes, world, workers, batch))
    return cases


@pytest.mark.parametrize("train", [True, False])
def test_plan_covers_every_sample_once_with_equal_batches_and_bounded_padding(train: bool) -> None:
    for sizes, world, workers, batch in plan_cases():
        plan = plan_epoch(
            sizes, train=train, batch_size=batch, num_workers=workers, world_size=world, seed=3, epoch=2
        )
        covered: Counter[tuple[str, int]] = Counter()
        for ranges, quota in zip(plan.streams, plan.samples_per_stream, strict=True):
            assert sum(r.take for r in ranges) == quota
            for r in ranges:
                covered.update((r.name, i) for i in range(r.skip, r.skip + r.take))
        assert covered == Counter((name, i) for name, n in sizes.items() for i in range(n))
        assert max(plan.samples_per_stream) - min(plan.samples_per_stream) <= 1
        streams = world * max(workers, 1)
        if train:
            per_rank = {plan.batches_for_rank(r) for r in range(world)}
            assert len(per_rank) == 1, (sizes, world, workers, batch)
            assert all(plan.padding_of_stream(s) >= 0 for s in range(streams))
            assert plan.total_padding < streams * batch
            assert plan.total_padding + plan.num_samples == sum(plan.batches_per_stream) * batch
        else:
            assert plan.total_padding == 0
            assert plan.batches_per_stream == tuple(math.ceil(q / batch) for q in plan.samples_per_stream)


def test_shard_order_is_seeded_per_epoch_and_eval_is_sorted() -> None:
    sizes = {f"train-{i:06d}.tar": 5 for i in range(12)}
    kw: dict[str, Any] = dict(batch_size=4, num_workers=2, world_size=2)
    e0 = plan_epoch(sizes, train=True, seed=1, epoch=0, **kw)
    assert e0 == plan_epoch(sizes, train=True, seed=1, epoch=0, **kw)  # every rank computes this
    assert e0.shard_order != plan_epoch(sizes, train=True, seed=1, epoch=1, **kw).shard_order
    assert e0.shard_order != plan_epoch(sizes, train=True, seed=2, epoch=0, **kw).shard_order
    assert sorted(e0.shard_order) == sorted(sizes)
    ev = plan_epoch(sizes, train=False, seed=1, epoch=5, **kw)
    assert ev.shard_order == tuple(sorted(sizes))
    assert ev == plan_epoch(sizes, train=False, seed=9, epoch=0, **kw)


def test_too_few_shards_is_a_clear_error(shards: str) -> None:
    with pytest.raises(ValueError) as info:
        build_loader(
            LoaderConfig(num_workers=4),
            shards,
            "train",
            train=True,
            dist=DistInfo(rank=0, world_size=2),
            image_size=SIDE,
            seed=0,
            batch_size=4,
        )
    message = str(info.value)
    for part in (
        "7 non-empty shard",
        "2 rank",
        "4 loader worker",
        "8 streams",
        "samples_per_shard",
        "num_workers",
    ):
        assert part in message
    # Evaluation splits shards into ranges, so 3 shards serve 4 streams.
    build_loader(
        LoaderConfig(num_workers=2),
        shards,
        "val",
        train=False,
        dist=DistInfo(0, 2),
        image_size=SIDE,
        seed=0,
        batch_size=4,
    )


def test_unknown_split_and_missing_sizes(shards: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no split 'test'.*\['train', 'val'\]"):
        build_loader(
            LoaderConfig(num_workers=0),
            shards,
            "test",
            train=False,
            dist=DistInfo(),
            image_size=8,
            seed=0,
            batch_size=2,
        )
    with pytest.raises(FileNotFoundError, match=r"sizes\.json"):
        build_loader(
            LoaderConfig(num_workers=0),
            str(tmp_path),
            "train",
            train=True,
            dist=DistInfo(),
            image_size=8,
            seed=0,
            batch_size=2,
        )


# --------------------------------------------------------------------------------------------------
# Stages and collation
# --------------------------------------------------------------------------------------------------


def sample(image_id: int, captions: list[list[int]], is_pad: bool = False) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "image": Image.new("RGB", (4, 4), (image_id, image_id, image_id)),
        "captions": captions,
        "references": [[f"r{image_id}"]],
        "is_pad": is_pad,
    }


def test_collate_pads_captions_and_counts_lengths() -> None:
    a = sample(1, [[1, 5, 2], [1, 5, 6, 7, 2]])
    b = sample(2, [[1, 2], [1, 8, 2]], is_pad=True)
    batch = collate([a, b])
    assert batch.images.shape == (2, 3, 4, 4) and batch.images.dtype == torch.uint8  # normalised later
    assert batch.normalized().images.dtype == torch.float32
    assert batch.captions.shape == (2, 2, 5) and batch.captions.dtype == torch.long
    assert batch.captions[0, 1].tolist() == [1, 5, 6, 7, 2]
    assert batch.captions[1, 0].tolist() == [1, 2, PAD_ID, PAD_ID, PAD_ID]
    assert batch.lengths.tolist() == [[3, 5], [2, 3]]
    assert batch.image_ids.tolist() == [1, 2] and batch.image_ids.dtype == torch.long
    assert batch.is_pad.tolist() == [False, True] and batch.is_pad.dtype == torch.bool
    assert batch.references == [[["r1"]], [["r2"]]]
    assert len(batch) == 2 and batch.num_real == 1
    moved = batch.to("cpu")
    assert torch.equal(moved.captions, batch.captions) and moved.references is batch.references


def test_collate_all_mode_repeats_images_one_reference_per_row() -> None:
    batch = collate([sample(1, [[1, 5, 2], [1, 2]]), sample(2, [[1, 6, 6, 2]])], caption_mode="all")
    assert batch.images.shape == (3, 3, 4, 4)
    assert batch.images[:, 0, 0, 0].tolist() == [1, 1, 2]
    assert batch.captions.shape == (3, 1, 4)
    assert batch.lengths.tolist() == [[3], [2], [4]]
    assert batch.image_ids.tolist() == [1, 1, 2]
    assert len(batch.references) == 3


def test_choose_captions_is_reproducible_and_changes_with_epoch() -> None:
    ids = [[1, 10 + k, 2] for k in range(7)]
    pick = choose_captions(ids, 5, seed=0, epoch=0, image_id=42)
    assert pick == choose_captions(ids, 5, seed=0, epoch=0, image_id=42)
    assert len({tuple(c) for c in pick}) == 5  # without replacement: enough references
    epochs = {tuple(map(tuple, choose_captions(ids, 5, seed=0, epoch=e, image_id=42))) for e in range(6)}
    assert len(epochs) > 1
    few = choose_captions(ids[:3], 5, seed=0, epoch=0, image_id=42)
    assert len(few) == 5 and {tuple(c) for c in few} == {tuple(c) for c in ids[:3]}  # all, then repeats


def test_normalisation_is_imagenet() -> None:
    image = Image.new("RGB", (3, 2), (255, 0, 128))
    other = Image.fromarray(np.random.default_rng(0).integers(0, 256, (2, 3, 3), dtype=np.uint8))
    planes = stack_planes([image, other, image])
    assert planes.shape == (3, 3, 2, 3) and planes.dtype == torch.uint8
    batch = normalize_images(planes)
    assert batch.shape == (3, 3, 2, 3) and batch.dtype == torch.float32
    for c, value in enumerate((255, 0, 128)):
        expected = (value / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(batch[0, c], torch.full((2, 3), expected), atol=1e-5)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    reference = (torch.from_numpy(np.array(other)).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(batch[1], reference, atol=1e-5)
    assert torch.equal(batch[2], batch[0])


def test_device_colour_jitter_matches_pillows_image_enhance() -> None:
    """The batched jitter on the device equals Pillow's ImageEnhance chain within its rounding."""
    from PIL import ImageEnhance

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)) for _ in range(3)]
    pictures.append(Image.new("RGB", (7, 9), (250, 250, 5)))  # clipped at 255 by a brightness > 1
    factors = [(1.1, 0.9, 1.08), (0.9, 1.1, 0.92), (1.0, 1.0, 1.0), (1.1, 1.1, 0.9)]
    expected = []
    for picture, (brightness, contrast, saturation) in zip(pictures, factors, strict=True):
        picture = ImageEnhance.Brightness(picture).enhance(brightness)
        picture = ImageEnhance.Contrast(picture).enhance(contrast)
        expected.append(ImageEnhance.Color(picture).enhance(saturation))
    got = prepare_images(stack_planes(pictures), torch.tensor(factors))  # (4, 3, 9, 7)
    reference = normalize_images(stack_planes(expected))
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    levels = ((got - reference) * std * 255).abs()  # differences in 0..255 levels
    assert float(levels.max()) <= 3.0  # Pillow truncates to an integer after each of the 3 steps
    assert torch.equal(prepare_images(stack_planes(pictures[2:3]), torch.ones(1, 3)), reference[2:3])
    with pytest.raises(ValueError, match="jitter must be"):
        prepare_images(stack_planes(pictures), torch.ones(3, 3))


def test_augmentation_draws_jitter_factors_the_batch_carries_to_the_device() -> None:
    image = Image.new("RGB", (40, 30), (90, 120, 200))
    cropped, factors = augment_image(image, 16, random.Random(3))
    assert cropped.size == (16, 16)
    assert all(1 - JITTER <= f <= 1 + JITTER for f in factors)
    assert (cropped, factors)[1] == augment_image(image, 16, random.Random(3))[1]  # seeded
    samples = [sample(1, [[1, 5, 2]]), sample(2, [[1, 2]])]
    samples = [{**s, "jitter": (1.05, 0.95, 1.0)} for s in samples]
    batch = collate(samples)
    assert batch.jitter is not None and batch.jitter.shape == (2, 3)
    crossed = pickle.loads(pickle.dumps(batch))  # as from a DataLoader worker
    assert crossed.jitter is not None and torch.equal(crossed.jitter, batch.jitter)
    ready = crossed.normalized()
    assert ready.jitter is None and torch.equal(ready.images, prepare_images(batch.images, batch.jitter))
    assert not torch.equal(ready.images, normalize_images(batch.images))
    with pytest.raises(ValueError, match="every sample"):
        collate([samples[0], sample(3, [[1, 2]])])


def test_eval_is_deterministic_and_augmentation_is_seeded(shards: str) -> None:
    def first(train: bool, augment: bool, epoch: int, workers: int = 0, normalize: bool = True) -> Batch:
        loader = build_loader(
            LoaderConfig(num_workers=workers, shuffle_buffer=0, augment=augment),
            shards,
            "val",
            train=train,
            dist=DistInfo(),
            image_size=24,
            seed=0,
            batch_size=4,
        )
        loader.set_epoch(epoch)
        loader.normalize = normalize
        return next(iter(loader))

    def images(train: bool, augment: bool, epoch: int) -> torch.Tensor:
        return first(train, augment, epoch).images

    plain = images(False, False, 0)
    assert plain.shape == (4, 3, 24, 24)
    assert torch.equal(plain, images(False, False, 0))
    assert torch.equal(plain, images(False, True, 0))  # evaluation never augments
    aug = images(True, True, 0)
    assert torch.equal(aug, images(True, True, 0))  # seeded by (seed, epoch, rank, worker)
    assert not torch.equal(aug, images(True, False, 0))  # same order, different pixels
    raw = first(True, True, 0, workers=1, normalize=False)  # the hand-over: uint8 and the jitter's factors
    assert raw.images.dtype == torch.uint8 and raw.jitter is not None and raw.jitter.shape == (4, 3)
    assert torch.equal(raw.normalized().images, aug)  # the worker's draw equals the in-process one


def test_world_one_without_workers_covers_train_once(shards: str) -> None:
    loader = build_loader(
        LoaderConfig(num_workers=0),
        shards,
        "train",
        train=True,
        dist=DistInfo(),
        image_size=SIDE,
        seed=0,
        batch_size=4,
    )
    assert loader.stage_names == [
        "plan",
        "split_by_node",
        "split_by_worker",
        "tar",
        "shuffle",
        "decode",
        "transform",
        "captions",
        "pad",
        "batch",
        "normalize",
    ]
    pairs, num_batches, batches = seen(loader)
    assert (
        num_batches
        == len(loader)
        == 16
        == count_batches(shards, "train", train=True, batch_size=4, num_workers=0, dist=DistInfo())
    )
    assert sorted(i for i, pad in pairs if not pad) == TRAIN_IDS
    assert sum(pad for _, pad in pairs) == loader.num_padding == 1
    assert loader.num_samples == 63
    batch = batches[0]
    assert batch.images.shape == (4, 3, SIDE, SIDE) and batch.images.dtype == torch.float32
    assert batch.captions.shape[:2] == (4, 5) and batch.lengths.shape == (4, 5)
    for row in range(4):
        image_id = int(batch.image_ids[row])
        refs = {tuple(caption_ids(image_id, k)) for k in range(num_refs(image_id))}
        for j in range(5):
            length = int(batch.lengths[row, j])
            caption = batch.captions[row, j]
            assert tuple(caption[:length].tolist()) in refs
            assert (caption[length:] == PAD_ID).all()
        assert len(batch.references[row]) == num_refs(image_id)


def test_all_mode_yields_every_reference_once(shards: str) -> None:
    loader = build_loader(
        LoaderConfig(num_workers=0, caption_mode="all"),
        shards,
        "train",
        train=True,
        dist=DistInfo(),
        image_size=SIDE,
        seed=0,
        batch_size=4,
    )
    got: Counter[tuple[int, tuple[int, ...]]] = Counter()
    for batch in loader:
        assert batch.captions.shape[1] == 1
        for row in range(len(batch)):
            if not batch.is_pad[row]:
                length = int(batch.lengths[row, 0])
                got[(int(batch.image_ids[row]), tuple(batch.captions[row, 0, :length].tolist()))] += 1
    expected = Counter((i, tuple(caption_ids(i, k))) for i in TRAIN_IDS for k in range(num_refs(i)))
    assert got == expected


def test_shard_shorter_than_sizes_json_fails_loudly(shards: str, tmp_path: Path) -> None:
    sizes = json.loads(Path(shards, "sizes.json").read_text())
    for name in sizes["val"]:
        (tmp_path / name).write_bytes(Path(shards, name).read_bytes())
    sizes["val"]["val-000002.tar"] = 5  # it holds 3
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    loader = build_loader(
        LoaderConfig(num_workers=0),
        str(tmp_path),
        "val",
        train=False,
        dist=DistInfo(),
        image_size=SIDE,
        seed=0,
        batch_size=4,
    )
    with pytest.raises(RuntimeError, match=r"sizes\.json does not match"):
        list(loader)


def test_build_loaders_reads_the_config_section(shards: str) -> None:
    cfg = LoaderConfig(batch_size=8, num_workers=0, caption_mode="all", seq_per_img=2)
    loaders = build_loaders(cfg, shards, dist=DistInfo(), image_size=SIDE, seed=1, batch_size=4)
    train, val = loaders["train"], loaders["val"]
    assert train.spec.batch_size == 4 and train.spec.train and train.spec.caption_mode == "all"
    assert not val.spec.train and val.spec.caption_mode == "random" and val.spec.seq_per_img == 2
    assert len(val) == math.ceil(17 / 4)


# --------------------------------------------------------------------------------------------------
# DDP: 2 ranks (gloo) x 2 DataLoader workers each
# --------------------------------------------------------------------------------------------------


def ddp_rank(rank: int, world: int, port: int, location: str, out: str) -> None:
    dist = join_gloo(rank, world, port)
    try:
        result: dict[str, Any] = {}
        section = LoaderConfig(num_workers=2)
        train = build_loader(
            section, location, "train", train=True, dist=dist, image_size=SIDE, seed=7, batch_size=4
        )
        for epoch in (0, 1):
            train.set_epoch(epoch)
            pairs, num_batches, _ = seen(train)
            result[f"train{epoch}"] = {"pairs": pairs, "batches": num_batches, "len": len(train)}
        val = build_loader(
            section, location, "val", train=False, dist=dist, image_size=SIDE, seed=0, batch_size=4
        )
        pairs, num_batches, _ = seen(val)
        result["val"] = {"pairs": pairs, "batches": num_batches, "len": len(val)}
        gathered = D.all_gather_object(dist, result)
        D.barrier(dist)
        if dist.is_main:
            Path(out).write_text(json.dumps(gathered))
    finally:
        D.destroy_process_group(dist)


def test_ddp_two_ranks_two_workers(shards: str, tmp_path: Path) -> None:
    out = tmp_path / "ranks.json"
    mp.spawn(ddp_rank, args=(2, free_port(), shards, str(out)), nprocs=2, join=True)
    ranks = json.loads(out.read_text())
    batch_size, world, workers = 4, 2, 2
    orders = []
    for epoch in (0, 1):
        results = [r[f"train{epoch}"] for r in ranks]
        assert results[0]["batches"] == results[1]["batches"] == results[0]["len"] == results[1]["len"]
        pairs = [tuple(p) for r in results for p in r["pairs"]]
        assert sorted(i for i, pad in pairs if not pad) == TRAIN_IDS  # every image exactly once
        padding = sum(pad for _, pad in pairs)
        assert padding < world * workers * batch_size
        assert len(pairs) == sum(r["batches"] for r in results) * batch_size  # full batches only
        orders.append([tuple(r["pairs"]) for r in results])
    assert orders[0] != orders[1]  # the epoch reshuffles
    val = [tuple(p) for r in ranks for p in r["val"]["pairs"]]
    assert sorted(i for i, _ in val) == VAL_IDS and not any(pad for _, pad in val)
    assert [r["val"]["batches"] for r in ranks] == [r["val"]["len"] for r in ranks]


def test_same_seed_and_epoch_reproduce_the_order(shards: str) -> None:
    def order(epoch: int) -> list[tuple[int, bool]]:
        loader = build_loader(
            LoaderConfig(num_workers=2),
            shards,
            "train",
            train=True,
            dist=DistInfo(),
            image_size=SIDE,
            seed=5,
            batch_size=4,
        )
        loader.set_epoch(epoch)
        return seen(loader)[0]

    first = order(3)
    assert first == order(3)
    assert first != order(4)


def test_workers_survive_an_inherited_failing_threading_atexit_hook(shards: str) -> None:
    """Prefect 3.8.8 registers a threading atexit hook that fails in forked DataLoader workers;
    ``init_worker`` clears the inherited hooks (without it this run dies: worker exited unexpectedly)."""
    code = textwrap.dedent(
        f"""
        import threading
        from captioning.config import LoaderConfig
        from captioning.data.loader import build_loader
        from captioning.training.dist import DistInfo

        def hook():
            raise RuntimeError("inherited hook")

        threading._register_atexit(hook)
        loader = build_loader(LoaderConfig(num_workers=2), {shards!r}, "train", train=True,
                              dist=DistInfo(), image_size={SIDE}, seed=0, batch_size=4)
        print("rows", sum(len(batch) for batch in loader))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert "rows 64" in out.stdout, out.stderr[-2000:]
    assert "exited unexpectedly" not in out.stderr


def test_batch_pickles_small_tensors_inline() -> None:
    batch = collate([sample(1, [[1, 5, 2]]), sample(2, [[1, 2]], is_pad=True)])
    again = pickle.loads(pickle.dumps(batch))
    assert isinstance(again, Batch)
    for name in ("images", "captions", "lengths", "image_ids", "is_pad"):
        a, b = getattr(batch, name), getattr(again, name)
        assert isinstance(b, torch.Tensor) and b.dtype == a.dtype and torch.equal(a, b)
    assert again.references == batch.references


def test_eval_order_is_fixed_and_covers_every_image_once(shards: str) -> None:
    def ids(num_workers: int) -> list[int]:
        loader = build_loader(
            LoaderConfig(num_workers=num_workers),
            shards,
            "val",
            train=False,
            dist=DistInfo(),
            image_size=SIDE,
            seed=0,
            batch_size=4,
        )
        pairs, num_batches, _ = seen(loader)
        assert num_batches == len(loader) and not any(pad for _, pad in pairs)
        return [i for i, _ in pairs]

    assert ids(0) == VAL_IDS  # one stream: shards in name order, samples in tar order
    with_workers = ids(2)
    assert sorted(with_workers) == VAL_IDS and with_workers == ids(2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterating_leaves_the_global_rng_alone(shards: str, num_workers: int) -> None:
    """Dropout draws from the global torch RNG: a mid-epoch resume is exact only if loading never does."""
    loader = build_loader(
        LoaderConfig(num_workers=num_workers),
        shards,
        "train",
        train=True,
        dist=DistInfo(),
        image_size=SIDE,
        seed=0,
        batch_size=4,
    )
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for _ in loader:
        pass
    assert torch.equal(torch.get_rng_state(), before)
