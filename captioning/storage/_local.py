"""Atomic local writes: a tmp file next to the target, then `os.replace`; listings skip the tmp files.

A reader of a local path sees the old content or the new, never a half-written file; a failed or
abandoned write leaves nothing behind but, at worst, a `.<name>.<random>.tmp` that listings ignore.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

# Local temporaries are `.<name>.<random>.tmp` next to the target; listings skip them.
TMP_SUFFIX = ".tmp"


def local_tmp(path: str) -> str:
    """A new empty temporary file next to `path` (parents created), for write-then-`os.replace`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX, dir=parent)
    # mkstemp creates 0600; the published file gets the usual mode (0666 less the umask), like open().
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return tmp


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_local(path: str) -> Iterator[str]:
    """Yield a tmp path next to `path`; on success it replaces `path`, on failure it is removed."""
    tmp = local_tmp(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def is_local_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)
