"""The data path end to end on a real S3-compatible server (rclone on loopback): the prepare step
writes shards to s3://, a re-run skips them, and the loader streams them without downloading."""

from __future__ import annotations

from pathlib import Path

from captioning import storage
from captioning.config import LoaderConfig, load_config
from captioning.data.loader import build_loader
from captioning.data.prepare import prepare_data
from captioning.data.records import read_karpathy
from captioning.data.shard_check import inspect_shards, verify_shards
from captioning.training.dist import DistInfo


def test_prepare_to_s3_then_stream(tmp_path: Path, s3_env: str) -> None:
    location = f"{s3_env}/shards"
    cfg = load_config(
        "demo",
        [
            f"--data.raw_dir={tmp_path / 'raw'}",
            f"--data.shard_dir={location}",
            "--data.synthetic.num_train=48",
            "--data.synthetic.num_val=10",
            "--data.synthetic.num_test=10",
            "--data.shards.samples_per_shard=8",
        ],
    )
    first = prepare_data(cfg, progress=False)
    assert first.manifest.num_built == 6 + 2 + 2
    names = {uri.rsplit("/", 1)[1] for uri in storage.list_files(location, suffix=".tar")}
    assert names == {f"train-{i:06d}.tar" for i in range(6)} | {
        "val-000000.tar",
        "val-000001.tar",
        "test-000000.tar",
        "test-000001.tar",
    }
    assert storage.exists(f"{location}/sizes.json") and storage.exists(f"{location}/manifest.json")
    assert verify_shards(location) == []
    # nothing is left in a local staging folder
    assert not any(p.suffix == ".tar" for p in tmp_path.rglob("*"))

    again = prepare_data(cfg, progress=False)
    assert again.manifest.num_built == 0 and again.manifest.num_skipped == 10

    report = inspect_shards(location, split="test", n=1)
    assert report["splits"]["test"]["num_samples"] == 10

    seen: list[int] = []
    loader = build_loader(
        LoaderConfig(num_workers=2, seq_per_img=2),
        location,
        "train",
        train=True,
        dist=DistInfo(),
        image_size=64,
        seed=0,
        batch_size=4,
    )
    for batch in loader:
        seen.extend(int(i) for i, pad in zip(batch.image_ids, batch.is_pad, strict=True) if not pad)
    train_ids = {r.image_id for r in read_karpathy(first.karpathy_json).split("train")}
    assert len(seen) == 48
    assert set(seen) == train_ids
