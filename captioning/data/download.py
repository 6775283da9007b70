"""Fetch a raw dataset: resumable, verified HTTP downloads and archive extraction that refuses tricks.

``fetch_dataset`` puts what a dataset needs under ``raw_dir`` and returns where its Karpathy split
file is and how to read its images (``RawDataset``)::

    raw = fetch_dataset("flickr8k", "data/raw")          # caption_datasets.zip + Flickr8k_Dataset.zip
    dataset = read_karpathy(raw.karpathy_json)
    jpeg = raw.images.read(dataset.records[0].path)

Only the small Karpathy JSON is extracted; the COCO and Flickr8k image zips are read in place
(``captioning.data.sources``). Flickr30k has no public URL (it is given out on request), so its
``flickr30k-images.tar.gz`` comes from a local path and is extracted, because a tar.gz cannot be
read at random. ``synthetic`` generates the learnable synthetic dataset under ``raw_dir/synthetic``.
``local`` fetches nothing: new data that landed as a folder (a Karpathy-format split file and its
images) is read where it is::

    raw = fetch_dataset("local", "unused", karpathy_json="/data/new/dataset_coco.json")
    raw.images                                           # DirSource("/data/new"): the JSON's folder

``download_file`` streams into ``dest.part``, resumes it with ``Range: bytes=N-``, retries
connection errors, timeouts and 5xx answers with exponential backoff, and renames the file into
place only once its size and MD5 (where known) match; a ``dest.verified`` marker lets the next
run skip it without hashing gigabytes again. ``extract_archive`` checks every member it would write
(no absolute paths, no ``..``, no links, no device files) before writing any, writes each file
atomically, and leaves a marker so a second call is free. No torch, Prefect or MLflow here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
import urllib3
from tqdm import tqdm

from captioning.config import ConfigError
from captioning.data.sources import (
    FLICKR30K_FOLDER,
    SYNTHETIC_FOLDER,
    DirSource,
    ImageSource,
    source_for,
)
from captioning.data.synthetic import generate_synthetic

if TYPE_CHECKING:
    from captioning.config import DataConfig

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("coco", "flickr8k", "flickr30k", "synthetic", "local")


class DownloadError(RuntimeError):
    """A download failed for good, or its bytes are not the expected ones; the message names the URL."""


class UnsafeArchiveError(ValueError):
    """An archive member would write outside the destination or is not a plain file or folder."""


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: its name under raw_dir, URL, and size (bytes) and MD5 where known."""

    name: str
    url: str
    size: int | None
    md5: str | None


# Sizes and checksums only where a public source states them; None where none was found (a wrong
# value would make every real download fail).
REMOTE_FILES: dict[str, RemoteFile] = {
    f.name: f
    for f in (
        # Sizes: tensorflow/datasets, tensorflow_datasets/url_checksums/coco.txt (which has SHA-256,
        # not MD5). MD5s: keras-contrib's COCO script and Salesforce LAVIS (download_coco.py), and for
        # train2014 also pystiche_papers, which hands it to torchvision's verifying downloader.
        RemoteFile(
            "train2014.zip",
            "http://images.cocodataset.org/zips/train2014.zip",
            13_510_573_713,
            "0da8c0bd3d6becc4dcb32757491aca88",
        ),
        RemoteFile(
            "val2014.zip",
            "http://images.cocodataset.org/zips/val2014.zip",
            6_645_013_297,
            "a3d79f5ed8d289b7a7554ce06a5782b3",
        ),
        # No size or checksum from a second source: mlverse/torchvision (R) lists MD5
        # 4fa8c08369d22fe16e41dc124bd1adc2, but it is the only source and the same project's
        # train2014 MD5 disagrees with five others, so it is not enforced. The zip's CRCs still
        # check the one member we extract.
        RemoteFile(
            "caption_datasets.zip",
            "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
            None,
            None,
        ),
        # MD5: mlverse/torchvision R/dataset-flickr.R and an independent CMake fetch script
        # (file(DOWNLOAD ... EXPECTED_MD5)) agree. No exact size published.
        RemoteFile(
            "Flickr8k_Dataset.zip",
            "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
            None,
            "f18a1e2920de5bd84dae7cf08ec78978",
        ),
    )
}

