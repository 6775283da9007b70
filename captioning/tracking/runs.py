"""Runs as a pipeline sees them: the parent run its driver opens, describes and ends; the tracker each
stage process reports to under it; evaluation runs.

    run = PipelineRun.open("auto", cfg, ["xe", "scst"], output="runs/demo/r1", run_name="demo-r1",
                           world_size=2, tags={"orchestrator": "cli"})       # captioning train
    tracker = open_stage_tracker(run.kind, cfg, "runs/demo/r1", "xe", parent_run_id=run.run_id)
    run.end("FINISHED", metrics={"test_CIDEr": 1.3})

    run_id = start_pipeline_run(cfg, ["xe"], run_name="demo-r1", world_size=2)   # the train-sat flow
    end_pipeline_run(run_id, "FINISHED", metrics={...})

Tracker kinds: ``mlflow`` (``tracking.tracking_uri`` or MLFLOW_TRACKING_URI), ``jsonl``
(``OUTPUT/metrics.jsonl``: the parent is run ``run``, a stage ``run/STAGE``), ``none``; ``auto`` is
mlflow when a tracking URI is configured, else jsonl. The flows always use MLflow. MLflow itself is
imported only where an MLflow run is opened: a jsonl or untracked run never loads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from captioning import storage
from captioning.config import Config
from captioning.data.format import MANIFEST_FILE, VOCAB_FILE
from captioning.tracking import TRACKERS, NullTracker, Tracker, TrackingUnavailable, flatten
from captioning.tracking.jsonl import JsonlTracker

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from captioning.tracking.mlflow_run import MlflowTracker

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PIPELINE_RUN = "run"  # the JSON-lines parent's run name


def _connect(uri: str | None, **kwargs: Any) -> MlflowClient:
    from captioning.tracking.client import connect

    return connect(uri, **kwargs)


def _mlflow_tracker() -> type[MlflowTracker]:
    from captioning.tracking.mlflow_run import MlflowTracker

    return MlflowTracker


def configured_uri(cfg: Config) -> str | None:
    """``tracking.tracking_uri``, else MLFLOW_TRACKING_URI, else None."""
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def tracking_uri_of(cfg: Config) -> str:
    """The MLflow server a pipeline reports to; TrackingUnavailable (saying how to get one) when none is set."""
    uri = configured_uri(cfg)
    if not uri:
        raise TrackingUnavailable(
            "the pipeline logs to MLflow: set MLFLOW_TRACKING_URI or --tracking.tracking_uri "
            "(`captioning stack up` starts a local server and prints the variable)"
        )
    return uri


def tracker_kind(requested: str, cfg: Config) -> str:
    """``auto`` resolved: mlflow when a tracking URI is configured, else jsonl."""
    if requested not in TRACKERS:
        raise ValueError(f"unknown tracker {requested!r}; valid: {', '.join(TRACKERS)}")
    if requested == "auto":
        return "mlflow" if configured_uri(cfg) else "jsonl"
    return requested


def git_commit() -> str:
    """The source tree's commit (with ``-dirty`` when it has local changes), or ``unknown``."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def describe_run(tracker: Tracker, cfg: Config, stages: Sequence[str], world_size: int) -> None:
    """The run's tags (recipe, stages, commit, dataset manifest hash), the flattened config as
    parameters, and the config, vocabulary and dataset manifest as artifacts under ``run/``."""
    manifest = storage.read_bytes(storage.join(cfg.data.shard_dir, MANIFEST_FILE))
    tracker.set_tags(
        {
            "recipe": cfg.recipe,
            "stages": ",".join(stages),
            "world_size": str(world_size),
            "git_commit": git_commit(),
            "dataset_manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "dataset": cfg.data.dataset,
        }
    )
    tracker.log_params(flatten(cfg.to_dict()))
    folder = tempfile.mkdtemp(prefix="captioning-run-")
    for name, data in (
        ("config.json", json.dumps(cfg.to_dict(), indent=1).encode()),
        (VOCAB_FILE, storage.read_bytes(storage.join(cfg.data.shard_dir, VOCAB_FILE))),
        (MANIFEST_FILE, manifest),
    ):
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(data)
        tracker.log_artifact(path, "run")


