"""MlflowTracker (captioning/tracking/mlflow_run.py) against real `mlflow server`s on loopback: runs,
metrics, params, artifacts (local and S3), a server killed and restarted mid-run, a server that never
comes back (tracking/fallback.py: the fallback file, then replay)."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from leftovers import owned_by_fixture
from mlflow import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from s3server import S3Server, free_port

from captioning.services.mlflow_server import MlflowServer
from captioning.tracking import Tracker
from captioning.tracking.client import (
    EXPERIMENT_KIND_TAG,
    PARENT_TAG,
    TRAINING_KIND,
    TRUNCATION_MARKER,
    connect,
    ensure_experiment,
)
from captioning.tracking.fallback import main, read_fallback, replay_fallback
from captioning.tracking.mlflow_run import MlflowTracker


def _experiment() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture
def client(mlflow_server: Any) -> MlflowClient:
    return connect(mlflow_server.url)


def test_tracker_satisfies_protocol(client: MlflowClient, tmp_path: Path) -> None:
    tracker: Tracker = MlflowTracker.start_run(client, _experiment(), "protocol", fallback_dir=str(tmp_path))
    tracker.close()


def test_experiments_are_tagged_as_model_training(client: MlflowClient, tmp_path: Path) -> None:
    """New experiments carry the training-kind tag; an existing one gets it unless a person chose a kind."""
    created = _experiment()
    MlflowTracker.start_run(client, created, "kind", fallback_dir=str(tmp_path)).close()
    experiment = client.get_experiment_by_name(created)
    assert experiment is not None
    assert experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND == "custom_model_development"

    untagged = client.create_experiment(_experiment())  # made before this project's runs, or by hand
    chosen = client.create_experiment(_experiment(), tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for experiment_id in (untagged, chosen):
        name = client.get_experiment(experiment_id).name
        assert ensure_experiment(client, name) == experiment_id
    assert client.get_experiment(untagged).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


# --- runs, metrics, params, artifacts ---------------------------------------------------------------


def test_hierarchy_names_parents_and_statuses(client: MlflowClient, tmp_path: Path) -> None:
    parent = MlflowTracker.start_run(
        client, _experiment(), "pipeline", tags={"recipe": "demo"}, fallback_dir=str(tmp_path)
    )
    xe = parent.child("xe")
    scst = parent.child("scst")
    xe.log_metrics({"train/loss": 3.0}, step=1)
    xe.close()
    parent.close()  # before its child: the child must not care
    scst.log_metrics({"train/reward": 0.5}, step=1)
    scst.close("FAILED")

    runs = {
        name: client.get_run(t.run_id or "") for name, t in [("pipeline", parent), ("xe", xe), ("scst", scst)]
    }
    assert {name: run.info.run_name for name, run in runs.items()} == {n: n for n in runs}
    assert PARENT_TAG not in runs["pipeline"].data.tags
    assert runs["pipeline"].data.tags["recipe"] == "demo"
    assert runs["xe"].data.tags[PARENT_TAG] == parent.run_id
    assert runs["scst"].data.tags[PARENT_TAG] == parent.run_id
    assert {run.info.experiment_id for run in runs.values()} == {parent.experiment_id}
    assert [runs[n].info.status for n in ("pipeline", "xe", "scst")] == ["FINISHED", "FINISHED", "FAILED"]
    assert _history(client, scst.run_id or "", "train/reward") == [(1, 0.5)]
    assert all(t.fallback_path is None for t in (parent, xe, scst))


def test_metric_histories_arrive_whole_and_in_order(
    client: MlflowClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A long flush interval: 1200 metrics wait in the queue and go in more than one log_batch call.
    tracker = MlflowTracker.start_run(
        client, _experiment(), "history", fallback_dir=str(tmp_path), flush_interval_s=60.0
    )
    start_ms = int(time.time() * 1000)
    expected: dict[str, list[tuple[int, float]]] = {"train/loss": [], "train/lr": [], "val/CIDEr": []}
    for step in range(400):
        values = {"train/loss": 5.0 / (step + 1), "train/lr": step * 1e-4, "val/CIDEr": step / 400}
        tracker.log_metrics(values, step=step)
        for key, value in values.items():
            expected[key].append((step, value))
    tracker.log_metrics({"odd/nan": math.nan, "odd/inf": math.inf}, step=0)
    with caplog.at_level(logging.WARNING, logger="captioning.tracking"):
        tracker.log_metrics({"odd/text": "high"}, step=0)  # type: ignore[dict-item]
    assert "not a number" in caplog.text
    assert tracker.flush(timeout_s=60)
    tracker.close()
    end_ms = int(time.time() * 1000)
    run_id = tracker.run_id or ""
    for key, history in expected.items():
        assert _history(client, run_id, key) == history
    timestamps = [m.timestamp for m in client.get_metric_history(run_id, "train/loss")]
    assert all(start_ms <= t <= end_ms for t in timestamps)
    assert math.isnan(client.get_metric_history(run_id, "odd/nan")[0].value)
    assert client.get_metric_history(run_id, "odd/inf")[0].value > 1e300  # MLflow stores inf as max float
    assert "odd/text" not in client.get_run(run_id).data.metrics


def test_rejected_records_are_isolated_and_kept(client: MlflowClient, tmp_path: Path) -> None:
    tracker = MlflowTracker.start_run(client, _experiment(), "rejects", fallback_dir=str(tmp_path))
    for step in range(10):
        tracker.log_metrics(
            {"good": float(step), "bad name!": 1.0} if step == 5 else {"good": float(step)}, step
        )
    assert not tracker.flush(timeout_s=30)  # one record was refused: not everything reached the server
    tracker.close()
    assert _history(client, tracker.run_id or "", "good") == [(s, float(s)) for s in range(10)]
    assert tracker.fallback_path is not None
    kept = [r for r in read_fallback(tracker.fallback_path) if r["kind"] == "metric"]
    assert [(r["key"], r["step"]) for r in kept] == [("bad name!", 5)] and "error" in kept[0]
    assert client.get_run(tracker.run_id or "").info.status == "FINISHED"


def test_params_flattened_chunked_truncated_and_relogged_on_resume(
    client: MlflowClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config: dict[str, Any] = {
        "model": {f"layer_{i}": {"dim": 64 * i, "dropout": 0.1} for i in range(60)},  # 120 params
        "train": {"xe": {"lr_decoder": 4e-4, "epochs": 20}, "notes": "x" * (MAX_PARAM_VAL_LENGTH + 500)},
        "seed": 1,
    }
    tracker = MlflowTracker.start_run(client, _experiment(), "params", fallback_dir=str(tmp_path))
    tracker.log_params(config)
    tracker.close()
    run_id = tracker.run_id or ""
    params = client.get_run(run_id).data.params
    assert len(params) == 124
    assert params["model.layer_7.dim"] == "448" and params["train.xe.lr_decoder"] == "0.0004"
    notes = params["train.notes"]
    assert len(notes) == MAX_PARAM_VAL_LENGTH and notes.endswith(TRUNCATION_MARKER)

    resumed = MlflowTracker.attach(client, run_id, fallback_dir=str(tmp_path))
    assert client.get_run(run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING, logger="captioning.tracking"):
        resumed.log_params(config)  # the same values again: skipped, no error
        resumed.log_params({"seed": 2})  # a changed value: a warning and a tag, not a crash
        assert resumed.flush(timeout_s=30)
    resumed.close()
    run = client.get_run(run_id)
    assert run.data.params["seed"] == "1" and run.data.tags["param_changed.seed"] == "2"
    assert "param_changed.seed" in caplog.text
    assert run.info.status == "FINISHED" and resumed.fallback_path is None


def _artifact_sources(tmp_path: Path) -> tuple[Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    report = tmp_path / "summary.json"
    report.write_text('{"CIDEr": 1.0}')
    folder = tmp_path / "plots"
    (folder / "val").mkdir(parents=True)
    (folder / "loss.txt").write_text("loss")
    (folder / "val" / "cider.txt").write_text("cider")
    return report, folder


def test_artifacts_files_and_folders(client: MlflowClient, tmp_path: Path) -> None:
    report, folder = _artifact_sources(tmp_path / "src")
    tracker = MlflowTracker.start_run(client, _experiment(), "artifacts", fallback_dir=str(tmp_path / "fb"))
    tracker.log_artifact(str(report), "reports")
    tracker.log_artifact(str(folder))
    transient = tmp_path / "gone.txt"
    transient.write_text("staged before it was deleted")
    tracker.log_artifact(str(transient))
    transient.unlink()  # the tracker uploads its staged copy
    tracker.close()
    run_id = tracker.run_id or ""
    assert [f.path for f in client.list_artifacts(run_id, "reports")] == ["reports/summary.json"]
    assert {f.path for f in client.list_artifacts(run_id, "plots")} == {"plots/loss.txt", "plots/val"}
    assert [f.path for f in client.list_artifacts(run_id, "plots/val")] == ["plots/val/cider.txt"]
    downloaded = client.download_artifacts(run_id, "gone.txt", str(tmp_path / "down"))
    assert Path(downloaded).read_text() == "staged before it was deleted"
    assert tracker.fallback_path is None
    assert not list((tmp_path / "fb").glob("mlflow-staging-*"))  # staged copies removed once uploaded


def test_artifacts_land_in_s3(
    s3_env: str, s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server.endpoint_url)  # the server's boto3 reads it
    bucket = s3_env.removeprefix("s3://")
    server = MlflowServer(tmp_path / "mlflow", port=free_port(), artifacts_destination=f"{s3_env}/mlflow")
    server.start()
    try:
        report, folder = _artifact_sources(tmp_path / "src")
        tracker = MlflowTracker.start_run(
            connect(server.url), _experiment(), "s3", fallback_dir=str(tmp_path)
        )
        tracker.log_artifact(str(report), "reports")
        tracker.log_artifact(str(folder))
        tracker.close()
        assert tracker.fallback_path is None
        listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix="mlflow/")
        keys = {obj["Key"] for obj in listed.get("Contents", [])}
        suffixes = ("reports/summary.json", "plots/loss.txt", "plots/val/cider.txt")
        prefix = f"mlflow/{tracker.experiment_id}/{tracker.run_id}/artifacts/"
        assert {prefix + s for s in suffixes} <= keys, keys
        body = s3_server.client().get_object(Bucket=bucket, Key=prefix + "reports/summary.json")["Body"]
        assert body.read() == b'{"CIDEr": 1.0}'
    finally:
        server.stop()


def test_system_metrics_and_node_id(client: MlflowClient, tmp_path: Path) -> None:
    tracker = MlflowTracker.start_run(
        client,
        _experiment(),
        "system",
        fallback_dir=str(tmp_path),
        system_metrics=True,
        system_interval_s=0.2,
        node_id="node-a",
    )
    time.sleep(1.0)
    tracker.close()
    run = client.get_run(tracker.run_id or "")
    assert run.data.tags["node_id"] == "node-a"
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "process_rss_megabytes"):
        assert f"system/{name}" in run.data.metrics, sorted(run.data.metrics)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")]
    assert len(steps) >= 2 and steps == sorted(steps)


# --- a server that goes away ------------------------------------------------------------------------


class KillableServer:
    """An MLflow server of this module's own on a fixed port, SIGKILLed and restarted on the same db."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.server = MlflowServer(state_dir, port=self.port)

    @property
    def url(self) -> str:
        return self.server.url

    def ensure_running(self) -> None:
        if self.server.process is None:
            self.server = MlflowServer(self.state_dir, port=self.port).start()
            assert self.server.process is not None
            owned_by_fixture(self.server.process.pid)  # restarted inside a test, stopped by the fixture

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash or an OOM kill would."""
        process = self.server.process
        assert process is not None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        self.server.pid_path.unlink(missing_ok=True)
        self.server.process = None

    def stop(self) -> None:
        if self.server.process is not None:
            self.server.stop()


@pytest.fixture(scope="module")
def killable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KillableServer]:
    server = KillableServer(tmp_path_factory.mktemp("mlflow-killable"))
    yield server
    server.stop()


def _timed_log(tracker: MlflowTracker, step: int) -> None:
    start = time.monotonic()
    tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/step": float(step)}, step=step)
    assert time.monotonic() - start < 1.0  # a hang guard only: the call just appends to a queue


@pytest.mark.usefixtures("subprocess_tree")
def test_server_killed_and_restarted_mid_run_loses_nothing(killable: KillableServer, tmp_path: Path) -> None:
    killable.ensure_running()
    client = connect(killable.url)
    tracker = MlflowTracker.start_run(
        client,
        _experiment(),
        "outage",
        fallback_dir=str(tmp_path),
        flush_interval_s=0.2,
        request_timeout_s=2.0,
    )
    tracker.log_params({"train": {"lr": 1e-3}})
    for step in range(30):
        _timed_log(tracker, step)
    assert tracker.flush(timeout_s=30)

    killable.kill()
    for step in range(30, 60):
        _timed_log(tracker, step)
        time.sleep(0.02)
    tracker.set_tags({"phase": "outage"})
    tracker.log_params({"train": {"epochs": 3}})
    start = time.monotonic()
    late_child = tracker.child("eval")  # the server is away: the run is created when it returns
    assert time.monotonic() - start < 5.0
    assert late_child.run_id is None
    late_child.log_metrics({"test/CIDEr": 0.9}, step=60)
    assert not tracker.flush(timeout_s=1.0)

    killable.ensure_running()
    for step in range(60, 90):
        _timed_log(tracker, step)
    late_child.close()
    tracker.close()

    run_id = tracker.run_id or ""
    assert tracker.fallback_path is None and late_child.fallback_path is None
    assert _history(client, run_id, "train/step") == [(s, float(s)) for s in range(90)]
    assert _history(client, run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(90)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "outage"
    assert run.data.params == {"train.lr": "0.001", "train.epochs": "3"}
    child_run = client.get_run(late_child.run_id or "")
    assert child_run.data.tags[PARENT_TAG] == run_id and child_run.info.run_name == "eval"
    assert child_run.info.status == "FINISHED"
    assert _history(client, child_run.info.run_id, "test/CIDEr") == [(60, 0.9)]


@pytest.mark.usefixtures("subprocess_tree")
def test_hung_server_times_out_instead_of_blocking(killable: KillableServer, tmp_path: Path) -> None:
    killable.ensure_running()
    client = connect(killable.url)
    tracker = MlflowTracker.start_run(
        client, _experiment(), "hung", fallback_dir=str(tmp_path), flush_interval_s=0.2, request_timeout_s=1.0
    )
    _timed_log(tracker, 0)
    assert tracker.flush(timeout_s=30)
    process = killable.server.process
    assert process is not None
    os.killpg(process.pid, signal.SIGSTOP)  # accepts connections (the kernel does), never answers
    try:
        for step in range(1, 20):
            _timed_log(tracker, step)
        start = time.monotonic()
        assert not tracker.flush(timeout_s=3.0)
        assert time.monotonic() - start < 15  # hang guard: MLflow's defaults would wait 120 s per try
    finally:
        os.killpg(process.pid, signal.SIGCONT)
    tracker.close()
    assert tracker.fallback_path is None
    assert _history(client, tracker.run_id or "", "train/step") == [(s, float(s)) for s in range(20)]


@pytest.mark.usefixtures("subprocess_tree")
def test_server_gone_for_good_writes_fallback_then_replays(
    killable: KillableServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    killable.ensure_running()
    client = connect(killable.url)
    tracker = MlflowTracker.start_run(
        client,
        _experiment(),
        "gone",
        fallback_dir=str(tmp_path / "fallback"),
        flush_interval_s=0.2,
        request_timeout_s=2.0,
        close_timeout_s=3.0,
    )
    tracker.log_params({"a": 1})
    for step in range(50):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert tracker.flush(timeout_s=30)

    killable.kill()
    for step in range(50, 100):
        _timed_log(tracker, step)
    tracker.log_params({"b": 2})
    tracker.set_tags({"phase": "lost"})
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    tracker.log_artifact(str(checkpoint), "checkpoints")
    orphan = tracker.child("eval")  # never gets a run while the server is away
    orphan.log_metrics({"test/CIDEr": 0.7}, step=3)
    with caplog.at_level(logging.WARNING, logger="captioning.tracking"):
        orphan.close()
        tracker.close()

    path = tracker.fallback_path
    assert path is not None and Path(path).name == f"mlflow-unsent-{tracker.run_id}.jsonl"
    assert path in caplog.text and "replay" in caplog.text
    records = read_fallback(path)
    assert records[0]["kind"] == "run" and records[0]["run_id"] == tracker.run_id
    metrics = [r for r in records if r["kind"] == "metric"]
    assert sorted((r["key"], r["step"]) for r in metrics) == sorted(
        (key, s) for s in range(50, 100) for key in ("train/loss", "train/step")
    )
    assert all(isinstance(r["timestamp"], int) for r in metrics)
    assert [r["key"] for r in records if r["kind"] == "param"] == ["b"]
    assert [r["status"] for r in records if r["kind"] == "status"] == ["FINISHED"]
    assert [Path(r["local_path"]).name for r in records if r["kind"] == "artifact"] == ["best.pt"]

    killable.ensure_running()
    replayed = replay_fallback(connect(killable.url), path)
    assert replayed == len(records) - 1
    assert main(["replay", path, "--tracking-uri", killable.url]) == replayed  # twice: nothing doubles
    run_id = tracker.run_id or ""
    assert _history(client, run_id, "loss") == [(s, float(s)) for s in range(50)]
    assert _history(client, run_id, "train/step") == [(s, float(s)) for s in range(50, 100)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a": "1", "b": "2"} and run.data.tags["phase"] == "lost"
    assert [f.path for f in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best.pt"]

    orphan_path = orphan.fallback_path
    assert orphan_path is not None and Path(orphan_path).name.startswith("mlflow-unsent-pending-")
    assert replay_fallback(client, orphan_path) == 2  # the metric and the FINISHED status
    created = read_fallback(orphan_path)[0]["run_id"]
    assert replay_fallback(client, orphan_path) == 2  # the same run again, not a second one
    assert read_fallback(orphan_path)[0]["run_id"] == created
    orphan_run = client.get_run(created)
    assert orphan_run.info.run_name == "eval" and orphan_run.data.tags[PARENT_TAG] == run_id
    assert orphan_run.info.status == "FINISHED"
    assert _history(client, created, "test/CIDEr") == [(3, 0.7)]


def test_a_stopped_stage_ends_killed_even_where_rank_0_saw_a_peer_break_first(client: MlflowClient) -> None:
    """end_leftover_runs: RUNNING runs of the stage end KILLED; with failed_since_ms, so do the stage's
    runs that ended FAILED since then (a stop's side effect), keeping their error; older FAILED runs
    and other stages stay as they are."""
    import time

    from captioning.tracking.client import PARENT_TAG
    from captioning.tracking.lineage import end_leftover_runs

    experiment = client.create_experiment(_experiment())
    parent = client.create_run(experiment, run_name="pipeline").info.run_id

    def child(name: str, status: str | None) -> str:
        run_id = client.create_run(experiment, run_name=name, tags={PARENT_TAG: parent}).info.run_id
        if status is not None:
            client.set_tag(run_id, "error", f"{name} broke")
            client.set_terminated(run_id, status)
        return run_id

    earlier = child("finetune", "FAILED")  # an earlier attempt's real failure
    time.sleep(0.05)
    since = int(time.time() * 1000)
    broken = child("finetune", "FAILED")  # rank 0 saw its peer's collective break while stopping
    running = child("finetune", None)
    other = child("xe", "FAILED")
    ended = end_leftover_runs(
        client, parent, "stage finetune was stopped", stage="finetune", failed_since_ms=since
    )
    assert sorted(ended) == sorted([broken, running])
    status = {r: client.get_run(r).info.status for r in (earlier, broken, running, other)}
    assert status == {earlier: "FAILED", broken: "KILLED", running: "KILLED", other: "FAILED"}
    tags = client.get_run(broken).data.tags
    assert tags["error"] == "stage finetune was stopped" and tags["error_while_stopping"] == "finetune broke"
    assert end_leftover_runs(client, parent, "again", stage="finetune") == []  # FAILED runs: only when asked
