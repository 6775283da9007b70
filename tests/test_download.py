"""Tests for downloads, archive extraction and fetch_dataset, against a real HTTP server on loopback
(``captioning.data.download``, ``archives`` and ``datasets``).

The served files are the archives generate_synthetic writes in the real download layouts, so
fetch_dataset runs its real code paths (URLs rewritten by base_url) without touching the internet.
"""

from __future__ import annotations

import hashlib
import io
import re
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from httpserver import FileServer

from captioning.config import DataConfig, DownloadConfig, SyntheticConfig
from captioning.data import archives as archives_module
from captioning.data import datasets as datasets_module
from captioning.data.archives import UnsafeArchiveError, extract_archive
from captioning.data.datasets import DATASET_FILES, REMOTE_FILES, build_raw_dataset, fetch_dataset
from captioning.data.download import DownloadError, download_file, resolve_url
from captioning.data.records import read_karpathy
from captioning.data.sources import DirSource, ImageSource, ZipSource
from captioning.data.synthetic import SyntheticDataset, generate_synthetic

SIZES: dict[str, Any] = {"num_train": 20, "num_val": 4, "num_test": 4}
FAST: dict[str, Any] = {"progress": False, "retry_delay_s": 0.001, "timeout_s": 10.0}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SyntheticDataset]:
    """One small synthetic dataset per real layout, archives included."""
    root = tmp_path_factory.mktemp("synth")
    return {
        style: generate_synthetic(root / style, style=style, **SIZES)
        for style in ("coco", "flickr8k", "flickr30k")
    }


@pytest.fixture
def server(synth: dict[str, SyntheticDataset]) -> Iterator[FileServer]:
    """A loopback server over the COCO-style archives (train2014.zip, val2014.zip, caption_datasets.zip)."""
    with FileServer(synth["coco"].root / "archives") as s:
        yield s


@pytest.fixture
def payload(synth: dict[str, SyntheticDataset]) -> bytes:
    return (synth["coco"].root / "archives" / "train2014.zip").read_bytes()


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ---------------------------------------------------------------------------------------- download


def test_full_download_writes_verified_file_and_marker(
    tmp_path: Path, server: FileServer, payload: bytes
) -> None:
    dest = tmp_path / "sub" / "train2014.zip"
    out = download_file(
        f"{server.url}/train2014.zip", dest, size=len(payload), md5=md5_of(payload), num_retries=5, **FAST
    )
    assert out == dest and dest.read_bytes() == payload
    assert not dest.with_name("train2014.zip.part").exists()
    assert dest.with_name("train2014.zip.verified").exists()
    assert [(r.range, r.status, r.body_bytes) for r in server.requests] == [(None, 200, len(payload))]


def test_resume_after_connection_cut_fetches_only_the_rest(
    tmp_path: Path, server: FileServer, payload: bytes
) -> None:
    cut = len(payload) // 3
    server.cut_after(cut)
    dest = tmp_path / "train2014.zip"
    download_file(f"{server.url}/train2014.zip", dest, md5=md5_of(payload), num_retries=2, **FAST)
    assert dest.read_bytes() == payload
    first, second = server.requests
    assert (first.range, first.status, first.body_bytes) == (None, 200, cut)
    assert (second.range, second.status, second.body_bytes) == (f"bytes={cut}-", 206, len(payload) - cut)


def test_resumes_a_part_file_left_by_an_earlier_run(
    tmp_path: Path, server: FileServer, payload: bytes
) -> None:
    dest = tmp_path / "train2014.zip"
    dest.with_name("train2014.zip.part").write_bytes(payload[:1000])
    download_file(f"{server.url}/train2014.zip", dest, size=len(payload), num_retries=5, **FAST)
    assert dest.read_bytes() == payload
    assert [(r.range, r.body_bytes) for r in server.requests] == [("bytes=1000-", len(payload) - 1000)]