def _mlflow_settings(cfg: Config, output: str) -> dict[str, Any]:
    local = not storage.is_s3(output)
    return dict(
        fallback_dir=output if local else tempfile.mkdtemp(prefix="mlflow-fallback-"),
        system_metrics=cfg.tracking.system_metrics,
    )


def open_stage_tracker(
    requested: str,
    cfg: Config,
    output: str,
    stage: str,
    *,
    parent_run_id: str | None = None,
    world_size: int = 1,
    is_main: bool = True,
) -> Tracker:
    """Rank 0's tracker for one stage; every other rank gets a NullTracker.

    MLflow: a child run ``stage`` of ``parent_run_id``, or without a parent a run of its own
    (``<recipe>-<stage>-<time>``), described like a pipeline's parent. An unreachable server is a
    TrackingUnavailable here, before any training starts.
    """
    if not is_main:
        return NullTracker()
    kind = tracker_kind(requested, cfg)
    if kind == "none":
        return NullTracker()
    if kind == "jsonl":
        if storage.is_s3(output):
            logger.warning(
                "--tracker jsonl needs a local --output; %s is not: metrics are not recorded", output
            )
            return NullTracker()
        return JsonlTracker(os.path.join(output, METRICS_FILE), run_name=f"{PIPELINE_RUN}/{stage}")
    client = _connect(configured_uri(cfg), timeout_s=cfg.tracking.connect_timeout_s)
    settings = _mlflow_settings(cfg, output)
    if parent_run_id:
        tracker = _mlflow_tracker().start_run(
            client, cfg.tracking.experiment, stage, parent_run_id=parent_run_id, **settings
        )
    else:
        run_name = f"{cfg.recipe}-{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
        tracker = _mlflow_tracker().start_run(client, cfg.tracking.experiment, run_name, **settings)
        describe_run(tracker, cfg, [stage], world_size)
    logger.info("MLflow: stage %s in run %s at %s", stage, tracker.run_id, client.tracking_uri)
    return tracker


def start_pipeline_run(
    cfg: Config,
    stages: Sequence[str],
    *,
    run_name: str,
    world_size: int,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
    output: str | None = None,
) -> str:
    """Create and describe the MLflow parent run of a pipeline; its id. The run stays RUNNING: each
    stage reports under it (``--parent-run-id``) and ``end_pipeline_run`` ends it.

    With ``output``: the parent run an earlier attempt recorded there (``lineage``) is continued
    instead (RUNNING again, its ``attempt`` tag counted up; runs the earlier attempt left RUNNING
    below it are ended KILLED with the reason), so a retry keeps one lineage.
    """
    from captioning.tracking import lineage

    client = _connect(tracking_uri or tracking_uri_of(cfg), timeout_s=cfg.tracking.connect_timeout_s)
    if output is not None and (earlier := lineage.parent_run_of(output, client)) is not None:
        attempt = lineage.reopen_run(client, earlier)
        lineage.end_leftover_runs(
            client,
            earlier,
            f"left RUNNING by attempt {attempt - 1}, which ended without closing it",
            output=output,
        )
        logger.info("MLflow: attempt %d continues parent run %s", attempt, earlier)
        return earlier
    tracker = _mlflow_tracker().start_run(
        client,
        cfg.tracking.experiment,
        run_name,
        tags={"attempt": "1", **dict(tags or {})},
        terminate_on_close=False,
        system_metrics=False,
    )
    try:
        describe_run(tracker, cfg, stages, world_size)
    finally:
        tracker.close()
    assert tracker.run_id is not None
    if output is not None:
        lineage.remember_parent_run(output, tracker.run_id, client)
    return tracker.run_id


