"""Tests for captioning.data.records: the three real Karpathy variants and every malformed case."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from captioning.data.records import Caption, KarpathyDataset, RecordsError, read_karpathy


def _sentence(raw: str, imgid: int, sentid: int) -> dict[str, Any]:
    """A sentence object as in Karpathy's files: lower-cased tokens without punctuation."""
    tokens = raw.lower().replace(".", "").split()
    return {"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentid}


def _coco_image(imgid: int, cocoid: int, split: str, filepath: str) -> dict[str, Any]:
    sentids = [cocoid * 10 + k for k in range(2)]
    return {
        "filepath": filepath,
        "sentids": sentids,
        "filename": f"COCO_{filepath}_{cocoid:012d}.jpg",
        "imgid": imgid,
        "split": split,
        "sentences": [
            _sentence("A man with a red helmet on a small moped on a dirt road. ", imgid, sentids[0]),
            _sentence("Man riding a motor bike on a dirt road on the countryside.", imgid, sentids[1]),
        ],
        "cocoid": cocoid,
    }


def _flickr_image(imgid: int, filename: str, split: str) -> dict[str, Any]:
    sentids = [imgid * 5 + k for k in range(3)]
    return {
        "sentids": sentids,
        "imgid": imgid,
        "sentences": [
            _sentence("A child in a pink dress is climbing up a set of stairs .", imgid, sentids[0]),
            _sentence("A girl going into a wooden building .", imgid, sentids[1]),
            _sentence("A little girl climbing into a wooden playhouse .", imgid, sentids[2]),
        ],
        "split": split,
        "filename": filename,
    }


def coco_data() -> dict[str, Any]:
    """A tiny dataset_coco.json: train, restval, val and test images, with filepath and cocoid."""
    return {
        "images": [
            _coco_image(0, 391895, "test", "val2014"),
            _coco_image(1, 522418, "restval", "val2014"),
            _coco_image(2, 184613, "train", "train2014"),
            _coco_image(3, 318219, "val", "val2014"),
            _coco_image(4, 554625, "restval", "val2014"),
            _coco_image(5, 397133, "train", "train2014"),
        ],
        "dataset": "coco",
    }


def flickr_data(name: str) -> dict[str, Any]:
    """A tiny dataset_flickr8k.json / dataset_flickr30k.json: no filepath, no cocoid."""
    if name == "flickr8k":
        files = ["2513260012_03d33305cf.jpg", "2903617548_d3e38d7f88.jpg", "3338291921_fe7ae0c8f8.jpg"]
    else:
        files = ["1000092795.jpg", "10002456.jpg", "1000268201.jpg"]
    return {
        "images": [
            _flickr_image(i, f, s)
            for i, (f, s) in enumerate(zip(files, ["train", "val", "test"], strict=True))
        ],
        "dataset": name,
    }


def write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the three real variants


def test_coco_parses_ids_paths_and_splits(tmp_path: Path) -> None:
    dataset = read_karpathy(write(tmp_path, "dataset_coco.json", coco_data()))
    assert isinstance(dataset, KarpathyDataset)
    assert dataset.name == "coco"
    assert dataset.num_restval_skipped == 0
    first = dataset.records[0]
    assert first.image_id == 391895  # cocoid, not imgid
    assert first.path == "val2014/COCO_val2014_000000391895.jpg"
    assert (first.split, first.source_split) == ("test", "test")
    assert first.captions[0] == Caption(
        raw="A man with a red helmet on a small moped on a dirt road. ",
        tokens=(
            "a",
            "man",
            "with",
            "a",
            "red",
            "helmet",
            "on",
            "a",
            "small",
            "moped",
            "on",
            "a",
            "dirt",
            "road",
        ),
        sent_id=3918950,
    )
    assert [r.image_id for r in dataset.records] == [391895, 522418, 184613, 318219, 554625, 397133]
    groups = dataset.by_split()
    assert [r.image_id for r in groups["train"]] == [522418, 184613, 554625, 397133]  # file order
    assert [r.image_id for r in groups["val"]] == [318219]
    assert [r.image_id for r in groups["test"]] == [391895]
    assert dataset.split("train") == groups["train"]


@pytest.mark.parametrize("name", ["flickr8k", "flickr30k"])
def test_flickr_parses_without_filepath_or_cocoid(tmp_path: Path, name: str) -> None:
    data = flickr_data(name)
    dataset = read_karpathy(write(tmp_path, f"dataset_{name}.json", data))
    assert dataset.name == name
    assert [r.image_id for r in dataset.records] == [0, 1, 2]  # imgid
    assert [r.path for r in dataset.records] == [image["filename"] for image in data["images"]]
    assert [r.split for r in dataset.records] == ["train", "val", "test"]
    assert all(len(r.captions) == 3 for r in dataset.records)
    assert dataset.records[1].captions[1].tokens == ("a", "girl", "going", "into", "a", "wooden", "building")


def test_name_is_derived_from_file_name_without_dataset_field(tmp_path: Path) -> None:
    data = flickr_data("flickr8k")
    del data["dataset"]
    assert read_karpathy(write(tmp_path, "dataset_flickr8k.json", data)).name == "flickr8k"


def test_by_split_always_has_three_keys(tmp_path: Path) -> None:
    data = flickr_data("flickr8k")
    data["images"] = data["images"][:1]
    groups = read_karpathy(write(tmp_path, "dataset_flickr8k.json", data)).by_split()
    assert list(groups) == ["train", "val", "test"]
    assert groups["val"] == groups["test"] == []


def test_split_rejects_unknown_name(tmp_path: Path) -> None:
    dataset = read_karpathy(write(tmp_path, "dataset_coco.json", coco_data()))
    with pytest.raises(ValueError, match="restval"):
        dataset.split("restval")


# ---------------------------------------------------------------- restval mapping


@pytest.mark.parametrize("target", ["train", "val", "test"])
def test_restval_goes_where_asked(tmp_path: Path, target: str) -> None:
    dataset = read_karpathy(write(tmp_path, "dataset_coco.json", coco_data()), restval_split=target)
    restval = [r for r in dataset.records if r.source_split == "restval"]
    assert [r.image_id for r in restval] == [522418, 554625]
    assert all(r.split == target for r in restval)
    assert dataset.num_restval_skipped == 0
    assert len(dataset.records) == 6


def test_restval_none_skips_and_counts(tmp_path: Path) -> None:
    dataset = read_karpathy(write(tmp_path, "dataset_coco.json", coco_data()), restval_split=None)
    assert dataset.num_restval_skipped == 2
    assert [r.image_id for r in dataset.records] == [391895, 184613, 318219, 397133]
    assert all(r.source_split != "restval" for r in dataset.records)


@pytest.mark.parametrize("bad", ["restval", "Train", "", "dev"])
def test_invalid_restval_split_argument(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path, "dataset_coco.json", coco_data())
    with pytest.raises(RecordsError, match=r"invalid restval_split .*'train', 'val', 'test' or None"):
        read_karpathy(path, restval_split=bad)


# ---------------------------------------------------------------- malformed input


def test_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset_coco\.json"):
        read_karpathy(tmp_path / "dataset_coco.json")


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "dataset_coco.json"
    path.write_text('{"images": [\n  {"filename": "a.jpg",,}\n]}', encoding="utf-8")
    with pytest.raises(RecordsError, match=r"dataset_coco\.json: invalid JSON at line 2, column 24"):
        read_karpathy(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "top level must be an object, got array"),
        ({"dataset": "coco"}, "missing top-level field 'images'"),
        ({"images": {"0": {}}}, "top-level field 'images' must be a list, got object"),
        ({"images": [], "dataset": 3}, "top-level field 'dataset' must be a non-empty string, got 3"),
    ],
    ids=["not-object", "no-images", "images-not-list", "dataset-not-string"],
)
def test_malformed_top_level(tmp_path: Path, data: Any, message: str) -> None:
    path = write(tmp_path, "dataset_coco.json", data)
    with pytest.raises(RecordsError) as info:
        read_karpathy(path)
    assert str(info.value) == f"{path}: {message}"


