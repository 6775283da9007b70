"""The S3 side of `captioning.storage`: the cached boto3 client, whole-operation retries, and the
translation of S3 failures into OSErrors naming the URI.

boto3 retries single requests (`REQUEST_MAX_ATTEMPTS`, standard mode); `retrying` repeats a whole,
idempotent operation on top of that, with jittered exponential backoff, when `is_transient` says
doing it again could succeed (connection trouble, 5xx, an upload the server forgot). Everything
else raises at once through `raise_as_oserror`: FileNotFoundError, PermissionError, else OSError.
boto3 is imported on first use.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
REQUEST_MAX_ATTEMPTS = 10  # boto3's per-request retries (standard mode)
# Whole-operation retries on top of boto3's: attempts, first delay, cap (seconds); jittered.
# 6 attempts wait up to 0.5 + 1 + 2 + 4 + 8 s in all: long enough for a server to restart.
OPERATION_ATTEMPTS = 6
OPERATION_BACKOFF_S = 0.5
OPERATION_BACKOFF_MAX_S = 16.0

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
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchBucket"})
_DENIED_CODES = frozenset(
    {"AccessDenied", "403", "Forbidden", "SignatureDoesNotMatch", "InvalidAccessKeyId", "AllAccessDisabled"}
)


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


def transfer_config(chunk_mb: int) -> Any:
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


def error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def is_transient(exc: BaseException) -> bool:
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
        if error_code(e) in _TRANSIENT_CODES:
            return True
    return False


def _translate(exc: BaseException, op: str, uri: str) -> BaseException:
    """The OSError a caller should see for a failed S3 call (naming the URI), or `exc` itself."""
    for e in _causes(exc):
        code = error_code(e)
        if code is None:
            continue
        message = str(getattr(e, "response", {}).get("Error", {}).get("Message") or code)
        if code == "NoSuchBucket":
            return FileNotFoundError(errno.ENOENT, f"{op}: no such bucket ({message})", uri)
        if code in NOT_FOUND_CODES:
            return FileNotFoundError(errno.ENOENT, f"{op}: no such object", uri)
        if code in _DENIED_CODES:
            return PermissionError(errno.EACCES, f"{op}: access denied ({code}: {message})", uri)
        return OSError(errno.EIO, f"{op} failed ({code}: {message})", uri)
    if is_transient(exc):
        return ConnectionError(errno.ECONNABORTED, f"{op} failed ({type(exc).__name__}: {exc})", uri)
    return exc


def raise_as_oserror(exc: BaseException, op: str, uri: str) -> NoReturn:
    new = _translate(exc, op, uri)
    if new is exc:
        raise exc
    raise new from exc


def retrying(op: str, uri: str, fn: Callable[[], T]) -> T:
    """Run `fn` (a whole, idempotent S3 operation); on a transient failure back off and run it again."""
    for attempt in range(1, OPERATION_ATTEMPTS + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == OPERATION_ATTEMPTS or not is_transient(exc):
                raise_as_oserror(exc, op, uri)
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


def call(op: str, uri: str, fn: Callable[[], T]) -> T:
    """Run one S3 request (boto3 retries it); translate its failure into an OSError naming `uri`."""
    try:
        return fn()
    except Exception as exc:
        raise_as_oserror(exc, op, uri)
