"""Archives checked where they arrive, and damaged members skipped where they are read.

A truncated or corrupt download is refused by the download step, naming the file, and fetched anew
once the server's copy is fixed; a zip member with a bad CRC (or cut short by the end of the file)
is one image skipped and counted with its reason and the archive's path, and the build completes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from archive_faults import cut_short, flip_member_byte, overstate_last_member
from httpserver import FileServer

from captioning.cli import main
from captioning.config import Config
from captioning.data.archives import ArchiveError, check_archive, extract_archive, unreadable_reason
from captioning.data.datasets import fetch_dataset
from captioning.data.download import DownloadError, download_file
from captioning.data.prepare import prepare_data
from captioning.data.records import read_karpathy
from captioning.data.shard_build import ShardError, write_shards
from captioning.data.sources import UnreadableImage, ZipSource
from captioning.data.synthetic import SyntheticDataset, generate_synthetic
from captioning.data.vocab import build_vocab

FAST: dict[str, Any] = {"progress": False, "retry_delay_s": 0.001, "timeout_s": 10.0, "num_retries": 2}


@pytest.fixture(scope="module")
def flickr8k(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return generate_synthetic(
        tmp_path_factory.mktemp("flickr8k"),
        num_train=8,
        num_val=2,
        num_test=2,
        image_size=32,
        style="flickr8k",
    )


@pytest.fixture
def mirror(flickr8k: SyntheticDataset, tmp_path: Path) -> Iterator[tuple[FileServer, Path]]:
    """A loopback server over a private copy of the Flickr8k-style archives (tests damage them)."""
    folder = shutil.copytree(flickr8k.root / "archives", tmp_path / "mirror")
    with FileServer(folder) as server:
        yield server, folder


def _members(zip_path: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as zf:
        return [n for n in zf.namelist() if n.endswith(".jpg")]


# ------------------------------------------------------------------------------- on arrival


def test_truncated_zip_is_refused_with_its_path_and_fetched_again_once_fixed(
    tmp_path: Path, mirror: tuple[FileServer, Path]
) -> None:
    server, folder = mirror
    good = (folder / "Flickr8k_Dataset.zip").read_bytes()
    server.substitute["Flickr8k_Dataset.zip"] = cut_short(folder / "Flickr8k_Dataset.zip", 0.6)
    dest = tmp_path / "raw" / "Flickr8k_Dataset.zip"
    with pytest.raises(DownloadError) as err:
        download_file(f"{server.url}/Flickr8k_Dataset.zip", dest, **FAST)
    message = str(err.value)
    assert "\n" not in message and str(dest) in message and "damaged" in message
    assert "not a readable zip archive" in message and "run again later" in message
    assert not dest.exists() and not dest.with_name(dest.name + ".verified").exists()
    assert not dest.with_name(dest.name + ".part").exists()  # nothing stays trusted

    del server.substitute["Flickr8k_Dataset.zip"]  # the server's copy is fixed
    download_file(f"{server.url}/Flickr8k_Dataset.zip", dest, **FAST)
    assert dest.read_bytes() == good
    assert json.loads(dest.with_name(dest.name + ".verified").read_text())["checked"] is True


def test_corrupt_tar_gz_is_refused_on_arrival(tmp_path: Path, flickr8k: SyntheticDataset) -> None:
    folder = tmp_path / "mirror"
    folder.mkdir()
    with tarfile.open(folder / "images.tar.gz", "w:gz") as tf:
        tf.add(flickr8k.root / "Flicker8k_Dataset", "flickr30k-images")
    damaged = cut_short(folder / "images.tar.gz", 0.5)
    with FileServer(folder) as server:
        server.substitute["images.tar.gz"] = damaged
        with pytest.raises(DownloadError, match=r"images\.tar\.gz: the download from .* is damaged"):
            download_file(f"{server.url}/images.tar.gz", tmp_path / "raw" / "images.tar.gz", **FAST)
    assert not (tmp_path / "raw" / "images.tar.gz").exists()


def test_a_marker_from_before_arrival_checks_is_checked_once(
    tmp_path: Path, mirror: tuple[FileServer, Path]
) -> None:
    """A zip that an earlier version marked verified without opening it is checked, then replaced."""
    server, folder = mirror
    dest = tmp_path / "Flickr8k_Dataset.zip"
    dest.write_bytes(cut_short(folder / "Flickr8k_Dataset.zip", 0.6))
    st = dest.stat()
    old = {"url": "", "size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": None}
    dest.with_name(dest.name + ".verified").write_text(json.dumps(old))
    download_file(f"{server.url}/Flickr8k_Dataset.zip", dest, **FAST)
    assert dest.read_bytes() == (folder / "Flickr8k_Dataset.zip").read_bytes()
    assert [r.status for r in server.requests] == [200]
    server.reset_log()
    download_file(f"{server.url}/Flickr8k_Dataset.zip", dest, **FAST)  # now trusted: no request
    assert server.requests == []


def test_check_archive_reads_the_whole_index(tmp_path: Path, flickr8k: SyntheticDataset) -> None:
    zip_path = shutil.copy(flickr8k.root / "archives" / "Flickr8k_Dataset.zip", tmp_path / "a.zip")
    assert check_archive(zip_path) == len(_members(Path(zip_path))) + 1  # the folder entry too
    overstate_last_member(Path(zip_path))
    with pytest.raises(ArchiveError, match=re.escape(f"{zip_path}: not a readable zip archive")):
        check_archive(zip_path)
    (tmp_path / "b.tar.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ArchiveError, match=r"b\.tar\.gz: not a readable tar archive"):
        check_archive(tmp_path / "b.tar.gz")
    with pytest.raises(ValueError, match=r"not a \.zip or \.tar"):
        check_archive(tmp_path / "notes.txt")


# ------------------------------------------------------------------------------- where read


def test_zip_member_with_a_bad_crc_is_unreadable_and_the_others_read(
    tmp_path: Path, flickr8k: SyntheticDataset
) -> None:
    zip_path = Path(shutil.copy(flickr8k.root / "archives" / "Flickr8k_Dataset.zip", tmp_path / "f.zip"))
    first, second = _members(zip_path)[:2]
    flip_member_byte(zip_path, first)
    source = ZipSource(zip_path, prefix="Flicker8k_Dataset/")
    with pytest.raises(UnreadableImage) as err:
        source.read(first.removeprefix("Flicker8k_Dataset/"))
    assert err.value.reason == "corrupt"
    assert str(zip_path) in err.value.detail and first in err.value.detail and "CRC" in err.value.detail
    assert source.read(second.removeprefix("Flicker8k_Dataset/")) == (flickr8k.root / second).read_bytes()


def test_zip_member_cut_short_by_the_end_of_the_file_is_truncated(
    tmp_path: Path, flickr8k: SyntheticDataset
) -> None:
    zip_path = tmp_path / "c.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_STORED) as zf:  # stored: read until the bytes run out
        zf.writestr("a.jpg", b"\xff\xd8" + bytes(range(256)) * 4)
    name = overstate_last_member(zip_path)
    with pytest.raises(UnreadableImage) as err:
        ZipSource(zip_path).read(name)
    assert err.value.reason == "truncated" and str(zip_path) in err.value.detail
    assert unreadable_reason(EOFError()) == "truncated"
    assert unreadable_reason(zlib.error("invalid distance too far back")) == "corrupt"


def test_a_zip_that_does_not_open_is_named_where_it_is_read(tmp_path: Path) -> None:
    bad = tmp_path / "val2014.zip"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ArchiveError, match=re.escape(f"{bad}: not a readable zip archive")) as err:
        ZipSource(bad).read("val2014/x.jpg")
    assert ".verified marker" in str(err.value)


def test_extraction_names_an_unreadable_member_or_skips_it(
    tmp_path: Path, flickr8k: SyntheticDataset
) -> None:
    zip_path = Path(shutil.copy(flickr8k.root / "archives" / "Flickr8k_Dataset.zip", tmp_path / "f.zip"))
    bad = _members(zip_path)[1]
    flip_member_byte(zip_path, bad)
    with pytest.raises(ArchiveError, match=re.escape(f"{zip_path}: member {bad!r} cannot be read")):
        extract_archive(zip_path, tmp_path / "strict")
    skipped: dict[str, str] = {}
    files = extract_archive(zip_path, tmp_path / "out", skipped=skipped)
    assert len(files) == len(_members(zip_path)) - 1 and not (tmp_path / "out" / bad).exists()
    assert list(skipped) == [bad] and skipped[bad].startswith(f"corrupt: {zip_path}: member {bad!r}")
    again: dict[str, str] = {}
    assert extract_archive(zip_path, tmp_path / "out", skipped=again) == files and again == skipped


def test_extraction_of_a_truncated_tar_gz_names_the_archive(
    tmp_path: Path, flickr8k: SyntheticDataset
) -> None:
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(flickr8k.root / "Flicker8k_Dataset", "flickr30k-images")
    archive.write_bytes(cut_short(archive, 0.5))
    with pytest.raises(ArchiveError, match=re.escape(f"{archive}: cannot be read")):
        extract_archive(archive, tmp_path / "out")


def test_build_skips_a_damaged_zip_member_counts_it_and_completes(
    tmp_path: Path, mirror: tuple[FileServer, Path]
) -> None:
    server, folder = mirror
    zip_path = folder / "Flickr8k_Dataset.zip"
    records = read_karpathy(_karpathy_json(folder, tmp_path)).records
    damaged = next(r for r in records if r.split == "train")
    flip_member_byte(zip_path, f"Flicker8k_Dataset/{damaged.path}")
    cfg = Config().replace(
        {
            "data.dataset": "flickr8k",
            "data.raw_dir": str(tmp_path / "raw"),
            "data.shard_dir": str(tmp_path / "shards"),
            "data.download.base_url": server.url,
            "data.download.verify_checksums": False,  # the synthetic zip is not the published one
            "data.download.num_retries": 2,
            "data.shards.image_size": 32,
            "data.shards.num_procs": 1,
            "data.min_word_freq": 1,
        }
    )
    result = prepare_data(cfg, progress=False)
    train = result.manifest.splits["train"]
    assert train.num_samples == 7 and train.failures == {"corrupt": 1}
    (stats_path,) = (tmp_path / "shards").glob("train-*.stats.json")
    (failed,) = json.loads(stats_path.read_text())["failed"]
    assert failed["image_id"] == damaged.image_id and failed["reason"] == "corrupt"
    assert str(tmp_path / "raw" / "Flickr8k_Dataset.zip") in failed["detail"] and "CRC" in failed["detail"]


def _karpathy_json(folder: Path, tmp_path: Path) -> Path:
    with zipfile.ZipFile(folder / "caption_datasets.zip") as zf:
        name = next(n for n in zf.namelist() if n.endswith("dataset_flickr8k.json"))
        return Path(zf.extract(name, tmp_path / "json"))


def test_a_caption_zip_without_the_split_file_is_named(
    tmp_path: Path, mirror: tuple[FileServer, Path]
) -> None:
    server, _ = mirror
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("dataset_coco.json", "{}")
    server.substitute["caption_datasets.zip"] = other.read_bytes()
    raw = tmp_path / "raw"
    with pytest.raises(
        DownloadError, match=re.escape(f"{raw / 'caption_datasets.zip'}: no dataset_flickr8k.json")
    ):
        fetch_dataset("flickr8k", raw, base_url=server.url, verify_checksums=False, **FAST)


def test_a_good_copy_put_there_by_hand_is_used_when_nothing_is_expected(
    tmp_path: Path, mirror: tuple[FileServer, Path]
) -> None:
    """caption_datasets.zip has no published size or checksum, and checks off expects none: a copy put
    at DEST by hand is used once its index reads (and marked verified), a damaged one fetched anew."""
    server, folder = mirror
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("caption_datasets.zip", "Flickr8k_Dataset.zip"):
        shutil.copy(folder / name, raw / name)
    fetch_dataset("flickr8k", raw, base_url=server.url, verify_checksums=False, **FAST)
    assert server.requests == []
    for name in ("caption_datasets.zip", "Flickr8k_Dataset.zip"):
        assert json.loads((raw / f"{name}.verified").read_text())["checked"] is True

    (raw / "caption_datasets.zip").write_bytes(cut_short(folder / "caption_datasets.zip", 0.5))
    fetch_dataset("flickr8k", raw, base_url=server.url, verify_checksums=True, **FAST)
    assert [r.path for r in server.requests] == ["caption_datasets.zip"]
    assert (raw / "caption_datasets.zip").read_bytes() == (folder / "caption_datasets.zip").read_bytes()


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return generate_synthetic(
        tmp_path_factory.mktemp("coco"), num_train=6, num_val=2, num_test=2, image_size=32, style="coco"
    )


def _damage_keeping_size_and_mtime(path: Path) -> None:
    """Zero the zip's end-of-central-directory record the way bit rot would: size and mtime unchanged,
    so the download step's marker still matches and only opening the zip finds it."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-22:] = bytes(22)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_an_image_zip_that_does_not_open_stops_shards_with_one_line(
    tmp_path: Path, coco: SyntheticDataset, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "raw"
    zip_path, good = raw / "train2014.zip", (coco.root / "archives" / "train2014.zip").read_bytes()

    def shards(server: FileServer, out: str) -> int:
        return main(
            [
                "shards",
                "--no-progress",
                "--data.dataset=coco",
                f"--data.raw_dir={raw}",
                f"--data.shard_dir={tmp_path / out}",
                f"--data.download.base_url={server.url}",
                "--data.download.verify_checksums=false",  # the synthetic zips are not the published ones
                "--data.download.num_retries=2",
                "--data.shards.image_size=32",
                "--data.shards.samples_per_shard=2",
                "--data.shards.num_procs=1",
                "--data.min_word_freq=1",
            ]
        )

    with FileServer(coco.root / "archives") as server:
        assert shards(server, "shards") == 0
        zip_path.write_bytes(cut_short(zip_path, 0.7))  # truncated after verification: fetched anew
        assert shards(server, "shards") == 0 and zip_path.read_bytes() == good
        capsys.readouterr()

        _damage_keeping_size_and_mtime(zip_path)
        server.reset_log()
        assert shards(server, "shards2") == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and err.count(str(zip_path)) == 1
        assert err.startswith(f"captioning shards: error: {zip_path}: not a readable zip archive")
        assert "delete it and its .verified marker and run again" in err and server.requests == []
        assert not (tmp_path / "shards2").exists()  # stopped before planning

        zip_path.unlink()  # doing what it says
        zip_path.with_name(zip_path.name + ".verified").unlink()
        assert shards(server, "shards2") == 0 and zip_path.read_bytes() == good


