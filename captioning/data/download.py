"""Resumable, verified HTTP downloads: one URL into one local file, fetched and hashed once.

    download_file("http://images.cocodataset.org/zips/val2014.zip", "data/raw/val2014.zip",
                  size=6_645_013_297, md5="a3d79f5ed8d289b7a7554ce06a5782b3",
                  num_retries=5, timeout_s=60.0)

``download_file`` streams into ``dest.part``, resumes it with ``Range: bytes=N-``, retries
connection errors, timeouts and 5xx answers with exponential backoff, and renames the file into
place only once its size and MD5 (where known) match; a ``dest.verified`` marker lets the next
run skip it without hashing gigabytes again. ``resolve_url`` points a URL at a mirror (or a loopback
test server). Which files a dataset needs is ``captioning.data.datasets``. ``num_retries`` and
``timeout_s`` are required: their defaults live in ``captioning.config`` (``data.download``).
No torch, Prefect or MLflow here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import requests
import urllib3
from tqdm import tqdm

from captioning import storage

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """A download failed for good, or its bytes are not the expected ones; the message names the URL."""


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
    num_retries: int,
    timeout_s: float,
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
    storage.write_text(_marker_path(dest), json.dumps(marker) + "\n")


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
