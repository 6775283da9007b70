"""captioning.pipeline without an orchestrator, MLflow or torchrun: overrides, stages, outcomes, the
new-data overrides, and the shard build key checked against a real (tiny) shard build."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from captioning import pipeline, storage
from captioning.config import Config, ConfigError, apply_overrides, load_config
from captioning.data import prepare
from captioning.data.download import RawDataset
from captioning.data.records import KarpathyDataset
from captioning.data.shards import ShardManifest
from captioning.data.vocab import Vocab
from captioning.launch import LaunchError, LaunchResult, torchrun_command
from captioning.pipeline import OUTCOME_FILE, PipelineError, StageOutcome

# --- overrides and stages ----------------------------------------------------------------------------


def test_normalize_overrides() -> None:
    assert pipeline.normalize_overrides(None) == []
    assert pipeline.normalize_overrides(["a.b=1", "--c.d=x=y"]) == ["--a.b=1", "--c.d=x=y"]


def test_launch_overrides_drop_train_stages_only() -> None:
    given = ["train.stages=xe", "--train.stages=xe,scst", "train.xe.epochs=2", "--train.stages_extra=1"]
    assert pipeline.launch_overrides(given) == ["--train.xe.epochs=2", "--train.stages_extra=1"]
    assert pipeline.launch_overrides(None) == []


def test_resolve_stages() -> None:
    cfg = load_config("demo")
    assert pipeline.resolve_stages(None, cfg) == ["xe", "finetune", "scst"]
    assert pipeline.resolve_stages([], cfg) == ["xe", "finetune", "scst"]
    only_xe = load_config("demo", ["--train.stages=xe"])
    assert pipeline.resolve_stages(None, only_xe) == ["xe"]
    assert pipeline.resolve_stages(["scst", "xe"], cfg) == ["scst", "xe"]


@pytest.mark.parametrize("stages", [["xe", "rl"], ["xe", "xe"], ["XE"]])
def test_resolve_stages_rejects_unknown_and_repeated(stages: list[str]) -> None:
    with pytest.raises(PipelineError, match="each at most once"):
        pipeline.resolve_stages(stages, load_config("demo"))


def outcome(stage: str, scores: Mapping[str, float], output: str = "runs/demo/r1") -> StageOutcome:
    return StageOutcome(
        stage=stage,
        checkpoint=f"{output}/{stage}/best.pt",
        test_scores=dict(scores),
        run_id=f"run-{stage}",
        output=output,
        duration_s=1.0,
    )


def test_best_stage() -> None:
    xe, ft, scst = (
        outcome("xe", {"CIDEr": 0.5}),
        outcome("finetune", {"CIDEr": 0.9}),
        outcome("scst", {"CIDEr": 0.7}),
    )
    assert pipeline.best_stage([xe, ft, scst]) is ft
    assert pipeline.best_stage([scst, xe]) is scst
    # A tie goes to the later stage (it trained longer for the same score).
    tied = outcome("scst", {"CIDEr": 0.9})
    assert pipeline.best_stage([xe, ft, tied]) is tied
    assert pipeline.best_stage([tied, ft]) is ft
    # Another metric; a stage without it never wins.
    assert pipeline.best_stage([xe, ft], metric="BLEU-4") is ft
    assert pipeline.best_stage([outcome("xe", {"BLEU-4": 0.1}), ft], metric="BLEU-4").stage == "xe"
    with pytest.raises(PipelineError, match="nothing to choose"):
        pipeline.best_stage([])


def test_run_output() -> None:
    assert pipeline.run_output(load_config("demo"), "r1") == "demo-data/runs/demo/r1"
    on_s3 = load_config("demo", ["--storage.run_dir=s3://bucket/runs/"])
    assert pipeline.run_output(on_s3, "r1") == "s3://bucket/runs/demo/r1"


def test_scores_table() -> None:
    rows = {"xe": {"CIDEr": 1.23456, "BLEU-4": 0.5}, "scst": {"CIDEr": 2.0}}
    table = pipeline.scores_table(rows, ["BLEU-4", "CIDEr", "METEOR"])
    assert table.splitlines() == [
        "| | BLEU-4 | CIDEr | METEOR |",
        "|---|---|---|---|",
        "| xe | 0.5000 | 1.2346 | - |",
        "| scst | - | 2.0000 | - |",
    ]
    header = pipeline.scores_table({}).splitlines()[0]  # default: every metric the evaluator reports
    assert header == "| | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr |"


# --- new data ---------------------------------------------------------------------------------------


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
    got = pipeline.new_data_overrides(cfg, str(split_file), None, user)
    drop_id = hashlib.sha256(split_file.read_bytes()).hexdigest()[:12]
    assert got == [
        "--train.xe.epochs=1",
        "--data.loader.batch_size=4",
        "--data.dataset=local",
        f"--data.local.karpathy_json={split_file}",
        f"--data.local.image_dir={split_file.parent}",
        f"--data.shard_dir=demo-data/shards-new/{drop_id}",
    ]
    # Each key once (an override given twice is a ConfigError), and the result is a valid config.
    loaded = load_config("demo", got)
    assert loaded.data.dataset == "local" and loaded.data.shard_dir == f"demo-data/shards-new/{drop_id}"
    assert loaded.data.local.karpathy_json == str(split_file)
    assert loaded.data.local.image_dir == str(split_file.parent)
    assert loaded.train.xe.epochs == 1 and loaded.data.loader.batch_size == 4

    # Other bytes, other shards; an image folder given is kept; a relative path becomes absolute.
    split_file.write_text('{"images": [] }\n')
    other = pipeline.new_data_overrides(cfg, str(split_file), "/images", None)
    assert other[-1] != got[-1] and other[-1].startswith("--data.shard_dir=demo-data/shards-new/")
    assert "--data.local.image_dir=/images" in other
    monkeypatch.chdir(tmp_path)
    relative = pipeline.new_data_overrides(cfg, "drop-1/dataset_coco.json", None, None)
    assert f"--data.local.karpathy_json={split_file}" in relative


def test_new_data_overrides_need_the_split_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no split file"):
        pipeline.new_data_overrides(load_config("demo"), str(tmp_path / "dataset.json"), None, None)


# --- MLflow settings --------------------------------------------------------------------------------


def test_tracking_uri_of(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(PipelineError, match="`captioning stack up`"):
        pipeline.tracking_uri_of(load_config("demo"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert pipeline.tracking_uri_of(load_config("demo")) == "http://127.0.0.1:5999"
    configured = load_config("demo", ["--tracking.tracking_uri=http://mlflow:5000"])
    assert pipeline.tracking_uri_of(configured) == "http://mlflow:5000"  # the config wins


# --- training launches (no torchrun: the launch is faked or must not happen) ------------------------


def args_after_module(cmd: Sequence[str]) -> list[str]:
    """The arguments of `-m captioning.train` in a torchrun command line."""
    i = list(cmd).index("captioning.train")
    assert cmd[i - 1] == "-m"
    return list(cmd[i + 1 :])


def test_train_command() -> None:
    cmd = pipeline.train_command("demo", "xe", "runs/demo/r1", nproc_per_node=2)
    assert cmd[:5] == torchrun_command([], nproc_per_node=2)
    assert args_after_module(cmd) == [
        "--config",
        "demo",
        "--output",
        "runs/demo/r1",
        "--train.stages=xe",
        "--no-register",
    ]
    full = pipeline.train_command(
        "demo",
        "finetune",
        "runs/demo/r1",
        ["--train.finetune.epochs=1"],
        nproc_per_node=2,
        init_from="runs/demo/r1/xe/best.pt",
        parent_run_id="abc123",
        resume=True,
        register=True,
    )
    assert args_after_module(full) == [
        "--config",
        "demo",
        "--output",
        "runs/demo/r1",
        "--train.stages=finetune",
        "--init-from",
        "runs/demo/r1/xe/best.pt",
        "--parent-run-id",
        "abc123",
        "--resume",
        "--train.finetune.epochs=1",
    ]


def test_train_command_multi_node() -> None:
    cmd = pipeline.train_command(
        "demo", "scst", "s3://bucket/runs/demo/r1/", nproc_per_node=4, nnodes=2, rdzv_endpoint="head:29400"
    )
    launcher = cmd[: cmd.index("captioning.train")]
    assert {"--nnodes=2", "--rdzv-endpoint=head:29400", "--rdzv-id=r1-scst"} <= set(launcher)
    assert "--standalone" not in launcher


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A run folder's parent: a local path, or `s3://<fresh bucket>` on the test server."""
    if request.param == "local":
        return str(tmp_path / "runs")
    return str(request.getfixturevalue("s3_env"))