def _del(key: str) -> Any:
    return lambda image: image.pop(key)


def _set(key: str, value: Any) -> Any:
    return lambda image: image.__setitem__(key, value)


def _set_sentence(index: int, key: str, value: Any) -> Any:
    return lambda image: image["sentences"][index].__setitem__(key, value)


COCO_ENTRY = "images[3] (filename 'COCO_val2014_000000318219.jpg', cocoid 318219)"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("split", 7), f"{COCO_ENTRY}: field 'split' must be a string, got integer"),
        (
            _set("split", "dev"),
            f"{COCO_ENTRY}: unknown split 'dev'; valid splits: 'train', 'val', 'test', 'restval'",
        ),
        (_del("split"), f"{COCO_ENTRY}: missing field 'split'"),
        (_del("sentences"), f"{COCO_ENTRY}: missing field 'sentences'"),
        (_del("filename"), "images[3] (cocoid 318219): missing field 'filename'"),
        (
            _set("filename", ""),
            "images[3] (cocoid 318219): field 'filename' must be a non-empty string, got ''",
        ),
        (_set("filepath", ["val2014"]), f"{COCO_ENTRY}: field 'filepath' must be a string, got array"),
        (_set("sentences", "a man"), f"{COCO_ENTRY}: field 'sentences' must be a list, got string"),
        (_set("sentences", []), f"{COCO_ENTRY}: field 'sentences' is empty"),
        (
            _set("cocoid", "318219"),
            "images[3] (filename 'COCO_val2014_000000318219.jpg', imgid 3): "
            "field 'cocoid' must be an integer, got '318219'",
        ),
        (
            _set("cocoid", 3.5),
            "images[3] (filename 'COCO_val2014_000000318219.jpg', imgid 3): "
            "field 'cocoid' must be an integer, got 3.5",
        ),
        (
            _set("cocoid", True),
            "images[3] (filename 'COCO_val2014_000000318219.jpg', imgid 3): "
            "field 'cocoid' must be an integer, got True",
        ),
        (
            _set_sentence(1, "tokens", []),
            f"{COCO_ENTRY} sentences[1]: field 'tokens' is empty "
            "(raw 'Man riding a motor bike on a dirt road on the countryside.')",
        ),
        (
            _set_sentence(1, "tokens", "a man"),
            f"{COCO_ENTRY} sentences[1]: field 'tokens' must be a list of strings",
        ),
        (
            _set_sentence(0, "tokens", ["a", 1]),
            f"{COCO_ENTRY} sentences[0]: field 'tokens' must be a list of strings",
        ),
        (_set_sentence(0, "raw", None), f"{COCO_ENTRY} sentences[0]: field 'raw' must be a string, got null"),
        (
            _set_sentence(0, "sentid", "x"),
            f"{COCO_ENTRY} sentences[0]: field 'sentid' must be an integer, got 'x'",
        ),
        (
            lambda image: image["sentences"][1].pop("tokens"),
            f"{COCO_ENTRY} sentences[1]: missing field 'tokens'",
        ),
        (
            lambda image: image["sentences"].__setitem__(1, "a man"),
            f"{COCO_ENTRY} sentences[1]: must be an object, got string",
        ),
    ],
    ids=[
        "split-not-string",
        "unknown-split",
        "missing-split",
        "missing-sentences",
        "missing-filename",
        "empty-filename",
        "filepath-not-string",
        "sentences-not-list",
        "empty-sentences",
        "id-string",
        "id-float",
        "id-bool",
        "empty-tokens",
        "tokens-not-list",
        "tokens-not-strings",
        "raw-not-string",
        "sentid-not-int",
        "missing-tokens",
        "sentence-not-object",
    ],
)
def test_malformed_coco_entry(tmp_path: Path, mutate: Any, message: str) -> None:
    data = coco_data()
    mutate(data["images"][3])
    path = write(tmp_path, "dataset_coco.json", data)
    with pytest.raises(RecordsError) as info:
        read_karpathy(path)
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            _del("imgid"),
            "images[1] (filename '10002456.jpg'): missing image id: neither 'cocoid' nor 'imgid'",
        ),
        (
            _set("imgid", None),
            "images[1] (filename '10002456.jpg'): field 'imgid' must be an integer, got None",
        ),
        (
            _set("imgid", 0),
            "duplicate image id 0: images[0] (filename '1000092795.jpg', imgid 0) "
            "and images[1] (filename '10002456.jpg', imgid 0)",
        ),
    ],
    ids=["missing-id", "id-null", "duplicate-id"],
)
def test_malformed_flickr_entry(tmp_path: Path, mutate: Any, message: str) -> None:
    data = flickr_data("flickr30k")
    mutate(data["images"][1])
    path = write(tmp_path, "dataset_flickr30k.json", data)
    with pytest.raises(RecordsError) as info:
        read_karpathy(path)
    assert str(info.value) == f"{path}: {message}"


