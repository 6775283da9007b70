"""Retraining's data: every shard build records an identified holdout, the loader reads the old and
the new training shards as one plan, and the holdout gate's rule (``captioning.evaluation.holdouts``).

The builds are real and tiny: a synthetic "original" dataset and a "landed" one (another seed, in a
folder of its own) sharded with the original's vocabulary, as the retrain flow does.
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from captioning.config import LoaderConfig, load_config
from captioning.data.format import (
    holdout_of,
    read_holdout,
    read_references,
    read_split_sizes,
    read_vocab_words,
    shard_url,
)
from captioning.data.loader import build_loader
from captioning.data.prepare import PrepareResult, prepare_data, up_to_date_manifest
from captioning.data.synthetic import generate_synthetic
from captioning.data.vocab import Vocab
from captioning.evaluation.holdouts import Holdout, HoldoutScores, decide, evaluation_run_name, load_holdout
from captioning.training.dist import DistInfo


def overrides(root: Path, *more: str, shard_dir: Path | None = None) -> list[str]:
    """The tiny build's settings; ``more`` replaces any of them."""
    settings = {
        "data.raw_dir": str(root / "raw"),
        "data.shard_dir": str(shard_dir or root / "shards"),
        "data.synthetic.num_train": "20",
        "data.synthetic.num_val": "4",
        "data.synthetic.num_test": "6",
        "data.synthetic.image_size": "32",
        "data.shards.image_size": "32",
        "data.shards.samples_per_shard": "8",
        "data.shards.num_procs": "1",
    }
    for override in more:
        key, value = override.removeprefix("--").split("=", 1)
        settings[key] = value
    return [f"--{k}={v}" for k, v in settings.items()]


def landed(root: Path, shard_dir: Path, *more: str) -> list[str]:
    """A dataset landed under ``root/inbox/drop`` (another seed), with shards of its own."""
    drop = root / "inbox" / "drop"
    if not drop.exists():
        generate_synthetic(
            drop, num_train=12, num_val=4, num_test=5, image_size=32, seed=7, make_archives=False
        )
    return overrides(
        root,
        "--data.dataset=local",
        f"--data.local.karpathy_json={drop / 'dataset_coco.json'}",
        *more,
        shard_dir=shard_dir,
    )


@dataclass(frozen=True)
class Builds:
    root: Path
    old: PrepareResult
    new: PrepareResult
    vocab: Vocab


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    root = tmp_path_factory.mktemp("retrain-data")
    old = prepare_data(load_config("demo", overrides(root)), progress=False)
    vocab = Vocab.from_json(json.loads((root / "shards" / "vocab.json").read_text()))
    new = prepare_data(load_config("demo", landed(root, root / "shards-new")), progress=False, vocab=vocab)
    return Builds(root, old, new, vocab)


