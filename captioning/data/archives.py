"""Safe archive extraction: .zip and .tar[.gz|.bz2|.xz] members checked before any is written.

    files = extract_archive("data/raw/caption_datasets.zip", "data/raw", members_prefix="dataset_coco.json")

``extract_archive`` checks every member it would write (no absolute paths, no ``..``, no links, no
device files) before writing any, writes each file atomically, and leaves a marker so a second
call is free. Used by ``captioning.data.datasets`` for the Karpathy JSON and Flickr30k's images.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from captioning import storage


class UnsafeArchiveError(ValueError):
    """An archive member would write outside the destination or is not a plain file or folder."""


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
    storage.write_text(marker, json.dumps({"stamp": stamp, "files": rels}) + "\n")
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
