"""The shard format: the contract between the shard writer and the loader, and its readers.

One sample per image, key ``f"{image_id:012d}"``, members ``KEY.jpg`` (the resized RGB JPEG) and
``KEY.json``::

    {"image_id": int, "split": str, "path": str, "orig_size": [w, h],
     "captions": [{"raw": str, "tokens": [str], "ids": [int]}, ...]}    # every reference caption

``ids = vocab.encode(tokens, max_len=max_caption_len)`` (``<start> ... <end>``). The train split
goes through ``apply_length_policy`` first (overlong captions dropped or truncated, counted); val and
test keep every reference. Under the output location (a local folder or ``s3://bucket/prefix``):
``{split}-{index:06d}.tar`` holding the split's records ``[index*n, (index+1)*n)`` in file order
(images that fail are skipped, so a shard can hold fewer), ``{split}-{index:06d}.stats.json`` next
to each (``ShardStats``), and at the end ``sizes.json`` (split -> tar name -> samples: all the loader
reads to plan an epoch), ``references.json``, ``vocab.json`` and ``manifest.json``
(``ShardManifest.to_json()``, written last: its presence means the build finished). These four are
``stable_json`` bytes, replaced atomically and only when their bytes change (``write_if_changed``);
every file of a local build has the same mode (0666 less the umask). Readers::

    sizes = split_sizes(read_sizes("data/shards"), "train")   # {"train-000000.tar": 1000, ...}
    sizes = read_split_sizes("data/shards", "train", extra=["data/old-shards"])   # two builds, one plan
    refs = read_references("data/shards", "train")           # image id -> caption ids (SCST's corpus)
    manifest = read_manifest("data/shards")                   # FileNotFoundError until the build finished
    holdout = read_holdout("data/shards")                     # {"split": "test", "id": sha256, "num_images"}

The manifest's ``holdout`` identifies the build's test split: ``id`` is the sha256 of its stored
images' ids and reference tokens (``holdout_of``), so two builds with the same id hold the same test
images and references (not necessarily stored at the same image size or quality: compare scores
across builds of one recipe; the champion gate names holdouts by dataset and id).

Writing is ``captioning.data.shard_build`` (one shard: ``shard_writer``), checking ``shard_check``,
reading batches ``captioning.data.loader``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from captioning import storage

FORMAT_VERSION = 1
SIZES_FILE, VOCAB_FILE, MANIFEST_FILE = "sizes.json", "vocab.json", "manifest.json"
REFERENCES_FILE = "references.json"  # split -> image id -> every stored caption's ids (SCST's CIDEr-D corpus)
HOLDOUT_SPLIT = "test"  # the split whose id the manifest records: the build's fixed, identified holdout
_HASH_CHUNK = 1 << 20


# ------------------------------------------------------------------------------ stats, manifest


@dataclass
class ShardStats:
    """What writing one shard did; saved as ``{split}-{index:06d}.stats.json`` next to the tar."""

    shard: str  # tar file name
    split: str
    count: int  # samples written
    failures: dict[str, int]  # skip reason -> images
    failed: list[dict[str, Any]]  # {"image_id", "path", "reason", "detail"} per skipped image
    converted: dict[str, int]  # conversion (cmyk, grayscale, ...) -> images
    sha256: str
    bytes: int
    duration_s: float
    job_hash: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ShardStats:
        """Rebuild from ``to_json`` output; raises ValueError when a field is missing or mistyped."""
        if not isinstance(data, dict):
            raise ValueError(f"shard stats must be a JSON object, got {type(data).__name__}")
        try:
            stats = cls(**{f: data[f] for f in cls.__dataclass_fields__})
        except KeyError as e:
            raise ValueError(f"shard stats are missing field {e}") from None
        if not isinstance(stats.sha256, str) or not isinstance(stats.bytes, int):
            raise ValueError("shard stats have a malformed sha256 or bytes field")
        return stats


@dataclass(frozen=True)
class SplitSummary:
    """Per-split totals of a build."""

    num_samples: int
    num_shards: int
    failures: dict[str, int]
    converted: dict[str, int]


@dataclass(frozen=True)
class ShardManifest:
    """What a build (``write_shards``, ``finish_shard_build``) produced; ``to_json()`` is manifest.json."""

    out: str
    config_hash: str
    vocab_sha256: str
    splits: dict[str, SplitSummary]
    shards: dict[str, str]  # tar name -> sha256
    sizes: dict[str, dict[str, int]]  # split -> tar name -> samples (the content of sizes.json)
    length_policy: dict[str, Any]
    image: dict[str, Any]  # the ImageSettings used
    samples_per_shard: int
    num_built: int  # shards written by this call
    num_skipped: int  # shards found complete and left alone
    duration_s: float
    holdout: dict[str, Any] = field(default_factory=dict)  # holdout_of(the test split)
    stats: dict[str, ShardStats] = field(repr=False, default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "config_hash": self.config_hash,
            "vocab_sha256": self.vocab_sha256,
            "splits": {name: asdict(summary) for name, summary in self.splits.items()},
            "shards": self.shards,
            "length_policy": self.length_policy,
            "image": self.image,
            "samples_per_shard": self.samples_per_shard,
            "holdout": self.holdout,
        }


def shard_name(split: str, index: int) -> str:
    """``train-000003``: the stem of a shard's tar and stats files."""
    return f"{split}-{index:06d}"