def stored_test_references(shard_dir: str) -> dict[int, list[list[str]]]:
    """The test split's image ids and reference tokens, read straight from the tars."""
    found: dict[int, list[list[str]]] = {}
    for tar_path in sorted(Path(shard_dir).glob("test-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    found[int(meta["image_id"])] = [c["tokens"] for c in meta["captions"]]
    return found


# --- every build records a fixed, identified holdout -------------------------------------------------


def test_every_build_records_its_test_split_as_an_identified_holdout(builds: Builds, tmp_path: Path) -> None:
    for built in (builds.old, builds.new):
        holdout = read_holdout(built.shard_dir)
        stored = stored_test_references(built.shard_dir)
        assert holdout == {"split": "test", "id": holdout_of(stored)["id"], "num_images": len(stored)}
        assert holdout == built.manifest.holdout and len(holdout["id"]) == 64
    assert read_holdout(builds.old.shard_dir)["id"] != read_holdout(builds.new.shard_dir)["id"]

    # The id names the test images and references, not how they were stored: another image size
    # and another vocabulary give other shards with the same holdout.
    other = prepare_data(
        load_config(
            "demo",
            overrides(
                builds.root,
                "--data.shards.image_size=16",
                "--data.min_word_freq=1",
                shard_dir=tmp_path / "other",
            ),
        ),
        progress=False,
    )
    assert other.manifest.vocab_sha256 != builds.old.manifest.vocab_sha256
    assert read_holdout(other.shard_dir) == read_holdout(builds.old.shard_dir)
    # Order does not matter; a changed reference does.
    stored = stored_test_references(builds.old.shard_dir)
    assert holdout_of(dict(reversed(stored.items()))) == holdout_of(stored)
    first = next(iter(stored))
    changed = {**stored, first: [["another", "caption"], *stored[first][1:]]}
    assert holdout_of(changed)["id"] != holdout_of(stored)["id"]


def test_a_build_from_before_holdout_ids_is_finished_again_without_rebuilding_a_shard(
    builds: Builds, tmp_path: Path
) -> None:
    cfg = load_config("demo", overrides(builds.root, shard_dir=tmp_path / "older"))
    first = prepare_data(cfg, progress=False)
    manifest_path = tmp_path / "older" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["holdout"]  # as written before holdout ids
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="predate holdout ids: run their shard build again"):
        read_holdout(str(tmp_path / "older"))
    assert up_to_date_manifest(cfg.data.shard_dir, manifest["config_hash"]) is None

    tars = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "older").glob("*.tar")}
    again = prepare_data(cfg, progress=False)
    assert again.manifest.num_built == 0 and again.manifest.num_skipped == len(tars)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "older").glob("*.tar")} == tars
    assert read_holdout(cfg.data.shard_dir) == first.manifest.holdout
    assert prepare_data(cfg, progress=False).summary["rebuilt"] is False  # up to date from now on


def test_a_holdout_names_its_dataset_split_and_id(builds: Builds) -> None:
    holdout = load_holdout(builds.old.shard_dir, label="synthetic")
    full = read_holdout(builds.old.shard_dir)["id"]
    assert (holdout.split, holdout.id, holdout.num_images) == ("test", full, 6)
    assert holdout.name == f"synthetic-test:{full[:6]}"
    assert evaluation_run_name("3", holdout) == f"v3 on synthetic-test:{full[:6]}"


def test_a_build_without_test_images_has_no_holdout_to_score_on(tmp_path: Path) -> None:
    holdout = {"split": "test", "id": holdout_of({})["id"], "num_images": 0}
    (tmp_path / "manifest.json").write_text(json.dumps({"holdout": holdout}))
    with pytest.raises(
        ValueError, match="hold no test images: the gate scores models on each dataset's test"
    ):
        load_holdout(str(tmp_path), label="drop")


# --- the loader reads the old and the new training shards as one plan --------------------------------


def image_ids(location: str, split: str) -> Counter[int]:
    return Counter(int(k) for k in json.loads(Path(location, "references.json").read_text())["splits"][split])


def test_training_reads_the_old_and_the_new_shards_each_sample_once(builds: Builds) -> None:
    old, new = builds.old.shard_dir, builds.new.shard_dir
    sizes = read_split_sizes(new, "train", extra=[old])
    assert sum(sizes.values()) == 12 + 20
    assert {name for name in sizes if "/" not in name} == set(builds.new.manifest.sizes["train"])
    assert {shard_url(old, name) for name in builds.old.manifest.sizes["train"]} <= set(sizes)
    assert read_split_sizes(new, "train") == builds.new.manifest.sizes["train"]  # one build: as before

    loader = build_loader(
        LoaderConfig(batch_size=4, num_workers=0, shuffle_buffer=8),
        new,
        "train",
        train=True,
        dist=DistInfo(),
        image_size=32,
        seed=0,
        extra_dirs=[old],
    )
    seen: Counter[int] = Counter()
    for batch in loader:
        seen.update(
            int(i) for i, pad in zip(batch.image_ids.tolist(), batch.is_pad.tolist(), strict=True) if not pad
        )
    # Every image of both builds, once (an id both builds hold would come twice).
    assert seen == image_ids(old, "train") + image_ids(new, "train")
    assert len(loader) == 8  # 32 images in batches of 4