def test_read_outcome(root: str) -> None:
    output = storage.join(root, "demo", "r1")
    assert pipeline.read_outcome(output, "xe") is None
    recorded = outcome("xe", {"CIDEr": 0.5}, output)
    storage.write_json(storage.join(output, "xe", OUTCOME_FILE), recorded.to_json())
    assert pipeline.read_outcome(output, "xe") == dataclasses.replace(recorded, launched=False)
    assert pipeline.read_outcome(output, "finetune") is None


def no_launch(*args: Any, **kwargs: Any) -> LaunchResult:
    raise AssertionError(f"launched {args}")


def test_a_finished_stage_is_not_launched_again(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "run_streaming", no_launch)
    output = storage.join(root, "demo", "r1")
    recorded = outcome("xe", {"CIDEr": 0.5}, output)
    storage.write_json(storage.join(output, "xe", OUTCOME_FILE), recorded.to_json())
    lines: list[str] = []
    got = pipeline.train_stage("demo", "xe", output, ["train.xe.epochs=1"], on_line=lines.append)
    assert got == dataclasses.replace(recorded, launched=False)
    assert lines == [f"stage xe already finished in {storage.join(output, 'xe')}; not launched again"]
    # The overrides are still checked first.
    with pytest.raises(ConfigError, match="no_such_key"):
        pipeline.train_stage("demo", "xe", output, ["train.no_such_key=1"], on_line=lines.append)