def holdout_of(
    references: Mapping[int, Sequence[Sequence[str]]], split: str = HOLDOUT_SPLIT
) -> dict[str, Any]:
    """The manifest's ``holdout``: ``split``, the number of images and an ``id``, the sha256 of the
    stored images' ids and reference tokens (``references``: image id -> each caption's tokens; what
    scoring compares with), independent of image bytes, vocabulary and order."""
    plain = {str(k): [list(c) for c in v] for k, v in sorted(references.items())}
    digest = hashlib.sha256(stable_json(plain, indent=0)).hexdigest()
    return {"split": split, "id": digest, "num_images": len(plain)}


# -------------------------------------------------------------------------------------- readers


def shard_url(location: str, name: str) -> str:
    """Where shard ``name`` lives: a local path or an ``s3://`` URL.

    A name holding a ``/`` already is one (a shard of another build in a combined plan,
    ``read_split_sizes``) and is returned as it is; shard names themselves never hold one.
    """
    if "/" in name:
        return name
    if storage.is_s3(location):
        return location.rstrip("/") + "/" + name
    return os.path.join(location, name)


def read_sizes(location: str) -> dict[str, dict[str, int]]:
    """Read and check ``sizes.json`` at ``location``: ``{split: {shard name: images}}``."""
    uri = shard_url(location, SIZES_FILE)
    if storage.is_s3(location):
        data = storage.read_json(uri)
    else:
        try:
            with open(uri, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{uri} not found: write the shards first (captioning shards)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{uri}: expected an object of splits, got {type(data).__name__}")
    for split, shards in data.items():
        if not isinstance(shards, dict):
            raise ValueError(f"{uri}: split {split!r} must map shard names to sizes")
        for name, size in shards.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(
                    f"{uri}: size of {split}/{name} must be a non-negative integer, got {size!r}"
                )
    return data


def split_sizes(sizes: Mapping[str, Mapping[str, int]], split: str) -> dict[str, int]:
    """The shard sizes of one split; raises ValueError naming the splits that exist."""
    if split not in sizes:
        raise ValueError(f"no split {split!r} in {SIZES_FILE}; it has {sorted(sizes)}")
    return dict(sizes[split])


def read_split_sizes(location: str, split: str, *, extra: Sequence[str] = ()) -> dict[str, int]:
    """``split``'s shard sizes at ``location``, plus that split of each ``extra`` build: one plan over
    several builds (old and new training data). Extra shards are keyed by their full location
    (``shard_url``), so names never collide and each is read where it is. The builds must share one
    vocabulary (their caption ids are mixed in one batch): ValueError naming them otherwise."""
    sizes = split_sizes(read_sizes(location), split)
    if not extra:
        return sizes
    check_distinct_builds(location, extra)
    words = read_vocab_words(location)
    for other in extra:
        if read_vocab_words(other) != words:
            raise ValueError(
                f"shards at {other} were built with another vocabulary than those at {location}: "
                "they cannot be read together (build them with the same vocabulary, or read one)"
            )
        sizes.update({shard_url(other, name): n for name, n in split_sizes(read_sizes(other), split).items()})
    return sizes


def check_distinct_builds(location: str, extra: Sequence[str]) -> None:
    """ValueError when a build is named twice among ``location`` and ``extra`` (however written):
    its samples would be read twice an epoch."""
    seen: dict[str, str] = {}
    for where in (location, *extra):
        key = where.rstrip("/") if storage.is_s3(where) else os.path.realpath(where)
        if key in seen:
            raise ValueError(
                f"the shard build at {where} is read twice (also as {seen[key]}): name each build once "
                "in data.shard_dir and data.extra_shard_dirs"
            )
        seen[key] = where


def read_vocab_words(out: str) -> Any:
    """The words of a finished build's ``vocab.json`` (FileNotFoundError when the build has not finished)."""
    read_manifest(out)
    return storage.read_json(storage.join(os.fspath(out), VOCAB_FILE)).get("words")


def read_manifest(out: str) -> dict[str, Any]:
    """The manifest.json of a finished build; FileNotFoundError when there is none."""
    data = read_json_or_none(storage.join(os.fspath(out), MANIFEST_FILE))
    if data is None:
        raise FileNotFoundError(f"no {MANIFEST_FILE} under {out}: the shard build has not finished")
    return dict(data)


def read_holdout(out: str) -> dict[str, Any]:
    """The manifest's ``holdout`` (``holdout_of``); ValueError when the build predates holdout ids."""
    holdout = read_manifest(out).get("holdout")
    if not isinstance(holdout, dict) or not holdout.get("id"):
        raise ValueError(
            f"the shards at {out} predate holdout ids: run their shard build again (captioning shards, "
            "or the prepare-data flow); it rewrites only the metadata"
        )
    return dict(holdout)


def read_references(out: str, split: str, *, extra: Sequence[str] = ()) -> dict[int, list[list[int]]]:
    """``references.json``'s captions of ``split`` (ids without <start>/<end>), by image id; with
    ``extra`` builds, theirs too (ValueError when one image id has other references in another)."""
    merged = _references(out, split)
    for other in extra:
        for image_id, captions in _references(other, split).items():
            if merged.setdefault(image_id, captions) != captions:
                raise ValueError(
                    f"image id {image_id} has other {split} references at {other} than at {out}: "
                    "builds read together need distinct image ids (Flickr-style files number their "
                    "images from 0: retrain on the new data alone with --data.retrain_on=new)"
                )
    return merged


def _references(out: str, split: str) -> dict[int, list[list[int]]]:
    uri = storage.join(os.fspath(out), REFERENCES_FILE)
    try:
        data = storage.read_json(uri)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no {REFERENCES_FILE} under {out}: the shards predate it; re-run the shard build"
        ) from None
    if not isinstance(data, dict) or split not in data.get("splits", {}):
        raise ValueError(f"{uri}: no split {split!r}")
    return {int(k): v for k, v in data["splits"][split].items()}