def test_builds_with_another_vocabulary_or_clashing_references_are_refused(
    builds: Builds, tmp_path: Path
) -> None:
    other = prepare_data(
        load_config("demo", overrides(builds.root, "--data.min_word_freq=1", shard_dir=tmp_path / "other")),
        progress=False,
    )
    assert read_vocab_words(other.shard_dir) != read_vocab_words(builds.old.shard_dir)
    with pytest.raises(ValueError, match="another vocabulary than those at"):
        read_split_sizes(builds.new.shard_dir, "train", extra=[other.shard_dir])
    with pytest.raises(FileNotFoundError, match="the shard build has not finished"):
        read_split_sizes(builds.new.shard_dir, "train", extra=[str(tmp_path / "none")])
    # One build named twice (itself, or another spelling of one path) would be read twice an epoch.
    for twice in ([builds.new.shard_dir], [builds.old.shard_dir, builds.old.shard_dir.rstrip("/") + "/."]):
        with pytest.raises(ValueError, match="is read twice"):
            read_split_sizes(builds.new.shard_dir, "train", extra=twice)

    # SCST's corpus over several builds: their references merged, one image id with other
    # references in two builds is an error, the same build twice merges to itself.
    both = read_references(builds.new.shard_dir, "train", extra=[builds.old.shard_dir])
    assert set(both) == set(image_ids(builds.old.shard_dir, "train")) | set(
        image_ids(builds.new.shard_dir, "train")
    )
    alone = read_references(builds.old.shard_dir, "train")
    assert read_references(builds.old.shard_dir, "train", extra=[builds.old.shard_dir]) == alone
    for name, captions in (("a", [[4, 5]]), ("b", [[6]])):
        (tmp_path / name).mkdir()
        refs = {"format": "token-ids", "splits": {"train": {"7": captions}}}
        (tmp_path / name / "references.json").write_text(json.dumps(refs))
    with pytest.raises(ValueError, match=r"image id 7 has other train references at .*b than at .*a"):
        read_references(str(tmp_path / "a"), "train", extra=[str(tmp_path / "b")])


# --- the gate's rule ------------------------------------------------------------------------------


ORIGINAL = Holdout("coco", "data/shards", "test", "a" * 64, 5000)
NEW = Holdout("2026-11", "data/shards-new/x", "test", "b" * 64, 500)


@pytest.mark.parametrize(
    ("original", "new", "tolerance", "promote", "says"),
    [
        # the numbers: better where it was trained, 0.03 worse on the original
        ((1.59, 1.56), (1.23, 1.32), 0.01, False, "0.0300 worse on the original data"),
        ((1.59, 1.56), (1.23, 1.32), 0.05, True, "promoted: better on the new data"),
        ((1.59, 1.59), (1.23, 1.32), 0.0, True, "within 0 on the original"),
        ((1.59, 1.70), (1.23, 1.23), 0.05, False, "not better on the new data"),  # a tie keeps the champion
        ((1.59, 1.70), (1.23, 1.20), 0.05, False, "not better on the new data"),
    ],
)
def test_the_gate_promotes_only_when_better_on_new_and_within_tolerance_on_original(
    original: tuple[float, float], new: tuple[float, float], tolerance: float, promote: bool, says: str
) -> None:
    decision = decide(HoldoutScores(ORIGINAL, *original), HoldoutScores(NEW, *new), tolerance=tolerance)
    assert decision.promote is promote
    assert says in decision.reason
    # every score and both holdouts are in the one line
    for score in (*original, *new):
        assert f"{score:.4f}" in decision.reason
    assert ORIGINAL.name in decision.reason and NEW.name in decision.reason


def test_the_gate_refuses_what_it_cannot_compare() -> None:
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        decide(HoldoutScores(ORIGINAL, 1.0, 1.0), HoldoutScores(NEW, 1.0, 1.1), tolerance=-0.1)
    with pytest.raises(ValueError, match="must be finite to compare"):
        decide(HoldoutScores(ORIGINAL, 1.0, float("nan")), HoldoutScores(NEW, 1.0, 1.1), tolerance=0.1)
