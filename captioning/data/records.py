"""Read Karpathy split files (``dataset_{coco,flickr8k,flickr30k}.json``) into typed, validated records.

The files come from Karpathy's ``caption_datasets.zip``. Their layout::

    {"dataset": "coco",
     "images": [{"filepath": "val2014",            # COCO only
                 "filename": "COCO_val2014_000000391895.jpg",
                 "cocoid": 391895,                  # COCO only
                 "imgid": 0, "split": "test", "sentids": [770337, ...],
                 "sentences": [{"tokens": ["a", "man", ...], "raw": "A man ...",
                                "imgid": 0, "sentid": 770337}, ...]},
                ...]}

Usage::

    dataset = read_karpathy("dataset_coco.json")         # restval folded into train
    train = dataset.split("train")

Plain Python on purpose: no torch, so data preparation imports fast.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS: tuple[str, ...] = ("train", "val", "test")
RESTVAL = "restval"
SOURCE_SPLITS: tuple[str, ...] = (*SPLITS, RESTVAL)


class RecordsError(ValueError):
    """A Karpathy split file (or an argument to read it) is malformed; the message names the entry."""


@dataclass(frozen=True)
class Caption:
    """One reference sentence: the raw text, its (lower-cased) tokens and the file's sentence id."""

    raw: str
    tokens: tuple[str, ...]
    sent_id: int


@dataclass(frozen=True)
class ImageRecord:
    """One image with its reference captions."""

    image_id: int
    path: str  # relative to the image root: "filepath/filename" (COCO) or "filename" (Flickr)
    split: str  # effective split after restval mapping: "train", "val" or "test"
    source_split: str  # as in the file: "train", "val", "test" or "restval"
    captions: tuple[Caption, ...]


