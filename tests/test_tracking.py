"""The Tracker protocol's local implementations: no-op (tracking/__init__.py) and JSON lines (tracking/jsonl.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from captioning.tracking import NullTracker, Tracker
from captioning.tracking.jsonl import JsonlTracker, metric_history, read_jsonl


def _use(tracker: Tracker, artifact: Path) -> None:
    tracker.log_params({"train.xe.lr_decoder": 4e-4, "model.arch": "show_attend_tell"})
    tracker.set_tags({"recipe": "demo"})
    stage = tracker.child("xe")
    for step in (1, 2, 3):
        stage.log_metrics(
            {"train/loss": 4.0 / step, "train/grad_norm": float("nan") if step == 2 else 1.0}, step=step
        )
    stage.log_artifact(str(artifact), "checkpoints")
    stage.close()
    tracker.close()


def test_null_tracker_accepts_everything(tmp_path: Path) -> None:
    artifact = tmp_path / "best.pt"
    artifact.write_bytes(b"x")
    _use(NullTracker(), artifact)


def test_jsonl_tracker_records_runs_metrics_and_artifacts(tmp_path: Path) -> None:
    artifact = tmp_path / "best.pt"
    artifact.write_bytes(b"weights")
    path = tmp_path / "run" / "metrics.jsonl"
    _use(JsonlTracker(path, run_name="pipeline"), artifact)
    records = read_jsonl(path)
    for line in path.read_text().splitlines():
        json.loads(line)  # strict JSON on every line, NaN included
    assert metric_history(records, "pipeline/xe", "train/loss") == [(1, 4.0), (2, 2.0), (3, 4.0 / 3)]
    nan = metric_history(records, "pipeline/xe", "train/grad_norm")[1][1]
    assert math.isnan(nan)
    params = next(r for r in records if r["kind"] == "params")
    assert params["run"] == "pipeline" and params["params"]["train.xe.lr_decoder"] == "0.0004"
    copied = tmp_path / "run" / "artifacts" / "pipeline" / "xe" / "checkpoints" / "best.pt"
    assert copied.read_bytes() == b"weights"
    ends = [(r["run"], r["status"]) for r in records if r["kind"] == "end"]
    assert ends == [("pipeline/xe", "FINISHED"), ("pipeline", "FINISHED")]


def test_jsonl_tracker_appends_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    first = JsonlTracker(path)
    first.log_metrics({"loss": 1.0}, step=1)
    first.close("KILLED")
    first.close()  # a second close is a no-op
    second = JsonlTracker(path)
    second.log_metrics({"loss": 0.5}, step=2)
    second.close()
    assert metric_history(read_jsonl(path), "run", "loss") == [(1, 1.0), (2, 0.5)]
    assert [r["status"] for r in read_jsonl(path) if r["kind"] == "end"] == ["KILLED", "FINISHED"]
