"""Checksums a user can act on: one-line mismatches with the options to proceed, a mirror's own
checksums (entries and sums files), checks off keeping the structural checks, and an override that
is needed once (``captioning.data.checksums``, ``download``, ``datasets``), against a loopback mirror.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from archive_faults import cut_short
from httpserver import FileServer

from captioning.cli import main
from captioning.config import Config, ConfigError, config_warnings, describe_config
from captioning.data import datasets as datasets_module
from captioning.data.checksums import Checksum, user_checksums
from captioning.data.datasets import REMOTE_FILES, RawDataset, fetch_dataset
from captioning.data.download import ChecksumMismatch, DownloadError, download_file
from captioning.data.synthetic import SyntheticDataset, generate_synthetic

FAST: dict[str, Any] = {"progress": False, "retry_delay_s": 0.001, "timeout_s": 10.0, "num_retries": 2}
ZIP = "Flickr8k_Dataset.zip"


@pytest.fixture(scope="module")
def flickr8k(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return generate_synthetic(
        tmp_path_factory.mktemp("flickr8k"),
        num_train=6,
        num_val=2,
        num_test=2,
        image_size=32,
        style="flickr8k",
    )


@pytest.fixture
def mirror(flickr8k: SyntheticDataset, tmp_path: Path) -> Iterator[FileServer]:
    """A mirror whose Flickr8k_Dataset.zip is not the published one (its MD5 differs)."""
    with FileServer(shutil.copytree(flickr8k.root / "archives", tmp_path / "mirror")) as server:
        yield server


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _fetch(server: FileServer, raw: Path, **options: Any) -> RawDataset:
    options.setdefault("verify_checksums", True)
    return fetch_dataset("flickr8k", raw, base_url=server.url, **FAST, **options)


def _zip_requests(server: FileServer) -> list[str]:
    return [r.path for r in server.requests if r.path == ZIP]


def _mismatch(server: FileServer, raw: Path, **options: Any) -> str:
    with pytest.raises(ChecksumMismatch) as err:
        _fetch(server, raw, **options)
    return str(err.value)


def test_mismatch_is_one_line_naming_file_values_and_options(tmp_path: Path, mirror: FileServer) -> None:
    raw = tmp_path / "raw"
    actual = _md5(mirror.root / ZIP)
    message = _mismatch(mirror, raw)
    assert "\n" not in message
    assert message.startswith(f"{raw / ZIP}: MD5 mismatch: expected {REMOTE_FILES[ZIP].md5}, got {actual}")
    assert "the expected value is the published one." in message
    assert f"--data.download.checksums={ZIP}=md5:{actual}" in message
    assert f"'{actual}  {ZIP}'" in message and "data.download.checksums_file" in message
    assert "--data.download.verify_checksums=false" in message and "later runs need neither option" in message
    assert (raw / f"{ZIP}.rejected").is_file() and not (raw / ZIP).exists()


def test_own_checksum_accepts_the_kept_download_once_for_good(tmp_path: Path, mirror: FileServer) -> None:
    raw = tmp_path / "raw"
    actual = _md5(mirror.root / ZIP)
    _mismatch(mirror, raw)
    mirror.reset_log()
    _fetch(mirror, raw, checksums=(f"{ZIP}=md5:{actual}",))
    assert _zip_requests(mirror) == []  # the kept download was taken, not fetched again
    assert (raw / ZIP).read_bytes() == (mirror.root / ZIP).read_bytes()
    assert not (raw / f"{ZIP}.rejected").exists()
    _fetch(mirror, raw)  # a later run without the option: still verified, nothing fetched
    assert mirror.requests == []


def test_checks_off_accepts_once_and_later_runs_need_no_override(tmp_path: Path, mirror: FileServer) -> None:
    raw = tmp_path / "raw"
    _mismatch(mirror, raw)
    mirror.reset_log()
    _fetch(mirror, raw, verify_checksums=False)
    assert _zip_requests(mirror) == []
    _fetch(mirror, raw)
    assert mirror.requests == []
    marker = json.loads((raw / f"{ZIP}.verified").read_text())
    assert marker["override"] is True and marker["md5"] == _md5(mirror.root / ZIP)


def test_a_later_own_checksum_that_disagrees_is_still_checked(tmp_path: Path, mirror: FileServer) -> None:
    raw = tmp_path / "raw"
    _fetch(mirror, raw, verify_checksums=False)
    message = _mismatch(mirror, raw, checksums=(f"{ZIP}=md5:{'0' * 32}",))
    assert (
        f"expected {'0' * 32}" in message and "the expected value is from data.download.checksums." in message
    )


def test_a_file_put_there_by_hand_with_other_bytes_is_fetched_again(
    tmp_path: Path, mirror: FileServer
) -> None:
    dest = tmp_path / ZIP
    dest.write_bytes(b"PK not the mirror's file")
    download_file(f"{mirror.url}/{ZIP}", dest, md5=_md5(mirror.root / ZIP), **FAST)
    assert dest.read_bytes() == (mirror.root / ZIP).read_bytes() and _zip_requests(mirror) == [ZIP]


def test_checks_off_still_refuses_a_truncated_archive(tmp_path: Path, mirror: FileServer) -> None:
    mirror.substitute[ZIP] = cut_short(mirror.root / ZIP, 0.7)
    with pytest.raises(DownloadError, match=re.escape(f"{tmp_path / 'raw' / ZIP}: the download from")):
        _fetch(mirror, tmp_path / "raw", verify_checksums=False)
    assert not (tmp_path / "raw" / ZIP).exists()


def test_a_sums_file_in_gnu_and_bsd_form(tmp_path: Path, mirror: FileServer) -> None:
    sha256 = hashlib.sha256((mirror.root / ZIP).read_bytes()).hexdigest()
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(
        f"# a mirror's sums\n\nSHA256 ({ZIP}) = {sha256}\n"
        f"{_md5(mirror.root / 'caption_datasets.zip')} *sub/caption_datasets.zip\n"
    )
    raw = tmp_path / "raw"
    _fetch(mirror, raw, checksums_file=str(sums))
    assert json.loads((raw / f"{ZIP}.verified").read_text())["sha256"] == sha256

    sums.write_text(f"{'f' * 64}  {ZIP}\n")  # a wrong one is checked, and its source named
    (raw / f"{ZIP}.verified").unlink()
    message = _mismatch(mirror, tmp_path / "raw2", checksums_file=str(sums))
    assert f"SHA-256 mismatch: expected {'f' * 64}, got {sha256}" in message
    assert f"the expected value is from data.download.checksums_file {sums}." in message


def test_entries_win_over_the_sums_file(tmp_path: Path) -> None:
    sums = tmp_path / "MD5SUMS"
    sums.write_text(f"{'a' * 32}  x.zip\n{'b' * 32}  y.zip\n")
    found = user_checksums([f"x.zip=md5:{'C' * 32}", f"y.zip={'d' * 64}"], sums)
    assert found["x.zip"].md5 == "c" * 32 and found["x.zip"].source == "data.download.checksums"
    assert found["y.zip"].md5 == "b" * 32 and found["y.zip"].sha256 == "d" * 64


@pytest.mark.parametrize(
    "entry", [ZIP, f"{ZIP}=md5:123", f"=md5:{'a' * 32}", f"{ZIP}=crc32:{'a' * 32}", f"{ZIP}=md5:{'g' * 32}"]
)
def test_a_malformed_entry_is_a_config_error_naming_it(entry: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"data.download.checksums: cannot read {entry!r}")):
        user_checksums([entry], None)


def test_a_malformed_or_missing_sums_file_is_a_config_error(tmp_path: Path) -> None:
    sums = tmp_path / "SUMS"
    sums.write_text(f"{'a' * 32}  x.zip\nthis is not a checksum\n")
    with pytest.raises(ConfigError, match=re.escape(f"data.download.checksums_file {sums}, line 2")):
        user_checksums([], sums)
    with pytest.raises(ConfigError, match=re.escape(f"cannot read {tmp_path / 'nowhere'}")):
        user_checksums([], tmp_path / "nowhere")


def test_the_command_line_prints_one_line_not_a_traceback(
    tmp_path: Path, mirror: FileServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "download",
            "--no-progress",
            "--data.dataset=flickr8k",
            f"--data.raw_dir={tmp_path / 'raw'}",
            f"--data.download.base_url={mirror.url}",
            "--data.download.num_retries=2",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"captioning download: error: {tmp_path / 'raw' / ZIP}: MD5 mismatch")


def test_the_settings_are_documented_and_warn_when_they_do_nothing() -> None:
    described = describe_config()
    assert "data.download.checksums : list[str]" in described
    assert "data.download.checksums_file : str | none" in described
    off = {"data.download.verify_checksums": False}
    warning = (
        "data.download.checksums/checksums_file are ignored when data.download.verify_checksums is false"
    )
    assert warning in config_warnings(
        Config().replace({**off, "data.download.checksums": (f"{ZIP}={'a' * 32}",)})
    )
    assert warning in config_warnings(Config().replace({**off, "data.download.checksums_file": "SUMS"}))
    assert warning not in config_warnings(Config().replace({"data.download.checksums_file": "SUMS"}))


def test_size_mismatch_from_the_server_is_one_line_with_the_options(
    tmp_path: Path, mirror: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server announces another size than the published one: nothing is kept (a partial download
    left by an earlier run is removed), and the options offered are those that apply to a copy not
    downloaded: the mirror's own checksum or checks off, never the MD5 of bytes that are not here."""
    actual = (mirror.root / ZIP).stat().st_size
    published = dataclasses.replace(REMOTE_FILES[ZIP], size=actual + 1000)
    monkeypatch.setitem(datasets_module.REMOTE_FILES, ZIP, published)
    raw = tmp_path / "raw"
    raw.mkdir()
    part = raw / f"{ZIP}.part"
    part.write_bytes((mirror.root / ZIP).read_bytes()[:100])  # an earlier run's partial download
    message = _mismatch(mirror, raw)
    assert "\n" not in message
    assert message.startswith(
        f"{raw / ZIP}: size mismatch: expected {actual + 1000} bytes, the server at {mirror.url}/{ZIP} has "
        f"{actual} (removed the partial download {part}); the expected value is the published one."
    )
    assert f"--data.download.checksums={ZIP}=md5:HEX, HEX being the MD5 the mirror publishes" in message
    assert f"'HEX  {ZIP}'" in message and "data.download.checksums_file" in message
    assert "--data.download.verify_checksums=false" in message and "later runs need neither option" in message
    assert "<its MD5>" not in message and "kept download" not in message
    assert not part.exists() and not (raw / ZIP).exists() and not (raw / f"{ZIP}.rejected").exists()
    _fetch(mirror, raw, verify_checksums=False)  # one of the options offered
    assert (raw / ZIP).read_bytes() == (mirror.root / ZIP).read_bytes()


