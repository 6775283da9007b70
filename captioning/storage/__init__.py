"""The only door to object storage: one API for local paths and `s3://bucket/key` URIs.

Data shards, checkpoints and artifacts live either on the local filesystem or in any S3-compatible
store; callers never branch on which. Local paths pass straight through to the filesystem (writes are
atomic: a tmp file in the same folder, then `os.replace`); `s3://` goes through boto3.

Where S3 is: the `endpoint_url` argument of a function, else boto3's own environment
(`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, credentials, region), else AWS. There is no module-level
configuration. For S3-compatible servers that do not do the new default checksums, set
`AWS_RESPONSE_CHECKSUM_VALIDATION=when_required` / `AWS_REQUEST_CHECKSUM_CALCULATION=when_required`
(the client here already sets both).

Failures: boto3 retries single requests (throttling, 5xx, dropped connections); on top of that the
whole-object operations (`read_bytes`, `write_bytes`, `upload_file`, `download_file`, `copy`,
`open_read`'s resumable stream) retry the whole operation with exponential backoff on connection
errors, so a server restarting in the middle of a multipart upload costs a retry, not the upload.
Errors that retrying cannot fix raise at once as the usual OSErrors naming the URI:
`FileNotFoundError` (no such key or bucket), `PermissionError` (access denied), else `OSError`.

    from captioning import storage
    storage.write_json("s3://bucket/run/meta.json", {"step": 3})
    storage.upload_file("ckpt.pt", storage.join("s3://bucket/run", "ckpt.pt"))
    storage.register_webdataset_s3()  # then webdataset.WebDataset(["s3://bucket/x-000000.tar"]) streams

Importing this package is cheap: boto3 (and webdataset) are imported on first use. Everything a
caller uses is here; the private modules behind it: `_uri` (URIs), `_s3` (the client, retries and
error translation), `_streams` (the resuming reader, the committing writer), `_local` (atomic
local writes).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any, BinaryIO, cast

from captioning.storage._local import TMP_SUFFIX, StorageFull, atomic_local, is_local_tmp, local_tmp
from captioning.storage._s3 import (
    NOT_FOUND_CODES,
    call,
    error_code,
    raise_as_oserror,
    retrying,
    s3_client,
    transfer_config,
)
from captioning.storage._streams import S3Reader, WriteThenCommit
from captioning.storage._uri import SCHEME, PathOrUri, is_s3, join, split_s3

__all__ = [
    "StorageFull",
    "copy",
    "download_file",
    "exists",
    "is_s3",
    "join",
    "list_files",
    "open_read",
    "open_write",
    "read_bytes",
    "read_json",
    "read_text",
    "register_webdataset_s3",
    "remove",
    "s3_client",
    "size",
    "split_s3",
    "sync_tree",
    "upload_file",
    "write_bytes",
    "write_json",
    "write_text",
]

# Managed copy (UploadPartCopy) only where one CopyObject cannot do it; few S3 look-alikes support it.
_MAX_SINGLE_COPY_BYTES = 5 * 1024**3
_READ_BUFFER_BYTES = 1024 * 1024


def _uri(uri: PathOrUri) -> str:
    return os.fspath(uri)


# --------------------------------------------------------------------------------------------------
# Whole objects


def exists(uri: PathOrUri, *, endpoint_url: str | None = None) -> bool:
    """Is there a file (or folder) at `uri`? For s3: an object, or any object under `uri/`."""
    uri = _uri(uri)
    if not is_s3(uri):
        return os.path.exists(uri)
    bucket, key = split_s3(uri)
    client = s3_client(endpoint_url)
    if not key:
        try:
            client.head_bucket(Bucket=bucket)
            return True
        except Exception as exc:
            if error_code(exc) in NOT_FOUND_CODES:
                return False
            raise_as_oserror(exc, "exists", uri)
    if not key.endswith("/"):
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            if error_code(exc) not in NOT_FOUND_CODES:
                raise_as_oserror(exc, "exists", uri)
    try:
        page = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
    except Exception as exc:
        if error_code(exc) in NOT_FOUND_CODES:
            return False
        raise_as_oserror(exc, "exists", uri)
    return bool(page.get("KeyCount") or page.get("Contents"))


def size(uri: PathOrUri, *, endpoint_url: str | None = None) -> int:
    """Size in bytes of the file or object at `uri`; FileNotFoundError when there is none."""
    uri = _uri(uri)
    if not is_s3(uri):
        return os.path.getsize(uri)
    bucket, key = split_s3(uri)
    head = call("size", uri, lambda: s3_client(endpoint_url).head_object(Bucket=bucket, Key=key))
    return int(head["ContentLength"])


def read_bytes(uri: PathOrUri, *, endpoint_url: str | None = None) -> bytes:
    """The whole content of `uri`."""
    uri = _uri(uri)
    if not is_s3(uri):
        with open(uri, "rb") as f:
            return f.read()
    bucket, key = split_s3(uri)

    def get() -> bytes:
        body = s3_client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"]
        try:
            return cast(bytes, body.read())
        finally:
            body.close()

    return retrying("read", uri, get)


def write_bytes(uri: PathOrUri, data: bytes, *, endpoint_url: str | None = None) -> None:
    """Write `data` to `uri`, replacing what was there: locally atomic (parents created); s3: one PUT."""
    uri = _uri(uri)
    if not is_s3(uri):
        with atomic_local(uri, len(data)) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return
    bucket, key = split_s3(uri)
    body = data if isinstance(data, bytes | bytearray) else bytes(data)
    retrying("write", uri, lambda: s3_client(endpoint_url).put_object(Bucket=bucket, Key=key, Body=body))


def read_text(uri: PathOrUri, *, encoding: str = "utf-8", endpoint_url: str | None = None) -> str:
    """The whole content of `uri` as text."""
    return read_bytes(uri, endpoint_url=endpoint_url).decode(encoding)


def write_text(
    uri: PathOrUri, text: str, *, encoding: str = "utf-8", endpoint_url: str | None = None
) -> None:
    """Write `text` to `uri` (see `write_bytes`)."""
    write_bytes(uri, text.encode(encoding), endpoint_url=endpoint_url)


def read_json(uri: PathOrUri, *, endpoint_url: str | None = None) -> Any:
    """Parse the JSON document at `uri`."""
    return json.loads(read_bytes(uri, endpoint_url=endpoint_url))


def write_json(uri: PathOrUri, obj: Any, *, indent: int = 2, endpoint_url: str | None = None) -> None:
    """Write `obj` as JSON with sorted keys and a trailing newline, so equal objects give equal bytes."""
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n"
    write_text(uri, text, endpoint_url=endpoint_url)


def _copy_local(src: str, dst: str) -> None:
    """A local file copied to a tmp file next to ``dst``, then renamed over it."""
    with atomic_local(dst, os.path.getsize(src)) as tmp:
        shutil.copyfile(src, tmp)


def upload_file(
    local_path: PathOrUri, uri: PathOrUri, *, chunk_mb: int = 64, endpoint_url: str | None = None
) -> None:
    """Copy the local file `local_path` to `uri`.

    s3: boto3's managed transfer, multipart in `chunk_mb` MiB parts above `chunk_mb` MiB (S3's minimum
    part is 5 MiB); the whole upload is retried on connection errors. Local: copy to a tmp file next
    to `uri`, then `os.replace`.
    """
    src, uri = os.fspath(local_path), _uri(uri)
    if not os.path.isfile(src):
        raise FileNotFoundError(errno.ENOENT, "upload: no such local file", src)
    if not is_s3(uri):
        return _copy_local(src, uri)
    bucket, key = split_s3(uri)
    config = transfer_config(chunk_mb)
    retrying(
        "upload",
        uri,
        lambda: s3_client(endpoint_url).upload_file(src, bucket, key, Config=config),
    )


def download_file(
    uri: PathOrUri, local_path: PathOrUri, *, chunk_mb: int = 64, endpoint_url: str | None = None
) -> None:
    """Copy `uri` to the local file `local_path`: written to a tmp file next to it, then `os.replace`."""
    uri, dst = _uri(uri), os.fspath(local_path)
    if not is_s3(uri):
        return _copy_local(uri, dst)
    bucket, key = split_s3(uri)
    config = transfer_config(chunk_mb)
    with atomic_local(dst) as tmp:
        retrying(
            "download",
            uri,
            lambda: s3_client(endpoint_url).download_file(bucket, key, tmp, Config=config),
        )


def copy(src: PathOrUri, dst: PathOrUri, *, endpoint_url: str | None = None) -> None:
    """Copy one file/object to another location of either kind (s3 -> s3 is server-side)."""
    src, dst = _uri(src), _uri(dst)
    if is_s3(src) and is_s3(dst):
        sb, sk = split_s3(src)
        db, dk = split_s3(dst)

        def server_side() -> None:
            client = s3_client(endpoint_url)
            head = client.head_object(Bucket=sb, Key=sk)
            if int(head["ContentLength"]) <= _MAX_SINGLE_COPY_BYTES:
                client.copy_object(Bucket=db, Key=dk, CopySource={"Bucket": sb, "Key": sk})
            else:
                client.copy({"Bucket": sb, "Key": sk}, db, dk, Config=transfer_config(512))

        retrying(f"copy to {dst}", src, server_side)
    elif is_s3(dst):
        upload_file(src, dst, endpoint_url=endpoint_url)
    else:
        download_file(src, dst, endpoint_url=endpoint_url)


def sync_tree(
    src: PathOrUri,
    dst: PathOrUri,
    *,
    last: Sequence[str] = ("manifest.json",),
    endpoint_url: str | None = None,
) -> dict[str, int]:
    """Copy every file under the folder ``src`` to the same relative path under ``dst`` (either kind).

    Files already at ``dst`` with the same size are skipped (shards are written atomically, so a
    same-size file is the finished one). Files named in ``last`` go after all the others, so a reader
    that waits for them never sees a half-copied folder. Returns counts: copied, skipped, bytes.
    """
    src, dst = _uri(src), _uri(dst)
    base = src.rstrip("/") + "/"
    files = list_files(src, endpoint_url=endpoint_url)
    if not files:
        raise FileNotFoundError(errno.ENOENT, "sync: nothing to copy", src)
    ordered = sorted(files, key=lambda f: (os.path.basename(f) in last, f))
    counts = {"copied": 0, "skipped": 0, "bytes": 0}
    for path in ordered:
        rel = path[len(base) :] if path.startswith(base) else os.path.relpath(path, src)
        target = join(dst, *rel.split("/"))
        nbytes = size(path, endpoint_url=endpoint_url)
        try:
            if size(target, endpoint_url=endpoint_url) == nbytes and os.path.basename(path) not in last:
                counts["skipped"] += 1
                continue
        except FileNotFoundError:
            pass
        copy(path, target, endpoint_url=endpoint_url)
        counts["copied"] += 1
        counts["bytes"] += nbytes
    return counts


def remove(uri: PathOrUri, *, endpoint_url: str | None = None) -> None:
    """Delete the file/object at `uri`; one that is already gone is not an error (like S3's DELETE)."""
    uri = _uri(uri)
    if not is_s3(uri):
        with contextlib.suppress(FileNotFoundError):
            os.remove(uri)
        return
    bucket, key = split_s3(uri)
    call("remove", uri, lambda: s3_client(endpoint_url).delete_object(Bucket=bucket, Key=key))


def list_files(
    prefix_uri: PathOrUri,
    suffix: str = "",
    *,
    endpoint_url: str | None = None,
    _page_size: int | None = None,
) -> list[str]:
    """All files under the folder `prefix_uri` (recursively) whose names end with `suffix`.

    Returns sorted full paths / URIs; an absent folder gives `[]`. s3 listings are paginated
    (`_page_size` sets the page size, for tests); local tmp files of in-flight writes are skipped.
    """
    prefix_uri = _uri(prefix_uri)
    if not is_s3(prefix_uri):
        found = []
        for folder, _, names in os.walk(prefix_uri):
            found += [os.path.join(folder, n) for n in names if n.endswith(suffix) and not is_local_tmp(n)]
        return sorted(found)
    bucket, key = split_s3(prefix_uri)
    prefix = key if not key or key.endswith("/") else key + "/"

    def pages() -> list[str]:
        paginator = s3_client(endpoint_url).get_paginator("list_objects_v2")
        config = {"PageSize": _page_size} if _page_size else {}
        uris = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig=config):
            for obj in page.get("Contents", []):
                name = obj["Key"]
                if name.endswith(suffix) and not name.endswith("/"):
                    uris.append(f"{SCHEME}{bucket}/{name}")
        return uris

    return sorted(call("list", prefix_uri, pages))


