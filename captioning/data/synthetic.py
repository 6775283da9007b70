"""Generate a small, learnable, deterministic-by-seed captioning dataset in the real on-disk layouts.

Images and captions come from ``captioning.data.scenes`` (one to three coloured shapes; every caption
word true of the pixels), saved as JPEGs. The files mimic the real downloads so the dataset / records
/ shards code can be tested on them:

- ``coco``: ``train2014/COCO_train2014_%012d.jpg`` (train + restval) and
  ``val2014/COCO_val2014_%012d.jpg`` (val + test); archives ``train2014.zip``, ``val2014.zip``.
- ``flickr8k``: ``Flicker8k_Dataset/<digits>_<hex>.jpg`` (the real zip's typo); ``Flickr8k_Dataset.zip``.
- ``flickr30k``: ``flickr30k-images/<digits>.jpg``; ``flickr30k-images.tar.gz`` (a manual download).

Archives go to ``out_dir/archives`` together with ``caption_datasets.zip``; the extracted layout is
written to ``out_dir`` next to ``dataset_<style>.json`` (Karpathy's split format) and
``scenes.json`` (the ground-truth shapes per ``imgid``). Usage::

    data = generate_synthetic("/tmp/synth", num_train=200, seed=0)
    scenes = load_scenes(data.scenes_path)          # imgid -> Scene (captioning.data.scenes)

Same seed -> byte-identical files, archives included. Pure Python + Pillow + numpy: no torch here.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioning.data.scenes import describe_scene, render_scene, sample_scene, scene_to_dict, tokenize

STYLES: tuple[str, ...] = ("coco", "flickr8k", "flickr30k")
_JPEG_QUALITY = 90
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class SyntheticDataset:
    """What generate_synthetic wrote: paths (extracted layout + archives) and counts."""

    root: Path
    style: str
    json_path: Path  # out_dir/dataset_<style>.json
    scenes_path: Path  # out_dir/scenes.json
    image_dirs: tuple[Path, ...]  # coco: (train2014, val2014); flickr: one folder
    archives: tuple[Path, ...]  # empty when make_archives=False
    num_train: int
    num_val: int
    num_test: int
    num_restval: int
    num_images: int
    num_captions: int
    image_size: int
    seed: int


# ---------------------------------------------------------------------------------------- dataset


def generate_synthetic(
    out_dir: str | Path,
    *,
    num_train: int = 200,
    num_val: int = 40,
    num_test: int = 40,
    num_restval: int = 0,
    image_size: int = 64,
    seed: int = 0,
    style: str = "coco",
    captions_per_image: int = 5,
    make_archives: bool = True,
) -> SyntheticDataset:
    """Write a synthetic dataset in the real layout of `style` under out_dir and return its paths.

    Image i is generated from its own random streams seeded by (seed, i), so it does not depend on
    the other images or on the order of generation; the split assignment is a seeded shuffle.
    image_size is in pixels; below ~48 the small shapes cover only a dozen or so pixels.
    """
    counts = {"num_train": num_train, "num_val": num_val, "num_test": num_test, "num_restval": num_restval}
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    total = num_train + num_val + num_test + num_restval
    if total == 0:
        raise ValueError("the dataset would be empty: num_train + num_val + num_test + num_restval == 0")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; valid styles: {', '.join(STYLES)}")
    if num_restval and style != "coco":
        raise ValueError(f"num_restval is only meaningful for style='coco' (Karpathy's {style} has none)")
    if not isinstance(image_size, int) or not 32 <= image_size <= 1024:
        raise ValueError(f"image_size must be an int in [32, 1024] pixels, got {image_size!r}")
    if not isinstance(captions_per_image, int) or captions_per_image < 1:
        raise ValueError(f"captions_per_image must be a positive int, got {captions_per_image!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")

    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    splits = ["train"] * num_train + ["restval"] * num_restval + ["val"] * num_val + ["test"] * num_test
    random.Random(f"synthetic:{seed}:splits").shuffle(splits)
    names = _image_names(style, total, seed)

    entries: list[dict[str, Any]] = []
    scenes: list[dict[str, Any]] = []
    files: dict[str, list[tuple[str, bytes]]] = {}  # image folder -> [(filename, jpeg bytes)]
    sent_id = 0
    for imgid, (split, (folder, filename, cocoid)) in enumerate(zip(splits, names, strict=True)):
        if style == "coco":
            folder = "train2014" if split in ("train", "restval") else "val2014"
            filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        scene = sample_scene(random.Random(f"synthetic:{seed}:{imgid}:scene"))
        image = render_scene(scene, image_size, random.Random(f"synthetic:{seed}:{imgid}:render"))
        buffer = io.BytesIO()
        # 4:4:4 chroma keeps the small shapes' colours crisp; fixed settings keep bytes reproducible.
        image.save(buffer, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
        files.setdefault(folder, []).append((filename, buffer.getvalue()))
        raws = describe_scene(scene, random.Random(f"synthetic:{seed}:{imgid}:captions"), captions_per_image)
        sentences = [
            {"tokens": tokenize(raw), "raw": raw, "imgid": imgid, "sentid": sent_id + k}
            for k, raw in enumerate(raws)
        ]
        sentids = list(range(sent_id, sent_id + len(raws)))
        sent_id += len(raws)
        # Key order and presence as in Karpathy's files: COCO has filepath and cocoid, Flickr has neither.
        if style == "coco":
            entry: dict[str, Any] = {
                "filepath": folder,
                "sentids": sentids,
                "filename": filename,
                "imgid": imgid,
                "split": split,
                "sentences": sentences,
                "cocoid": cocoid,
            }
        else:
            entry = {
                "sentids": sentids,
                "imgid": imgid,
                "sentences": sentences,
                "split": split,
                "filename": filename,
            }
        entries.append(entry)
        scenes.append(
            {"imgid": imgid, "path": f"{folder}/{filename}", "split": split, **scene_to_dict(scene)}
        )

    folders = sorted(files)
    for folder in folders:
        (root / folder).mkdir(exist_ok=True)
        for filename, data in files[folder]:
            (root / folder / filename).write_bytes(data)
    json_name = f"dataset_{style}.json"
    json_bytes = json.dumps({"images": entries, "dataset": style}).encode()
    (root / json_name).write_bytes(json_bytes)
    scenes_doc = {
        "style": style,
        "seed": seed,
        "image_size": image_size,
        "coordinates": "normalised to the image side; origin top left; radius of the enclosing circle",
        "images": scenes,
    }
    (root / "scenes.json").write_text(json.dumps(scenes_doc, indent=1) + "\n")

    archives: list[Path] = []
    if make_archives:
        archive_dir = root / "archives"
        archive_dir.mkdir(exist_ok=True)
        if style == "flickr30k":
            (folder,) = folders
            archives.append(_write_tar_gz(archive_dir / f"{folder}.tar.gz", folder, files[folder]))
        else:
            # Real names: train2014.zip / val2014.zip hold their folder; Flickr8k_Dataset.zip holds
            # the misspelt Flicker8k_Dataset/ folder.
            for folder in folders:
                zip_name = "Flickr8k_Dataset.zip" if style == "flickr8k" else f"{folder}.zip"
                archives.append(_write_zip(archive_dir / zip_name, folder, files[folder]))
        archives.append(_write_zip(archive_dir / "caption_datasets.zip", None, [(json_name, json_bytes)]))

    return SyntheticDataset(
        root=root,
        style=style,
        json_path=root / json_name,
        scenes_path=root / "scenes.json",
        image_dirs=tuple(root / folder for folder in folders),
        archives=tuple(archives),
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        num_restval=num_restval,
        num_images=total,
        num_captions=sent_id,
        image_size=image_size,
        seed=seed,
    )


def _image_names(style: str, total: int, seed: int) -> list[tuple[str, str, int]]:
    """(folder, filename, cocoid) per image: unique ids that look like the real ones."""
    rng = random.Random(f"synthetic:{seed}:ids")
    if style == "coco":  # folder and filename depend on the split; filled in by the caller
        return [("", "", cocoid) for cocoid in rng.sample(range(1, 600_000), total)]
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < total:
        if style == "flickr8k":
            name = f"{rng.randrange(10**9, 4 * 10**9)}_{rng.getrandbits(40):010x}.jpg"
        else:
            name = f"{rng.randrange(10**9, 5 * 10**9)}.jpg"
        if name not in seen:
            seen.add(name)
            names.append(name)
    folder = "Flicker8k_Dataset" if style == "flickr8k" else "flickr30k-images"
    return [(folder, name, 0) for name in names]


def _write_zip(path: Path, folder: str | None, members: list[tuple[str, bytes]]) -> Path:
    """Zip members (under folder/ if given) with fixed order, timestamps and permissions."""
    with zipfile.ZipFile(path, "w") as archive:
        if folder is not None:  # the real image zips start with their directory entry
            info = zipfile.ZipInfo(f"{folder}/", date_time=_ZIP_DATE)
            info.external_attr = (0o40755 << 16) | 0x10
            archive.writestr(info, b"")
        for name, data in members:
            info = zipfile.ZipInfo(f"{folder}/{name}" if folder else name, date_time=_ZIP_DATE)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data, compresslevel=6)
    return path


def _write_tar_gz(path: Path, folder: str, members: list[tuple[str, bytes]]) -> Path:
    """tar.gz of folder/ with mtime 0, root ownership and a gzip header without name or time."""
    with (
        path.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        info = tarfile.TarInfo(folder)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
        tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return path