def test_a_source_zip_that_does_not_open_fails_the_build_once_not_per_shard(
    tmp_path: Path, coco: SyntheticDataset
) -> None:
    """A hand-built source (no fetch step to check it): the shards' ArchiveError is raised once."""
    zip_path = Path(shutil.copy(coco.root / "archives" / "train2014.zip", tmp_path / "train2014.zip"))
    _damage_keeping_size_and_mtime(zip_path)
    records = read_karpathy(coco.json_path).records
    settings: dict[str, Any] = {"image_size": 32, "resize_mode": "squash", "jpeg_quality": 90}
    with pytest.raises(ArchiveError) as err:
        write_shards(
            records,
            build_vocab(records, min_word_freq=1),
            ZipSource(zip_path),
            str(tmp_path / "shards"),
            **settings,
            samples_per_shard=2,
            max_image_pixels=10**8,
            max_caption_len=50,
            overlong="drop",
            num_procs=1,
            executor="process",
            dask_address=None,
            progress=False,
        )
    assert str(err.value).count(str(zip_path)) == 1 and "delete it and its .verified marker" in str(err.value)


def test_shard_failures_print_one_line_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    message = "1 of 3 shards failed (re-run to resume): train-000001.tar: OSError: No space left on device"

    def failing(*args: Any, **kwargs: Any) -> None:
        raise ShardError(message)

    monkeypatch.setattr("captioning.data.prepare.prepare_data", failing)
    assert main(["shards", "--no-progress"]) == 1
    assert capsys.readouterr().err == f"captioning shards: error: {message}\n"
