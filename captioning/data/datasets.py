"""The raw datasets: which files each needs, and fetching one into a split file plus an image source.

``fetch_dataset`` puts what a dataset needs under ``raw_dir`` and returns where its Karpathy split
file is and how to read its images (``RawDataset``)::

    raw = fetch_dataset("flickr8k", "data/raw",          # caption_datasets.zip + Flickr8k_Dataset.zip
                        num_retries=5, timeout_s=60.0, verify_checksums=True)
    dataset = read_karpathy(raw.karpathy_json)
    jpeg = raw.images.read(dataset.records[0].path)

Only the small Karpathy JSON is extracted; the COCO and Flickr8k image zips are read in place
(``captioning.data.sources``). Flickr30k has no public URL (it is given out on request): its image
archive (``.tar.gz`` or ``.zip`` holding ``flickr30k-images/``) is a local path, a URL, or
``flickr30k-images.tar.gz`` under ``base_url``, and is extracted, because a tar.gz cannot be read at
random; once extracted, later runs use the images without the archive. ``synthetic`` generates the learnable synthetic dataset under ``raw_dir/synthetic``.
``local`` fetches nothing: new data that landed as a folder (a Karpathy-format split file and its
images) is read where it is::

    raw = fetch_dataset("local", "unused", karpathy_json="/data/new/dataset_coco.json",
                        num_retries=5, timeout_s=60.0, verify_checksums=True)
    raw.images                                           # DirSource("/data/new"): the JSON's folder

Files arrive through ``captioning.data.download`` (resumable, verified HTTP; archives checked on
arrival) and ``captioning.data.archives`` (safe extraction). Sizes and checksums come from
``REMOTE_FILES`` unless the user gives a file's own (``checksums`` entries and/or a
``checksums_file``, ``captioning.data.checksums``); a mismatch names the file, both values and the
options to proceed. The download settings (``num_retries``,
``timeout_s``, ``verify_checksums``) are required even where nothing is downloaded (synthetic,
local): their defaults live in ``captioning.config`` (``data.download``), and ``build_raw_dataset``
reads the ``data`` config section. No torch, Prefect or MLflow here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from captioning import storage
from captioning.config import ConfigError
from captioning.data.archives import ArchiveError, extract_archive, extracted_files
from captioning.data.checksums import Checksum, how_to_proceed, user_checksums
from captioning.data.download import ChecksumMismatch, DownloadError, download_file, resolve_url
from captioning.data.sources import (
    FLICKR30K_FOLDER,
    SYNTHETIC_FOLDER,
    DirSource,
    ImageSource,
    check_source,
    source_for,
)
from captioning.data.synthetic import generate_synthetic

if TYPE_CHECKING:
    from captioning.config import DataConfig


DATASETS: tuple[str, ...] = ("coco", "flickr8k", "flickr30k", "synthetic", "local")


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file: its name under raw_dir, URL, and size (bytes) and MD5 where known."""

    name: str
    url: str
    size: int | None
    md5: str | None


# Sizes and checksums only where a public source states them; None where none was found (a wrong
# value would make every real download fail).
REMOTE_FILES: dict[str, RemoteFile] = {
    f.name: f
    for f in (
        # Sizes: tensorflow/datasets, tensorflow_datasets/url_checksums/coco.txt (which has SHA-256,
        # not MD5). MD5s: keras-contrib's COCO script and Salesforce LAVIS (download_coco.py), and for
        # train2014 also pystiche_papers, which hands it to torchvision's verifying downloader.
        RemoteFile(
            "train2014.zip",
            "http://images.cocodataset.org/zips/train2014.zip",
            13_510_573_713,
            "0da8c0bd3d6becc4dcb32757491aca88",
        ),
        RemoteFile(
            "val2014.zip",
            "http://images.cocodataset.org/zips/val2014.zip",
            6_645_013_297,
            "a3d79f5ed8d289b7a7554ce06a5782b3",
        ),
        # No size or checksum from a second source: mlverse/torchvision (R) lists MD5
        # 4fa8c08369d22fe16e41dc124bd1adc2, but it is the only source and the same project's
        # train2014 MD5 disagrees with five others, so it is not enforced. The zip's CRCs still
        # check the one member we extract.
        RemoteFile(
            "caption_datasets.zip",
            "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
            None,
            None,
        ),
        # MD5: mlverse/torchvision R/dataset-flickr.R and an independent CMake fetch script
        # (file(DOWNLOAD ... EXPECTED_MD5)) agree. No exact size published.
        RemoteFile(
            "Flickr8k_Dataset.zip",
            "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
            None,
            "f18a1e2920de5bd84dae7cf08ec78978",
        ),
    )
}

