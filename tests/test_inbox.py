"""captioning.data.inbox: which landed folders are ready, the check before announcing one, announcing once,
and the overrides that give new data shards of its own."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from captioning.config import load_config
from captioning.data.inbox import (
    ANNOUNCED_FILE,
    READY_FILE,
    check_dataset,
    dataset_label,
    find_ready,
    mark_announced,
    new_data_overrides,
)
from captioning.data.records import RecordsError
from captioning.data.synthetic import SyntheticDataset, generate_synthetic


def land(folder: Path, *, num_train: int = 4, num_val: int = 2, num_test: int = 3) -> SyntheticDataset:
    """A dataset landed in `folder`: a COCO-style split file (dataset_coco.json) and its images."""
    return generate_synthetic(
        folder,
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        image_size=32,
        style="coco",
        make_archives=False,
    )


def make_folder(
    inbox: Path, name: str, *, split_file: str | None = "dataset_x.json", ready: bool = True
) -> Path:
    """An inbox folder with (optionally) a split file and READY, without images (find_ready reads neither)."""
    folder = inbox / name
    folder.mkdir(parents=True)
    if split_file:
        (folder / split_file).write_text('{"images": []}\n')
    if ready:
        (folder / READY_FILE).write_text("")
    return folder


def test_find_ready(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    make_folder(inbox, "c-ready")
    make_folder(inbox, "a-ready", split_file="dataset_coco.json")
    make_folder(inbox, "b-copying", ready=False)  # READY comes last: still being copied
    make_folder(inbox, "d-no-split-file", split_file=None)
    make_folder(inbox, "e-other-json", split_file="captions.json")
    announced = make_folder(inbox, "f-announced")
    (announced / ANNOUNCED_FILE).write_text("{}\n")
    (inbox / "g-a-file").write_text("not a folder")
    (inbox / READY_FILE).write_text("")  # the inbox itself is no dataset
    assert find_ready(inbox) == [
        inbox / "a-ready" / "dataset_coco.json",
        inbox / "c-ready" / "dataset_x.json",
    ]
    assert find_ready(str(inbox)) == find_ready(inbox)


def test_find_ready_takes_the_first_split_file_by_name(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, "drop", split_file="dataset_flickr8k.json")
    (folder / "dataset_coco.json").write_text("{}")
    assert find_ready(tmp_path) == [folder / "dataset_coco.json"]


def test_find_ready_without_an_inbox(tmp_path: Path) -> None:
    assert find_ready(tmp_path / "missing") == []
    (tmp_path / "a-file").write_text("")
    assert find_ready(tmp_path / "a-file") == []


def test_check_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    landed = land(tmp_path / "drop")
    report = check_dataset(landed.json_path)
    assert report["counts"] == {"train": 4, "val": 2, "test": 3}
    assert report["num_captions"] == 5 * 9  # captions_per_image defaults to 5
    assert report["num_missing_images"] == 0 and report["missing_examples"] == []
    assert report["karpathy_json"] == str(landed.json_path.resolve())
    assert report["image_dir"] == str((tmp_path / "drop").resolve())
    assert len(report["id"]) == 12

    # Stable: the same file gives the same id (and the same report), whatever path names it.
    relative = Path("drop") / landed.json_path.name
    assert check_dataset(landed.json_path) == report
    monkeypatch.chdir(tmp_path)
    assert check_dataset(relative) == report

    # Another split file, another id.
    data = json.loads(landed.json_path.read_text())
    data["images"][0]["sentences"][0]["raw"] += " again"
    landed.json_path.write_text(json.dumps(data))
    assert check_dataset(landed.json_path)["id"] != report["id"]


def test_check_dataset_counts_missing_images(tmp_path: Path) -> None:
    landed = land(tmp_path / "drop")
    entry = json.loads(landed.json_path.read_text())["images"][1]
    relative = f"{entry['filepath']}/{entry['filename']}"
    (tmp_path / "drop" / relative).unlink()
    report = check_dataset(landed.json_path)
    assert report["num_missing_images"] == 1 and report["missing_examples"] == [relative]
    assert report["counts"] == {"train": 4, "val": 2, "test": 3}  # still counted: the writer skips it


def test_check_dataset_with_images_elsewhere(tmp_path: Path) -> None:
    landed = land(tmp_path / "images")
    split_file = tmp_path / "meta" / "dataset_coco.json"
    split_file.parent.mkdir()
    split_file.write_bytes(landed.json_path.read_bytes())
    assert check_dataset(split_file)["num_missing_images"] == 9  # not next to the split file
    report = check_dataset(split_file, image_dir=str(tmp_path / "images"))
    assert report["num_missing_images"] == 0 and report["image_dir"] == str((tmp_path / "images").resolve())


def test_check_dataset_rejects_a_malformed_split_file(tmp_path: Path) -> None:
    landed = land(tmp_path / "drop")
    data = json.loads(landed.json_path.read_text())
    del data["images"][2]["split"]
    landed.json_path.write_text(json.dumps(data))
    with pytest.raises(RecordsError):
        check_dataset(landed.json_path)
    landed.json_path.write_text("{not json")
    with pytest.raises(RecordsError):
        check_dataset(landed.json_path)
    with pytest.raises(FileNotFoundError):
        check_dataset(tmp_path / "drop" / "dataset_missing.json")


def test_mark_announced(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    landed = land(inbox / "drop-1", num_train=2, num_val=1, num_test=1)
    (inbox / "drop-1" / READY_FILE).write_text("")
    make_folder(inbox, "drop-2")
    [first, second] = find_ready(inbox)
    assert first == landed.json_path
    report = check_dataset(first)
    marker = mark_announced(first, report)
    assert marker == (inbox / "drop-1" / ANNOUNCED_FILE).resolve()
    saved = json.loads(marker.read_text())
    assert {k: saved[k] for k in report} == report and saved["announced_at"] > 0
    assert not list((inbox / "drop-1").glob("*.tmp"))
    assert find_ready(inbox) == [second]


# --- new data gets shards of its own ------------------------------------------------------------------


def test_new_data_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    split_file = tmp_path / "drop-1" / "dataset_coco.json"
    split_file.parent.mkdir()
    split_file.write_text('{"images": []}\n')
    cfg = load_config("demo")
    user = [
        "train.xe.epochs=1",
        "--data.dataset=synthetic",
        "data.shard_dir=/old/shards",
        "--data.local.image_dir=/elsewhere",
        "data.local.karpathy_json=/old.json",
        "--data.loader.batch_size=4",
    ]
    got = new_data_overrides(cfg, str(split_file), None, user)
    drop_id = hashlib.sha256(split_file.read_bytes()).hexdigest()[:12]
    assert got == [
        "--train.xe.epochs=1",
        "--data.loader.batch_size=4",
        "--data.dataset=local",
        f"--data.local.karpathy_json={split_file}",
        f"--data.local.image_dir={split_file.parent}",
        f"--data.shard_dir=demo-data/shards-new/{drop_id}",
        "--data.extra_shard_dirs=demo-data/shards",  # data.retrain_on=all: the old training data too
    ]
    # Each key once (an override given twice is a ConfigError), and the result is a valid config.
    loaded = load_config("demo", got)
    assert loaded.data.dataset == "local" and loaded.data.shard_dir == f"demo-data/shards-new/{drop_id}"
    assert loaded.data.local.karpathy_json == str(split_file)
    assert loaded.data.local.image_dir == str(split_file.parent)
    assert loaded.train.xe.epochs == 1 and loaded.data.loader.batch_size == 4
    assert loaded.data.extra_shard_dirs == ("demo-data/shards",)

    # Other bytes, other shards; an image folder given is kept; a relative path becomes absolute.
    split_file.write_text('{"images": [] }\n')
    other = new_data_overrides(cfg, str(split_file), "/images", None)
    assert other[-2] != got[-2] and other[-2].startswith("--data.shard_dir=demo-data/shards-new/")
    assert "--data.local.image_dir=/images" in other
    monkeypatch.chdir(tmp_path)
    relative = new_data_overrides(cfg, "drop-1/dataset_coco.json", None, None)
    assert f"--data.local.karpathy_json={split_file}" in relative


def test_new_data_overrides_read_the_old_training_shards_unless_new_only(tmp_path: Path) -> None:
    split_file = tmp_path / "2026-11" / "dataset_coco.json"
    split_file.parent.mkdir()
    split_file.write_text('{"images": []}\n')
    cfg = load_config("demo", ["--data.shard_dir=/data/shards", "--data.extra_shard_dirs=/data/older"])
    user = ["--data.extra_shard_dirs=/elsewhere"]  # replaced: the retrain decides what training reads
    every = load_config("demo", new_data_overrides(cfg, str(split_file), None, user))
    assert every.data.extra_shard_dirs == ("/data/shards", "/data/older")
    assert every.data.shard_dir.startswith("/data/shards-new/")
    new_only = load_config("demo", ["--data.retrain_on=new"])
    alone = load_config("demo", new_data_overrides(new_only, str(split_file), None, user))
    assert alone.data.extra_shard_dirs == () and alone.data.shard_dir.startswith("demo-data/shards-new/")
    assert dataset_label(split_file) == "2026-11"


def test_new_data_overrides_need_the_split_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no split file"):
        new_data_overrides(load_config("demo"), str(tmp_path / "dataset.json"), None, None)
