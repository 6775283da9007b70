"""Tests for captioning.data.records: bytes that are not UTF-8 or JSON, and image paths (cleaned or refused).

Every error names the file and, where the text allows, the entry; the fixtures are test_records'.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from test_records import coco_data, flickr_data, write

from captioning.data.records import RecordsError, read_karpathy

FLICKR_ENTRY = "images[1] (filename '10002456.jpg', imgid 1)"
COCO_ENTRY = "images[3] (filename 'COCO_val2014_000000318219.jpg', cocoid 318219)"
SAFE_PATHS = (
    "image paths must be relative, '/'-separated names inside the image folder: fix or remove the entry"
)


def _error(path: Path) -> str:
    with pytest.raises(RecordsError) as info:
        read_karpathy(path)
    return str(info.value)


def _flickr_bytes() -> bytes:
    """dataset_flickr30k.json as UTF-8, one key per line, with a 'é' in images[1] sentences[2]."""
    data = flickr_data("flickr30k")
    data["images"][1]["sentences"][2]["raw"] = "A girl in a café ."
    return json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------- encodings


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("café".encode(), b"caf\xe9", f"{FLICKR_ENTRY} sentences[2] field 'raw'"),
        (
            b'"10002456.jpg"',
            b'"1000\xe92456.jpg"',
            "images[1] (filename '1000\\udce92456.jpg', imgid 1) field 'filename'",
        ),
        (b'"flickr30k"', b'"flickr\xe930k"', "top-level field 'dataset'"),
    ],
    ids=["in-caption", "in-filename", "in-dataset-name"],
)
@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["plain", "bom"])
def test_non_utf8_byte_names_offset_line_and_entry(
    tmp_path: Path, old: bytes, new: bytes, where: str, bom: bytes
) -> None:
    raw = bom + _flickr_bytes().replace(old, new)
    offset = raw.index(b"\xe9")
    line = raw[:offset].count(b"\n") + 1
    path = tmp_path / "dataset_flickr30k.json"
    path.write_bytes(raw)
    assert _error(path) == (
        f"{path}: not valid UTF-8: byte 0xe9 at byte offset {offset} (line {line}), in {where}; "
        "re-save the file as UTF-8"
    )


def test_non_utf8_byte_in_a_file_that_does_not_parse_still_names_the_entry(tmp_path: Path) -> None:
    raw = _flickr_bytes().replace("café".encode(), b"caf\xe9")[:-40]  # also cut short
    path = tmp_path / "dataset_flickr30k.json"
    path.write_bytes(raw)
    # No filename or id: the file does not parse as a whole, but the walk reaches the entry.
    assert ", in images[1] sentences[2] field 'raw'; re-save the file as UTF-8" in _error(path)


def test_utf16_file_is_named_at_offset_zero(tmp_path: Path) -> None:
    path = tmp_path / "dataset_flickr30k.json"
    path.write_bytes(json.dumps(flickr_data("flickr30k")).encode("utf-16"))
    assert _error(path) == (
        f"{path}: not valid UTF-8: byte 0xff at byte offset 0 (line 1); re-save the file as UTF-8"
    )


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "dataset_flickr30k.json"
    path.write_bytes(b"\xef\xbb\xbf" + _flickr_bytes())
    dataset = read_karpathy(path)
    assert dataset.records[1].captions[2].raw == "A girl in a café ."


def test_empty_file_is_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "dataset_coco.json"
    path.write_bytes(b"")
    assert _error(path) == f"{path}: invalid JSON at line 1, column 1: Expecting value"


def test_integer_over_the_digit_limit_names_the_entry(tmp_path: Path) -> None:
    digits = sys.get_int_max_str_digits()
    raw = _flickr_bytes().replace(b'"sentid": 6', b'"sentid": ' + b"9" * (digits + 1))
    path = tmp_path / "dataset_flickr30k.json"
    path.write_bytes(raw)
    line = raw[: raw.index(b"9" * digits)].count(b"\n") + 1
    assert _error(path) == (
        f"{path}: invalid JSON: an integer of more than {digits} digits at line {line}, "
        "in images[1] sentences[1] field 'sentid'"
    )


def test_nesting_too_deep_is_named(tmp_path: Path) -> None:
    path = tmp_path / "dataset_coco.json"
    path.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}", encoding="utf-8")
    assert _error(path) == f"{path}: invalid JSON: arrays or objects nested too deeply"


# ---------------------------------------------------------------- image paths


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("filepath", "..", "has a '..' segment"),
        ("filepath", "val2014/../../etc", "has a '..' segment"),
        ("filename", "../secret.jpg", "has a '..' segment"),
        ("filename", "..\\secret.jpg", "has a '..' segment"),
        ("filepath", "/etc", "is absolute"),
        ("filename", "/etc/passwd", "is absolute"),
        ("filename", "\\server\\share.jpg", "is absolute"),
        ("filepath", "C:/images", "starts with a drive letter"),
        ("filename", "c:secret.jpg", "starts with a drive letter"),
        ("filename", "./c:secret.jpg", "starts with a drive letter"),
        ("filepath", ".//\\server", "is absolute"),
        ("filepath", "./../images", "has a '..' segment"),
        ("filename", "a\0.jpg", "contains a NUL character"),
    ],
    ids=[
        "dotdot-filepath",
        "dotdot-inside-filepath",
        "dotdot-filename",
        "dotdot-backslash",
        "absolute-filepath",
        "absolute-filename",
        "absolute-backslash",
        "drive-filepath",
        "drive-relative-filename",
        "drive-after-dot",
        "absolute-after-dot",
        "dotdot-after-dot",
        "nul",
    ],
)
def test_unsafe_image_path_is_refused_naming_the_entry(
    tmp_path: Path, key: str, value: str, problem: str
) -> None:
    data = coco_data()
    data["images"][3][key] = value
    path = write(tmp_path, "dataset_coco.json", data)
    entry = COCO_ENTRY if key == "filepath" else f"images[3] (filename {value!r}, cocoid 318219)"
    assert (
        _error(path) == f"{path}: {entry}: unsafe image path: field {key!r} {value!r} {problem}; {SAFE_PATHS}"
    )


@pytest.mark.parametrize(
    ("filepath", "filename", "expected"),
    [
        ("val2014/", "a.jpg", "val2014/a.jpg"),
        ("images/", "a.jpg", "images/a.jpg"),
        ("val2014", "a//b.jpg", "val2014/a/b.jpg"),
        ("val2014", "./a.jpg", "val2014/a.jpg"),
        ("val2014", "sub/", "val2014/sub"),
        ("./val2014/./sub//", "./a.jpg", "val2014/sub/a.jpg"),
        (".", "a.jpg", "a.jpg"),
        ("./", "sub//a.jpg", "sub/a.jpg"),
    ],
    ids=[
        "trailing-slash",
        "folder-with-slash",
        "empty-segment",
        "dot-segment",
        "filename-trailing-slash",
        "all-at-once",
        "dot-filepath",
        "dot-slash-filepath",
    ],
)
def test_harmless_path_forms_are_normalised(
    tmp_path: Path, filepath: str, filename: str, expected: str
) -> None:
    # A folder read always ignored empty and '.' segments (pathlib drops them); hand-written
    # dataset=local files use them, so they are cleaned, not refused.
    data: dict[str, Any] = coco_data()
    data["images"][3].update(filepath=filepath, filename=filename)
    dataset = read_karpathy(write(tmp_path, "dataset_coco.json", data))
    assert dataset.records[3].path == expected


@pytest.mark.parametrize("filename", [".", "./", ".//."], ids=["dot", "dot-slash", "dots"])
def test_filename_naming_no_file_is_refused(tmp_path: Path, filename: str) -> None:
    data = coco_data()
    data["images"][3]["filename"] = filename
    path = write(tmp_path, "dataset_coco.json", data)
    assert _error(path) == (
        f"{path}: images[3] (filename {filename!r}, cocoid 318219): field 'filename' {filename!r} "
        "names no file (only empty or '.' segments); give the image's file name: fix or remove the entry"
    )


@pytest.mark.parametrize(
    ("filepath", "filename", "expected"),
    [
        ("val2014", "..a.jpg", "val2014/..a.jpg"),
        ("val2014", "a...jpg", "val2014/a...jpg"),
        ("val2014/sub", "a.jpg", "val2014/sub/a.jpg"),
        ("", "sub/a.jpg", "sub/a.jpg"),
        ("val2014", "a\\b.jpg", "val2014/a\\b.jpg"),  # a backslash that escapes nothing is a name
        ("val2014", "ab:c.jpg", "val2014/ab:c.jpg"),  # a colon past the first letter is no drive
    ],
    ids=["dotdot-prefix", "dots-inside", "nested-filepath", "empty-filepath", "inner-backslash", "colon"],
)
def test_unusual_but_safe_image_paths_are_kept(
    tmp_path: Path, filepath: str, filename: str, expected: str
) -> None:
    data: dict[str, Any] = coco_data()
    data["images"][3].update(filepath=filepath, filename=filename)
    dataset = read_karpathy(write(tmp_path, "dataset_coco.json", data))
    assert dataset.records[3].path == expected
