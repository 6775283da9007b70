"""write_shards: the shard contract, bad images, determinism, parallel executors, resume after SIGKILL."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from captioning.data.format import ShardManifest, read_references
from captioning.data.images import ImageSettings
from captioning.data.records import Caption, ImageRecord, read_karpathy
from captioning.data.shard_build import ShardError, write_shards
from captioning.data.shard_check import inspect_shards, verify_shards
from captioning.data.shard_writer import plan_shards
from captioning.data.sources import DirSource
from captioning.data.synthetic import generate_synthetic
from captioning.data.vocab import Vocab, apply_length_policy, build_vocab

MAX_LEN = 30
# Small everything: 32 px images, 8 per shard, a low bomb limit that the 32 px synthetic images pass.
BUILD: dict[str, Any] = dict(
    image_size=32,
    resize_mode="squash",
    jpeg_quality=90,
    samples_per_shard=8,
    max_image_pixels=100 * 100,
    max_caption_len=MAX_LEN,
    overlong="drop",
    executor="process",
    dask_address=None,
    progress=False,
)
RED, BLUE = (220, 20, 30), (30, 40, 220)


# ------------------------------------------------------------------------------------ test data


def _encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    data = bytearray(_encode(Image.new("L", (4, 4))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _bad_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    noise = _encode(Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)), "JPEG")
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([*RED, *BLUE] + [0] * 762)
    palette.paste(1, (10, 0, 20, 20))
    rotated = Image.new("RGB", (80, 40), BLUE)
    rotated.paste(RED, (0, 0, 80, 20))  # stored top half red; displayed (orientation 6) right half red
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "corrupt.jpg": b"definitely not an image" * 8,
        "truncated.jpg": noise[: len(noise) // 2],
        "empty.jpg": b"",
        "cmyk.jpg": _encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
        "gray.png": _encode(Image.new("L", (30, 20), 128)),
        "la.png": _encode(Image.new("LA", (30, 20), (128, 200))),
        "rgba.png": _encode(Image.new("RGBA", (30, 20), (*RED, 100))),
        "palette.png": _encode(palette, transparency=0),
        "sixteen.png": _encode(Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16))),
        "rotated.jpg": _encode(rotated, "JPEG", exif=exif.tobytes()),
        "big.png": _encode(Image.new("RGB", (120, 120), RED)),  # over max_image_pixels=10_000
        "bomb.png": _bomb_png(30000, 30000),  # header of 900 Mpx: Pillow's own bomb error
        "ok.png": _encode(Image.new("RGB", (30, 30), RED)),
    }


def _caption(text: str, sent_id: int) -> Caption:
    return Caption(raw=text, tokens=tuple(text.lower().split()), sent_id=sent_id)


def _bad_records() -> list[ImageRecord]:
    """Records for the bad files (train, except the rotated one) plus caption-length cases."""
    short = "a red shape on a dark background"
    overlong = " ".join(["word"] * (MAX_LEN + 1))

    def record(i: int, name: str, split: str = "train", captions: tuple[str, ...] = (short,)) -> ImageRecord:
        caps = tuple(_caption(text, 900_000 + 10 * i + k) for k, text in enumerate(captions))
        return ImageRecord(
            image_id=900_000 + i, path=f"bad/{name}", split=split, source_split=split, captions=caps
        )

    names = [n for n in _bad_files() if n not in ("rotated.jpg", "ok.png")]
    records = [record(i, name) for i, name in enumerate(names)]
    records += [
        record(50, "missing.jpg"),
        record(51, "ok.png", captions=(overlong,)),  # train, only caption overlong -> no_captions
        record(52, "ok.png", captions=(overlong, short)),  # train: overlong dropped, one kept
        record(53, "rotated.jpg", split="val"),
        record(54, "ok.png", split="val", captions=(overlong, short)),  # val keeps every reference
    ]
    return records


EXPECTED_TRAIN_FAILURES = {
    "corrupt": 1,
    "empty": 1,
    "missing": 1,
    "no_captions": 1,
    "too_large": 2,
    "truncated": 1,
}
EXPECTED_TRAIN_CONVERTED = {"16bit": 1, "alpha": 3, "cmyk": 1, "grayscale": 2, "palette": 1}


@dataclass(frozen=True)
class Data:
    root: Path
    json_path: Path
    records: list[ImageRecord]
    vocab: Vocab

    @property
    def source(self) -> DirSource:
        return DirSource(self.root)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    root = tmp_path_factory.mktemp("raw")
    synth = generate_synthetic(root, num_train=20, num_val=6, num_test=6, image_size=32, make_archives=False)
    (root / "bad").mkdir()
    for name, content in _bad_files().items():
        (root / "bad" / name).write_bytes(content)
    records = list(read_karpathy(synth.json_path).records) + _bad_records()
    train, _ = apply_length_policy(
        [r for r in records if r.split == "train"], max_caption_len=MAX_LEN, overlong="drop"
    )
    return Data(root, synth.json_path, records, build_vocab(train, min_word_freq=2))


@pytest.fixture(scope="module")
def built(data: Data, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ShardManifest]:
    out = tmp_path_factory.mktemp("shards")
    manifest = write_shards(data.records, data.vocab, data.source, str(out), num_procs=1, **BUILD)
    return out, manifest


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------ contract


def test_build_completes_and_counts_every_skip_and_conversion(built: tuple[Path, ShardManifest]) -> None:
    out, manifest = built
    train = manifest.splits["train"]
    assert train.failures == EXPECTED_TRAIN_FAILURES
    assert train.converted == EXPECTED_TRAIN_CONVERTED
    assert train.num_samples == 20 + 1 + 6  # synthetic + the kept overlong case + 6 converted
    assert manifest.splits["val"].converted == {"exif_rotated": 1}
    assert manifest.splits["val"].num_samples == 8 and manifest.splits["test"].num_samples == 6
    assert manifest.length_policy["num_dropped"] == 2 and manifest.length_policy["num_images_dropped"] == 1
    assert manifest.num_built == 7 and manifest.num_skipped == 0

    # Per-shard stats name each failed image with its reason.
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("train-*.stats.json"))]
    failed = {f["path"]: f["reason"] for s in stats for f in s["failed"]}
    assert failed["bad/bomb.png"] == "too_large" and failed["bad/missing.jpg"] == "missing"
    assert failed["bad/ok.png"] == "no_captions"
    for s in stats:
        assert {"shard", "split", "count", "failures", "failed", "sha256", "bytes", "duration_s"} <= s.keys()
        assert s["bytes"] == (out / s["shard"]).stat().st_size


def test_references_file_holds_every_stored_image_and_no_skipped_one(
    built: tuple[Path, ShardManifest],
) -> None:
    out, _ = built
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    stored = {s["json"]["image_id"]: s["json"] for s in wds.WebDataset(urls, shardshuffle=False).decode()}
    for split in ("train", "val", "test"):
        refs = read_references(str(out), split)
        expected = {
            i: [c["ids"][1:-1] for c in m["captions"]] for i, m in stored.items() if m["split"] == split
        }
        assert refs == expected
    with pytest.raises(ValueError, match="no split"):
        read_references(str(out), "restval")
    with pytest.raises(FileNotFoundError, match="re-run the shard build"):
        read_references(str(out / "nowhere"), "train")


def test_samples_follow_the_contract(data: Data, built: tuple[Path, ShardManifest]) -> None:
    out, _ = built
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    samples = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode("pil")}
    by_id = {r.image_id: r for r in data.records}
    train_kept, _ = apply_length_policy(
        [r for r in data.records if r.split == "train"], max_caption_len=MAX_LEN, overlong="drop"
    )
    expected_captions = {r.image_id: r.captions for r in train_kept}
    expected_captions.update({r.image_id: r.captions for r in data.records if r.split != "train"})
    assert len(samples) == 20 + 7 + 8 + 6

    for key, sample in samples.items():
        meta = sample["json"]
        record = by_id[meta["image_id"]]
        assert key == f"{meta['image_id']:012d}"
        assert meta["split"] == record.split and meta["path"] == record.path
        assert list(meta) == ["image_id", "split", "path", "orig_size", "captions"]
        assert sample["jpg"].size == (32, 32) and sample["jpg"].mode == "RGB"
        captions = expected_captions[record.image_id]
        assert [c["raw"] for c in meta["captions"]] == [c.raw for c in captions]
        for stored, caption in zip(meta["captions"], captions, strict=True):
            assert stored["tokens"] == list(caption.tokens)
            assert stored["ids"] == data.vocab.encode(caption.tokens, max_len=MAX_LEN)

    # val keeps the overlong reference (ids cut to MAX_LEN + <start>/<end>, tokens whole).
    val_long = samples[f"{900_054:012d}"]["json"]["captions"]
    assert (
        len(val_long) == 2
        and len(val_long[0]["tokens"]) == MAX_LEN + 1
        and len(val_long[0]["ids"]) == MAX_LEN + 2
    )
    # train dropped it.
    assert len(samples[f"{900_052:012d}"]["json"]["captions"]) == 1

    # The EXIF-rotated image is stored upright: displayed 40x80, red on the right after rotation.
    rotated = samples[f"{900_053:012d}"]
    assert rotated["json"]["orig_size"] == [40, 80]
    pixels = np.asarray(rotated["jpg"], dtype=int)
    assert np.abs(pixels[16, 28] - RED).max() < 40 and np.abs(pixels[16, 3] - BLUE).max() < 40


def test_shards_hold_consecutive_records_in_file_order(data: Data, built: tuple[Path, ShardManifest]) -> None:
    out, manifest = built
    sizes = json.loads((out / "sizes.json").read_text())
    assert set(sizes) == {"train", "val", "test"}
    assert list(sizes["train"]) == [f"train-{i:06d}.tar" for i in range(5)]
    assert sizes == manifest.sizes
    train = [r for r in data.records if r.split == "train"]
    for k, name in enumerate(sizes["train"]):
        urls = [str(out / name)]
        keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
        chunk = [f"{r.image_id:012d}" for r in train[k * 8 : (k + 1) * 8]]
        assert keys == [key for key in chunk if key in keys]  # in order, failures removed
        assert sizes["train"][name] == len(keys)


def test_manifest_files(data: Data, built: tuple[Path, ShardManifest]) -> None:
    out, manifest = built
    saved = json.loads((out / "manifest.json").read_text())
    assert {"config_hash", "vocab_sha256", "splits", "shards", "length_policy"} <= saved.keys()
    assert saved["shards"].keys() == {p.name for p in out.glob("*.tar")}
    assert saved["splits"]["train"]["num_samples"] == manifest.splits["train"].num_samples
    assert saved["splits"]["train"]["failures"] == EXPECTED_TRAIN_FAILURES
    assert Vocab.load(out / "vocab.json") == data.vocab
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_plan_chunks_each_split(data: Data) -> None:
    jobs, stats = plan_shards(
        data.records,
        data.vocab,
        data.source,
        "unused",
        settings=ImageSettings(size=32, resize_mode="squash", jpeg_quality=90, max_image_pixels=178_956_970),
        samples_per_shard=5,
        max_caption_len=MAX_LEN,
        overlong="truncate",
    )
    assert stats.num_truncated == 2 and stats.num_images_dropped == 0
    for split in ("train", "val", "test"):
        records = [r for r in data.records if r.split == split]
        split_jobs = [j for j in jobs if j.split == split]
        assert [j.index for j in split_jobs] == list(range(len(split_jobs)))
        assert [i.image_id for j in split_jobs for i in j.items] == [r.image_id for r in records]
        assert all(len(j.items) == 5 for j in split_jobs[:-1])


def test_rejects_unknown_splits_and_duplicates(data: Data, tmp_path: Path) -> None:
    bad_split = replace(data.records[0], split="restval")
    with pytest.raises(ValueError, match="split"):
        write_shards([bad_split], data.vocab, data.source, str(tmp_path), num_procs=0, **BUILD)
    with pytest.raises(ValueError, match="duplicate"):
        write_shards(data.records[:1] * 2, data.vocab, data.source, str(tmp_path), num_procs=0, **BUILD)


# ------------------------------------------------------------------------- determinism, parallel


def test_two_builds_give_identical_bytes(
    data: Data, built: tuple[Path, ShardManifest], tmp_path: Path
) -> None:
    out, _ = built
    write_shards(data.records, data.vocab, data.source, str(tmp_path), num_procs=1, **BUILD)
    assert _tars(tmp_path) == _tars(out)
    for name in ("sizes.json", "manifest.json", "vocab.json"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_process_pool_gives_the_same_bytes(
    data: Data, built: tuple[Path, ShardManifest], tmp_path: Path
) -> None:
    out, _ = built
    manifest = write_shards(data.records, data.vocab, data.source, str(tmp_path), num_procs=2, **BUILD)
    assert manifest.num_built == 7
    assert _tars(tmp_path) == _tars(out)


def test_dask_cluster_gives_the_same_bytes(
    data: Data, built: tuple[Path, ShardManifest], tmp_path: Path, subprocess_tree: None
) -> None:
    from distributed import LocalCluster

    out, _ = built
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        write_shards(
            data.records,
            data.vocab,
            data.source,
            str(tmp_path),
            num_procs=0,
            **{**BUILD, "executor": "dask", "dask_address": cluster.scheduler_address},
        )
    assert _tars(tmp_path) == _tars(out)


# ---------------------------------------------------------------------------------------- resume


def test_rerun_of_a_complete_build_does_no_work(
    data: Data, built: tuple[Path, ShardManifest], tmp_path: Path
) -> None:
    out = _copy(built[0], tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    manifest = write_shards(data.records, data.vocab, data.source, str(out), num_procs=1, **BUILD)
    assert (manifest.num_built, manifest.num_skipped) == (0, 7)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    assert manifest.splits == built[1].splits


def test_rerun_rebuilds_only_damaged_shards(
    data: Data, built: tuple[Path, ShardManifest], tmp_path: Path
) -> None:
    reference = _tars(built[0])
    out = _copy(built[0], tmp_path / "out")
    damaged = bytearray((out / "train-000001.tar").read_bytes())
    damaged[600] ^= 0xFF
    (out / "train-000001.tar").write_bytes(bytes(damaged))
    (out / "val-000000.stats.json").unlink()
    (out / "test-000000.tar").unlink()
    leftovers = [
        ".train-000002.tar.0123456789abcdef0123456789abcdef.tmp",
        ".sizes.json.abc123.tmp",
        ".vocab-x1.tmp",
    ]
    for name in leftovers:
        (out / name).write_bytes(b"partial")

    manifest = write_shards(data.records, data.vocab, data.source, str(out), num_procs=1, **BUILD)
    assert (manifest.num_built, manifest.num_skipped) == (3, 4)
    assert _tars(out) == reference
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_changed_settings_rebuild_every_shard(
    data: Data, built: tuple[Path, ShardManifest], tmp_path: Path
) -> None:
    out = _copy(built[0], tmp_path / "out")
    manifest = write_shards(
        data.records, data.vocab, data.source, str(out), num_procs=1, **{**BUILD, "jpeg_quality": 70}
    )
    assert (manifest.num_built, manifest.num_skipped) == (7, 0)
    assert _tars(out) != _tars(built[0])


_KILL_SCRIPT = """
import sys, time
from captioning.data.records import read_karpathy
from captioning.data.shard_build import write_shards
from captioning.data.sources import DirSource
from captioning.data.vocab import Vocab


