"""Read image bytes by their Karpathy relative path, from a folder or straight from a zip archive.

``ImageRecord.path`` is ``filepath/filename`` for COCO (``train2014/COCO_train2014_000000000009.jpg``)
and ``filename`` for Flickr. A source maps that path to bytes; ``source_for`` knows each dataset's
on-disk layout after ``fetch_dataset``::

    images = source_for("coco", "data/raw")          # train2014.zip + val2014.zip, never extracted
    jpeg = images.read(record.path)                  # bytes; FileNotFoundError when it is not there

An image the source has but cannot read (a zip member with a bad CRC or a damaged stream, or an
archive member that extraction had to leave out) raises ``UnreadableImage`` with its skip reason and
the archive's path, so the shard writer skips and counts it like any other bad image; a zip that
cannot be opened at all raises ``ArchiveError`` naming it, which ``check_source`` finds once, before
a build starts.

Sources are small picklable values that open their files lazily, once per process: they are sent to
DataLoader workers, ``multiprocessing`` children and Dask workers, and a forked child must not share
its parent's file offset, so a zip handle is reopened whenever ``os.getpid()`` changed. Plain
Python: no torch here.
"""

from __future__ import annotations

import os
import threading
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

from captioning.data.archives import MEMBER_READ_ERRORS, ArchiveError, unreadable_reason

# Where each real archive keeps its images (member = prefix + ImageRecord.path).
FLICKR8K_PREFIX = "Flicker8k_Dataset/"  # sic: the real Flickr8k_Dataset.zip misspells its folder
FLICKR30K_FOLDER = "flickr30k-images"
COCO_ZIPS = ("train2014.zip", "val2014.zip")
FLICKR8K_ZIP = "Flickr8k_Dataset.zip"
SYNTHETIC_FOLDER = "synthetic"  # under raw_dir, so it never collides with a real download
_SYNTHETIC_PREFIXES = {"coco": "", "flickr8k": FLICKR8K_PREFIX, "flickr30k": f"{FLICKR30K_FOLDER}/"}


class UnreadableImage(Exception):
    """The source has the image but its bytes cannot be read; ``reason`` is "corrupt" or "truncated",
    ``detail`` names the archive and member and says what failed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@runtime_checkable
class ImageSource(Protocol):
    """Anything that returns an image's encoded bytes given its Karpathy relative path."""

    def read(self, rel_path: str) -> bytes:
        """Return the file's bytes; raise FileNotFoundError when the source has no such image and
        UnreadableImage when it has one whose bytes cannot be read."""
        ...


def _check_relative(rel_path: str) -> str:
    """Refuse absolute paths and '..' so a record can never read outside its source."""
    parts = PurePosixPath(rel_path.replace("\\", "/")).parts
    if not rel_path or rel_path.startswith(("/", "\\")) or ".." in parts:
        raise ValueError(f"image path must be relative and stay inside the source, got {rel_path!r}")
    return rel_path


@dataclass(frozen=True)
class DirSource:
    """Images under a folder: file = root / (prefix + rel_path).

    ``unreadable`` lists the files an extraction had to leave out, as (path under root, reason,
    detail): reading one raises UnreadableImage instead of FileNotFoundError.
    """

    root: Path
    prefix: str = ""
    unreadable: tuple[tuple[str, str, str], ...] = ()

    def __init__(
        self,
        root: str | os.PathLike[str],
        prefix: str = "",
        unreadable: Iterable[tuple[str, str, str]] = (),
    ) -> None:
        object.__setattr__(self, "root", Path(root))
        object.__setattr__(self, "prefix", prefix)
        object.__setattr__(self, "unreadable", tuple(sorted(tuple(entry) for entry in unreadable)))

    def read(self, rel_path: str) -> bytes:
        path = self.root / (self.prefix + _check_relative(rel_path))
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            for name, reason, detail in self.unreadable:  # only looked at for a file that is not there
                if name == self.prefix + rel_path:
                    raise UnreadableImage(reason, detail) from None
            raise FileNotFoundError(f"image {rel_path!r} not found: no file {path}") from None