def test_many_cuts_that_make_progress_do_not_use_up_retries(
    tmp_path: Path, server: FileServer, payload: bytes
) -> None:
    server.cut_after(len(payload) // 5, times=4)
    dest = tmp_path / "train2014.zip"
    download_file(f"{server.url}/train2014.zip", dest, md5=md5_of(payload), num_retries=2, **FAST)
    assert dest.read_bytes() == payload
    assert len(server.requests) == 5


def test_retries_after_server_errors(tmp_path: Path, server: FileServer, payload: bytes) -> None:
    server.fail(500, times=2)
    dest = tmp_path / "train2014.zip"
    download_file(f"{server.url}/train2014.zip", dest, md5=md5_of(payload), num_retries=3, **FAST)
    assert dest.read_bytes() == payload
    assert [r.status for r in server.requests] == [500, 500, 200]


def test_gives_up_after_num_retries(tmp_path: Path, server: FileServer) -> None:
    server.fail(503, times=10)
    url = f"{server.url}/train2014.zip"
    with pytest.raises(DownloadError, match="HTTP 503") as err:
        download_file(url, tmp_path / "train2014.zip", num_retries=3, **FAST)
    assert url in str(err.value)
    assert len(server.requests) == 3
    assert not (tmp_path / "train2014.zip").exists()


def test_client_error_is_not_retried(tmp_path: Path, server: FileServer) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(f"{server.url}/missing.zip", tmp_path / "missing.zip", num_retries=5, **FAST)
    assert len(server.requests) == 1


def test_server_that_ignores_range_restarts_the_file(
    tmp_path: Path, server: FileServer, payload: bytes
) -> None:
    dest = tmp_path / "train2014.zip"
    dest.with_name("train2014.zip.part").write_bytes(b"x" * 500)  # would corrupt the file if appended to
    server.ignore_range = True
    download_file(f"{server.url}/train2014.zip", dest, md5=md5_of(payload), num_retries=5, **FAST)
    assert dest.read_bytes() == payload
    assert [(r.range, r.status) for r in server.requests] == [("bytes=500-", 200)]


def test_416_on_a_complete_part_file_finishes_without_a_body(
    tmp_path: Path, server: FileServer, payload: bytes
) -> None:
    dest = tmp_path / "train2014.zip"
    dest.with_name("train2014.zip.part").write_bytes(payload)
    download_file(f"{server.url}/train2014.zip", dest, md5=md5_of(payload), num_retries=5, **FAST)
    assert dest.read_bytes() == payload
    assert [(r.range, r.status) for r in server.requests] == [(f"bytes={len(payload)}-", 416)]


def test_416_on_an_overlong_part_file_restarts(tmp_path: Path, server: FileServer, payload: bytes) -> None:
    dest = tmp_path / "train2014.zip"
    dest.with_name("train2014.zip.part").write_bytes(payload + b"junk")
    download_file(f"{server.url}/train2014.zip", dest, num_retries=2, **FAST)
    assert dest.read_bytes() == payload
    assert [r.status for r in server.requests] == [416, 200]


def test_size_mismatch_is_caught_and_partial_removed(
    tmp_path: Path, server: FileServer, payload: bytes
) -> None:
    dest = tmp_path / "train2014.zip"
    url = f"{server.url}/train2014.zip"
    with pytest.raises(DownloadError) as err:
        download_file(url, dest, size=len(payload) + 1, num_retries=5, **FAST)
    message = str(err.value)
    assert url in message and str(len(payload) + 1) in message and str(len(payload)) in message
    assert not dest.exists() and not dest.with_name("train2014.zip.part").exists()


def test_md5_mismatch_from_a_different_file_is_caught_and_partial_removed(
    tmp_path: Path, server: FileServer, payload: bytes
) -> None:
    other = bytes(b ^ 0xFF for b in payload)  # same length, other bytes
    server.substitute["train2014.zip"] = other
    dest = tmp_path / "train2014.zip"
    url = f"{server.url}/train2014.zip"
    with pytest.raises(DownloadError, match="MD5 mismatch") as err:
        download_file(url, dest, size=len(payload), md5=md5_of(payload), num_retries=5, **FAST)
    assert url in str(err.value) and md5_of(payload) in str(err.value) and md5_of(other) in str(err.value)
    assert not dest.exists() and not dest.with_name("train2014.zip.part").exists()


def test_skips_a_complete_file_without_any_request(
    tmp_path: Path, server: FileServer, payload: bytes
) -> None:
    url = f"{server.url}/train2014.zip"
    known = tmp_path / "known" / "train2014.zip"
    unknown = tmp_path / "unknown" / "train2014.zip"
    download_file(url, known, size=len(payload), md5=md5_of(payload), num_retries=5, **FAST)
    download_file(url, unknown, num_retries=5, **FAST)  # nothing known: the marker says it completed
    server.reset_log()
    download_file(url, known, size=len(payload), md5=md5_of(payload), num_retries=5, **FAST)
    download_file(url, unknown, num_retries=5, **FAST)
    assert server.requests == []

    # A file put there by hand is hashed once against the known MD5, then trusted.
    by_hand = tmp_path / "by_hand" / "train2014.zip"
    by_hand.parent.mkdir()
    by_hand.write_bytes(payload)
    download_file(url, by_hand, md5=md5_of(payload), num_retries=5, **FAST)
    assert server.requests == [] and by_hand.with_name("train2014.zip.verified").exists()

    # Without anything known and without the marker, its structure decides: the zip opens, so it is
    # used and marked again (a damaged one is fetched again: tests/test_archive_checks.py).
    unknown.with_name("train2014.zip.verified").unlink()
    download_file(url, unknown, num_retries=5, **FAST)
    assert server.requests == [] and unknown.with_name("train2014.zip.verified").exists()


def test_resolve_url_keeps_the_file_name() -> None:
    url = REMOTE_FILES["Flickr8k_Dataset.zip"].url
    assert resolve_url(url, None) == url
    assert (
        resolve_url(url, "http://127.0.0.1:8000/mirror/")
        == "http://127.0.0.1:8000/mirror/Flickr8k_Dataset.zip"
    )


def test_remote_file_table_is_consistent() -> None:
    for name, remote in REMOTE_FILES.items():
        assert remote.name == name and remote.url.endswith("/" + name)
        assert remote.md5 is None or (len(remote.md5) == 32 and int(remote.md5, 16) >= 0)
    assert {n for names in DATASET_FILES.values() for n in names} <= set(REMOTE_FILES)


# ---------------------------------------------------------------------------------------- extract


def _zip_with(path: Path, members: list[tuple[str, bytes, int]]) -> Path:
    """A zip whose members carry the given Unix modes (file type bits included)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def _tar_with(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info in members:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return path


def _tarinfo(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


FILE = stat.S_IFREG | 0o644


@pytest.mark.parametrize(
    ("evil", "mode"),
    [
        ("../evil.txt", FILE),
        ("a/../../evil.txt", FILE),
        ("/tmp/evil-absolute.txt", FILE),
        ("link", stat.S_IFLNK | 0o777),
        ("fifo", stat.S_IFIFO | 0o644),
    ],
)
def test_unsafe_zip_member_is_refused_before_writing(tmp_path: Path, evil: str, mode: int) -> None:
    archive = _zip_with(tmp_path / "evil.zip", [("ok.txt", b"fine", FILE), (evil, b"/etc/passwd", mode)])
    dest = tmp_path / "out" / "deep"
    with pytest.raises(UnsafeArchiveError, match=re.escape(repr(evil))):
        extract_archive(archive, dest)
    assert not (tmp_path / "out").exists()  # not even ok.txt, which came first
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize(
    "evil",
    [
        _tarinfo("../evil.txt"),
        _tarinfo("/tmp/evil-absolute.txt"),
        _tarinfo("link", tarfile.SYMTYPE, "/etc/passwd"),
        _tarinfo("hard", tarfile.LNKTYPE, "ok.txt"),
        _tarinfo("dev", tarfile.CHRTYPE),
    ],
    ids=["dotdot", "absolute", "symlink", "hardlink", "device"],
)
def test_unsafe_tar_member_is_refused_before_writing(tmp_path: Path, evil: tarfile.TarInfo) -> None:
    archive = _tar_with(tmp_path / "evil.tar.gz", [_tarinfo("ok.txt"), evil])
    with pytest.raises(UnsafeArchiveError, match=re.escape(evil.name)):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_members_prefix_extracts_only_those_members(
    tmp_path: Path, synth: dict[str, SyntheticDataset]
) -> None:
    archive = synth["coco"].root / "archives" / "train2014.zip"
    with zipfile.ZipFile(archive) as zf:
        first = next(n for n in zf.namelist() if n.endswith(".jpg"))
    (path,) = extract_archive(archive, tmp_path, members_prefix=first)
    assert path == tmp_path / first
    assert path.read_bytes() == (synth["coco"].root / first).read_bytes()
    assert [p for p in tmp_path.rglob("*.jpg")] == [path]


def test_tar_gz_extraction_of_flickr30k_and_skip_on_second_call(
    tmp_path: Path, synth: dict[str, SyntheticDataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = synth["flickr30k"]
    (archive,) = [a for a in data.archives if a.name.endswith(".tar.gz")]
    files = extract_archive(archive, tmp_path)
    expected = sorted(p.relative_to(data.root) for p in (data.root / "flickr30k-images").iterdir())
    assert sorted(p.relative_to(tmp_path) for p in files) == expected
    for rel in expected:
        assert (tmp_path / rel).read_bytes() == (data.root / rel).read_bytes()
    assert not list(tmp_path.rglob("*.tmp-*"))

    def fail(*args: object) -> list[Path]:
        raise AssertionError("extracted again despite the completion marker")

    monkeypatch.setattr(archives_module, "_extract_tar", fail)
    assert extract_archive(archive, tmp_path) == files


# ---------------------------------------------------------------------------------------- datasets


def _assert_every_image_readable(raw_json: Path, images: ImageSource, image_root: Path) -> int:
    dataset = read_karpathy(raw_json)
    assert dataset.records
    for record in dataset.records:
        assert images.read(record.path) == (image_root / record.path).read_bytes()
    return len(dataset.records)


def test_fetch_coco_reads_images_straight_from_the_zips(
    tmp_path: Path, server: FileServer, synth: dict[str, SyntheticDataset]
) -> None:
    raw_dir = tmp_path / "raw"
    raw = fetch_dataset("coco", raw_dir, base_url=server.url, verify_checksums=False, num_retries=5, **FAST)
    assert raw.name == "coco" and raw.karpathy_json == raw_dir / "dataset_coco.json"
    assert _assert_every_image_readable(raw.karpathy_json, raw.images, synth["coco"].root) == 28
    assert sorted(r.path for r in server.requests) == ["caption_datasets.zip", "train2014.zip", "val2014.zip"]
    assert not (raw_dir / "train2014").exists() and not (raw_dir / "val2014").exists()  # never extracted

    server.reset_log()
    again = fetch_dataset("coco", raw_dir, base_url=server.url, verify_checksums=False, num_retries=5, **FAST)
    assert server.requests == [] and again.karpathy_json == raw.karpathy_json


def test_fetch_applies_known_sizes_and_checksums(tmp_path: Path, server: FileServer) -> None:
    # The synthetic train2014.zip is not 13 GB: the table's size must stop it before any body byte.
    with pytest.raises(DownloadError, match=re.escape("train2014.zip: size mismatch")):
        fetch_dataset(
            "coco", tmp_path / "raw", base_url=server.url, num_retries=5, verify_checksums=True, **FAST
        )
    assert not (tmp_path / "raw" / "train2014.zip").exists()


def test_fetch_flickr8k_reads_the_misspelt_folder_in_the_zip(
    tmp_path: Path, synth: dict[str, SyntheticDataset]
) -> None:
    data = synth["flickr8k"]
    with FileServer(data.root / "archives") as server:
        raw = fetch_dataset(
            "flickr8k", tmp_path, base_url=server.url, verify_checksums=False, num_retries=5, **FAST
        )
    assert isinstance(raw.images, ZipSource) and raw.images.prefix == "Flicker8k_Dataset/"
    assert _assert_every_image_readable(raw.karpathy_json, raw.images, data.root / "Flicker8k_Dataset") == 28


def test_fetch_flickr30k_extracts_the_local_archive(
    tmp_path: Path, synth: dict[str, SyntheticDataset]
) -> None:
    data = synth["flickr30k"]
    archive = data.root / "archives" / "flickr30k-images.tar.gz"
    with FileServer(data.root / "archives") as server:
        raw = fetch_dataset(
            "flickr30k",
            tmp_path,
            base_url=server.url,
            verify_checksums=False,
            flickr30k_archive=archive,
            num_retries=5,
            **FAST,
        )
        assert [r.path for r in server.requests] == [
            "caption_datasets.zip"
        ]  # images come from the local path
    assert isinstance(raw.images, DirSource) and raw.images.root == tmp_path / "flickr30k-images"
    assert _assert_every_image_readable(raw.karpathy_json, raw.images, data.root / "flickr30k-images") == 28


def test_fetch_flickr30k_without_archive_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="flickr30k_archive"):
        fetch_dataset("flickr30k", tmp_path, num_retries=5, verify_checksums=True, **FAST)


def test_fetch_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid datasets: coco, flickr8k, flickr30k, synthetic"):
        fetch_dataset("imagenet", tmp_path, num_retries=5, timeout_s=60.0, verify_checksums=True)


@pytest.mark.parametrize("style", ["coco", "flickr8k", "flickr30k"])
def test_fetch_synthetic_generates_once(tmp_path: Path, style: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {**SIZES, "style": style, "image_size": 32}
    raw = fetch_dataset(
        "synthetic", tmp_path, synthetic=settings, num_retries=5, verify_checksums=True, **FAST
    )
    root = tmp_path / "synthetic"
    image_root = root if style == "coco" else next(p for p in root.iterdir() if p.is_dir())
    assert raw.name == "synthetic" and raw.karpathy_json == root / f"dataset_{style}.json"
    assert _assert_every_image_readable(raw.karpathy_json, raw.images, image_root) == 28
    assert not (root / "archives").exists()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated again with unchanged settings")

    monkeypatch.setattr(datasets_module, "generate_synthetic", fail)
    assert (
        fetch_dataset("synthetic", tmp_path, synthetic=settings, num_retries=5, verify_checksums=True, **FAST)
        == raw
    )


def test_build_raw_dataset_reads_the_data_section(tmp_path: Path) -> None:
    cfg = DataConfig(
        dataset="synthetic",
        raw_dir=str(tmp_path),
        download=DownloadConfig(num_retries=1),
        synthetic=SyntheticConfig(num_train=3, num_val=1, num_test=1, image_size=32, style="flickr8k"),
    )
    raw = build_raw_dataset(cfg, progress=False)
    assert len(read_karpathy(raw.karpathy_json).records) == 5
