"""Flickr30k like the other datasets: its image archive is a URL under base_url, a URL, or a local
.tar.gz or .zip; the extracted images are reused without the archive; a damaged member is skipped
and counted (``captioning.data.datasets``), against a loopback mirror.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from archive_faults import flip_member_byte, zip_folder
from httpserver import FileServer

from captioning.config import Config
from captioning.data import datasets as datasets_module
from captioning.data.datasets import RawDataset, fetch_dataset
from captioning.data.download import DownloadError
from captioning.data.prepare import prepare_data
from captioning.data.records import read_karpathy
from captioning.data.sources import DirSource, UnreadableImage
from captioning.data.synthetic import SyntheticDataset, generate_synthetic

FAST: dict[str, Any] = {"progress": False, "retry_delay_s": 0.001, "timeout_s": 10.0, "num_retries": 2}
TAR = "flickr30k-images.tar.gz"


@pytest.fixture(scope="module")
def flickr30k(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return generate_synthetic(
        tmp_path_factory.mktemp("flickr30k"),
        num_train=6,
        num_val=2,
        num_test=2,
        image_size=32,
        style="flickr30k",
    )


@pytest.fixture
def mirror(flickr30k: SyntheticDataset) -> Iterator[FileServer]:
    with FileServer(flickr30k.root / "archives") as server:
        yield server


def _fetch(raw: Path, **options: Any) -> RawDataset:
    return fetch_dataset("flickr30k", raw, verify_checksums=True, **FAST, **options)


def _assert_images(raw: RawDataset, flickr30k: SyntheticDataset) -> None:
    assert (
        isinstance(raw.images, DirSource) and raw.images.root == raw.karpathy_json.parent / "flickr30k-images"
    )
    for record in read_karpathy(raw.karpathy_json).records:
        assert (
            raw.images.read(record.path) == (flickr30k.root / "flickr30k-images" / record.path).read_bytes()
        )


def test_the_archive_under_base_url(tmp_path: Path, mirror: FileServer, flickr30k: SyntheticDataset) -> None:
    raw = _fetch(tmp_path, base_url=mirror.url)
    assert sorted(r.path for r in mirror.requests) == ["caption_datasets.zip", TAR]
    _assert_images(raw, flickr30k)


def test_the_archive_as_a_url(tmp_path: Path, mirror: FileServer, flickr30k: SyntheticDataset) -> None:
    raw = _fetch(tmp_path, base_url=mirror.url, flickr30k_archive=f"{mirror.url}/{TAR}")
    assert sorted(r.path for r in mirror.requests) == ["caption_datasets.zip", TAR]
    assert (tmp_path / f"{TAR}.verified").is_file()  # checked on arrival like any download
    _assert_images(raw, flickr30k)


def test_the_archive_as_a_local_zip(tmp_path: Path, mirror: FileServer, flickr30k: SyntheticDataset) -> None:
    archive = zip_folder(flickr30k.root / "flickr30k-images", tmp_path / "flickr30k-images.zip")
    raw = _fetch(tmp_path / "raw", base_url=mirror.url, flickr30k_archive=str(archive))
    assert [r.path for r in mirror.requests] == ["caption_datasets.zip"]
    _assert_images(raw, flickr30k)


def test_extracted_images_are_reused_without_the_archive(
    tmp_path: Path, mirror: FileServer, flickr30k: SyntheticDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = Path(shutil.copy(flickr30k.root / "archives" / TAR, tmp_path / TAR))
    first = _fetch(tmp_path / "raw", base_url=mirror.url, flickr30k_archive=str(local))
    local.unlink()
    mirror.reset_log()

    real = datasets_module.extract_archive

    def no_image_extraction(archive: Path, dest: Path, **kwargs: Any) -> list[Path]:
        assert Path(archive).name != TAR, "the image archive was extracted again"
        return real(archive, dest, **kwargs)

    monkeypatch.setattr(datasets_module, "extract_archive", no_image_extraction)
    assert _fetch(tmp_path / "raw", base_url=mirror.url, flickr30k_archive=str(local)) == first
    # Without any archive setting or base_url, an earlier extraction is found as well.
    assert _fetch(tmp_path / "raw") == first
    assert mirror.requests == []


def test_a_downloaded_archive_may_be_deleted_after_extraction(
    tmp_path: Path, mirror: FileServer, flickr30k: SyntheticDataset
) -> None:
    first = _fetch(tmp_path, base_url=mirror.url)
    (tmp_path / TAR).unlink()
    mirror.reset_log()
    assert _fetch(tmp_path, base_url=mirror.url) == first
    assert mirror.requests == []
    _assert_images(first, flickr30k)


def test_a_missing_local_archive_is_named(tmp_path: Path, mirror: FileServer) -> None:
    nowhere = tmp_path / "nowhere" / TAR
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"data.download.flickr30k_archive: no file {nowhere}")
    ):
        _fetch(tmp_path / "raw", base_url=mirror.url, flickr30k_archive=str(nowhere))


def test_no_archive_says_every_way_to_give_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"flickr30k_archive to its path \(a \.tar\.gz or \.zip\) or URL"):
        _fetch(tmp_path)


def test_an_archive_without_the_image_folder_is_refused(tmp_path: Path, mirror: FileServer) -> None:
    other = tmp_path / "photos"
    other.mkdir()
    (other / "1.jpg").write_bytes(b"x")
    archive = zip_folder(other, tmp_path / "photos.zip", junk=False)
    with pytest.raises(DownloadError, match=re.escape(f"{archive}: no flickr30k-images/ folder")):
        _fetch(tmp_path / "raw", base_url=mirror.url, flickr30k_archive=str(archive))


def test_a_damaged_member_is_skipped_and_counted_and_remembered(
    tmp_path: Path, mirror: FileServer, flickr30k: SyntheticDataset
) -> None:
    archive = zip_folder(flickr30k.root / "flickr30k-images", tmp_path / "flickr30k-images.zip")
    records = read_karpathy(flickr30k.json_path).records
    damaged = next(r for r in records if r.split == "train")
    flip_member_byte(archive, f"flickr30k-images/{damaged.path}")
    cfg = Config().replace(
        {
            "data.dataset": "flickr30k",
            "data.raw_dir": str(tmp_path / "raw"),
            "data.shard_dir": str(tmp_path / "shards"),
            "data.download.base_url": mirror.url,
            "data.download.flickr30k_archive": str(archive),
            "data.download.num_retries": 2,
            "data.shards.image_size": 32,
            "data.shards.num_procs": 1,
            "data.min_word_freq": 1,
        }
    )
    train = prepare_data(cfg, progress=False).manifest.splits["train"]
    assert train.num_samples == 5 and train.failures == {"corrupt": 1}

    archive.unlink()  # the skip is remembered with the extraction
    raw = _fetch(tmp_path / "raw", base_url=mirror.url, flickr30k_archive=str(archive))
    with pytest.raises(UnreadableImage) as err:
        raw.images.read(damaged.path)
    assert err.value.reason == "corrupt" and str(archive) in err.value.detail and "CRC" in err.value.detail


def test_no_archive_under_base_url_says_how_else_to_give_it(
    tmp_path: Path, flickr30k: SyntheticDataset
) -> None:
    folder = tmp_path / "mirror"  # a mirror with the caption zip but no flickr30k-images.tar.gz
    folder.mkdir()
    shutil.copy(flickr30k.root / "archives" / "caption_datasets.zip", folder)
    with FileServer(folder) as server, pytest.raises(DownloadError) as err:
        _fetch(tmp_path / "raw", base_url=server.url)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{server.url}/{TAR}: HTTP 404 Not Found")
    assert f"looked for as {TAR} under data.download.base_url" in message
    assert "or set data.download.flickr30k_archive to its path or URL" in message
