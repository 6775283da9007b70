"""Check a finished shard build: every file against the manifest, and a look at decoded samples.

    problems = verify_shards("data/shards")           # [] when every tar matches its sha256
    report = inspect_shards("data/shards", split="val", n=2)

Local folders and ``s3://bucket/prefix`` alike; ``captioning verify`` and ``captioning inspect`` run
them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image

from captioning import storage
from captioning.data.format import (
    MANIFEST_FILE,
    SIZES_FILE,
    VOCAB_FILE,
    read_json_or_none,
    read_manifest,
    sha256_file,
)
from captioning.data.records import SPLITS


def verify_shards(out: str) -> list[str]:
    """Check every shard listed in the manifest (and vocab.json, sizes.json) against it.

    Returns one message per problem; an empty list means the shards are intact.
    """
    out = os.fspath(out)
    try:
        manifest = read_manifest(out)
    except FileNotFoundError as e:
        return [str(e)]
    problems: list[str] = []
    shards: dict[str, str] = manifest.get("shards", {})
    for name, expected in sorted(shards.items()):
        uri = storage.join(out, name)
        try:
            actual = _sha256_uri(uri)
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        if actual != expected:
            problems.append(f"{name}: sha256 {actual} does not match the manifest's {expected}")
    try:
        vocab_sha = _sha256_uri(storage.join(out, VOCAB_FILE))
        if vocab_sha != manifest.get("vocab_sha256"):
            problems.append(f"{VOCAB_FILE}: sha256 {vocab_sha} does not match the manifest's")
    except FileNotFoundError:
        problems.append(f"{VOCAB_FILE}: missing")
    sizes = read_json_or_none(storage.join(out, SIZES_FILE))
    if sizes is None:
        problems.append(f"{SIZES_FILE}: missing")
    else:
        listed = {name for split_sizes in sizes.values() for name in split_sizes}
        if listed != set(shards):
            problems.append(f"{SIZES_FILE} lists other shards than {MANIFEST_FILE}")
        for split, summary in manifest.get("splits", {}).items():
            total = sum(sizes.get(split, {}).values())
            if total != summary.get("num_samples"):
                problems.append(
                    f"{split}: {SIZES_FILE} counts {total} samples, the manifest {summary.get('num_samples')}"
                )
    return problems


def inspect_shards(
    out: str, split: str | None = None, n: int = 1, images_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Per-split counts from the manifest and the first n samples of each split, decoded.

    Returns ``{"out", "splits": {split: {num_samples, num_shards, failures, converted}},
    "samples": {split: [{"key", "shard", "image_id", "path", "image_size", "orig_size", "captions"}]}}``
    (captions as raw strings). ``split`` limits both to one split. With ``images_dir`` each sample's
    stored JPEG is also written there as ``{split}-{key}.jpg`` (its path under ``"image_file"``).
    """
    out = os.fspath(out)
    manifest = read_manifest(out)
    sizes = read_json_or_none(storage.join(out, SIZES_FILE)) or {}
    known = manifest.get("splits", {})
    if split is not None and split not in known:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(known)}")
    names = [split] if split is not None else sorted(known, key=_split_order)
    report: dict[str, Any] = {
        "out": out,
        "splits": {name: manifest["splits"][name] for name in names},
        "samples": {},
    }
    for name in names:
        samples: list[dict[str, Any]] = []
        for tar_name in sorted(sizes.get(name, {})):
            if len(samples) >= n:
                break
            samples.extend(_read_samples(storage.join(out, tar_name), tar_name, n - len(samples), images_dir))
        report["samples"][name] = samples
    return report


def _split_order(split: str) -> tuple[int, str]:
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


def _read_samples(
    uri: str, tar_name: str, n: int, images_dir: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """Decode up to n samples of one tar (saving their JPEGs into ``images_dir`` when given)."""
    samples: list[dict[str, Any]] = []
    if n <= 0:
        return samples
    with storage.open_read(uri) as fileobj, tarfile.open(fileobj=fileobj, mode="r|") as tar:
        pending: dict[str, dict[str, bytes]] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            handle = tar.extractfile(member)
            if handle is None:
                continue
            pending.setdefault(key, {})[ext] = handle.read()
            if {"jpg", "json"} <= pending[key].keys():
                parts = pending.pop(key)
                meta = json.loads(parts["json"])
                with Image.open(io.BytesIO(parts["jpg"])) as image:
                    image_size = list(image.size)
                samples.append(
                    {
                        "key": key,
                        "shard": tar_name,
                        "image_id": meta["image_id"],
                        "path": meta["path"],
                        "image_size": image_size,
                        "orig_size": meta["orig_size"],
                        "captions": [c["raw"] for c in meta["captions"]],
                    }
                )
                if images_dir is not None:
                    image_file = Path(images_dir) / f"{meta['split']}-{key}.jpg"
                    image_file.parent.mkdir(parents=True, exist_ok=True)
                    image_file.write_bytes(parts["jpg"])
                    samples[-1]["image_file"] = str(image_file)
                if len(samples) >= n:
                    break
    return samples


def _sha256_uri(uri: str) -> str:
    """sha256 of a local file or S3 object; FileNotFoundError when it does not exist."""
    if storage.is_s3(uri):
        return hashlib.sha256(storage.read_bytes(uri)).hexdigest()
    return sha256_file(uri)
