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

Image paths are cleaned at validation: empty and '.' segments are dropped (``a//b.jpg``,
``./a.jpg``, a ``filepath`` of ``val2014/`` are read as ``a/b.jpg``, ``a.jpg``, ``val2014``), as a
folder read always did; a path that could leave the image folder or zip ('..', absolute, a drive
letter, NUL) is refused, naming the entry.

Plain Python on purpose: no torch, so data preparation imports fast.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS: tuple[str, ...] = ("train", "val", "test")
RESTVAL = "restval"
SOURCE_SPLITS: tuple[str, ...] = (*SPLITS, RESTVAL)

_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, which editors on Windows like to add
_DRIVE = re.compile(r"[A-Za-z]:")
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


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
    # relative to the image root: "filepath/filename" (COCO) or "filename" (Flickr), '/'-joined,
    # without empty or '.' segments
    path: str
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
    RecordsError, naming the file and the entry, for anything malformed: bytes that are not UTF-8
    (named by byte offset and the entry holding them; a leading BOM is allowed), invalid JSON, and
    image paths that could leave the image folder or zip ('..', absolute, a drive letter, NUL) or
    that name no file; empty and '.' segments are dropped from the record's path.
    """
    if restval_split is not None and restval_split not in SPLITS:
        raise RecordsError(
            f"invalid restval_split {restval_split!r}; valid values: {', '.join(map(repr, SPLITS))} or None"
        )
    file_name = os.fspath(path)
    try:
        with open(file_name, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"Karpathy split file not found: {file_name}") from None
    data = _load_json(file_name, raw)

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
    folder = _clean_path(where, "filepath", filepath) if filepath else ""
    name = _clean_path(where, "filename", filename)
    if not name:
        raise RecordsError(
            f"{where}: field 'filename' {filename!r} names no file (only empty or '.' segments); "
            "give the image's file name: fix or remove the entry"
        )

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
        path=f"{folder}/{name}" if folder else name,
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


def _clean_path(where: str, key: str, part: str) -> str:
    """A 'filepath' or 'filename' with its empty and '.' segments dropped ('a//./b/' -> 'a/b').

    Raises RecordsError naming the entry when the path could leave the image folder or zip prefix.
    A folder read (pathlib) always ignored those segments; a zip member name must not have them.
    """
    clean = "/".join(segment for segment in part.split("/") if segment not in ("", "."))
    problem = _unsafe_path_problem(part, clean)
    if problem:
        raise RecordsError(
            f"{where}: unsafe image path: field {key!r} {part!r} {problem}; image paths must be "
            "relative, '/'-separated names inside the image folder: fix or remove the entry"
        )
    return clean


def _unsafe_path_problem(part: str, clean: str) -> str | None:
    """Why a path (as written, and ``clean`` of '.' and empty segments) could escape; None if safe.

    A backslash counts as a separator for the escape checks ('..', a leading one), as it does on
    Windows and for ``sources``; the leading checks also look at the clean path, so './C:/x' and
    './\\x' are caught like 'C:/x' and '\\x'.
    """
    if "\0" in part:
        return "contains a NUL character"
    if part.startswith(("/", "\\")) or clean.startswith("\\"):
        return "is absolute"
    if _DRIVE.match(clean):
        return "starts with a drive letter"
    if ".." in re.split(r"[/\\]", part):
        return "has a '..' segment"
    return None


def _load_json(file_name: str, raw: bytes) -> Any:
    """Decode a split file's bytes (UTF-8, an optional BOM dropped) and parse them as JSON.

    Every failure is a RecordsError naming the file and, where the text still parses around it,
    the entry: a byte that is not UTF-8 is named by its offset and the entry whose text holds it.
    """
    skipped = len(_BOM) if raw.startswith(_BOM) else 0
    try:
        text = raw[skipped:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = skipped + e.start
        # surrogateescape maps each bad byte to one character, so offsets stay aligned with `prefix`.
        lenient = raw[skipped:].decode("utf-8", errors="surrogateescape")
        prefix = raw[skipped:offset].decode("utf-8")
        line, where = prefix.count("\n") + 1, _where_in_text(lenient, len(prefix))
        raise RecordsError(
            f"{file_name}: not valid UTF-8: byte 0x{raw[offset]:02x} at byte offset {offset} "
            f"(line {line}){where}; re-save the file as UTF-8"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordsError(
            f"{file_name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except RecursionError:
        raise RecordsError(f"{file_name}: invalid JSON: arrays or objects nested too deeply") from None
    except ValueError as e:  # the int digit limit: json names no position, so look for the number
        limit = sys.get_int_max_str_digits()
        match = re.search(rf"[:\[,]\s*-?([0-9]{{{limit + 1},}})", text) if limit else None
        if match is None:
            raise RecordsError(f"{file_name}: invalid JSON: {e}") from None
        line = text.count("\n", 0, match.start(1)) + 1
        raise RecordsError(
            f"{file_name}: invalid JSON: an integer of more than {limit} digits "
            f"at line {line}{_where_in_text(text, match.start(1))}"
        ) from None


def _where_in_text(text: str, offset: int) -> str:
    """ ", in images[2] (filename ..., imgid 2) sentences[1] field 'raw'" for the entry holding offset.

    Empty when the text does not parse far enough to say; the full parse (when it succeeds) only
    adds the entry's filename and id.
    """
    path = _json_path_at(text, offset)
    if not path:
        return ""
    if path[0] != "images" or len(path) < 2 or not isinstance(path[1], int):
        return f", in top-level field {path[0]!r}" if isinstance(path[0], str) else ""
    try:
        data = json.loads(text)
        image = data["images"][path[1]]
    except (ValueError, RecursionError, LookupError, TypeError):
        image = None
    where, rest = _describe(path[1], image), path[2:]
    if len(rest) >= 2 and rest[0] == "sentences" and isinstance(rest[1], int):
        where, rest = f"{where} sentences[{rest[1]}]", rest[2:]
    if rest and isinstance(rest[0], str):
        where += f" field {rest[0]!r}"
    return f", in {where}"


def _json_path_at(text: str, offset: int) -> list[str | int]:
    """The keys and indexes leading to the innermost JSON value whose text holds ``offset``.

    Walks down from the top, skipping siblings with the C scanner, and stops where the text stops
    parsing; an offset in a key or between values names the enclosing container.
    """
    path: list[str | int] = []
    pos = _skip_ws(text, 0)
    try:
        while pos < len(text) and text[pos] in "{[":
            found = _child_at(text, pos, offset)
            if found is None:
                break
            key, pos = found
            path.append(key)
            if pos < 0:  # the offset is in this member's key
                break
    except (ValueError, RecursionError, IndexError):
        pass
    return path


def _child_at(text: str, pos: int, offset: int) -> tuple[str | int, int] | None:
    """In the object or array starting at ``pos``: the member holding ``offset`` and its value's start.

    The start is -1 when the offset lies in the member's key. None when no member holds it.
    """
    is_object = text[pos] == "{"
    pos = _skip_ws(text, pos + 1)
    index = 0
    while pos <= offset and text[pos] not in "]}":
        key: str | int = index
        if is_object:
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            if text[pos] != ":":
                return None
            pos = _skip_ws(text, pos + 1)
            if offset < pos:
                return str(key), -1
        try:
            _, end = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError):
            return key, pos  # the text stops parsing in this value: it is the one to name
        if offset < end:
            return key, pos
        pos = _skip_ws(text, end)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        index += 1
    return None


def _skip_ws(text: str, pos: int) -> int:
    """The first position at or after ``pos`` that is not JSON whitespace."""
    match = _WHITESPACE.match(text, pos)
    return match.end() if match else pos


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