# What each downloadable dataset needs, by REMOTE_FILES name. Flickr30k's images come from its own
# archive (flickr30k_archive, or FLICKR30K_ARCHIVE under base_url); synthetic is generated; local is
# already on disk.
DATASET_FILES: dict[str, tuple[str, ...]] = {
    "coco": ("caption_datasets.zip", "train2014.zip", "val2014.zip"),
    "flickr8k": ("caption_datasets.zip", "Flickr8k_Dataset.zip"),
    "flickr30k": ("caption_datasets.zip",),
}


FLICKR30K_ARCHIVE = "flickr30k-images.tar.gz"  # the name the authors give out


@dataclass(frozen=True)
class RawDataset:
    """A fetched dataset: its Karpathy split file and the source its images are read from."""

    name: str
    karpathy_json: Path
    images: ImageSource


def fetch_dataset(
    dataset: str,
    raw_dir: str | os.PathLike[str],
    *,
    base_url: str | None = None,
    flickr30k_archive: str | os.PathLike[str] | None = None,
    num_retries: int,
    timeout_s: float,
    verify_checksums: bool,
    checksums: Sequence[str] = (),
    checksums_file: str | os.PathLike[str] | None = None,
    progress: bool = True,
    retry_delay_s: float = 1.0,
    synthetic: Mapping[str, Any] | None = None,
    karpathy_json: str | os.PathLike[str] | None = None,
    image_dir: str | os.PathLike[str] | None = None,
) -> RawDataset:
    """Download (or generate) a dataset under raw_dir and return its split file and image source.

    coco / flickr8k: download caption_datasets.zip and the image zip(s) (``base_url`` replaces the
    URLs' prefix), extract only ``dataset_<name>.json``, read images straight from the zips (each
    is opened once here: one damaged since it was verified raises ArchiveError naming it).
    flickr30k: the Karpathy JSON as above; images from ``flickr30k_archive`` (a local .tar.gz or
    .zip, or an http[s] URL; none: ``FLICKR30K_ARCHIVE`` under ``base_url``, and a failure to fetch
    it says how to give it otherwise), extracted to
    ``raw_dir/flickr30k-images`` once: later calls reuse the extracted images even when the archive
    is gone; members that fail to read are left out and read as UnreadableImage (skipped, counted).
    synthetic: ``generate_synthetic(raw_dir/synthetic, **synthetic)`` unless the same settings were
    generated there already. local: nothing is fetched
    (raw_dir is unused); the split file is ``karpathy_json`` and the images are read from
    ``image_dir`` (default: the JSON's folder), so the records' paths (``filepath/filename`` for
    COCO-style entries, ``filename`` for Flickr-style ones) must be relative to it.
    ``checksums`` (``NAME=md5:HEX`` entries) and ``checksums_file`` (md5sum/sha256sum output) give
    a mirror's own checksums, which replace the published size and MD5 of those files.
    ``verify_checksums=False`` ignores every size and checksum (mirrors serving other bytes, tests):
    a download must still be complete and, for an archive, open. A file stored under either
    override stays trusted by later calls without it. A mismatch raises ChecksumMismatch: one line
    naming the file, the expected and actual values, and the options to proceed.
    """
    raw = Path(raw_dir)
    if dataset == "synthetic":
        return _generate(raw, dict(synthetic or {}))
    if dataset == "local":
        return _local(karpathy_json, image_dir)
    if dataset not in DATASET_FILES:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    own = user_checksums(checksums, checksums_file)
    fetch_options: dict[str, Any] = {
        "num_retries": num_retries,
        "timeout_s": timeout_s,
        "progress": progress,
        "retry_delay_s": retry_delay_s,
    }

    def fetch(name: str, url: str) -> Path:
        return _fetch_file(url, raw / name, REMOTE_FILES.get(name), own, verify_checksums, fetch_options)

    images: ImageSource | None = None
    if dataset == "flickr30k":  # first: a missing archive is refused before anything is downloaded
        location = os.fspath(flickr30k_archive) if flickr30k_archive is not None else None
        mirrored = location is None and base_url is not None
        if mirrored:
            location = f"{str(base_url).rstrip('/')}/{FLICKR30K_ARCHIVE}"
        images = _flickr30k_images(location, raw, fetch, mirrored=mirrored)
    for name in DATASET_FILES[dataset]:
        fetch(name, resolve_url(REMOTE_FILES[name].url, base_url))
    karpathy_json = _extract_karpathy_json(raw / "caption_datasets.zip", dataset, raw)
    images = images or source_for(dataset, raw)
    check_source(images)  # a zip damaged since it was verified: one error now, not one per shard
    return RawDataset(name=dataset, karpathy_json=karpathy_json, images=images)


