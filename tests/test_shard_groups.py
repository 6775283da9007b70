"""The shard build in three steps (plan, groups of shards written separately, finish) equals write_shards."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from captioning.data.format import ShardManifest
from captioning.data.records import ImageRecord, read_karpathy
from captioning.data.shard_build import (
    ShardError,
    ShardGroupResult,
    ShardPlan,
    finish_shard_build,
    plan_shard_build,
    write_shard_group,
    write_shards,
)
from captioning.data.sources import DirSource
from captioning.data.synthetic import generate_synthetic
from captioning.data.vocab import Vocab, build_vocab

# 20 train, 6 val, 6 test images in shards of 4: 5 + 2 + 2 = 9 jobs, 3 groups of 3.
PLAN: dict[str, Any] = dict(
    image_size=32,
    resize_mode="squash",
    jpeg_quality=90,
    samples_per_shard=4,
    max_image_pixels=178_956_970,
    max_caption_len=30,
    overlong="drop",
)
RUN: dict[str, Any] = dict(
    num_procs=1, executor="process", dask_address=None, progress=False
)  # in this process
NUM_JOBS = 9
OUTPUTS = ("sizes.json", "references.json", "vocab.json", "manifest.json")


@dataclass(frozen=True)
class Data:
    root: Path
    records: list[ImageRecord]
    vocab: Vocab

    @property
    def source(self) -> DirSource:
        return DirSource(self.root)


@dataclass(frozen=True)
class Grouped:
    out: Path
    plan: ShardPlan
    results: list[ShardGroupResult]
    manifest: ShardManifest


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    root = tmp_path_factory.mktemp("raw")
    synth = generate_synthetic(root, num_train=20, num_val=6, num_test=6, image_size=32, make_archives=False)
    records = list(read_karpathy(synth.json_path).records)
    return Data(root, records, build_vocab([r for r in records if r.split == "train"], min_word_freq=2))


@pytest.fixture(scope="module")
def reference(data: Data, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ShardManifest]:
    out = tmp_path_factory.mktemp("reference")
    manifest = write_shards(data.records, data.vocab, data.source, str(out), **RUN, **PLAN)
    return out, manifest


@pytest.fixture(scope="module")
def grouped(data: Data, tmp_path_factory: pytest.TempPathFactory) -> Grouped:
    out = tmp_path_factory.mktemp("grouped")
    plan = plan_shard_build(data.records, data.vocab, data.source, str(out), **PLAN)
    groups = plan.groups(3)
    # Each group as a separate call, last group first: order must not matter.
    results = [write_shard_group(group, **RUN) for group in reversed(groups)][::-1]
    return Grouped(out, plan, results, finish_shard_build(plan, data.vocab, results))


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_groups_written_separately_give_the_same_build_as_write_shards(
    grouped: Grouped, reference: tuple[Path, ShardManifest]
) -> None:
    ref_out, ref_manifest = reference
    assert len(_tars(grouped.out)) == NUM_JOBS
    assert _tars(grouped.out) == _tars(ref_out)
    for name in OUTPUTS:  # manifest.json holds neither timings nor num_built: identical bytes
        assert (grouped.out / name).read_bytes() == (ref_out / name).read_bytes(), name
    manifest = grouped.manifest
    assert manifest.to_json() == ref_manifest.to_json()
    assert (manifest.splits, manifest.sizes, manifest.shards) == (
        ref_manifest.splits,
        ref_manifest.sizes,
        ref_manifest.shards,
    )
    assert [r.num_built for r in grouped.results] == [3, 3, 3]
    assert (manifest.num_built, manifest.num_skipped) == (NUM_JOBS, 0)
    assert list(manifest.stats) == [job.name for job in grouped.plan.jobs]
    assert not [p for p in grouped.out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("num_groups", [1, 2, 3, 4, 8, NUM_JOBS, NUM_JOBS + 1, 100])
def test_groups_partition_the_jobs_in_order(grouped: Grouped, num_groups: int) -> None:
    jobs = grouped.plan.jobs
    groups = grouped.plan.groups(num_groups)
    assert len(groups) == min(num_groups, len(jobs))
    assert all(groups) and tuple(job for group in groups for job in group) == jobs
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    assert groups == grouped.plan.groups(num_groups)  # deterministic


def test_groups_reject_a_non_positive_count_and_an_empty_plan_has_none(data: Data, tmp_path: Path) -> None:
    plan = plan_shard_build([], data.vocab, data.source, str(tmp_path), **PLAN)
    assert plan.jobs == () and plan.groups(4) == []
    with pytest.raises(ValueError, match="num_groups"):
        plan.groups(0)


def test_plan_and_results_survive_pickling(grouped: Grouped) -> None:
    """Tasks on other processes or machines receive them pickled."""
    assert pickle.loads(pickle.dumps(grouped.plan)) == grouped.plan
    assert pickle.loads(pickle.dumps(grouped.results)) == grouped.results


def test_a_second_run_of_a_group_skips_every_shard(grouped: Grouped) -> None:
    group = grouped.plan.groups(3)[1]
    before = {p.name: p.stat().st_mtime_ns for p in grouped.out.glob("*.tar")}
    again = write_shard_group(group, **RUN)
    assert (again.num_built, again.num_skipped) == (0, len(group))
    assert again.stats == grouped.results[1].stats
    assert {p.name: p.stat().st_mtime_ns for p in grouped.out.glob("*.tar")} == before


def test_finish_without_a_group_names_its_shards_and_writes_nothing(grouped: Grouped, data: Data) -> None:
    manifest_mtime = (grouped.out / "manifest.json").stat().st_mtime_ns
    missing = [job.name for job in grouped.plan.groups(3)[1]]
    with pytest.raises(ShardError, match="3 of 9 planned shards have no stats") as error:
        finish_shard_build(grouped.plan, data.vocab, [grouped.results[0], grouped.results[2]])
    assert all(name in str(error.value) for name in missing)
    assert (grouped.out / "manifest.json").stat().st_mtime_ns == manifest_mtime


def test_finish_refuses_results_of_another_plan(grouped: Grouped, data: Data) -> None:
    first = grouped.results[0]
    name = next(iter(first.stats))
    other = {**first.stats, name: dataclasses.replace(first.stats[name], job_hash="0" * 64)}
    with pytest.raises(ShardError, match=f"not part of this plan.*{name}"):
        finish_shard_build(
            grouped.plan, data.vocab, [dataclasses.replace(first, stats=other), *grouped.results[1:]]
        )


class _FlakySource:
    """Raises an I/O error (not FileNotFoundError) for one path: that shard fails, the others finish."""

    def __init__(self, root: Path, bad_path: str) -> None:
        self.inner = DirSource(root)
        self.bad_path = bad_path

    def read(self, rel_path: str) -> bytes:
        if rel_path == self.bad_path:
            raise PermissionError(f"cannot read {rel_path}")
        return self.inner.read(rel_path)


def test_a_failing_shard_fails_its_group_only(data: Data, tmp_path: Path) -> None:
    train = [r for r in data.records if r.split == "train"]
    flaky = _FlakySource(data.root, train[4].path)  # in train-000001, of the first group
    plan = plan_shard_build(data.records, data.vocab, flaky, str(tmp_path), **PLAN)
    first, second = plan.groups(2)
    with pytest.raises(
        ShardError, match=r"1 of 5 shards failed.*train-000001\.tar: PermissionError"
    ) as error:
        write_shard_group(first, **RUN)
    assert str(error.value).count(".tar:") == 1
    assert not (tmp_path / "train-000001.tar").exists()
    assert all((tmp_path / job.stats_name).exists() for job in first if job.name != "train-000001")
    result = write_shard_group(second, **RUN)  # the other group is unaffected
    assert (result.num_built, result.num_skipped) == (len(second), 0)
    assert all((tmp_path / job.tar_name).exists() for job in second)
    assert not (tmp_path / "manifest.json").exists()

    # With the source fixed, the failed group resumes: only the failed shard is written.
    plan = plan_shard_build(data.records, data.vocab, data.source, str(tmp_path), **PLAN)
    first, second = plan.groups(2)
    retried = write_shard_group(first, **RUN)
    assert (retried.num_built, retried.num_skipped) == (1, len(first) - 1)
    manifest = finish_shard_build(plan, data.vocab, [retried, result])
    assert (manifest.num_built, manifest.num_skipped) == (1 + len(second), len(first) - 1)
