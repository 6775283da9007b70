"""Archives: structural checks where they arrive, and safe extraction of .zip and .tar[.gz|.bz2|.xz].

    check_archive("data/raw/val2014.zip")          # reads the whole index; ArchiveError names the file
    files = extract_archive("data/raw/caption_datasets.zip", "data/raw", members_prefix="dataset_coco.json")

``check_archive`` opens an archive and reads its central directory (zip) or every member header
(tar), so a truncated or corrupt download is refused before anything trusts it. ``extract_archive``
checks every member it would write (no absolute paths, no ``..``, no links, no device files) before
writing any, writes each file atomically, and leaves a marker so a second call is free, and so
``extracted_files`` finds the files again after the archive itself is gone. A member whose bytes
cannot be read (bad CRC, a damaged or cut-short stream) fails the extraction naming the archive and
the member, or, with ``skipped``, is left out and recorded with its reason. Used by
``captioning.data.download`` (arrival checks) and ``captioning.data.datasets`` (the Karpathy JSON,
Flickr30k's images).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from captioning import storage

# What reading a damaged member raises: zipfile's bad CRC / bad header, a broken deflate, bzip2 or
# xz stream, data that ends early (EOFError), an unsupported method (NotImplementedError) or an
# encrypted member (RuntimeError).
MEMBER_READ_ERRORS: tuple[type[Exception], ...] = (
    zipfile.BadZipFile,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    NotImplementedError,
    RuntimeError,
)
# ... and what reading an archive's index raises when the file is truncated, corrupt or not one.
_INDEX_ERRORS: tuple[type[Exception], ...] = (*MEMBER_READ_ERRORS, OSError)
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class UnsafeArchiveError(ValueError):
    """An archive member would write outside the destination or is not a plain file or folder."""


class ArchiveError(ValueError):
    """An archive that cannot be read (truncated, corrupt, not an archive); the message names it."""


def unreadable_reason(exc: BaseException) -> str:
    """The skip reason of a member that failed to read: "truncated" for data that ends early."""
    return "truncated" if isinstance(exc, EOFError) else "corrupt"


def archive_kind(name: str) -> str | None:
    """The archive kind a file name says: "zip", "tar" (any compression), or None."""
    lower = name.lower()
    if lower.endswith(".zip"):
        return "zip"
    return "tar" if lower.endswith(_TAR_SUFFIXES) else None


def check_archive(path: str | os.PathLike[str], kind: str | None = None) -> int:
    """Open an archive, read its whole index, and return how many members it lists.

    zip: the central directory, and every member's data must start inside the file; tar (any
    compression): every member header, which reads a compressed tar to its end. ``kind`` defaults
    to ``archive_kind(path)``. Raises ArchiveError naming the file when it is truncated, corrupt or
    not an archive of that kind.
    """
    path = Path(path)
    kind = kind or archive_kind(path.name)
    if kind not in ("zip", "tar"):
        raise ValueError(f"{path}: not a .zip or .tar[.gz|.bz2|.xz] name")
    try:
        if kind == "zip":
            size = path.stat().st_size
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
            for info in infos:
                if info.header_offset + info.compress_size > size:
                    raise zipfile.BadZipFile(f"member {info.filename!r} runs past the end of the file")
            return len(infos)
        with tarfile.open(path, "r:*") as tf:
            return sum(1 for _ in tf)
    except FileNotFoundError:
        raise
    except _INDEX_ERRORS as e:
        raise ArchiveError(f"{path}: not a readable {kind} archive ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class _Member:
    """An archive member that passed the safety checks: its name in the archive and its target."""

    name: str
    rel: PurePosixPath
    is_dir: bool


def extract_archive(
    archive: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    members_prefix: str | None = None,
    skipped: dict[str, str] | None = None,
) -> list[Path]:
    """Extract a .zip or .tar[.gz|.bz2|.xz] archive (or its members starting with members_prefix).

    Every member to be written is checked first: an absolute path, a '..' component, a symbolic or
    hard link, or a device / FIFO member raises UnsafeArchiveError naming it, and nothing is written.
    Files are written atomically (temporary name, then rename). An archive that cannot be read
    raises ArchiveError naming it; so does a member whose bytes fail to read, unless ``skipped`` is
    given: then that member is left out and ``skipped[path relative to dest_dir]`` says why
    ("corrupt: ..." or "truncated: ..."). A marker in dest_dir records the extraction (skips
    included), so calling again with the same archive (same size and mtime) and prefix is a no-op.
    Returns the extracted files (not folders), in archive order.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    st = archive.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "members_prefix": members_prefix}
    marker = _extraction_marker(archive.name, dest_dir, members_prefix)
    done = _read_extraction(marker)
    if done is not None and done[0] == stamp and (skipped is not None or not done[2]):
        if skipped is not None:
            skipped.update(done[2])
        return done[1]

    found: dict[str, str] | None = None if skipped is None else {}
    if zipfile.is_zipfile(archive):
        written = _extract_zip(archive, dest_dir, members_prefix, found)
    elif tarfile.is_tarfile(archive):
        written = _extract_tar(archive, dest_dir, members_prefix, found)
    else:
        raise ArchiveError(
            f"{archive}: not a readable zip or tar archive (truncated, corrupt or another format)"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    rels = [p.relative_to(dest_dir).as_posix() for p in written]
    storage.write_text(marker, json.dumps({"stamp": stamp, "files": rels, "skipped": found or {}}) + "\n")
    if skipped is not None and found:
        skipped.update(found)
    return written


def extracted_files(
    archive_name: str, dest_dir: str | os.PathLike[str], *, members_prefix: str | None = None
) -> tuple[list[Path], dict[str, str]] | None:
    """(files, skipped members) of an earlier complete extraction of an archive with that name into
    dest_dir, whether or not the archive is still there; None when there was none or a file is gone."""
    done = _read_extraction(_extraction_marker(archive_name, Path(dest_dir), members_prefix))
    return None if done is None else (done[1], done[2])


def _extraction_marker(archive_name: str, dest_dir: Path, members_prefix: str | None) -> Path:
    tag = "all" if members_prefix is None else hashlib.sha1(members_prefix.encode()).hexdigest()[:12]
    return dest_dir / f".{archive_name}.{tag}.extracted"


def _read_extraction(marker: Path) -> tuple[dict[str, Any], list[Path], dict[str, str]] | None:
    """(stamp, files, skipped) from an extraction marker whose files all exist; else None."""
    try:
        done = json.loads(marker.read_text())
        files = [marker.parent / rel for rel in done["files"]]
        skipped = {str(k): str(v) for k, v in dict(done.get("skipped") or {}).items()}
        if all(f.is_file() for f in files):
            return dict(done["stamp"]), files, skipped
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


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


@contextlib.contextmanager
def _index_read(archive: Path) -> Iterator[None]:
    """Errors while reading an archive's index: a truncated or corrupt file, named."""
    try:
        yield
    except _INDEX_ERRORS as e:
        if isinstance(e, FileNotFoundError | PermissionError):
            raise
        raise ArchiveError(f"{archive}: cannot be read ({type(e).__name__}: {e})") from None


def _extract_zip(
    archive: Path, dest_dir: Path, members_prefix: str | None, skipped: dict[str, str] | None
) -> list[Path]:
    with contextlib.ExitStack() as stack:
        with _index_read(archive):
            zf = stack.enter_context(zipfile.ZipFile(archive))
            infos = zf.infolist()
        members = []
        for info in infos:
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
        return _write_members(archive, dest_dir, members, lambda m: zf.open(m.name), skipped)


def _extract_tar(
    archive: Path, dest_dir: Path, members_prefix: str | None, skipped: dict[str, str] | None
) -> list[Path]:
    with contextlib.ExitStack() as stack:
        with _index_read(archive):
            tf = stack.enter_context(tarfile.open(archive, "r:*"))
            listed = tf.getmembers()
        members = []
        infos: dict[str, tarfile.TarInfo] = {}
        for info in listed:
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

        return _write_members(archive, dest_dir, members, open_member, skipped)


class _Unreadable(Exception):
    """A member whose bytes failed to read: its skip reason and what happened."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _write_members(
    archive: Path,
    dest_dir: Path,
    members: list[_Member],
    open_member: Callable[[_Member], IO[bytes]],
    skipped: dict[str, str] | None,
) -> list[Path]:
    """Create folders and write files atomically; members were all checked beforehand. A member that
    fails to read raises ArchiveError, or with skipped is recorded there and not written."""
    written: dict[Path, None] = {}  # ordered and without duplicates (a later member wins)
    for member in members:
        target = dest_dir.joinpath(*member.rel.parts)
        if member.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("wb") as dst:
                _copy_member(member, open_member, dst)
            os.replace(tmp, target)
        except _Unreadable as e:
            where = f"{archive}: member {member.name!r} cannot be read ({e.detail})"
            if skipped is None:
                raise ArchiveError(where) from None
            skipped[member.rel.as_posix()] = f"{e.reason}: {where}"
            written.pop(target, None)
            target.unlink(missing_ok=True)  # an earlier member of the same name would pass for it
            continue
        finally:
            tmp.unlink(missing_ok=True)
        written[target] = None
    return list(written)


def _copy_member(member: _Member, open_member: Callable[[_Member], IO[bytes]], dst: IO[bytes]) -> None:
    """Copy one member's bytes into dst; a failure to read them (not to write) becomes _Unreadable."""
    try:
        src = open_member(member)
    except MEMBER_READ_ERRORS as e:
        raise _Unreadable(unreadable_reason(e), f"{type(e).__name__}: {e}") from None
    with src:
        while True:
            try:
                chunk = src.read(1 << 20)
            except MEMBER_READ_ERRORS as e:
                raise _Unreadable(unreadable_reason(e), f"{type(e).__name__}: {e}") from None
            if not chunk:
                break
            dst.write(chunk)