class ZipSource:
    """Images inside a zip archive, read in place: member = prefix + rel_path.

    The archive is opened on first use in each process, and its name index is built once per
    process; pickling keeps only the path and prefix.
    """

    def __init__(self, zip_path: str | os.PathLike[str], prefix: str = "") -> None:
        self.zip_path = Path(zip_path)
        self.prefix = prefix
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._zip: zipfile.ZipFile | None = None
        self._index: dict[str, zipfile.ZipInfo] = {}

    def _open(self) -> tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]:
        if self._pid is not None and self._pid != os.getpid():
            self._lock = threading.Lock()  # a parent's thread may have held the old one at fork time
        with self._lock:
            if self._zip is None or self._pid != os.getpid():
                # After a fork the inherited handle shares the parent's file offset: drop it unused.
                try:
                    archive = zipfile.ZipFile(self.zip_path)
                except (zipfile.BadZipFile, EOFError) as e:
                    raise ArchiveError(
                        f"{self.zip_path}: not a readable zip archive ({e}); delete it and its "
                        ".verified marker and run again to fetch it anew"
                    ) from None
                self._index = {info.filename: info for info in archive.infolist() if not info.is_dir()}
                self._zip, self._pid = archive, os.getpid()
            return self._zip, self._index

    def read(self, rel_path: str) -> bytes:
        archive, index = self._open()
        member = self.prefix + _check_relative(rel_path)
        info = index.get(member)
        if info is None:
            raise FileNotFoundError(f"image {rel_path!r} not found: no member {member!r} in {self.zip_path}")
        try:
            return archive.read(info)
        except MEMBER_READ_ERRORS as e:  # a bad CRC, a damaged or cut-short stream: this image only
            raise UnreadableImage(
                unreadable_reason(e), f"{self.zip_path}: member {member!r}: {type(e).__name__}: {e}"
            ) from None

    def names(self) -> list[str]:
        """Relative paths (prefix removed) of every file under the prefix, in archive order."""
        _, index = self._open()
        return [name[len(self.prefix) :] for name in index if name.startswith(self.prefix)]

    def close(self) -> None:
        """Close this process's handle; the next read reopens it."""
        with self._lock:
            if self._zip is not None and self._pid == os.getpid():
                self._zip.close()
            self._zip, self._pid, self._index = None, None, {}

    def __getstate__(self) -> dict[str, Any]:
        return {"zip_path": self.zip_path, "prefix": self.prefix}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.zip_path = state["zip_path"]
        self.prefix = state["prefix"]
        self._reset()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ZipSource):
            return NotImplemented
        return (self.zip_path, self.prefix) == (other.zip_path, other.prefix)

    def __hash__(self) -> int:
        return hash((self.zip_path, self.prefix))

    def __repr__(self) -> str:
        return f"ZipSource({str(self.zip_path)!r}, prefix={self.prefix!r})"


@dataclass(frozen=True)
class ChainSource:
    """Several sources tried in order; the first that has the image answers."""

    sources: tuple[ImageSource, ...]

    def __init__(self, sources: Sequence[ImageSource]) -> None:
        if not sources:
            raise ValueError("ChainSource needs at least one source")
        object.__setattr__(self, "sources", tuple(sources))

    def read(self, rel_path: str) -> bytes:
        misses = []
        for source in self.sources:
            try:
                return source.read(rel_path)
            except FileNotFoundError as e:
                misses.append(str(e))
        raise FileNotFoundError(f"image {rel_path!r} not found in any source: " + "; ".join(misses))


def check_source(source: ImageSource) -> None:
    """Open every zip archive a source reads (a ZipSource, or one inside a ChainSource) once, so a
    zip that does not open stops a build before any shard is planned or written: ArchiveError names
    it and says what to do. A zip that is not there is left to the reads (images not found)."""
    if isinstance(source, ChainSource):
        for inner in source.sources:
            check_source(inner)
    elif isinstance(source, ZipSource) and source.zip_path.is_file():
        probe = ZipSource(source.zip_path, source.prefix)  # the source itself stays unopened
        probe._open()
        probe.close()


def raise_source_error(error: BaseException) -> None:
    """Raise a shard job's error when it is its image source's, not the shard's: a zip that does not
    open (ArchiveError) fails every shard alike and no re-run helps, so a build stops on it once."""
    if isinstance(error, ArchiveError):
        raise error


def source_for(
    dataset: str, raw_dir: str | os.PathLike[str], *, synthetic_style: str = "coco"
) -> ImageSource:
    """The image source of a dataset fetched into raw_dir by ``fetch_dataset``.

    coco: ``train2014.zip`` and ``val2014.zip`` read in place (their members already start with the
    Karpathy ``filepath``); flickr8k: ``Flickr8k_Dataset.zip`` under ``Flicker8k_Dataset/``;
    flickr30k: the extracted ``flickr30k-images/`` folder; synthetic: the folders generate_synthetic
    wrote under ``raw_dir/synthetic`` in the layout of ``synthetic_style``.
    """
    raw = Path(raw_dir)
    if dataset == "coco":
        return ChainSource([ZipSource(raw / name) for name in COCO_ZIPS])
    if dataset == "flickr8k":
        return ZipSource(raw / FLICKR8K_ZIP, prefix=FLICKR8K_PREFIX)
    if dataset == "flickr30k":
        return DirSource(raw / FLICKR30K_FOLDER)
    if dataset == "synthetic":
        if synthetic_style not in _SYNTHETIC_PREFIXES:
            raise ValueError(
                f"unknown synthetic style {synthetic_style!r}; valid styles: {', '.join(_SYNTHETIC_PREFIXES)}"
            )
        return DirSource(raw / SYNTHETIC_FOLDER, prefix=_SYNTHETIC_PREFIXES[synthetic_style])
    raise ValueError(f"unknown dataset {dataset!r}; valid datasets: coco, flickr8k, flickr30k, synthetic")
