"""Resumable, verified HTTP downloads: one URL into one local file, fetched, checked and hashed once.

    download_file("http://images.cocodataset.org/zips/val2014.zip", "data/raw/val2014.zip",
                  size=6_645_013_297, md5="a3d79f5ed8d289b7a7554ce06a5782b3",
                  num_retries=5, timeout_s=60.0)

``download_file`` streams into ``dest.part``, resumes it with ``Range: bytes=N-``, retries
connection errors, timeouts and 5xx answers with exponential backoff, and renames the file into
place only once it is complete (every byte the server announced), matches the expected size and
checksums (MD5 and/or SHA-256, where known) and, for a .zip or .tar[.gz|...], opens with its whole
index readable. A ``dest.verified`` marker (size, mtime, MD5) lets the next run skip it without
hashing gigabytes again. A complete download with other bytes than expected is kept as
``dest.rejected`` and ChecksumMismatch names the file and both values; an override (the caller's own
checksums, or none with ``override=True``: checks off) accepts it later without downloading again,
and a file stored under an override stays trusted by later calls. ``resolve_url`` points a URL at a
mirror (or a loopback test server). Which files a dataset needs is ``captioning.data.datasets``.
``num_retries`` and ``timeout_s`` are required: their defaults live in ``captioning.config``
(``data.download``). No torch, Prefect or MLflow here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3

from captioning import storage
from captioning.data.archives import ArchiveError, archive_kind, check_archive
from captioning.progress import show_progress

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A download failed for good, or its bytes are not the expected ones; the message names the file."""


class ChecksumMismatch(DownloadError):
    """A complete download whose size or checksum (``kind``: "size", "MD5" or "SHA-256") is not the
    expected one; ``md5`` is the download's own MD5 and ``kept`` where its bytes were kept (both None
    when nothing was downloaded: the server announced another size)."""

    def __init__(
        self, message: str, kind: str = "", md5: str | None = None, kept: Path | None = None
    ) -> None:
        super().__init__(message)
        self.kind, self.md5, self.kept = kind, md5, kept


@dataclass(frozen=True)
class _Expected:
    """What the caller knows about the file (None: unknown) and whether it overrides what is published."""

    size: int | None
    md5: str | None
    sha256: str | None
    override: bool

    @property
    def checksum(self) -> bool:
        return self.md5 is not None or self.sha256 is not None


# Answers worth another try: the server or something in between is overloaded or restarting.
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_DELAY_S = 120.0


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
    sha256: str | None = None,
    override: bool = False,
    num_retries: int,
    timeout_s: float,
    progress: bool = True,
    retry_delay_s: float = 1.0,
    chunk_bytes: int = 1 << 20,
) -> Path:
    """Download url to dest unless dest is already complete; return dest.

    Complete means: a marker written when dest was stored still matches its size and mtime, and
    dest has the expected size and checksums (or was stored under an override, see below); a file
    put there by hand is hashed once against a known size and checksum, or, when none is known,
    used once its structure passes (an archive's index reads). Bytes go to ``dest.part``, which a
    later attempt (or call) resumes with an HTTP Range request. Connection errors, timeouts and
    408/429/5xx answers are retried: ``num_retries`` failed attempts in a row make it give up
    (DownloadError), and an attempt that brought new bytes starts the count afresh; a body that
    ends short of the known size without a length announced is resumed the same way. After the
    k-th failure in a row it waits ``retry_delay_s * 2**(k-1)`` seconds (at most two minutes).
    Other HTTP errors fail at once. ``timeout_s`` bounds connecting and each read.

    A size or checksum mismatch raises ChecksumMismatch naming dest, the URL, the expected and the
    actual value, and keeps the bytes as ``dest.rejected`` (for a size the server announces up
    front nothing is kept: a partial ``dest.part`` is removed). ``override=True`` says the expected
    values are the caller's own (a mirror's checksums; none at all: checks off): a kept
    ``dest.rejected`` that satisfies them is used without downloading, and what is stored under an
    override is trusted by later calls whatever they expect (until the file changes or its
    ``.verified`` marker is deleted), unless they override with checksums it does not have. A
    downloaded .zip or .tar[.gz|...] whose index cannot be read is removed and DownloadError says so.
    """
    if num_retries < 1:
        raise ValueError(f"num_retries must be >= 1, got {num_retries}")
    dest = Path(dest)
    expected = _Expected(size, md5.lower() if md5 else None, sha256.lower() if sha256 else None, override)
    if _is_complete(dest, expected):
        log.info("%s is complete; skipping %s", dest, url)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    rejected = dest.with_name(dest.name + ".rejected")
    if override and rejected.is_file() and _take_rejected(rejected, dest, url, expected):
        return dest
    part = dest.with_name(dest.name + ".part")

    failures = 0
    with requests.Session() as session:
        while True:
            before = _size_or_zero(part)
            try:
                _fetch_into(session, url, part, dest, expected, timeout_s, progress, chunk_bytes)
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

    digests = _file_digests(part, sha256=expected.sha256 is not None)
    mismatch = _mismatch(part.stat().st_size, digests, expected)
    if mismatch is not None:
        kind, want, got = mismatch
        os.replace(part, rejected)
        raise ChecksumMismatch(
            f"{dest}: {kind} mismatch: expected {want}, got {got} (downloaded from {url}); "
            f"kept the download as {rejected}",
            kind,
            digests["md5"],
            rejected,
        )
    _store(part, dest, url, digests, expected.override)
    rejected.unlink(missing_ok=True)
    return dest