class FakeLaunch:
    """Stands in for run_streaming: records the command and env, writes what training would, exits."""

    def __init__(self, output: str, returncode: int = 0) -> None:
        self.output, self.returncode = output, returncode
        self.calls: list[tuple[list[str], dict[str, str]]] = []

    def __call__(self, cmd: Sequence[str], *, env: Mapping[str, str], **_: Any) -> LaunchResult:
        self.calls.append((list(cmd), dict(env)))
        if self.returncode == 0:
            summary = {
                "stages": [
                    {"name": "xe", "best_checkpoint": "ckpt/xe/best.pt", "test_scores": {"CIDEr": 0.7}}
                ],
                "stage_runs": {"xe": "run-xe"},
            }
            storage.write_json(storage.join(self.output, "summary.json"), summary)
        return LaunchResult(returncode=self.returncode, duration_s=1.23456, tail=["last words"])


def test_train_stage_launches_records_and_then_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = str(tmp_path / "r1")
    fake = FakeLaunch(output)
    monkeypatch.setattr(pipeline, "run_streaming", fake)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    got = pipeline.train_stage(
        "demo", "xe", output, ["train.xe.epochs=1"], parent_run_id="parent", on_line=print
    )
    assert got == StageOutcome(
        stage="xe",
        checkpoint="ckpt/xe/best.pt",
        test_scores={"CIDEr": 0.7},
        run_id="run-xe",
        output=output,
        duration_s=1.235,
        launched=True,
    )
    [(cmd, env)] = fake.calls
    args = args_after_module(cmd)
    assert "--resume" not in args and args[-1] == "--train.xe.epochs=1"
    assert args[args.index("--parent-run-id") + 1] == "parent"
    assert "--nproc-per-node=2" in cmd  # the demo recipe's train.nproc_per_node
    assert env["OMP_NUM_THREADS"] == "1" and env["TQDM_DISABLE"] == "1"
    assert pipeline.read_outcome(output, "xe") == dataclasses.replace(got, launched=False)
    # Run again with the same output: nothing launched.
    again = pipeline.train_stage("demo", "xe", output, ["train.xe.epochs=1"], on_line=print)
    assert len(fake.calls) == 1 and again == dataclasses.replace(got, launched=False)


def test_train_stage_resumes_and_reports_a_failed_launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = str(tmp_path / "r1")
    storage.write_bytes(storage.join(output, "xe", "last.pt"), b"checkpoint")
    fake = FakeLaunch(output, returncode=3)
    monkeypatch.setattr(pipeline, "run_streaming", fake)
    with pytest.raises(LaunchError, match="exit 3") as info:
        pipeline.train_stage("demo", "xe", output, on_line=print)
    assert info.value.returncode == 3 and info.value.tail == ["last words"]
    assert "--resume" in args_after_module(fake.calls[0][0])
    assert pipeline.read_outcome(output, "xe") is None


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
    """The prepare-data flow's build: plan with the build key, write one group, finish."""
    cfg = apply_overrides(small.cfg, {"data.shard_dir": shard_dir})
    plan = prepare.plan_shards_for(list(small.dataset.records), small.vocab, small.raw, cfg, config_hash=key)
    result = prepare.write_shard_group_for(plan.jobs, cfg, progress=False)
    return prepare.finish_shards(plan, small.vocab, [result])