# What each downloadable dataset needs, by REMOTE_FILES name. Flickr30k's images come from a local
# archive (flickr30k_archive); synthetic is generated; local is already on disk.
DATASET_FILES: dict[str, tuple[str, ...]] = {
    "coco": ("caption_datasets.zip", "train2014.zip", "val2014.zip"),
    "flickr8k": ("caption_datasets.zip", "Flickr8k_Dataset.zip"),
    "flickr30k": ("caption_datasets.zip",),
}

# Answers worth another try: the server or something in between is overloaded or restarting.
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_DELAY_S = 120.0


@dataclass(frozen=True)
class RawDataset:
    """A fetched dataset: its Karpathy split file and the source its images are read from."""

    name: str
    karpathy_json: Path
    images: ImageSource


# ---------------------------------------------------------------------------------------- download


class _Retryable(Exception):
    """A failure that another attempt may not have (cut connection, 5xx, a resume that went wrong)."""


def resolve_url(url: str, base_url: str | None) -> str:
    """Replace scheme, host and path of url with base_url, keeping the file name (mirrors, tests)."""
    if base_url is None:
        return url
    name = PurePosixPath(urlsplit(url).path).name
    return f"{base_url.rstrip('/')}/{name}"


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    *,
    size: int | None = None,
    md5: str | None = None,
    num_retries: int = 5,
    timeout_s: float = 60.0,
    progress: bool = True,
    retry_delay_s: float = 1.0,
    chunk_bytes: int = 1 << 20,
) -> Path:
    """Download url to dest unless dest is already complete; return dest.

    Complete means: dest matches the known size and MD5, or, with neither known, a marker written
    after an earlier verified download still matches dest's size and modification time. Bytes go to
    ``dest.part``, which a later attempt (or a later call) resumes with an HTTP Range request.
    Connection errors, timeouts and 408/429/5xx answers are retried: ``num_retries`` failed
    attempts in a row make it give up (DownloadError), and an attempt that brought new bytes starts
    the count afresh. After the k-th failure in a row it waits ``retry_delay_s * 2**(k-1)`` seconds
    (at most two minutes). Other HTTP errors fail at once.
    ``timeout_s`` bounds connecting and each read. A size or MD5 mismatch removes the partial file
    and raises DownloadError naming the URL, the expected and the actual value.
    """
    if num_retries < 1:
        raise ValueError(f"num_retries must be >= 1, got {num_retries}")
    dest = Path(dest)
    md5 = md5.lower() if md5 else None
    if _is_complete(dest, size, md5):
        log.info("%s is complete; skipping %s", dest, url)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    failures = 0
    with requests.Session() as session:
        while True:
            before = _size_or_zero(part)
            try:
                _fetch_into(session, url, part, size, timeout_s, progress, chunk_bytes, dest.name)
                break
            except (
                requests.exceptions.InvalidURL,
                requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema,
            ) as e:
                raise DownloadError(f"{url}: {e}") from None
            except _Retryable as e:
                reason = str(e)
            except (
                requests.RequestException,
                urllib3.exceptions.HTTPError,
                ConnectionError,
                TimeoutError,
            ) as e:
                reason = f"{type(e).__name__}: {e}"
            # Attempts that moved the file forward do not use up retries: a 13 GB zip over a flaky
            # link may need many resumes.
            failures = 1 if _size_or_zero(part) > before else failures + 1
            if failures >= num_retries:
                raise DownloadError(
                    f"{url}: gave up after {failures} failed attempt(s) in a row; last error: {reason}"
                )
            delay_s = min(retry_delay_s * 2 ** (failures - 1), _MAX_DELAY_S)
            log.warning("%s: %s; retrying in %.2g s", url, reason, delay_s)
            time.sleep(delay_s)

    actual_size = part.stat().st_size
    if size is not None and actual_size != size:
        part.unlink()
        raise DownloadError(
            f"{url}: size mismatch: expected {size} bytes, got {actual_size}; removed the partial file {part}"
        )
    if md5 is not None:
        actual_md5 = _file_md5(part)
        if actual_md5 != md5:
            part.unlink()
            raise DownloadError(
                f"{url}: MD5 mismatch: expected {md5}, got {actual_md5}; removed the partial file {part}"
            )
    os.replace(part, dest)
    _write_marker(dest, url, md5)
    return dest