def _fetch_file(
    url: str,
    dest: Path,
    published: RemoteFile | None,
    own: Mapping[str, Checksum],
    verify: bool,
    options: Mapping[str, Any],
) -> Path:
    """download_file with the user's checksums for dest's name (else the published size and MD5), or
    none with verify off; a mismatch's message gets where the expected value came from and the
    options to proceed."""
    mine = own.get(dest.name)
    if not verify:
        expected: dict[str, Any] = {"override": True}
    elif mine is not None:
        expected = {"md5": mine.md5, "sha256": mine.sha256, "override": True}
    else:
        expected = {"size": published.size, "md5": published.md5} if published else {}
    try:
        return download_file(url, dest, **expected, **options)
    except ChecksumMismatch as e:
        source = f"from {mine.source}" if verify and mine is not None else "the published one"
        e.args = (f"{e}; the expected value is {source}. {how_to_proceed(dest.name, e.md5, e.kept)}",)
        raise


def _flickr30k_images(
    location: str | None, raw: Path, fetch: Callable[[str, str], Path], *, mirrored: bool
) -> ImageSource:
    """Flickr30k's images: the archive at location (a local path, or a URL fetched into raw;
    ``mirrored``: the one under base_url) extracted into raw, or an earlier extraction of it when the
    archive is not there."""
    is_url = location is not None and re.match(r"https?://", location) is not None
    if location is None:
        path = None
    elif is_url:
        path = raw / (PurePosixPath(urlsplit(location).path).name or FLICKR30K_ARCHIVE)
    else:
        path = Path(location).expanduser()
    have_archive = path is not None and (
        path.is_file() or (is_url and path.with_name(path.name + ".part").is_file())
    )
    earlier = None if have_archive else _earlier_flickr30k(raw, None if path is None else path.name)
    if earlier is not None:
        skipped = earlier
    elif location is None:
        raise ValueError(
            "flickr30k has no public download: request flickr30k-images.tar.gz from its authors and set "
            "data.download.flickr30k_archive to its path (a .tar.gz or .zip) or URL, or serve it "
            f"as {FLICKR30K_ARCHIVE} under data.download.base_url"
        )
    else:
        assert path is not None
        if is_url:
            try:
                fetch(path.name, location)
            except DownloadError as e:
                if not mirrored or isinstance(e, ChecksumMismatch):
                    raise
                raise DownloadError(
                    f"{e}; flickr30k's images are looked for as {FLICKR30K_ARCHIVE} under "
                    "data.download.base_url: put it there, or set data.download.flickr30k_archive to "
                    "its path or URL"
                ) from None
        elif not path.is_file():
            raise FileNotFoundError(
                f"data.download.flickr30k_archive: no file {path}, and no earlier extraction of it "
                f"under {raw}"
            )
        skipped = {}
        extract_archive(path, raw, skipped=skipped)
    if not (raw / FLICKR30K_FOLDER).is_dir():
        raise DownloadError(f"{path or raw}: no {FLICKR30K_FOLDER}/ folder in the archive")
    prefix = f"{FLICKR30K_FOLDER}/"
    unreadable = []
    for rel, why in skipped.items():  # "reason: detail" by path under raw
        if rel.startswith(prefix):
            reason, _, detail = why.partition(": ")
            unreadable.append((rel.removeprefix(prefix), reason, detail))
    return DirSource(raw / FLICKR30K_FOLDER, unreadable=unreadable)


