"""captioning.data.prepare: the one shard build key (the command line's and the flow's), the up-to-date
check, and what a prepare run reports, checked against real (tiny) shard builds."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from captioning import storage
from captioning.cli import main as cli_main
from captioning.config import Config, apply_overrides, load_config
from captioning.data import prepare
from captioning.data.datasets import RawDataset
from captioning.data.format import ShardManifest
from captioning.data.records import KarpathyDataset
from captioning.data.vocab import Vocab

# --- shards: build key and up-to-date check on a real tiny build ------------------------------------


@dataclass(frozen=True)
class Small:
    """A tiny synthetic dataset fetched once for the module: raw files, records and vocabulary."""

    root: Path
    cfg: Config
    raw: RawDataset
    dataset: KarpathyDataset
    vocab: Vocab


def small_overrides(root: Path) -> list[str]:
    return [
        f"--data.raw_dir={root / 'raw'}",
        f"--data.shard_dir={root / 'shards'}",
        "--data.synthetic.num_train=20",
        "--data.synthetic.num_val=5",
        "--data.synthetic.num_test=5",
        "--data.synthetic.image_size=32",
        "--data.shards.image_size=32",
        "--data.shards.samples_per_shard=8",
        "--data.shards.num_procs=1",
    ]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Small:
    root = tmp_path_factory.mktemp("small")
    cfg = load_config("demo", small_overrides(root))
    raw = prepare.fetch(cfg, progress=False)
    dataset = prepare.build_records(raw.karpathy_json, cfg)
    vocab, _ = prepare.build_vocabulary(dataset, cfg)
    return Small(root, cfg, raw, dataset, vocab)


def build(small: Small, shard_dir: str, key: str) -> ShardManifest:
    """The prepare-data flow's build: plan with a build key, write one group, finish."""
    cfg = apply_overrides(small.cfg, {"data.shard_dir": shard_dir})
    plan = prepare.plan_shards_for(list(small.dataset.records), small.vocab, small.raw, cfg, key=key)
    result = prepare.write_shard_group_for(plan.jobs, cfg, progress=False)
    return prepare.finish_shards(plan, small.vocab, [result])


def key_of(small: Small, *changes: str) -> str:
    """The build key of the small dataset with some settings replaced."""
    keys = {c.split("=", 1)[0] for c in changes}
    kept = [o for o in small_overrides(small.root) if o.split("=", 1)[0] not in keys]
    cfg = load_config("demo", [*kept, *changes])
    return prepare.build_key(cfg, small.raw.karpathy_json, small.vocab)


def test_build_key_is_stable_and_ignores_other_settings(small: Small) -> None:
    key = prepare.build_key(small.cfg, small.raw.karpathy_json, small.vocab)
    assert key_of(small) == key
    assert (
        key_of(small, "--data.loader.batch_size=4", "--data.shards.num_procs=2", "--train.xe.epochs=1") == key
    )


@pytest.mark.parametrize(
    "change",
    [
        "--data.shards.image_size=48",
        "--data.shards.jpeg_quality=80",
        "--data.shards.samples_per_shard=4",
        "--data.max_caption_len=8",
        "--data.synthetic.seed=1",
    ],
)
def test_build_key_changes_with_a_shard_setting(small: Small, change: str) -> None:
    assert key_of(small, change) != key_of(small)


def test_build_key_changes_with_the_split_file_and_the_vocabulary(small: Small, tmp_path: Path) -> None:
    key = key_of(small)
    edited = tmp_path / "dataset_coco.json"
    edited.write_bytes(small.raw.karpathy_json.read_bytes() + b"\n")  # the same records, other bytes
    assert prepare.build_key(small.cfg, edited, small.vocab) != key
    richer, _ = prepare.build_vocabulary(
        small.dataset, apply_overrides(small.cfg, {"data.min_word_freq": "1"})
    )
    assert richer.to_json() != small.vocab.to_json()
    assert prepare.build_key(small.cfg, small.raw.karpathy_json, richer) != key


