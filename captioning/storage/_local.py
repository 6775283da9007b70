"""Atomic local writes: a tmp file next to the target, then `os.replace`; listings skip the tmp files.

A reader of a local path sees the old content or the new, never a half-written file; a failed or
abandoned write leaves nothing behind but, at worst, a `.<name>.<random>.tmp` that listings ignore.
A full disk (or quota) is `StorageFull`: one line naming the file, the bytes needed and the bytes
free there; the previous file at that path is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class StorageFull(OSError):
    """A local write ran out of space: the message names the file, the bytes needed and the bytes free."""


def _free_bytes(path: str) -> int | None:
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        return None


def no_space(path: str, needed: int | None, error: OSError) -> StorageFull:
    """The StorageFull for ``error`` (ENOSPC or EDQUOT) while writing ``path``."""
    free = _free_bytes(path)
    what = "the quota is used up" if error.errno == errno.EDQUOT else "no space left on the device"
    need = f"{needed / 2**20:.1f} MiB needed" if needed is not None else "size unknown"
    have = f"{free / 2**20:.1f} MiB free there" if free is not None else "free space unknown"
    return StorageFull(
        error.errno, f"cannot write {path}: {what} ({need}, {have}); the previous file there is unchanged"
    )


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
def atomic_local(path: str, size: int | None = None) -> Iterator[str]:
    """Yield a tmp path next to `path`; on success it replaces `path`, on failure it is removed. Running
    out of space raises StorageFull (``size``: the bytes being written, where known)."""
    try:
        tmp = local_tmp(path)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise no_space(path, size, e) from None
        raise
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in _NO_SPACE and not isinstance(e, StorageFull):
            raise no_space(path, size, e) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def is_local_tmp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)