@dataclass(frozen=True)
class KarpathyDataset:
    """All records of one split file, in file order, after restval mapping."""

    name: str
    records: tuple[ImageRecord, ...]
    num_restval_skipped: int  # restval images left out because restval_split was None

    def by_split(self) -> dict[str, list[ImageRecord]]:
        """Return records grouped by effective split; keys "train", "val", "test" are always present."""
        groups: dict[str, list[ImageRecord]] = {name: [] for name in SPLITS}
        for record in self.records:
            groups[record.split].append(record)
        return groups

    def split(self, name: str) -> list[ImageRecord]:
        """Return the records of one effective split ("train", "val" or "test"), in file order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid splits: {', '.join(SPLITS)}")
        return [record for record in self.records if record.split == name]


def read_karpathy(path: str | os.PathLike[str], *, restval_split: str | None = "train") -> KarpathyDataset:
    """Read and validate a Karpathy split file.

    ``restval_split`` says where COCO's "restval" images go: "train" (the usual choice), "val",
    "test", or None to leave them out (counted in ``num_restval_skipped``). The image id is
    ``cocoid`` when present, else ``imgid``. Raises FileNotFoundError for a missing file and
    RecordsError, naming the file and the entry, for anything malformed.
    """
    if restval_split is not None and restval_split not in SPLITS:
        raise RecordsError(
            f"invalid restval_split {restval_split!r}; valid values: {', '.join(map(repr, SPLITS))} or None"
        )
    file_name = os.fspath(path)
    try:
        with open(file_name, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"Karpathy split file not found: {file_name}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordsError(
            f"{file_name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None

    if not isinstance(data, dict):
        raise RecordsError(f"{file_name}: top level must be an object, got {_type_name(data)}")
    if "images" not in data:
        raise RecordsError(f"{file_name}: missing top-level field 'images'")
    images = data["images"]
    if not isinstance(images, list):
        raise RecordsError(f"{file_name}: top-level field 'images' must be a list, got {_type_name(images)}")
    name = data.get("dataset")
    if name is None:
        name = _name_from_path(file_name)
    elif not isinstance(name, str) or not name:
        raise RecordsError(f"{file_name}: top-level field 'dataset' must be a non-empty string, got {name!r}")

    records: list[ImageRecord] = []
    seen: dict[int, str] = {}  # image id -> entry description, to name both sides of a duplicate
    num_restval_skipped = 0
    for index, image in enumerate(images):
        record = _parse_image(file_name, index, image)
        where = _describe(index, image)
        if record.image_id in seen:
            raise RecordsError(
                f"{file_name}: duplicate image id {record.image_id}: {seen[record.image_id]} and {where}"
            )
        seen[record.image_id] = where
        if record.source_split == RESTVAL:
            if restval_split is None:
                num_restval_skipped += 1
                continue
            record = ImageRecord(
                image_id=record.image_id,
                path=record.path,
                split=restval_split,
                source_split=record.source_split,
                captions=record.captions,
            )
        records.append(record)
    return KarpathyDataset(name=name, records=tuple(records), num_restval_skipped=num_restval_skipped)


def _parse_image(file_name: str, index: int, image: Any) -> ImageRecord:
    """Validate one ``images[index]`` entry and turn it into a record (split still as in the file)."""
    if not isinstance(image, dict):
        raise RecordsError(f"{file_name}: images[{index}]: must be an object, got {_type_name(image)}")
    where = f"{file_name}: {_describe(index, image)}"

    for key in ("filename", "split", "sentences"):
        if key not in image:
            raise RecordsError(f"{where}: missing field {key!r}")
    filename = image["filename"]
    if not isinstance(filename, str) or not filename:
        raise RecordsError(f"{where}: field 'filename' must be a non-empty string, got {filename!r}")
    filepath = image.get("filepath")
    if filepath is not None and not isinstance(filepath, str):
        raise RecordsError(f"{where}: field 'filepath' must be a string, got {_type_name(filepath)}")

    id_key = "cocoid" if "cocoid" in image else "imgid" if "imgid" in image else None
    if id_key is None:
        raise RecordsError(f"{where}: missing image id: neither 'cocoid' nor 'imgid'")
    image_id = image[id_key]
    if not _is_int(image_id):
        raise RecordsError(f"{where}: field {id_key!r} must be an integer, got {image_id!r}")

    split = image["split"]
    if not isinstance(split, str):
        raise RecordsError(f"{where}: field 'split' must be a string, got {_type_name(split)}")
    if split not in SOURCE_SPLITS:
        raise RecordsError(
            f"{where}: unknown split {split!r}; valid splits: {', '.join(map(repr, SOURCE_SPLITS))}"
        )

    sentences = image["sentences"]
    if not isinstance(sentences, list):
        raise RecordsError(f"{where}: field 'sentences' must be a list, got {_type_name(sentences)}")
    if not sentences:
        raise RecordsError(f"{where}: field 'sentences' is empty")
    captions = tuple(_parse_sentence(f"{where} sentences[{i}]", s) for i, s in enumerate(sentences))

    return ImageRecord(
        image_id=image_id,
        path=f"{filepath}/{filename}" if filepath else filename,
        split=split,
        source_split=split,
        captions=captions,
    )


def _parse_sentence(where: str, sentence: Any) -> Caption:
    """Validate one sentence object; ``where`` names the file, image entry and sentence index."""
    if not isinstance(sentence, dict):
        raise RecordsError(f"{where}: must be an object, got {_type_name(sentence)}")
    for key in ("tokens", "raw", "sentid"):
        if key not in sentence:
            raise RecordsError(f"{where}: missing field {key!r}")
    raw, tokens, sent_id = sentence["raw"], sentence["tokens"], sentence["sentid"]
    if not isinstance(raw, str):
        raise RecordsError(f"{where}: field 'raw' must be a string, got {_type_name(raw)}")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise RecordsError(f"{where}: field 'tokens' must be a list of strings")
    if not _is_int(sent_id):
        raise RecordsError(f"{where}: field 'sentid' must be an integer, got {sent_id!r}")
    if not tokens:
        # An empty caption cannot be trained on or scored against, whatever raw says.
        raise RecordsError(f"{where}: field 'tokens' is empty (raw {raw!r})")
    return Caption(raw=raw, tokens=tuple(tokens), sent_id=sent_id)


def _describe(index: int, image: Any) -> str:
    """Name an entry for error messages: its index plus the filename and id when they are known."""
    details = []
    if isinstance(image, dict):
        if isinstance(image.get("filename"), str) and image["filename"]:
            details.append(f"filename {image['filename']!r}")
        for key in ("cocoid", "imgid"):
            if _is_int(image.get(key)):
                details.append(f"{key} {image[key]}")
                break
    return f"images[{index}]" + (f" ({', '.join(details)})" if details else "")


def _name_from_path(file_name: str) -> str:
    """Derive a dataset name from the file name: "dataset_coco.json" -> "coco"."""
    stem = Path(file_name).stem
    return stem.removeprefix("dataset_") or stem


def _is_int(value: Any) -> bool:
    """True for JSON integers; bool is an int subclass in Python but not an id."""
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    """Name a decoded JSON value's type the way the JSON spec does, for error messages."""
    names = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
