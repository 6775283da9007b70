"""Object-storage locations as strings: `s3://bucket/key` URIs next to local paths, and joining them.

Pure string work (no boto3, no I/O); `captioning.storage` re-exports `is_s3`, `split_s3` and `join`.
"""

from __future__ import annotations

import os
import re

PathOrUri = str | os.PathLike[str]

SCHEME = "s3://"
# Bucket names: S3's rules are stricter (lowercase, 3-63 chars); be lenient for S3-compatible servers,
# but never accept what cannot be a bucket at all (empty, slashes, spaces).
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_s3(uri: PathOrUri) -> bool:
    """True for `s3://...` URIs, False for local paths."""
    return isinstance(uri, str) and uri.startswith(SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> `("bucket", "a/b")`; `s3://bucket` and `s3://bucket/` -> `("bucket", "")`.

    Raises ValueError when `uri` is not an `s3://` URI or names no valid bucket.
    """
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(SCHEME) :].partition("/")
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
        return f"{SCHEME}{bucket}/" + "/".join(segments) + trailing
    return os.path.join(base, *pieces) + trailing