class SlowSource:
    # Same bytes as DirSource, slowly, so the parent can kill the build part-way.
    def __init__(self, root):
        self.inner = DirSource(root)

    def read(self, path):
        time.sleep(0.03)
        return self.inner.read(path)


def main():
    json_path, root, vocab_path, out = sys.argv[1:5]
    records = read_karpathy(json_path).records
    write_shards(records, Vocab.load(vocab_path), SlowSource(root), out, image_size=32,
                 resize_mode="squash", jpeg_quality=90, samples_per_shard=4,
                 max_image_pixels=178_956_970, max_caption_len=50, overlong="drop",
                 num_procs=1, executor="process", dask_address=None, progress=False)


if __name__ == "__main__":
    main()
"""


def test_sigkill_then_rerun_gives_identical_shards(data: Data, tmp_path: Path, subprocess_tree: None) -> None:
    records = read_karpathy(data.json_path).records  # the 32 synthetic images
    vocab_path = tmp_path / "vocab.json"
    data.vocab.save(vocab_path)
    script = tmp_path / "build.py"
    script.write_text(_KILL_SCRIPT)
    killed = tmp_path / "killed"
    args = [sys.executable, str(script), str(data.json_path), str(data.root), str(vocab_path), str(killed)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(killed.glob("*.stats.json")):
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "the build never finished a shard"
            time.sleep(0.01)
        time.sleep(0.18)  # a shard takes ~0.12 s here: land in the middle of a later one
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "manifest.json").exists()
    done_before = len(list(killed.glob("*.stats.json")))

    settings = dict(  # those of _KILL_SCRIPT's build
        image_size=32,
        resize_mode="squash",
        jpeg_quality=90,
        samples_per_shard=4,
        max_image_pixels=178_956_970,
        max_caption_len=50,
        overlong="drop",
        num_procs=1,
        executor="process",
        dask_address=None,
        progress=False,
    )
    reference = tmp_path / "reference"
    write_shards(records, data.vocab, data.source, str(reference), **settings)  # type: ignore[arg-type]
    total = len(_tars(reference))  # 20 train, 6 val, 6 test in shards of 4
    assert total == 9 and 1 <= done_before < total
    resumed = write_shards(records, data.vocab, data.source, str(killed), **settings)  # type: ignore[arg-type]
    assert (resumed.num_skipped, resumed.num_built) == (done_before, total - done_before)
    assert _tars(killed) == _tars(reference)
    assert not [p for p in killed.iterdir() if p.name.startswith(".")]
    again = write_shards(records, data.vocab, data.source, str(killed), **settings)  # type: ignore[arg-type]
    assert (again.num_built, again.num_skipped) == (0, total)


class _FlakySource:
    """Raises an I/O error (not FileNotFoundError) for one path: the shard fails, the others finish."""

    def __init__(self, root: Path, bad_path: str) -> None:
        self.inner = DirSource(root)
        self.bad_path = bad_path

    def read(self, rel_path: str) -> bytes:
        if rel_path == self.bad_path:
            raise PermissionError(f"cannot read {rel_path}")
        return self.inner.read(rel_path)


def test_source_errors_fail_the_shard_not_the_others(data: Data, tmp_path: Path) -> None:
    val = [r for r in data.records if r.split == "val"]
    source = _FlakySource(data.root, val[0].path)
    with pytest.raises(ShardError, match=r"val-000000\.tar: PermissionError"):
        write_shards(data.records, data.vocab, source, str(tmp_path), num_procs=1, **BUILD)
    assert not (tmp_path / "manifest.json").exists()
    assert (tmp_path / "train-000004.stats.json").exists() and (tmp_path / "test-000000.stats.json").exists()
    assert not (tmp_path / "val-000000.tar").exists()
    manifest = write_shards(data.records, data.vocab, data.source, str(tmp_path), num_procs=1, **BUILD)
    assert (manifest.num_built, manifest.num_skipped) == (1, 6)


# ------------------------------------------------------------------------------- verify, inspect


def test_verify_finds_damaged_and_missing_shards(built: tuple[Path, ShardManifest], tmp_path: Path) -> None:
    assert verify_shards(str(built[0])) == []
    out = _copy(built[0], tmp_path / "out")
    damaged = bytearray((out / "train-000000.tar").read_bytes())
    damaged[-1] ^= 1
    (out / "train-000000.tar").write_bytes(bytes(damaged))
    (out / "test-000000.tar").unlink()
    problems = verify_shards(str(out))
    assert len(problems) == 2
    assert any("test-000000.tar: missing" in p for p in problems)
    assert any("train-000000.tar: sha256" in p for p in problems)
    (out / "manifest.json").unlink()
    assert "manifest.json" in verify_shards(str(out))[0]


def test_inspect_reports_counts_and_decodes_samples(built: tuple[Path, ShardManifest]) -> None:
    out, manifest = built
    report = inspect_shards(str(out), n=1)
    assert list(report["splits"]) == ["train", "val", "test"]
    assert report["splits"]["train"]["num_samples"] == manifest.splits["train"].num_samples
    assert report["splits"]["train"]["failures"] == EXPECTED_TRAIN_FAILURES
    for split in ("train", "val", "test"):
        (sample,) = report["samples"][split]
        assert sample["image_size"] == [32, 32] and sample["captions"]
        assert sample["key"] == f"{sample['image_id']:012d}"
    train = inspect_shards(str(out), split="train", n=10)  # crosses into the second shard
    assert list(train["samples"]) == ["train"] and len(train["samples"]["train"]) == 10
    assert len({s["shard"] for s in train["samples"]["train"]}) == 2
    with pytest.raises(ValueError, match="unknown split"):
        inspect_shards(str(out), split="restval")


def test_dask_without_address_starts_a_local_cluster(
    data: Data, built: tuple[Path, ShardManifest], tmp_path: Path, subprocess_tree: None
) -> None:
    write_shards(
        data.records, data.vocab, data.source, str(tmp_path), num_procs=2, **{**BUILD, "executor": "dask"}
    )
    assert _tars(tmp_path) == _tars(built[0])


def test_shards_of_an_earlier_bigger_build_are_left_alone_and_unlisted(
    data: Data, built: tuple[Path, ShardManifest], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = _copy(built[0], tmp_path / "out")
    (out / "train-000099.tar").write_bytes(b"old")
    with caplog.at_level("WARNING", logger="captioning.data.shard_build"):
        manifest = write_shards(data.records, data.vocab, data.source, str(out), num_procs=1, **BUILD)
    assert "train-000099.tar" in caplog.text
    assert "train-000099.tar" not in manifest.shards and (out / "train-000099.tar").exists()
    assert verify_shards(str(out)) == []