def end_pipeline_run(
    run_id: str,
    status: str = "FINISHED",
    *,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> None:
    """Log the pipeline's final figures on its parent run and end it with ``status``."""
    client = _connect(tracking_uri)
    for metric, number in (metrics or {}).items():
        client.log_metric(run_id, metric, float(number))
    for tag, text in (tags or {}).items():
        client.set_tag(run_id, tag, str(text))
    client.set_terminated(run_id, status)


def error_status(exc: BaseException) -> str:
    """FAILED for an error; KILLED for a cancellation or an interrupt (not an Exception)."""
    return "FAILED" if isinstance(exc, Exception) else "KILLED"


def end_run_after_error(
    run_id: str, exc: BaseException, *, tracking_uri: str | None = None, reason: str | None = None
) -> None:
    """End the parent run after the pipeline failed (FAILED) or was cancelled or interrupted (KILLED),
    tagged ``error`` with ``reason`` (default: the exception; a run stopped for a given reason from
    outside is KILLED); a tracking server that cannot be reached then only gets a warning: the
    original error matters."""
    status = "KILLED" if reason else error_status(exc)
    try:
        end_pipeline_run(
            run_id,
            status,
            tags={"error": (reason or f"{type(exc).__name__}: {exc}")[:500]},
            tracking_uri=tracking_uri,
        )
    except Exception as err:
        logger.warning("could not end MLflow run %s as %s: %s", run_id, status, err)


@contextlib.contextmanager
def ended_on_error(
    run_id: str, *, tracking_uri: str | None = None, reason: Callable[[], str | None] = lambda: None
) -> Iterator[None]:
    """Around a pipeline's steps: an error, a cancellation or an interrupt ends the parent run
    (``end_run_after_error``; ``reason()``, when it says something, names why) before it propagates,
    so no parent run is left RUNNING by a failure."""
    try:
        yield
    except BaseException as exc:
        end_run_after_error(run_id, exc, tracking_uri=tracking_uri, reason=reason())
        raise


def log_evaluation(
    scores: Mapping[str, float],
    *,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    results_file: str | None = None,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """An MLflow run holding an evaluation's scores (and its captions file); its run id."""
    tracker = _mlflow_tracker().start_run(
        _connect(tracking_uri),
        experiment,
        run_name,
        parent_run_id=parent_run_id,
        tags={"kind": "evaluation", **tags},
        system_metrics=False,
    )
    tracker.log_metrics(dict(scores), step=0)
    if results_file and os.path.exists(results_file):
        tracker.log_artifact(results_file)
    tracker.close()
    assert tracker.run_id is not None
    return tracker.run_id


class PipelineRun:
    """The parent run of a pipeline driven from a terminal (``captioning train``), for any tracker
    kind: an MLflow run, the ``run`` records of ``OUTPUT/metrics.jsonl``, or nothing."""

    def __init__(
        self, kind: str, run_id: str | None, tracking_uri: str | None, jsonl: Tracker | None
    ) -> None:
        self.kind, self.run_id, self.tracking_uri, self._jsonl = kind, run_id, tracking_uri, jsonl

    @classmethod
    def open(
        cls,
        requested: str,
        cfg: Config,
        stages: Sequence[str],
        *,
        output: str,
        run_name: str,
        world_size: int,
        tags: Mapping[str, str] | None = None,
    ) -> PipelineRun:
        kind = tracker_kind(requested, cfg)
        if kind == "mlflow":
            uri = tracking_uri_of(cfg)
            run_id = start_pipeline_run(
                cfg, stages, run_name=run_name, world_size=world_size, tags=tags, output=output
            )
            return cls(kind, run_id, uri, None)
        if kind == "jsonl" and not storage.is_s3(output):
            tracker = JsonlTracker(os.path.join(output, METRICS_FILE), run_name=PIPELINE_RUN)
            tracker.set_tags(dict(tags or {}))
            describe_run(tracker, cfg, stages, world_size)
            return cls(kind, None, None, tracker)
        return cls(kind, None, None, None)

    def end(
        self, status: str, metrics: Mapping[str, float] | None = None, tags: Mapping[str, str] | None = None
    ) -> None:
        if self.run_id is not None:
            end_pipeline_run(self.run_id, status, metrics=metrics, tags=tags, tracking_uri=self.tracking_uri)
        elif self._jsonl is not None:
            self._jsonl.log_metrics(dict(metrics or {}))
            self._jsonl.set_tags(dict(tags or {}))
            self._jsonl.close(status)

    def end_after_error(self, exc: BaseException) -> None:
        if self.run_id is not None:
            end_run_after_error(self.run_id, exc, tracking_uri=self.tracking_uri)
        elif self._jsonl is not None:
            self._jsonl.set_tags({"error": f"{type(exc).__name__}: {exc}"[:500]})
            self._jsonl.close(error_status(exc))