def _store(src: Path, dest: Path, url: str, digests: dict[str, str], override: bool) -> None:
    """Check src's structure (archives), rename it to dest and write dest's marker; a damaged archive
    is removed and DownloadError names it."""
    if archive_kind(dest.name) is not None:
        try:
            check_archive(src, archive_kind(dest.name))
        except ArchiveError as e:
            src.unlink(missing_ok=True)
            raise DownloadError(
                f"{dest}: the download from {url} is damaged: {e}; removed it. The server's copy may be "
                f"truncated or corrupt: run again later to fetch it anew, or put a good copy at {dest}"
            ) from None
    os.replace(src, dest)
    _write_marker(dest, url, digests, override)


def _take_rejected(rejected: Path, dest: Path, url: str, expected: _Expected) -> bool:
    """Use an earlier rejected download when it satisfies an override (no download); else False."""
    digests = _file_digests(rejected, sha256=expected.sha256 is not None)
    mismatch = _mismatch(rejected.stat().st_size, digests, expected)
    if mismatch is not None:
        log.warning("%s: %s mismatch (expected %s, got %s): downloading again", rejected, *mismatch)
        return False
    try:
        _store(rejected, dest, url, digests, override=True)
    except DownloadError as e:
        log.warning("%s; downloading again", e)
        return False
    log.info("%s: accepted the earlier download %s", dest, rejected)
    return True


def _fetch_into(
    session: requests.Session,
    url: str,
    part: Path,
    dest: Path,
    expected: _Expected,
    timeout_s: float,
    progress: bool,
    chunk_bytes: int,
) -> None:
    """One HTTP attempt: resume or restart part and stream the body into it."""
    size = expected.size
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
            kept = f"removed the partial download {part}" if offset else "nothing downloaded"
            raise ChecksumMismatch(
                f"{dest}: size mismatch: expected {size} bytes, the server at {url} has {total} ({kept})",
                "size",
            )

        written = offset
        with (
            part.open(mode) as f,
            show_progress(
                total, dest.name, unit="B", unit_scale=True, initial=offset, enabled=progress
            ) as bar,
        ):
            # The raw stream, undecoded: a .tar.gz served with Content-Encoding: gzip stays a .tar.gz.
            for chunk in response.raw.stream(chunk_bytes, decode_content=False):
                f.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    if total is not None and written < total:
        raise _Retryable(f"connection closed after {written} of {total} bytes")
    if total is None and size is not None and written < size:  # no length announced: resume it
        raise _Retryable(f"connection closed after {written} of {size} bytes (the server sent no length)")
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