# --------------------------------------------------------------------------- local or s3 files


def write_vocab(out: str, vocab_json: Mapping[str, Any]) -> str:
    """Write ``vocab.json`` (the bytes ``Vocab.save`` writes) when they change; return their sha256."""
    data = stable_json(vocab_json)
    write_if_changed(storage.join(out, VOCAB_FILE), data)
    return hashlib.sha256(data).hexdigest()


def read_json_or_none(uri: str) -> Any | None:
    """Parsed JSON, or None when the file is missing or not valid JSON (a torn leftover)."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def stable_json(obj: Any, *, indent: int = 1) -> bytes:
    """The bytes every metadata file is written as: JSON with sorted keys and a final newline."""
    return (json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def write_stable_json(uri: str, obj: Any, *, indent: int = 1) -> bool:
    """Write ``stable_json(obj)`` to ``uri`` unless it already holds those bytes (``write_if_changed``)."""
    return write_if_changed(uri, stable_json(obj, indent=indent))


def write_if_changed(uri: str, data: bytes) -> bool:
    """Replace ``uri`` with ``data`` only when its bytes differ; return whether it was written.

    Written atomically (a tmp file renamed over the old one: a reader sees the old bytes or the new,
    never none) or in one PUT on S3. A local file left as it was gets the mode a new one would get
    (0666 less the umask), so every output of a build has the same mode whichever run wrote it.
    """
    try:
        same = storage.size(uri) == len(data) and storage.read_bytes(uri) == data
    except FileNotFoundError:
        same = False
    if not same:
        storage.write_bytes(uri, data)
        return True
    if not storage.is_s3(uri):
        mode = 0o666 & ~_umask()
        if stat.S_IMODE(os.stat(uri).st_mode) != mode:
            try:
                os.chmod(uri, mode)
            except PermissionError:  # another user's file: a new copy of ours gets the usual mode
                storage.write_bytes(uri, data)
                return True
    return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a local file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
