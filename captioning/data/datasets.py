"""The raw datasets: which files each needs, and fetching one into a split file plus an image source.

``fetch_dataset`` puts what a dataset needs under ``raw_dir`` and returns where its Karpathy split
file is and how to read its images (``RawDataset``)::

    raw = fetch_dataset("flickr8k", "data/raw",          # caption_datasets.zip + Flickr8k_Dataset.zip
                        num_retries=5, timeout_s=60.0, verify_checksums=True)
    dataset = read_karpathy(raw.karpathy_json)
    jpeg = raw.images.read(dataset.records[0].path)

Only the small Karpathy JSON is extracted; the COCO and Flickr8k image zips are read in place
(``captioning.data.sources``). Flickr30k has no public URL (it is given out on request), so its
``flickr30k-images.tar.gz`` comes from a local path and is extracted, because a tar.gz cannot be
read at random. ``synthetic`` generates the learnable synthetic dataset under ``raw_dir/synthetic``.
``local`` fetches nothing: new data that landed as a folder (a Karpathy-format split file and its
images) is read where it is::

    raw = fetch_dataset("local", "unused", karpathy_json="/data/new/dataset_coco.json",
                        num_retries=5, timeout_s=60.0, verify_checksums=True)
    raw.images                                           # DirSource("/data/new"): the JSON's folder

Files arrive through ``captioning.data.download`` (resumable, verified HTTP) and
``captioning.data.archives`` (safe extraction). The download settings (``num_retries``,
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from captioning import storage
from captioning.config import ConfigError
from captioning.data.archives import extract_archive
from captioning.data.download import DownloadError, download_file, resolve_url
from captioning.data.sources import (
    FLICKR30K_FOLDER,
    SYNTHETIC_FOLDER,
    DirSource,
    ImageSource,
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

# What each downloadable dataset needs, by REMOTE_FILES name. Flickr30k's images come from a local
# archive (flickr30k_archive); synthetic is generated; local is already on disk.
DATASET_FILES: dict[str, tuple[str, ...]] = {
    "coco": ("caption_datasets.zip", "train2014.zip", "val2014.zip"),
    "flickr8k": ("caption_datasets.zip", "Flickr8k_Dataset.zip"),
    "flickr30k": ("caption_datasets.zip",),
}


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
    progress: bool = True,
    retry_delay_s: float = 1.0,
    synthetic: Mapping[str, Any] | None = None,
    karpathy_json: str | os.PathLike[str] | None = None,
    image_dir: str | os.PathLike[str] | None = None,
) -> RawDataset:
    """Download (or generate) a dataset under raw_dir and return its split file and image source.

    coco / flickr8k: download caption_datasets.zip and the image zip(s) (``base_url`` replaces the
    URLs' prefix), extract only ``dataset_<name>.json``, read images straight from the zips.
    flickr30k: the Karpathy JSON as above; images from the local (or http[s]) ``flickr30k_archive``,
    extracted to ``raw_dir/flickr30k-images``. synthetic: ``generate_synthetic(raw_dir/synthetic,
    **synthetic)`` unless the same settings were generated there already. local: nothing is fetched
    (raw_dir is unused); the split file is ``karpathy_json`` and the images are read from
    ``image_dir`` (default: the JSON's folder), so the records' paths (``filepath/filename`` for
    COCO-style entries, ``filename`` for Flickr-style ones) must be relative to it.
    ``verify_checksums=False`` ignores the known sizes and MD5s (mirrors serving other bytes, tests).
    """
    raw = Path(raw_dir)
    if dataset == "synthetic":
        return _generate(raw, dict(synthetic or {}))
    if dataset == "local":
        return _local(karpathy_json, image_dir)
    if dataset not in DATASET_FILES:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    if dataset == "flickr30k" and flickr30k_archive is None:
        raise ValueError(
            "flickr30k has no public download: request flickr30k-images.tar.gz from its authors "
            "and set data.download.flickr30k_archive to its path"
        )

    fetch_options: dict[str, Any] = {
        "num_retries": num_retries,
        "timeout_s": timeout_s,
        "progress": progress,
        "retry_delay_s": retry_delay_s,
    }
    for name in DATASET_FILES[dataset]:
        remote = REMOTE_FILES[name]
        download_file(
            resolve_url(remote.url, base_url),
            raw / name,
            size=remote.size if verify_checksums else None,
            md5=remote.md5 if verify_checksums else None,
            **fetch_options,
        )
    karpathy_json = _extract_karpathy_json(raw / "caption_datasets.zip", dataset, raw)

    if dataset == "flickr30k":
        assert flickr30k_archive is not None
        archive = os.fspath(flickr30k_archive)
        if re.match(r"https?://", archive):
            name = PurePosixPath(urlsplit(archive).path).name or "flickr30k-images.tar.gz"
            archive_path = download_file(archive, raw / name, **fetch_options)
        else:
            archive_path = Path(archive).expanduser()
            if not archive_path.is_file():
                raise FileNotFoundError(f"flickr30k_archive not found: {archive_path}")
        extract_archive(archive_path, raw)
        if not (raw / FLICKR30K_FOLDER).is_dir():
            raise DownloadError(f"{archive_path}: no {FLICKR30K_FOLDER}/ folder in the archive")
    return RawDataset(name=dataset, karpathy_json=karpathy_json, images=source_for(dataset, raw))


def build_raw_dataset(cfg: DataConfig, *, progress: bool = True) -> RawDataset:
    """fetch_dataset with the settings of the ``data`` config section (download, synthetic, local)."""
    return fetch_dataset(
        cfg.dataset,
        cfg.raw_dir,
        **dataclasses.asdict(
            cfg.download
        ),  # base_url, flickr30k_archive, num_retries, timeout_s, verify_checksums
        progress=progress,
        synthetic=dataclasses.asdict(cfg.synthetic),
        karpathy_json=cfg.local.karpathy_json,
        image_dir=cfg.local.image_dir,
    )


def _extract_karpathy_json(caption_zip: Path, dataset: str, dest_dir: Path) -> Path:
    """Extract dataset_<name>.json (at the zip's root or in a folder) from caption_datasets.zip."""
    wanted = f"dataset_{dataset}.json"
    with zipfile.ZipFile(caption_zip) as zf:
        names = [n for n in zf.namelist() if PurePosixPath(n).name == wanted and "__MACOSX" not in n]
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