def test_a_cut_without_a_length_announced_is_resumed_not_rejected(tmp_path: Path, mirror: FileServer) -> None:
    good = (mirror.root / ZIP).read_bytes()
    mirror.no_length = True  # no Content-Length: a dropped connection looks like the end of the file
    mirror.cut_after(len(good) // 3)
    dest = tmp_path / ZIP
    download_file(f"{mirror.url}/{ZIP}", dest, size=len(good), md5=_md5(mirror.root / ZIP), **FAST)
    assert dest.read_bytes() == good and not dest.with_name(f"{ZIP}.rejected").exists()
    cut = len(good) // 3
    assert [(r.range, r.status, r.body_bytes) for r in mirror.requests] == [
        (None, 200, cut),
        (f"bytes={cut}-", 206, len(good) - cut),
    ]


def test_sums_file_lines_of_other_algorithms_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sums = tmp_path / "SUMS"
    sums.write_text(
        f"{'1' * 40}  x.zip\n{'2' * 128} *x.zip\nSHA512 (x.zip) = {'3' * 128}\nSHA1 (y.zip) = {'4' * 40}\n"
        f"BLAKE2b (x.zip) = {'5' * 128}\n{'6' * 96}  y.zip\n{'a' * 32}  x.zip\n"
    )
    found = user_checksums([], sums)
    assert found == {
        "x.zip": Checksum(md5="a" * 32, sha256=None, source=f"data.download.checksums_file {sums}")
    }
    for bad in (f"SHA256 (x.zip) = {'7' * 63}", f"{'8' * 33}  x.zip", f"SHA512 (x.zip) = {'g' * 128}"):
        sums.write_text(f"{'1' * 40}  x.zip\n{bad}\n")  # a line that does not parse is still refused
        with pytest.raises(ConfigError, match=re.escape(f"data.download.checksums_file {sums}, line 2")):
            user_checksums([], sums)
    sums.write_text(f"SHA512 (x.zip) = {'3' * 128}\n")
    with caplog.at_level("WARNING", logger="captioning.data.checksums"):
        assert user_checksums([], sums) == {}
    assert f"data.download.checksums_file {sums}: no MD5 or SHA-256 line" in caplog.text