# --------------------------------------------------------------------------------------------------
# Streams


def open_read(uri: PathOrUri, *, endpoint_url: str | None = None) -> BinaryIO:
    """A binary stream over `uri`, read as it arrives (never downloaded first). Close it when done.

    s3: the GetObject body behind a buffer; a dropped connection resumes with a ranged GET at the
    current offset. FileNotFoundError at once when there is no such object.
    """
    uri = _uri(uri)
    if not is_s3(uri):
        return open(uri, "rb")
    return cast(BinaryIO, io.BufferedReader(S3Reader(uri, endpoint_url), buffer_size=_READ_BUFFER_BYTES))


def open_write(uri: PathOrUri, *, chunk_mb: int = 64, endpoint_url: str | None = None) -> BinaryIO:
    """A binary stream whose content replaces `uri` when it is closed (all or nothing).

    Writes spool to a local tmp file (next to a local target; in the temp dir for s3), committed on
    `close()` with `os.replace` / `upload_file`. Leaving a `with` block by an exception, or dropping
    the stream unclosed, discards it.
    """
    uri = _uri(uri)
    if not is_s3(uri):
        tmp = local_tmp(uri)
        return cast(BinaryIO, WriteThenCommit(tmp, lambda t: os.replace(t, uri)))
    split_s3(uri)
    fd, tmp = tempfile.mkstemp(prefix="storage-upload-", suffix=TMP_SUFFIX)
    os.close(fd)
    return cast(
        BinaryIO,
        WriteThenCommit(tmp, lambda t: upload_file(t, uri, chunk_mb=chunk_mb, endpoint_url=endpoint_url)),
    )


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
    """webdataset.gopen handler for `s3://` URLs (endpoint and credentials from the environment)."""
    if mode.startswith("r"):
        return open_read(url)
    if mode.startswith("w"):
        return open_write(url)
    raise ValueError(f"{url}: unsupported mode {mode!r}")


def register_webdataset_s3() -> None:
    """Teach webdataset to open `s3://` URLs through this package (reads stream, writes upload on close).

    Idempotent and cheap: call it in the main process and in every DataLoader `worker_init_fn` (a
    spawned worker imports webdataset afresh, without the registration).
    """
    import importlib

    # Not `from webdataset import gopen`: the package re-exports the function under the module's name.
    gopen_module = importlib.import_module("webdataset.gopen")
    gopen_module.gopen_schemes["s3"] = _gopen_s3
