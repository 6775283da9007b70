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

Importing this module is cheap: boto3 (and webdataset) are imported on first use.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, BinaryIO, NoReturn, TypeVar, cast

__all__ = [
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

log = logging.getLogger(__name__)

T = TypeVar("T")
PathOrUri = str | os.PathLike[str]

_SCHEME = "s3://"
# Bucket names: S3's rules are stricter (lowercase, 3-63 chars); be lenient for S3-compatible servers,
# but never accept what cannot be a bucket at all (empty, slashes, spaces).
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
REQUEST_MAX_ATTEMPTS = 10  # boto3's per-request retries (standard mode)
# Whole-operation retries on top of boto3's: attempts, first delay, cap (seconds); jittered.
# 6 attempts wait up to 0.5 + 1 + 2 + 4 + 8 s in all: long enough for a server to restart.
OPERATION_ATTEMPTS = 6
OPERATION_BACKOFF_S = 0.5
OPERATION_BACKOFF_MAX_S = 16.0
# Managed copy (UploadPartCopy) only where one CopyObject cannot do it; few S3 look-alikes support it.
_MAX_SINGLE_COPY_BYTES = 5 * 1024**3
_READ_BUFFER_BYTES = 1024 * 1024
# Local temporaries are `.<name>.<random>.tmp` next to the target; listings skip them.
_TMP_SUFFIX = ".tmp"

# ClientError codes that retrying the whole operation can fix. NoSuchUpload: the server forgot an
# in-flight multipart upload (it restarted); a fresh upload succeeds.
_TRANSIENT_CODES = frozenset(
    {
        "NoSuchUpload",
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "500",
        "502",
        "503",
        "504",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchBucket"})
_DENIED_CODES = frozenset(
    {"AccessDenied", "403", "Forbidden", "SignatureDoesNotMatch", "InvalidAccessKeyId", "AllAccessDisabled"}
)


# --------------------------------------------------------------------------------------------------
# URIs


def is_s3(uri: PathOrUri) -> bool:
    """True for `s3://...` URIs, False for local paths."""
    return isinstance(uri, str) and uri.startswith(_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> `("bucket", "a/b")`; `s3://bucket` and `s3://bucket/` -> `("bucket", "")`.

    Raises ValueError when `uri` is not an `s3://` URI or names no valid bucket.
    """
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(_SCHEME) :].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise ValueError(f"malformed s3 URI {uri!r}: expected s3://bucket/key with a bucket name")
    return bucket, key


def join(base: PathOrUri, *parts: str) -> str:
    """Join path parts onto a local path or an s3 URI; parts are always relative to `base`.

    Slashes between parts are collapsed, so an s3 key never gets `//` inside it:
    `join("s3://b/run/", "/ckpt/", "last.pt")` -> `"s3://b/run/ckpt/last.pt"`. A trailing slash on the
    last part is kept (`join("s3://b", "dir/")` -> `"s3://b/dir/"`). Local paths use `os.path.join`,
    except that a part starting with `/` does not throw away what came before it.
    """
    base = os.fspath(base)
    pieces = [p.strip("/") for p in parts if p.strip("/")]
    if not pieces:
        return base
    trailing = "/" if parts[-1].endswith("/") and parts[-1].strip("/") else ""
    if is_s3(base):
        bucket, key = split_s3(base)
        segments = [s for piece in [key, *pieces] for s in piece.split("/") if s]
        return f"{_SCHEME}{bucket}/" + "/".join(segments) + trailing
    return os.path.join(base, *pieces) + trailing


def _uri(uri: PathOrUri) -> str:
    return os.fspath(uri)


# --------------------------------------------------------------------------------------------------
# The client


_client_lock = threading.Lock()
_clients: dict[tuple[Any, ...], Any] = {}
# What boto3 reads from the environment when it builds a client; a change means a different client.
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
)


def _reset_after_fork() -> None:
    # A forked child (DataLoader worker) must neither reuse the parent's connections nor inherit a
    # lock some parent thread held at fork time.
    global _client_lock
    _client_lock = threading.Lock()
    _clients.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client, cached per process (and per pid, per endpoint and AWS environment).

    The endpoint is `endpoint_url`, else what boto3 reads from `AWS_ENDPOINT_URL_S3` /
    `AWS_ENDPOINT_URL`, else AWS. Path-style addressing and SigV4, so S3-compatible servers
    (MinIO, rclone, Ceph) work; checksums only when required, which they all accept.
    """
    key = (os.getpid(), endpoint_url, *(os.environ.get(name) for name in _CLIENT_ENV))
    with _client_lock:
        client = _clients.get(key)
        if client is None:
            client = _new_client(endpoint_url)
            if any(k[0] != key[0] for k in _clients):
                _clients.clear()  # another pid's clients (fork without the hook): never reuse them
            _clients[key] = client
        return client


def _new_client(endpoint_url: str | None) -> Any:
    import boto3.session
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"max_attempts": REQUEST_MAX_ATTEMPTS, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        response_checksum_validation="when_required",
        request_checksum_calculation="when_required",
    )
    # A fresh Session per client: boto3's default session is not thread-safe to create clients from.
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def _transfer_config(chunk_mb: int) -> Any:
    from boto3.s3.transfer import TransferConfig

    chunk = int(chunk_mb) * 1024 * 1024
    return TransferConfig(
        multipart_threshold=chunk, multipart_chunksize=chunk, preferred_transfer_client="classic"
    )


# --------------------------------------------------------------------------------------------------
# Errors and retries


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps: `__cause__`, boto3's `last_exception`, and the `__context__` of boto3's
    own wrappers (S3UploadFailedError is raised inside `except ClientError`, without `from`). Other
    contexts are not followed: an error raised while handling a dropped connection is not transient."""
    from boto3.exceptions import Boto3Error

    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen or len(seen) > 20:
            continue
        seen.add(id(e))
        yield e
        context = e.__context__ if isinstance(e, Boto3Error) else None
        for nxt in (e.__cause__, context, getattr(e, "last_exception", None)):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def _is_transient(exc: BaseException) -> bool:
    """Would doing the whole operation again plausibly succeed? (Connection trouble, 5xx, lost upload.)"""
    import botocore.exceptions as bce
    import urllib3.exceptions as u3e

    transient_types = (
        bce.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, ...
        bce.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
        bce.IncompleteReadError,
        u3e.ProtocolError,
        u3e.TimeoutError,
        u3e.NewConnectionError,
        ConnectionError,  # builtins: refused, reset, aborted, broken pipe
        TimeoutError,
    )
    for e in _causes(exc):
        if isinstance(e, transient_types):
            return True
        if _error_code(e) in _TRANSIENT_CODES:
            return True
    return False


def _translate(exc: BaseException, op: str, uri: str) -> BaseException:
    """The OSError a caller should see for a failed S3 call (naming the URI), or `exc` itself."""
    for e in _causes(exc):
        code = _error_code(e)
        if code is None:
            continue
        message = str(getattr(e, "response", {}).get("Error", {}).get("Message") or code)
        if code == "NoSuchBucket":
            return FileNotFoundError(errno.ENOENT, f"{op}: no such bucket ({message})", uri)
        if code in _NOT_FOUND_CODES:
            return FileNotFoundError(errno.ENOENT, f"{op}: no such object", uri)
        if code in _DENIED_CODES:
            return PermissionError(errno.EACCES, f"{op}: access denied ({code}: {message})", uri)
        return OSError(errno.EIO, f"{op} failed ({code}: {message})", uri)
    if _is_transient(exc):
        return ConnectionError(errno.ECONNABORTED, f"{op} failed ({type(exc).__name__}: {exc})", uri)
    return exc


def _raise(exc: BaseException, op: str, uri: str) -> NoReturn:
    new = _translate(exc, op, uri)
    if new is exc:
        raise exc
    raise new from exc


def _retrying(op: str, uri: str, fn: Callable[[], T]) -> T:
    """Run `fn` (a whole, idempotent S3 operation); on a transient failure back off and run it again."""
    for attempt in range(1, OPERATION_ATTEMPTS + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == OPERATION_ATTEMPTS or not _is_transient(exc):
                _raise(exc, op, uri)
            delay = min(OPERATION_BACKOFF_MAX_S, OPERATION_BACKOFF_S * 2 ** (attempt - 1))
            delay *= 0.5 + random.random() / 2
            log.warning(
                "%s %s failed (%s: %s); attempt %d/%d again in %.1f s",
                op,
                uri,
                type(exc).__name__,
                exc,
                attempt + 1,
                OPERATION_ATTEMPTS,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _call(op: str, uri: str, fn: Callable[[], T]) -> T:
    """Run one S3 request (boto3 retries it); translate its failure into an OSError naming `uri`."""
    try:
        return fn()
    except Exception as exc:
        _raise(exc, op, uri)


# --------------------------------------------------------------------------------------------------
# Local helpers


def _local_tmp(path: str) -> str:
    """A new empty temporary file next to `path` (parents created), for write-then-`os.replace`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=_TMP_SUFFIX, dir=parent)
    # mkstemp creates 0600; the published file gets the usual mode (0666 less the umask), like open().
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_local(path: str) -> Iterator[str]:
    """Yield a tmp path next to `path`; on success it replaces `path`, on failure it is removed."""
    tmp = _local_tmp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _is_local_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(_TMP_SUFFIX)


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
            if _error_code(exc) in _NOT_FOUND_CODES:
                return False
            _raise(exc, "exists", uri)
    if not key.endswith("/"):
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            if _error_code(exc) not in _NOT_FOUND_CODES:
                _raise(exc, "exists", uri)
    try:
        page = client.list_objects_v2(Bucket=bucket, Prefix=key.rstrip("/") + "/", MaxKeys=1)
    except Exception as exc:
        if _error_code(exc) in _NOT_FOUND_CODES:
            return False
        _raise(exc, "exists", uri)
    return bool(page.get("KeyCount") or page.get("Contents"))


def size(uri: PathOrUri, *, endpoint_url: str | None = None) -> int:
    """Size in bytes of the file or object at `uri`; FileNotFoundError when there is none."""
    uri = _uri(uri)
    if not is_s3(uri):
        return os.path.getsize(uri)
    bucket, key = split_s3(uri)
    head = _call("size", uri, lambda: s3_client(endpoint_url).head_object(Bucket=bucket, Key=key))
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

    return _retrying("read", uri, get)


def write_bytes(uri: PathOrUri, data: bytes, *, endpoint_url: str | None = None) -> None:
    """Write `data` to `uri`, replacing what was there: locally atomic (parents created); s3: one PUT."""
    uri = _uri(uri)
    if not is_s3(uri):
        with _atomic_local(uri) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return
    bucket, key = split_s3(uri)
    body = data if isinstance(data, bytes | bytearray) else bytes(data)
    _retrying("write", uri, lambda: s3_client(endpoint_url).put_object(Bucket=bucket, Key=key, Body=body))


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
        with _atomic_local(uri) as tmp:
            shutil.copyfile(src, tmp)
        return
    bucket, key = split_s3(uri)
    config = _transfer_config(chunk_mb)
    _retrying(
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
        with _atomic_local(dst) as tmp:
            shutil.copyfile(uri, tmp)
        return
    bucket, key = split_s3(uri)
    config = _transfer_config(chunk_mb)
    with _atomic_local(dst) as tmp:
        _retrying(
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
                client.copy({"Bucket": sb, "Key": sk}, db, dk, Config=_transfer_config(512))

        _retrying(f"copy to {dst}", src, server_side)
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
    _call("remove", uri, lambda: s3_client(endpoint_url).delete_object(Bucket=bucket, Key=key))


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
            found += [os.path.join(folder, n) for n in names if n.endswith(suffix) and not _is_local_tmp(n)]
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
                    uris.append(f"{_SCHEME}{bucket}/{name}")
        return uris

    return sorted(_call("list", prefix_uri, pages))


# --------------------------------------------------------------------------------------------------
# Streams


class _S3Reader(io.RawIOBase):
    """The body of one GetObject, read as it arrives; resumes with a ranged GET if the connection drops."""

    def __init__(self, uri: str, endpoint_url: str | None) -> None:
        super().__init__()
        self._uri = uri
        self._endpoint_url = endpoint_url
        self._bucket, self._key = split_s3(uri)
        self._pos = 0
        response = _retrying("open", uri, self._get)
        self._etag: str | None = response.get("ETag")
        self._size = int(response["ContentLength"])
        self._body: Any = response["Body"]

    def _get(self, **extra: Any) -> Any:
        return s3_client(self._endpoint_url).get_object(Bucket=self._bucket, Key=self._key, **extra)

    def _reopen(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        # If-Match: resume only the same object version; a replaced object fails loudly instead of
        # splicing two versions together.
        extra: dict[str, Any] = {"Range": f"bytes={self._pos}-"}
        if self._etag:
            extra["IfMatch"] = self._etag
        response = self._get(**extra)
        etag = response.get("ETag")
        if self._etag and etag and etag != self._etag:
            raise OSError(errno.ESTALE, "object changed while it was being read", self._uri)
        self._body = response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self._size or len(view) == 0:
            return 0
        for attempt in range(1, OPERATION_ATTEMPTS + 1):
            try:
                data = self._body.read(len(view))
                if not data:  # botocore checks the length itself; never let a short stream pass as EOF
                    raise ConnectionResetError(f"stream ended at byte {self._pos} of {self._size}")
                break
            except Exception as exc:
                if attempt == OPERATION_ATTEMPTS or not _is_transient(exc):
                    _raise(exc, "read", self._uri)
                log.warning("reading %s at byte %d: %s; resuming", self._uri, self._pos, exc)
                # A dropped connection is usually just that: resume at once, back off if it recurs.
                time.sleep(OPERATION_BACKOFF_S * (attempt - 1))
                _retrying("read", self._uri, self._reopen)
        n = len(data)
        view[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._body.close()
        super().close()


class _WriteThenCommit(io.RawIOBase):
    """Writes go to a local tmp file; `close()` commits it (os.replace or upload); an error discards it."""

    def __init__(self, tmp: str, commit: Callable[[str], None]) -> None:
        super().__init__()
        self._tmp = tmp
        self._commit = commit
        self._file = open(tmp, "wb")  # noqa: SIM115 - closed in close()/abort()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self._file.write(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._file.close()
            self._commit(self._tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._tmp)
            super().close()

    def abort(self) -> None:
        """Close without committing: nothing at the destination changes."""
        if self.closed:
            return
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._tmp)
        super().close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        # Garbage-collected without close(): the writer never finished, so never publish partial data.
        with contextlib.suppress(Exception):
            self.abort()


def open_read(uri: PathOrUri, *, endpoint_url: str | None = None) -> BinaryIO:
    """A binary stream over `uri`, read as it arrives (never downloaded first). Close it when done.

    s3: the GetObject body behind a buffer; a dropped connection resumes with a ranged GET at the
    current offset. FileNotFoundError at once when there is no such object.
    """
    uri = _uri(uri)
    if not is_s3(uri):
        return open(uri, "rb")
    return cast(BinaryIO, io.BufferedReader(_S3Reader(uri, endpoint_url), buffer_size=_READ_BUFFER_BYTES))


def open_write(uri: PathOrUri, *, chunk_mb: int = 64, endpoint_url: str | None = None) -> BinaryIO:
    """A binary stream whose content replaces `uri` when it is closed (all or nothing).

    Writes spool to a local tmp file (next to a local target; in the temp dir for s3), committed on
    `close()` with `os.replace` / `upload_file`. Leaving a `with` block by an exception, or dropping
    the stream unclosed, discards it.
    """
    uri = _uri(uri)
    if not is_s3(uri):
        tmp = _local_tmp(uri)
        return cast(BinaryIO, _WriteThenCommit(tmp, lambda t: os.replace(t, uri)))
    split_s3(uri)
    fd, tmp = tempfile.mkstemp(prefix="storage-upload-", suffix=_TMP_SUFFIX)
    os.close(fd)
    return cast(
        BinaryIO,
        _WriteThenCommit(tmp, lambda t: upload_file(t, uri, chunk_mb=chunk_mb, endpoint_url=endpoint_url)),
    )


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> BinaryIO:
    """webdataset.gopen handler for `s3://` URLs (endpoint and credentials from the environment)."""
    if mode.startswith("r"):
        return open_read(url)
    if mode.startswith("w"):
        return open_write(url)
    raise ValueError(f"{url}: unsupported mode {mode!r}")


def register_webdataset_s3() -> None:
    """Teach webdataset to open `s3://` URLs through this module (reads stream, writes upload on close).

    Idempotent and cheap: call it in the main process and in every DataLoader `worker_init_fn` (a
    spawned worker imports webdataset afresh, without the registration).
    """
    import importlib

    # Not `from webdataset import gopen`: the package re-exports the function under the module's name.
    gopen_module = importlib.import_module("webdataset.gopen")
    gopen_module.gopen_schemes["s3"] = _gopen_s3