def test_up_to_date_manifest(small: Small, tmp_path: Path) -> None:
    shard_dir = str(tmp_path / "shards")
    key = key_of(small)
    build(small, shard_dir, key)
    manifest = prepare.up_to_date_manifest(shard_dir, key)
    assert manifest is not None and manifest["config_hash"] == key
    assert manifest == json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 5  # train 20/8 -> 3, val 1, test 1
    assert prepare.up_to_date_manifest(shard_dir, key_of(small, "--data.shards.jpeg_quality=80")) is None
    assert prepare.up_to_date_manifest(str(tmp_path / "nothing-here"), key) is None


def other_stats_sha256(stats_file: Path) -> None:
    """What a rebuild killed after writing a shard (same size, new bytes) but before its manifest leaves."""
    stats = json.loads(stats_file.read_text())
    stats["sha256"] = "0" * 64
    stats_file.write_text(json.dumps(stats))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 512)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "train-000001.tar").unlink(),
        lambda d: truncate(d / "test-000000.tar"),
        lambda d: (d / "train-000002.stats.json").unlink(),
        lambda d: (d / "manifest.json").unlink(),
        lambda d: (d / "manifest.json").write_text("{not json"),
        lambda d: other_stats_sha256(d / "train-000000.stats.json"),
    ],
    ids=[
        "tar-deleted",
        "tar-truncated",
        "stats-deleted",
        "manifest-deleted",
        "manifest-garbled",
        "rebuilt-after-the-manifest",
    ],
)
def test_up_to_date_manifest_notices_damage(small: Small, tmp_path: Path, damage: Any) -> None:
    shard_dir = tmp_path / "shards"
    key = key_of(small)
    build(small, str(shard_dir), key)
    assert prepare.up_to_date_manifest(str(shard_dir), key) is not None
    damage(shard_dir)
    assert prepare.up_to_date_manifest(str(shard_dir), key) is None


def test_up_to_date_manifest_on_s3(small: Small, s3_env: str) -> None:
    shard_dir = storage.join(s3_env, "shards")
    key = key_of(small)
    build(small, shard_dir, key)
    assert prepare.up_to_date_manifest(shard_dir, key) is not None
    storage.remove(storage.join(shard_dir, "val-000000.tar"))
    assert prepare.up_to_date_manifest(shard_dir, key) is None


def rebuilt_summary(manifest: ShardManifest) -> dict[str, Any]:
    """The prepare-data flow's summary of a build it ran."""
    return prepare.manifest_summary(
        manifest.out, manifest.to_json(), num_built=manifest.num_built, num_skipped=manifest.num_skipped
    )


def test_manifest_summary_and_data_report(small: Small, tmp_path: Path) -> None:
    shard_dir = str(tmp_path / "shards")
    key = key_of(small)
    summary = rebuilt_summary(build(small, shard_dir, key))
    assert summary == {
        "shard_dir": shard_dir,
        "build_key": key,
        "rebuilt": True,
        "num_built": 5,
        "num_skipped": 0,
        "samples": {"train": 20, "val": 5, "test": 5},
        "skipped_images": {"train": {}, "val": {}, "test": {}},
    }
    report = prepare.data_report(summary)
    assert report.splitlines()[0] == f"Shards in `{shard_dir}`: 5 built, 0 kept"
    assert "| train | 20 | none |" in report.splitlines()

    # Kept: what check-shards found up to date is manifest.json, which records no build's counts.
    manifest = prepare.up_to_date_manifest(shard_dir, key)
    assert manifest is not None
    kept = prepare.manifest_summary(shard_dir, manifest)
    assert kept == {**summary, "rebuilt": False, "num_built": 0, "num_skipped": 5}
    assert prepare.data_report(kept).splitlines()[0] == f"Shards in `{shard_dir}`: up to date"

    # A second build finds every shard complete.
    again = rebuilt_summary(build(small, shard_dir, key))
    assert (again["rebuilt"], again["num_built"], again["num_skipped"]) == (True, 0, 5)
    assert prepare.data_report(again).splitlines()[0] == f"Shards in `{shard_dir}`: 0 built, 5 kept"