def _earlier_flickr30k(raw: Path, name: str | None) -> dict[str, str] | None:
    """The skipped members of an earlier complete extraction of the archive called name (any archive
    that filled flickr30k-images/ when name is None) into raw; None when there is none."""
    names = (
        [name]
        if name is not None
        else [m.name[1 : -len(".all.extracted")] for m in raw.glob(".*.all.extracted")]
    )
    for candidate in names:
        done = extracted_files(candidate, raw)
        if done is not None and any(f.parent.name == FLICKR30K_FOLDER for f in done[0]):
            return done[1]
    return None


def build_raw_dataset(cfg: DataConfig, *, progress: bool = True) -> RawDataset:
    """fetch_dataset with the settings of the ``data`` config section (download, synthetic, local)."""
    return fetch_dataset(
        cfg.dataset,
        cfg.raw_dir,
        # base_url, flickr30k_archive, num_retries, timeout_s, verify_checksums, checksums(_file)
        **dataclasses.asdict(cfg.download),
        progress=progress,
        synthetic=dataclasses.asdict(cfg.synthetic),
        karpathy_json=cfg.local.karpathy_json,
        image_dir=cfg.local.image_dir,
    )


def _extract_karpathy_json(caption_zip: Path, dataset: str, dest_dir: Path) -> Path:
    """Extract dataset_<name>.json (at the zip's root or in a folder) from caption_datasets.zip."""
    wanted = f"dataset_{dataset}.json"
    try:
        with zipfile.ZipFile(caption_zip) as zf:
            names = [n for n in zf.namelist() if PurePosixPath(n).name == wanted and "__MACOSX" not in n]
    except zipfile.BadZipFile as e:
        raise ArchiveError(f"{caption_zip}: not a readable zip archive ({e})") from None
    if not names:
        raise DownloadError(f"{caption_zip}: no {wanted} inside")
    member = min(names, key=len)
    (path,) = extract_archive(caption_zip, dest_dir, members_prefix=member)
    return path


def _generate(raw: Path, settings: dict[str, Any]) -> RawDataset:
    """Generate the synthetic dataset under raw/synthetic, once per distinct settings."""
    root = raw / SYNTHETIC_FOLDER
    settings.setdefault("make_archives", False)  # fetch reads the folders; archives are for tests
    style = str(settings.get("style", "coco"))
    marker = root / ".generated.json"
    json_path = root / f"dataset_{style}.json"
    try:
        done = json.loads(marker.read_text()) == settings and json_path.is_file()
    except (OSError, ValueError):
        done = False
    if not done:
        data = generate_synthetic(root, **settings)
        json_path = data.json_path
        storage.write_text(marker, json.dumps(settings, sort_keys=True) + "\n")
    return RawDataset(
        name="synthetic", karpathy_json=json_path, images=source_for("synthetic", raw, synthetic_style=style)
    )


def _local(
    karpathy_json: str | os.PathLike[str] | None, image_dir: str | os.PathLike[str] | None
) -> RawDataset:
    """A Karpathy-format dataset already on disk, read in place (absolute paths, for any worker)."""
    if karpathy_json is None:
        raise ConfigError(
            "dataset=local needs data.local.karpathy_json: the path of the folder's Karpathy-format "
            "split file (e.g. --data.local.karpathy_json=/data/new/dataset_coco.json)"
        )
    json_path = Path(karpathy_json).expanduser().absolute()
    if not json_path.is_file():
        raise FileNotFoundError(f"data.local.karpathy_json: no file {json_path}")
    root = json_path.parent if image_dir is None else Path(image_dir).expanduser().absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"data.local.image_dir: no folder {root}")
    return RawDataset(name="local", karpathy_json=json_path, images=DirSource(root))