def _fetch_into(
    session: requests.Session,
    url: str,
    part: Path,
    size: int | None,
    timeout_s: float,
    progress: bool,
    chunk_bytes: int,
    desc: str,
) -> None:
    """One HTTP attempt: resume or restart part and stream the body into it."""
    offset = _size_or_zero(part)
    if size is not None and offset > size:  # longer than the whole file can be: start over
        part.unlink()
        offset = 0
    # identity: the byte counts (Content-Length, Range) must be those of the file itself.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with session.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
        status = response.status_code
        if status == 416 and offset:
            total = _content_range(response.headers.get("Content-Range"))[1]
            if total == offset:  # the .part already holds every byte; verification decides
                return
            part.unlink(missing_ok=True)
            raise _Retryable(f"HTTP 416 resuming at byte {offset} (server size {total}); restarting")
        if status in _RETRY_STATUSES:
            raise _Retryable(f"HTTP {status} {response.reason}")
        length = _int_or_none(response.headers.get("Content-Length"))
        if status == 206 and offset:
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise _Retryable(f"asked to resume at byte {offset}, server sent from byte {start}")
            if total is None and length is not None:
                total = offset + length
            mode = "ab"
        elif status == 200:
            offset, mode, total = 0, "wb", length  # a server that ignores Range sends it all again
        else:
            raise DownloadError(f"{url}: HTTP {status} {response.reason}")
        if size is not None and total is not None and total != size:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{url}: size mismatch: expected {size} bytes, the server has {total}; "
                f"removed the partial file {part}"
            )

        written = offset
        with (
            part.open(mode) as f,
            tqdm(
                total=total,
                initial=offset,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                disable=not progress,
            ) as bar,
        ):
            # The raw stream, undecoded: a .tar.gz served with Content-Encoding: gzip stays a .tar.gz.
            for chunk in response.raw.stream(chunk_bytes, decode_content=False):
                f.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    if total is not None and written < total:
        raise _Retryable(f"connection closed after {written} of {total} bytes")
    if total is not None and written > total:
        part.unlink()
        raise _Retryable(f"server sent {written} bytes but announced {total}; restarting")


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header: "bytes 10-99/100" or "bytes */100"."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if match is None:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total != "*" else None)


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _file_md5(path: Path) -> str:
    log.info("verifying the MD5 of %s", path)
    with path.open("rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def _marker_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified")