def key_of(small: Small, *changes: str) -> str:
    """The build key of the small dataset with some settings replaced."""
    keys = {c.split("=", 1)[0] for c in changes}
    kept = [o for o in small_overrides(small.root) if o.split("=", 1)[0] not in keys]
    cfg = load_config("demo", [*kept, *changes])
    return pipeline.shard_build_key(cfg, small.raw.karpathy_json, small.vocab)


def test_build_key_is_stable_and_ignores_other_settings(small: Small) -> None:
    key = pipeline.shard_build_key(small.cfg, small.raw.karpathy_json, small.vocab)
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
    assert pipeline.shard_build_key(small.cfg, edited, small.vocab) != key
    richer, _ = prepare.build_vocabulary(
        small.dataset, apply_overrides(small.cfg, {"data.min_word_freq": "1"})
    )
    assert richer.to_json() != small.vocab.to_json()
    assert pipeline.shard_build_key(small.cfg, small.raw.karpathy_json, richer) != key


def test_up_to_date_manifest(small: Small, tmp_path: Path) -> None:
    shard_dir = str(tmp_path / "shards")
    key = key_of(small)
    build(small, shard_dir, key)
    manifest = pipeline.up_to_date_manifest(shard_dir, key)
    assert manifest is not None and manifest["config_hash"] == key
    assert manifest == json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 5  # train 20/8 -> 3, val 1, test 1
    assert pipeline.up_to_date_manifest(shard_dir, key_of(small, "--data.shards.jpeg_quality=80")) is None
    assert pipeline.up_to_date_manifest(str(tmp_path / "nothing-here"), key) is None


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
    ],
    ids=["tar-deleted", "tar-truncated", "stats-deleted", "manifest-deleted", "manifest-garbled"],
)
def test_up_to_date_manifest_notices_damage(small: Small, tmp_path: Path, damage: Any) -> None:
    shard_dir = tmp_path / "shards"
    key = key_of(small)
    build(small, str(shard_dir), key)
    assert pipeline.up_to_date_manifest(str(shard_dir), key) is not None
    damage(shard_dir)
    assert pipeline.up_to_date_manifest(str(shard_dir), key) is None


def test_up_to_date_manifest_on_s3(small: Small, s3_env: str) -> None:
    shard_dir = storage.join(s3_env, "shards")
    key = key_of(small)
    build(small, shard_dir, key)
    assert pipeline.up_to_date_manifest(shard_dir, key) is not None
    storage.remove(storage.join(shard_dir, "val-000000.tar"))
    assert pipeline.up_to_date_manifest(shard_dir, key) is None


def rebuilt_summary(manifest: ShardManifest) -> dict[str, Any]:
    """The prepare-data flow's summary of a build it ran."""
    return pipeline.manifest_summary(
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
    report = pipeline.data_report(summary)
    assert report.splitlines()[0] == f"Shards in `{shard_dir}`: 5 built, 0 kept"
    assert "| train | 20 | none |" in report.splitlines()

    # Kept: what check-shards found up to date is manifest.json, which records no build's counts.
    manifest = pipeline.up_to_date_manifest(shard_dir, key)
    assert manifest is not None
    kept = pipeline.manifest_summary(shard_dir, manifest)
    assert kept == {**summary, "rebuilt": False, "num_built": 0, "num_skipped": 5}
    assert pipeline.data_report(kept).splitlines()[0] == f"Shards in `{shard_dir}`: up to date"

    # A second build finds every shard complete.
    again = rebuilt_summary(build(small, shard_dir, key))
    assert (again["rebuilt"], again["num_built"], again["num_skipped"]) == (True, 0, 5)
    assert pipeline.data_report(again).splitlines()[0] == f"Shards in `{shard_dir}`: 0 built, 5 kept"


def test_data_report_lists_skipped_images() -> None:
    summary = {
        "shard_dir": "s3://b/shards",
        "rebuilt": True,
        "num_built": 2,
        "num_skipped": 1,
        "samples": {"train": 18, "val": 5},
        "skipped_images": {"train": {"missing": 2, "decode_error": 1}},
    }
    assert pipeline.data_report(summary).splitlines() == [
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
    assert pipeline.up_to_date_manifest(str(tmp_path / "b"), key) is not None