def test_image_not_an_object(tmp_path: Path) -> None:
    data = flickr_data("flickr8k")
    data["images"].insert(2, "2513260012_03d33305cf.jpg")
    path = write(tmp_path, "dataset_flickr8k.json", data)
    with pytest.raises(RecordsError) as info:
        read_karpathy(path)
    assert str(info.value) == f"{path}: images[2]: must be an object, got string"


def test_duplicate_cocoid_names_both_entries(tmp_path: Path) -> None:
    data = coco_data()
    data["images"][5]["cocoid"] = 391895
    path = write(tmp_path, "dataset_coco.json", data)
    with pytest.raises(RecordsError) as info:
        read_karpathy(path)
    assert str(info.value) == (
        f"{path}: duplicate image id 391895: "
        "images[0] (filename 'COCO_val2014_000000391895.jpg', cocoid 391895) and "
        "images[5] (filename 'COCO_train2014_000000397133.jpg', cocoid 391895)"
    )


def test_records_are_immutable_and_input_untouched(tmp_path: Path) -> None:
    data = coco_data()
    before = copy.deepcopy(data)
    dataset = read_karpathy(write(tmp_path, "dataset_coco.json", data))
    assert data == before
    with pytest.raises(AttributeError):
        dataset.records[0].split = "train"  # type: ignore[misc]
