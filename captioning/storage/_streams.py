"""The streams behind `captioning.storage.open_read` / `open_write`: a resuming S3 reader and a
committing writer.

`S3Reader` reads one GetObject body as it arrives and resumes at the current offset with a ranged
(If-Match) GET when the connection drops. `WriteThenCommit` spools writes to a local tmp file and
hands it to a commit function on `close()` (os.replace, or an upload); an exception or garbage
collection without `close()` discards it, so the destination only ever holds complete content.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from captioning.storage import _s3
from captioning.storage._uri import split_s3

log = logging.getLogger(__name__)


class S3Reader(io.RawIOBase):
    """The body of one GetObject, read as it arrives; resumes with a ranged GET if the connection drops."""

    def __init__(self, uri: str, endpoint_url: str | None) -> None:
        super().__init__()
        self._uri = uri
        self._endpoint_url = endpoint_url
        self._bucket, self._key = split_s3(uri)
        self._pos = 0
        response = _s3.retrying("open", uri, self._get)
        self._etag: str | None = response.get("ETag")
        self._size = int(response["ContentLength"])
        self._body: Any = response["Body"]

    def _get(self, **extra: Any) -> Any:
        return _s3.s3_client(self._endpoint_url).get_object(Bucket=self._bucket, Key=self._key, **extra)

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
        for attempt in range(1, _s3.OPERATION_ATTEMPTS + 1):
            try:
                data = self._body.read(len(view))
                if not data:  # botocore checks the length itself; never let a short stream pass as EOF
                    raise ConnectionResetError(f"stream ended at byte {self._pos} of {self._size}")
                break
            except Exception as exc:
                if attempt == _s3.OPERATION_ATTEMPTS or not _s3.is_transient(exc):
                    _s3.raise_as_oserror(exc, "read", self._uri)
                log.warning("reading %s at byte %d: %s; resuming", self._uri, self._pos, exc)
                # A dropped connection is usually just that: resume at once, back off if it recurs.
                time.sleep(_s3.OPERATION_BACKOFF_S * (attempt - 1))
                _s3.retrying("read", self._uri, self._reopen)
        n = len(data)
        view[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._body.close()
        super().close()


class WriteThenCommit(io.RawIOBase):
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