def _write_marker(dest: Path, url: str, md5: str | None) -> None:
    st = dest.stat()
    marker = {"url": url, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": md5}
    _write_text_atomic(_marker_path(dest), json.dumps(marker) + "\n")


def _is_complete(dest: Path, size: int | None, md5: str | None) -> bool:
    """True when dest exists and matches what is known about it (see download_file)."""
    try:
        st = dest.stat()
    except FileNotFoundError:
        return False
    if size is not None and st.st_size != size:
        log.warning("%s has %d bytes, expected %d: downloading it again", dest, st.st_size, size)
        return False
    try:
        marker = json.loads(_marker_path(dest).read_text())
    except (OSError, ValueError):
        marker = None
    if (
        isinstance(marker, dict)
        and marker.get("size") == st.st_size
        and marker.get("mtime_ns") == st.st_mtime_ns
        and (md5 is None or marker.get("md5") == md5)
    ):
        return True
    if md5 is not None:  # a file put there by hand: hash it once, then trust the marker
        if _file_md5(dest) != md5:
            log.warning("%s does not have MD5 %s: downloading it again", dest, md5)
            return False
        _write_marker(dest, "", md5)
        return True
    if size is not None:
        _write_marker(dest, "", None)
        return True
    return False


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- extract


@dataclass(frozen=True)
class _Member:
    """An archive member that passed the safety checks: its name in the archive and its target."""

    name: str
    rel: PurePosixPath
    is_dir: bool


def extract_archive(
    archive: str | os.PathLike[str], dest_dir: str | os.PathLike[str], *, members_prefix: str | None = None
) -> list[Path]:
    """Extract a .zip or .tar[.gz|.bz2|.xz] archive (or its members starting with members_prefix).

    Every member to be written is checked first: an absolute path, a '..' component, a symbolic or
    hard link, or a device / FIFO member raises UnsafeArchiveError naming it, and nothing is written.
    Files are written atomically (temporary name, then rename). A marker in dest_dir records the
    extraction, so calling again with the same archive (same size and mtime) and prefix is a no-op.
    Returns the extracted files (not folders), in archive order.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    st = archive.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "members_prefix": members_prefix}
    tag = "all" if members_prefix is None else hashlib.sha1(members_prefix.encode()).hexdigest()[:12]
    marker = dest_dir / f".{archive.name}.{tag}.extracted"
    try:
        done = json.loads(marker.read_text())
        files = [dest_dir / rel for rel in done["files"]]
        if done["stamp"] == stamp and all(f.is_file() for f in files):
            return files
    except (OSError, ValueError, KeyError, TypeError):
        pass

    if zipfile.is_zipfile(archive):
        written = _extract_zip(archive, dest_dir, members_prefix)
    elif tarfile.is_tarfile(archive):
        written = _extract_tar(archive, dest_dir, members_prefix)
    else:
        raise ValueError(f"{archive}: not a zip or tar archive")
    dest_dir.mkdir(parents=True, exist_ok=True)
    rels = [p.relative_to(dest_dir).as_posix() for p in written]
    _write_text_atomic(marker, json.dumps({"stamp": stamp, "files": rels}) + "\n")
    return written


def _safe_rel(archive: Path, name: str) -> PurePosixPath | None:
    """The member's path relative to dest_dir, None for the root itself; refuse escapes."""
    normalized = name.replace("\\", "/")
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has a NUL byte in its name")
    if normalized.startswith("/") or re.match(r"[A-Za-z]:/", normalized):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path")
    parts = [p for p in normalized.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} would escape the destination ('..')")
    return PurePosixPath(*parts) if parts else None


def _selected(name: str, members_prefix: str | None) -> bool:
    return members_prefix is None or name.startswith(members_prefix)


def _extract_zip(archive: Path, dest_dir: Path, members_prefix: str | None) -> list[Path]:
    with zipfile.ZipFile(archive) as zf:
        members = []
        for info in zf.infolist():
            if not _selected(info.filename, members_prefix):
                continue
            mode = info.external_attr >> 16  # Unix mode bits, when the creator stored them
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symbolic link")
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a device or special file")
            rel = _safe_rel(archive, info.filename)
            if rel is not None:
                members.append(_Member(info.filename, rel, info.is_dir()))
        return _write_members(dest_dir, members, lambda m: zf.open(m.name))


def _extract_tar(archive: Path, dest_dir: Path, members_prefix: str | None) -> list[Path]:
    with tarfile.open(archive, "r:*") as tf:
        members = []
        infos: dict[str, tarfile.TarInfo] = {}
        for info in tf.getmembers():
            if not _selected(info.name, members_prefix):
                continue
            if info.issym() or info.islnk():
                kind = "symbolic" if info.issym() else "hard"
                raise UnsafeArchiveError(
                    f"{archive}: member {info.name!r} is a {kind} link (to {info.linkname!r})"
                )
            if not (info.isreg() or info.isdir()):
                raise UnsafeArchiveError(f"{archive}: member {info.name!r} is a device or special file")
            rel = _safe_rel(archive, info.name)
            if rel is not None:
                members.append(_Member(info.name, rel, info.isdir()))
                infos[info.name] = info

        def open_member(member: _Member) -> IO[bytes]:
            f = tf.extractfile(infos[member.name])
            assert f is not None  # regular files always have data
            return f

        return _write_members(dest_dir, members, open_member)


def _write_members(
    dest_dir: Path, members: list[_Member], open_member: Callable[[_Member], IO[bytes]]
) -> list[Path]:
    """Create folders and write files atomically; members were all checked beforehand."""
    written: dict[Path, None] = {}  # ordered and without duplicates (a later member wins)
    for member in members:
        target = dest_dir.joinpath(*member.rel.parts)
        if member.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open_member(member) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        written[target] = None
    return list(written)


# ---------------------------------------------------------------------------------------- datasets


def fetch_dataset(
    dataset: str,
    raw_dir: str | os.PathLike[str],
    *,
    base_url: str | None = None,
    flickr30k_archive: str | os.PathLike[str] | None = None,
    num_retries: int = 5,
    timeout_s: float = 60.0,
    verify_checksums: bool = True,
    progress: bool = True,
    retry_delay_s: float = 1.0,
    synthetic: Mapping[str, Any] | None = None,
    karpathy_json: str | os.PathLike[str] | None = None,
    image_dir: str | os.PathLike[str] | None = None,
) -> RawDataset:
    """Download (or generate) a dataset under raw_dir and return its split file and image source.

    coco / flickr8k: download caption_datasets.zip and the image zip(s) (``base_url`` replaces the
    URLs' prefix), extract only ``dataset_<name>.json``, read images straight from the zips.
    flickr30k: the Karpathy JSON as above; images from the local (or http[s]) ``flickr30k_archive``,
    extracted to ``raw_dir/flickr30k-images``. synthetic: ``generate_synthetic(raw_dir/synthetic,
    **synthetic)`` unless the same settings were generated there already. local: nothing is fetched
    (raw_dir is unused); the split file is ``karpathy_json`` and the images are read from
    ``image_dir`` (default: the JSON's folder), so the records' paths (``filepath/filename`` for
    COCO-style entries, ``filename`` for Flickr-style ones) must be relative to it.
    ``verify_checksums=False`` ignores the known sizes and MD5s (mirrors serving other bytes, tests).
    """
    raw = Path(raw_dir)
    if dataset == "synthetic":
        return _generate(raw, dict(synthetic or {}))
    if dataset == "local":
        return _local(karpathy_json, image_dir)
    if dataset not in DATASET_FILES:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if dataset == "flickr30k" and flickr30k_archive is None:
        raise ValueError(
            "flickr30k has no public download: request flickr30k-images.tar.gz from its authors "
            "and set data.download.flickr30k_archive to its path"
        )

    fetch_options: dict[str, Any] = {
        "num_retries": num_retries,
        "timeout_s": timeout_s,
        "progress": progress,
        "retry_delay_s": retry_delay_s,
    }
    for name in DATASET_FILES[dataset]:
        remote = REMOTE_FILES[name]
        download_file(
            resolve_url(remote.url, base_url),
            raw / name,
            size=remote.size if verify_checksums else None,
            md5=remote.md5 if verify_checksums else None,
            **fetch_options,
        )
    karpathy_json = _extract_karpathy_json(raw / "caption_datasets.zip", dataset, raw)

    if dataset == "flickr30k":
        assert flickr30k_archive is not None
        archive = os.fspath(flickr30k_archive)
        if re.match(r"https?://", archive):
            name = PurePosixPath(urlsplit(archive).path).name or "flickr30k-images.tar.gz"
            archive_path = download_file(archive, raw / name, **fetch_options)
        else:
            archive_path = Path(archive).expanduser()
            if not archive_path.is_file():
                raise FileNotFoundError(f"flickr30k_archive not found: {archive_path}")
        extract_archive(archive_path, raw)
        if not (raw / FLICKR30K_FOLDER).is_dir():
            raise DownloadError(f"{archive_path}: no {FLICKR30K_FOLDER}/ folder in the archive")
    return RawDataset(name=dataset, karpathy_json=karpathy_json, images=source_for(dataset, raw))


def build_raw_dataset(cfg: DataConfig, *, progress: bool = True) -> RawDataset:
    """fetch_dataset with the settings of the ``data`` config section (download, synthetic, local)."""
    download = cfg.download
    return fetch_dataset(
        cfg.dataset,
        cfg.raw_dir,
        base_url=download.base_url,
        flickr30k_archive=download.flickr30k_archive,
        num_retries=download.num_retries,
        timeout_s=download.timeout_s,
        verify_checksums=download.verify_checksums,
        progress=progress,
        synthetic=dataclasses.asdict(cfg.synthetic),
        karpathy_json=cfg.local.karpathy_json,
        image_dir=cfg.local.image_dir,
    )


def _extract_karpathy_json(caption_zip: Path, dataset: str, dest_dir: Path) -> Path:
    """Extract dataset_<name>.json (at the zip's root or in a folder) from caption_datasets.zip."""
    wanted = f"dataset_{dataset}.json"
    with zipfile.ZipFile(caption_zip) as zf:
        names = [n for n in zf.namelist() if PurePosixPath(n).name == wanted and "__MACOSX" not in n]
    if not names:
        raise DownloadError(f"{caption_zip}: no {wanted} inside")
    member = min(names, key=len)
    (path,) = extract_archive(caption_zip, dest_dir, members_prefix=member)
    return path


def _generate(raw: Path, settings: dict[str, Any]) -> RawDataset:
    """Generate the synthetic dataset under raw/synthetic, once per distinct settings."""
    root = raw / SYNTHETIC_FOLDER
    settings.setdefault("make_archives", False)  # fetch reads the folders; archives are for tests
    style = str(settings.get("style", "coco"))
    marker = root / ".generated.json"
    json_path = root / f"dataset_{style}.json"
    try:
        done = json.loads(marker.read_text()) == settings and json_path.is_file()
    except (OSError, ValueError):
        done = False
    if not done:
        data = generate_synthetic(root, **settings)
        json_path = data.json_path
        _write_text_atomic(marker, json.dumps(settings, sort_keys=True) + "\n")
    return RawDataset(
        name="synthetic", karpathy_json=json_path, images=source_for("synthetic", raw, synthetic_style=style)
    )


def _local(
    karpathy_json: str | os.PathLike[str] | None, image_dir: str | os.PathLike[str] | None
) -> RawDataset:
    """A Karpathy-format dataset already on disk, read in place (absolute paths, for any worker)."""
    if karpathy_json is None:
        raise ConfigError(
            "dataset=local needs data.local.karpathy_json: the path of the folder's Karpathy-format "
            "split file (e.g. --data.local.karpathy_json=/data/new/dataset_coco.json)"
        )
    json_path = Path(karpathy_json).expanduser().absolute()
    if not json_path.is_file():
        raise FileNotFoundError(f"data.local.karpathy_json: no file {json_path}")
    root = json_path.parent if image_dir is None else Path(image_dir).expanduser().absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"data.local.image_dir: no folder {root}")
    return RawDataset(name="local", karpathy_json=json_path, images=DirSource(root))
