"""captioning.tracking.runs without a server: which tracker a run gets, the JSON-lines parent run a
terminal pipeline opens and ends, a stage's tracker under it."""

from __future__ import annotations

from pathlib import Path

import pytest

from captioning import storage
from captioning.config import Config, load_config
from captioning.tracking import NullTracker, TrackingUnavailable
from captioning.tracking.jsonl import JsonlTracker, metric_history, read_jsonl
from captioning.tracking.runs import (
    METRICS_FILE,
    PipelineRun,
    open_stage_tracker,
    tracker_kind,
    tracking_uri_of,
)


def test_tracking_uri_of(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingUnavailable, match="`captioning stack up`"):
        tracking_uri_of(load_config("demo"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking_uri_of(load_config("demo")) == "http://127.0.0.1:5999"
    configured = load_config("demo", ["--tracking.tracking_uri=http://mlflow:5000"])
    assert tracking_uri_of(configured) == "http://mlflow:5000"  # the config wins


def test_tracker_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("demo")
    assert tracker_kind("auto", cfg) == "jsonl"
    assert tracker_kind("none", cfg) == "none" and tracker_kind("mlflow", cfg) == "mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracker_kind("auto", cfg) == "mlflow"
    with pytest.raises(ValueError, match="unknown tracker 'wandb'"):
        tracker_kind("wandb", cfg)


def shard_dir_with_metadata(root: Path) -> str:
    """What describe_run reads from a finished build: manifest.json and vocab.json."""
    shard_dir = str(root / "shards")
    storage.write_json(storage.join(shard_dir, "manifest.json"), {"config_hash": "k"})
    storage.write_json(storage.join(shard_dir, "vocab.json"), {"words": ["<pad>"]})
    return shard_dir


def test_jsonl_pipeline_run_and_its_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg: Config = load_config("demo", [f"--data.shard_dir={shard_dir_with_metadata(tmp_path)}"])
    output = str(tmp_path / "run")
    run = PipelineRun.open("auto", cfg, ["xe", "scst"], output=output, run_name="demo-run", world_size=2)
    assert (run.kind, run.run_id) == ("jsonl", None)
    stage = open_stage_tracker(run.kind, cfg, output, "xe", parent_run_id=run.run_id)
    assert isinstance(stage, JsonlTracker)
    stage.log_metrics({"train/loss": 2.0}, step=1)
    stage.close()
    run.end("FINISHED", {"test_CIDEr": 1.5}, tags={"best_stage": "xe"})
    records = read_jsonl(Path(output) / METRICS_FILE)
    assert metric_history(records, "run/xe", "train/loss") == [(1, 2.0)]
    assert metric_history(records, "run", "test_CIDEr") == [(None, 1.5)]
    tags = {k: v for r in records if r["kind"] == "tags" and r["run"] == "run" for k, v in r["tags"].items()}
    assert tags["recipe"] == "demo" and tags["stages"] == "xe,scst" and tags["best_stage"] == "xe"
    assert len(tags["dataset_manifest_sha256"]) == 64
    params = {
        k: v for r in records if r["kind"] == "params" and r["run"] == "run" for k, v in r["params"].items()
    }
    assert params["train.scst.num_samples"] == str(cfg.train.scst.num_samples)
    for name in ("config.json", "vocab.json", "manifest.json"):
        assert (Path(output) / "artifacts" / "run" / "run" / name).is_file()
    ends = [r for r in records if r["kind"] == "end"]
    assert [(r["run"], r["status"]) for r in ends] == [("run/xe", "FINISHED"), ("run", "FINISHED")]


def test_a_failed_pipeline_run_ends_failed_or_killed(tmp_path: Path) -> None:
    cfg = load_config("demo", [f"--data.shard_dir={shard_dir_with_metadata(tmp_path)}"])
    for exc, status in ((RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")):
        output = str(tmp_path / status)
        run = PipelineRun.open("jsonl", cfg, ["xe"], output=output, run_name="r", world_size=1)
        run.end_after_error(exc)
        records = read_jsonl(Path(output) / METRICS_FILE)
        assert [r["status"] for r in records if r["kind"] == "end"] == [status]


def test_no_tracking_where_asked_or_where_jsonl_cannot_write(tmp_path: Path) -> None:
    cfg = load_config("demo")
    assert isinstance(open_stage_tracker("none", cfg, str(tmp_path), "xe"), NullTracker)
    assert isinstance(open_stage_tracker("jsonl", cfg, "s3://bucket/run", "xe"), NullTracker)
    assert isinstance(open_stage_tracker("jsonl", cfg, str(tmp_path), "xe", is_main=False), NullTracker)
    run = PipelineRun.open("none", cfg, ["xe"], output=str(tmp_path), run_name="r", world_size=1)
    run.end("FINISHED", {"test_CIDEr": 1.0})
    assert not (tmp_path / METRICS_FILE).exists()


def test_an_unreachable_mlflow_server_is_an_error_before_anything_runs(tmp_path: Path) -> None:
    from s3server import free_port

    dead = f"--tracking.tracking_uri=http://127.0.0.1:{free_port()}"
    cfg = load_config("demo", [dead, "--tracking.connect_timeout_s=1"])
    with pytest.raises(TrackingUnavailable, match="captioning mlflow start"):
        open_stage_tracker("auto", cfg, str(tmp_path), "xe")