def test_data_report_lists_skipped_images() -> None:
    summary = {
        "shard_dir": "s3://b/shards",
        "rebuilt": True,
        "num_built": 2,
        "num_skipped": 1,
        "samples": {"train": 18, "val": 5},
        "skipped_images": {"train": {"missing": 2, "decode_error": 1}},
    }
    assert prepare.data_report(summary).splitlines() == [
        "Shards in `s3://b/shards`: 2 built, 1 kept",
        "",
        "| split | samples | skipped images |",
        "|---|---|---|",
        "| train | 18 | missing: 2, decode_error: 1 |",
        "| val | 5 | none |",
    ]


def test_a_copied_shard_folder_is_up_to_date_where_it_lies(small: Small, tmp_path: Path) -> None:
    """The manifest names shards relative to its folder: a moved build is still complete."""
    key = key_of(small)
    build(small, str(tmp_path / "a"), key)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    assert prepare.up_to_date_manifest(str(tmp_path / "b"), key) is not None


# --- one key: `captioning shards` and the prepare-data flow's steps agree ---------------------------


def file_times(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_shards_built_by_the_cli_are_up_to_date_for_the_flow(small: Small, tmp_path: Path) -> None:
    from tasks import data as data_tasks

    dirs = [f"--data.raw_dir={small.root / 'raw'}", f"--data.shard_dir={tmp_path / 'shards'}"]
    argv = ["shards", "--recipe", "demo", *small_overrides(small.root)[2:], *dirs, "--no-progress"]
    assert cli_main(argv) == 0
    cfg = apply_overrides(small.cfg, {"data.shard_dir": str(tmp_path / "shards")})
    key, manifest = data_tasks.check_shards.fn(cfg, small.raw, small.vocab)  # the flow's check-shards task
    assert manifest is not None and manifest["config_hash"] == key
    # And the CLI's own re-run does no work: nothing built, no file rewritten.
    before = file_times(tmp_path / "shards")
    result = prepare.prepare_data(cfg, progress=False)
    assert (result.manifest.num_built, result.manifest.num_skipped) == (0, 5)
    assert result.summary["rebuilt"] is False
    assert file_times(tmp_path / "shards") == before


def test_shards_built_by_the_flow_steps_are_up_to_date_for_the_cli(small: Small, tmp_path: Path) -> None:
    from tasks import data as data_tasks

    cfg = apply_overrides(small.cfg, {"data.shard_dir": str(tmp_path / "shards")})
    key, found = data_tasks.check_shards.fn(cfg, small.raw, small.vocab)
    assert found is None
    plan = data_tasks.plan_shards.fn(small.dataset, small.vocab, small.raw, cfg, key)
    groups = [data_tasks.write_shards.fn(jobs, cfg) for jobs in plan.groups(2)]
    data_tasks.finish_shards.fn(plan, small.vocab, groups)
    before = file_times(tmp_path / "shards")
    result = prepare.prepare_data(cfg, progress=False)  # what `captioning shards` runs
    assert (result.manifest.num_built, result.manifest.num_skipped) == (0, 5)
    assert result.manifest.config_hash == key
    assert file_times(tmp_path / "shards") == before


def test_prepare_data_with_a_given_vocabulary_keys_on_it(small: Small, tmp_path: Path) -> None:
    cfg = apply_overrides(small.cfg, {"data.shard_dir": str(tmp_path / "shards")})
    own = prepare.prepare_data(cfg, progress=False)
    richer, _ = prepare.build_vocabulary(small.dataset, apply_overrides(cfg, {"data.min_word_freq": "1"}))
    other = prepare.prepare_data(cfg, progress=False, vocab=richer)  # a checkpoint's vocabulary
    assert other.manifest.config_hash != own.manifest.config_hash
    assert other.manifest.num_built == 5 and other.vocab_size == len(richer)
