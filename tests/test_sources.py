"""Tests for image sources: same bytes as the files on disk, clear misses, safe across processes."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest

from captioning.data.archives import ArchiveError
from captioning.data.records import read_karpathy
from captioning.data.sources import (
    ChainSource,
    DirSource,
    ImageSource,
    ZipSource,
    check_source,
    raise_source_error,
    source_for,
)
from captioning.data.synthetic import SyntheticDataset, generate_synthetic


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return generate_synthetic(
        tmp_path_factory.mktemp("coco"), num_train=20, num_val=4, num_test=4, style="coco"
    )


@pytest.fixture(scope="module")
def paths(coco: SyntheticDataset) -> list[str]:
    return [record.path for record in read_karpathy(coco.json_path).records]


def _sources(coco: SyntheticDataset) -> dict[str, ImageSource]:
    archives = coco.root / "archives"
    return {
        "dir": DirSource(coco.root),
        "chain-of-zips": ChainSource(
            [ZipSource(archives / "train2014.zip"), ZipSource(archives / "val2014.zip")]
        ),
        "chain-mixed": ChainSource(
            [DirSource(coco.root / "nowhere"), ZipSource(archives / "val2014.zip"), DirSource(coco.root)]
        ),
    }


@pytest.mark.parametrize("kind", ["dir", "chain-of-zips", "chain-mixed"])
def test_sources_read_the_same_bytes_as_the_files(
    coco: SyntheticDataset, paths: list[str], kind: str
) -> None:
    source = _sources(coco)[kind]
    assert isinstance(source, ImageSource)
    for path in paths:
        assert source.read(path) == (coco.root / path).read_bytes()


def test_zip_source_with_prefix_and_names(coco: SyntheticDataset, paths: list[str]) -> None:
    source = ZipSource(coco.root / "archives" / "train2014.zip", prefix="train2014/")
    names = source.names()
    assert sorted(names) == sorted(p.removeprefix("train2014/") for p in paths if p.startswith("train2014/"))
    assert source.read(names[0]) == (coco.root / "train2014" / names[0]).read_bytes()


@pytest.mark.parametrize("kind", ["dir", "chain-of-zips", "chain-mixed"])
def test_missing_image_raises_file_not_found(coco: SyntheticDataset, kind: str) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("COCO_val2014_000000000000.jpg")):
        _sources(coco)[kind].read("val2014/COCO_val2014_000000000000.jpg")
    with pytest.raises(FileNotFoundError):
        _sources(coco)[kind].read("train2014")  # a folder is not an image


@pytest.mark.parametrize("bad", ["../secret.jpg", "/etc/passwd", "train2014/../../x.jpg", ""])
def test_paths_outside_the_source_are_refused(coco: SyntheticDataset, bad: str) -> None:
    for source in (DirSource(coco.root), ZipSource(coco.root / "archives" / "val2014.zip")):
        with pytest.raises(ValueError, match="relative"):
            source.read(bad)


def test_chain_source_first_source_wins(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"from a")
    (tmp_path / "b" / "x.jpg").write_bytes(b"from b")
    (tmp_path / "b" / "y.jpg").write_bytes(b"only b")
    chain = ChainSource([DirSource(tmp_path / "a"), DirSource(tmp_path / "b")])
    assert chain.read("x.jpg") == b"from a" and chain.read("y.jpg") == b"only b"
    with pytest.raises(ValueError):
        ChainSource([])


def test_zip_source_pickles_without_its_handle(coco: SyntheticDataset, paths: list[str]) -> None:
    source = ZipSource(coco.root / "archives" / "val2014.zip")
    val = [p for p in paths if p.startswith("val2014/")]
    source.read(val[0])  # opens the archive in this process
    clone = pickle.loads(pickle.dumps(source))
    assert clone == source and clone._zip is None
    assert clone.read(val[-1]) == (coco.root / val[-1]).read_bytes()
    source.close()
    assert source.read(val[0]) == (coco.root / val[0]).read_bytes()  # reopens after close


def _digests_in_child(source: ImageSource, paths: list[str], queue: Any) -> None:
    """Child process body: read every image, report digests and whether zips reopened here."""
    digests = [hashlib.sha1(source.read(p)).hexdigest() for p in paths]
    zips = [s for s in getattr(source, "sources", (source,)) if isinstance(s, ZipSource)]
    queue.put((digests, all(z._pid == os.getpid() for z in zips if z._zip is not None)))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_used_source_reads_in_a_child_process(coco: SyntheticDataset, paths: list[str], method: str) -> None:
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    source = _sources(coco)["chain-of-zips"]
    source.read(paths[0])  # parent handles are open: fork inherits them, spawn pickles the source
    ctx: Any = multiprocessing.get_context(method)
    queue = ctx.Queue()
    child = ctx.Process(target=_digests_in_child, args=(source, paths, queue))
    child.start()
    digests, reopened = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert digests == [hashlib.sha1((coco.root / p).read_bytes()).hexdigest() for p in paths]
    assert reopened
    # The parent's handles still work after the child used its own.
    assert source.read(paths[-1]) == (coco.root / paths[-1]).read_bytes()


def test_source_for_maps_each_layout(tmp_path: Path) -> None:
    coco = source_for("coco", tmp_path)
    assert coco == ChainSource([ZipSource(tmp_path / "train2014.zip"), ZipSource(tmp_path / "val2014.zip")])
    assert source_for("flickr8k", tmp_path) == ZipSource(
        tmp_path / "Flickr8k_Dataset.zip", "Flicker8k_Dataset/"
    )
    assert source_for("flickr30k", tmp_path) == DirSource(tmp_path / "flickr30k-images")
    assert source_for("synthetic", tmp_path) == DirSource(tmp_path / "synthetic")
    assert source_for("synthetic", tmp_path, synthetic_style="flickr8k") == DirSource(
        tmp_path / "synthetic", "Flicker8k_Dataset/"
    )
    with pytest.raises(ValueError, match="valid datasets"):
        source_for("imagenet", tmp_path)
    with pytest.raises(ValueError, match="valid styles"):
        source_for("synthetic", tmp_path, synthetic_style="imagenet")


def test_check_source_opens_each_zip_once_and_names_one_that_does_not_open(
    tmp_path: Path, coco: SyntheticDataset
) -> None:
    good = ZipSource(coco.root / "archives" / "val2014.zip")
    chain = ChainSource([good, ZipSource(tmp_path / "train2014.zip"), DirSource(tmp_path / "nowhere")])
    check_source(chain)  # a zip that is not there is left to the reads (images not found)
    assert good._zip is None  # checked with a probe: the source itself is still unopened
    bad = tmp_path / "train2014.zip"
    bad.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ArchiveError, match=re.escape(f"{bad}: not a readable zip archive")):
        check_source(chain)
    with pytest.raises(ArchiveError, match=r"delete it and its \.verified marker"):
        raise_source_error(
            ArchiveError(f"{bad}: not a readable zip archive; delete it and its .verified marker")
        )
    raise_source_error(OSError("disk full"))  # a shard's own failure: gathered, not raised here