def _file_digests(path: Path, *, sha256: bool) -> dict[str, str]:
    """{"md5": hex} (and "sha256" when asked) of a file, in one pass."""
    log.info("hashing %s", path)
    hashes: dict[str, Any] = {"md5": hashlib.md5(usedforsecurity=False)}
    if sha256:
        hashes["sha256"] = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            for h in hashes.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashes.items()}


def _mismatch(size: int, digests: dict[str, str], expected: _Expected) -> tuple[str, str, str] | None:
    """(what, expected, actual) of the first expectation the file fails; None when it fails none."""
    if expected.size is not None and size != expected.size:
        return "size", f"{expected.size} bytes", f"{size} bytes"
    for kind, key, want in (("MD5", "md5", expected.md5), ("SHA-256", "sha256", expected.sha256)):
        if want is not None and digests.get(key) != want:
            return kind, want, str(digests.get(key))
    return None


def _marker_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".verified")


def _write_marker(dest: Path, url: str, digests: dict[str, str], override: bool) -> None:
    """Record dest as stored: its stat, digests, whether under an override; its structure was checked."""
    st = dest.stat()
    marker = {"url": url, "size": st.st_size, "mtime_ns": st.st_mtime_ns, **digests}
    marker.update(override=override, checked=True)
    storage.write_text(_marker_path(dest), json.dumps(marker) + "\n")


def _structure_ok(dest: Path) -> bool:
    """False (with a warning) for an archive whose index cannot be read; True for anything else."""
    kind = archive_kind(dest.name)
    if kind is None:
        return True
    try:
        check_archive(dest, kind)
    except ArchiveError as e:
        log.warning("%s: downloading it again", e)
        return False
    return True


def _is_complete(dest: Path, expected: _Expected) -> bool:
    """True when dest exists and may be used as it is (see download_file)."""
    try:
        st = dest.stat()
    except FileNotFoundError:
        return False
    try:
        marker = json.loads(_marker_path(dest).read_text())
    except (OSError, ValueError):
        marker = None
    if (
        isinstance(marker, dict)
        and marker.get("size") == st.st_size
        and marker.get("mtime_ns") == st.st_mtime_ns
    ):
        if not marker.get("checked") and not _structure_ok(dest):  # a marker from before arrival checks
            return False
        digests = {k: marker[k] for k in ("md5", "sha256") if isinstance(marker.get(k), str)}
        if (expected.md5 and "md5" not in digests) or (expected.sha256 and "sha256" not in digests):
            digests = _file_digests(dest, sha256=True)
        if not marker.get("checked") or digests.keys() - marker.keys():
            _write_marker(dest, str(marker.get("url", "")), digests, bool(marker.get("override")))
        mismatch = _mismatch(st.st_size, digests, expected)
        if mismatch is None:
            return True
        if marker.get("override") and not (expected.override and expected.checksum):
            log.info(
                "%s was accepted earlier under an override; delete %s to check it again",
                dest,
                _marker_path(dest),
            )
            return True
        log.warning("%s: %s mismatch (expected %s, got %s): downloading it again", dest, *mismatch)
        return False
    # No marker, or the file changed since: a file put there by hand is checked once, then trusted.
    if expected.size is None and not expected.checksum:  # nothing to compare: its structure decides
        if not _structure_ok(dest):
            return False
        log.info("%s: no size or checksum to check it against; using the file that is there", dest)
        _write_marker(dest, "", _file_digests(dest, sha256=False), expected.override)
        return True
    if expected.size is not None and st.st_size != expected.size:
        log.warning("%s has %d bytes, expected %d: downloading it again", dest, st.st_size, expected.size)
        return False
    digests = _file_digests(dest, sha256=expected.sha256 is not None)
    mismatch = _mismatch(st.st_size, digests, expected)
    if mismatch is not None:
        log.warning("%s: %s mismatch (expected %s, got %s): downloading it again", dest, *mismatch)
        return False
    if not _structure_ok(dest):
        return False
    _write_marker(dest, "", digests, expected.override)
    return True
