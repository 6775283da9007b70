"""MLflow behind the ``Tracker`` protocol: an explicit run id, a background flusher, a local fallback.

    client = connect()                                   # tracking/client.py: MLFLOW_TRACKING_URI, fails fast
    tracker = MlflowTracker.start_run(client, "sat-coco", "pipeline", fallback_dir="runs/demo")
    stage = tracker.child("xe")                          # nested run: tag mlflow.parentRunId
    stage.log_params({"train": {"lr_decoder": 4e-4}})    # -> param train.lr_decoder
    stage.log_metrics({"train/loss": 3.2}, step=10)      # appends to a buffer; never waits on the network
    stage.log_artifact("runs/demo/xe/best.pt", "checkpoints")
    stage.close()                                        # flush, FINISHED; what could not be sent -> fallback file
    tracker.close()

    MlflowTracker.attach(client, run_id)                 # a run the orchestrator created (STYLE habit 8)
    python -m captioning.tracking.fallback replay runs/demo/mlflow-unsent-<run_id>.jsonl [--tracking-uri URI]

Never touches MLflow's fluent global state (``mlflow.start_run``): every call names its run id.

Why background threads: a training step must not wait for, or die of, the tracking server. Metrics,
params and tags go to a queue (timestamps taken when logged) that a thread sends in order, with backoff
while the server is away (tracking/record_queue.py); artifacts are staged now and uploaded by a second
thread (tracking/artifacts.py). ``close()`` waits a bounded time; whatever is still unsent then goes to
``<fallback_dir>/mlflow-unsent-<run_id>.jsonl`` (tracking/fallback.py), which ``replay_fallback`` uploads.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from captioning.tracking import flatten
from captioning.tracking.artifacts import ArtifactUploads
from captioning.tracking.client import (
    FIRST_BACKOFF_S,
    PARENT_TAG,
    RUN_NAME_TAG,
    STAGING_PREFIX,
    Backend,
    ensure_experiment,
    is_transient,
    now_ms,
    redact,
    truncate,
)
from captioning.tracking.fallback import write_fallback
from captioning.tracking.record_queue import Record, RecordQueue
from captioning.tracking.system import SystemSampler

logger = logging.getLogger(__name__)

NODE_TAG = "node_id"


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What a tracker passes on to its children."""

    fallback_dir: str
    system_metrics: bool
    node_id: str
    flush_interval_s: float
    system_interval_s: float
    request_timeout_s: float
    close_timeout_s: float
    artifact_attempts: int
    terminate_on_close: bool


# Trackers not closed yet: at interpreter exit their queues are flushed (or saved, waiting at most
# _EXIT_FLUSH_S each) but the run's status is left as it is, since nobody said whether the work
# succeeded. Only in the process that made them (a forked worker inherits the set, not the threads).
_open_trackers: weakref.WeakSet[MlflowTracker] = weakref.WeakSet()
_EXIT_FLUSH_S = 10.0


@atexit.register
def _flush_open_trackers() -> None:
    for tracker in list(_open_trackers):
        if tracker._pid == os.getpid():
            with contextlib.suppress(Exception):
                tracker._shutdown(
                    status=None, flush_timeout_s=min(_EXIT_FLUSH_S, tracker._settings.close_timeout_s)
                )


# --- the tracker ------------------------------------------------------------------------------------


class MlflowTracker:
    """One MLflow run behind the ``Tracker`` protocol (``captioning.tracking``); rank 0 only.

    ``log_*`` and ``set_tags`` only append to a queue; ``flush()`` waits for it; ``close()`` ends the run.
    ``run_id`` is None only for a child made while the server was away (created when it returns).
    ``fallback_path`` is set once ``close()`` had to save unsent data locally.
    """

    run_id: str | None
    fallback_path: str | None

    def __init__(self, client: MlflowClient, run_id: str, **settings: Any) -> None:
        """Track the existing run ``run_id`` (its params are read once, so re-logging them is a no-op).

        ``settings``: the keywords of ``_settings_from`` (fallback_dir, system_metrics, node_id,
        flush_interval_s, system_interval_s, request_timeout_s, close_timeout_s, artifact_attempts,
        terminate_on_close), with its defaults; ``start_run`` and ``attach`` take the same.
        """
        resolved = _settings_from(**settings)
        run = client.get_run(run_id)
        self._status_at_start = str(run.info.status)
        self._setup(
            client,
            resolved,
            run_id=run_id,
            experiment_id=str(run.info.experiment_id),
            run_name=str(run.info.run_name or ""),
            known_params=dict(run.data.params),
        )

    @classmethod
    def start_run(
        cls,
        client: MlflowClient,
        experiment: str,
        run_name: str,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> MlflowTracker:
        """A new run ``run_name`` in ``experiment`` (created when missing); nested under ``parent_run_id``.

        ``kwargs`` are the constructor's settings. The run gets MLflow's context tags (user, source, git
        commit) like ``mlflow.start_run`` would, without touching its global state.
        """
        experiment_id = ensure_experiment(client, experiment)
        run_tags = {**resolve_tags(dict(tags or {})), RUN_NAME_TAG: run_name}
        if parent_run_id:
            run_tags[PARENT_TAG] = parent_run_id
        run = client.create_run(experiment_id, tags=run_tags, run_name=run_name)
        tracker = cls.__new__(cls)
        tracker._setup(
            client,
            _settings_from(**kwargs),
            run_id=str(run.info.run_id),
            experiment_id=experiment_id,
            run_name=run_name,
            known_params={},
        )
        return tracker

    @classmethod
    def attach(cls, client: MlflowClient, run_id: str, **kwargs: Any) -> MlflowTracker:
        """An existing run (the orchestrator created it and passed its id down; or a resumed run).

        A run that was already terminated (a crashed attempt, say) is set back to RUNNING.
        """
        tracker = cls(client, run_id, **kwargs)
        if tracker._status_at_start != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return tracker

    def _setup(
        self,
        client: MlflowClient,
        settings: _Settings,
        *,
        run_id: str | None,
        experiment_id: str,
        run_name: str,
        known_params: dict[str, str],
        pending_tags: Mapping[str, str] | None = None,
        parent: MlflowTracker | None = None,
    ) -> None:
        self._client = client
        self._pid = os.getpid()
        self._settings = settings
        self._backend = Backend(client, settings.request_timeout_s)
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.run_name = run_name
        self.fallback_path = None
        self._pending_tags = dict(pending_tags or {})  # tags of a run still to be created
        self._parent = parent
        self._cv = threading.Condition()  # an RLock underneath: the queues below share it
        self._records = RecordQueue(
            self._backend,
            self._cv,
            known_params,
            flush_interval_s=settings.flush_interval_s,
            run_id=lambda: self.run_id,
            create_run=self._create_run,
            name=run_name,
        )
        self._uploads = ArtifactUploads(
            client,
            self._cv,
            os.path.join(settings.fallback_dir, f"{STAGING_PREFIX}{run_id or uuid.uuid4().hex}"),
            attempts=settings.artifact_attempts,
            run_id=lambda: self.run_id,
            name=run_name,
        )
        self._closed = False
        self._warned_closed = False
        self._warned_create = False
        self._sampler: SystemSampler | None = None
        self._records.start()
        _open_trackers.add(self)
        if settings.system_metrics:
            self.set_tags({NODE_TAG: settings.node_id})
            self._sampler = SystemSampler(self, settings.system_interval_s)

    # --- the Tracker protocol -----------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested dicts flattened with dots; values ``str()``, cut to MLflow's limit with a marker.

        A key the run already has with the same value is skipped (resume); with a different value it is
        kept as tag ``param_changed.<key>`` and a warning (MLflow forbids changing a param).
        """
        records = [
            Record("param", key, truncate(value, MAX_PARAM_VAL_LENGTH))
            for key, value in flatten(params).items()
        ]
        self._enqueue(records)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queue ``metrics`` at ``step`` (default 0), stamped now; NaN and inf go as MLflow takes them."""
        timestamp = now_ms()
        records = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                logger.warning("metric %s=%r is not a number; not logged", key, value)
                continue
            records.append(Record("metric", str(key), number, int(step or 0), timestamp))
        self._enqueue(records)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._enqueue([Record("tag", str(k), truncate(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()])

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a file or a folder (as ``artifact_path/<basename>``) in the background.

        A staged copy is taken now, so the source may change or go away after this returns: hard links
        (instant) when ``fallback_dir`` is on the same file system, else a copy (time in proportion to
        size). Failures are retried, then reported in the fallback file at ``close()``; never raised here.
        """
        local_path = os.fspath(local_path)
        if not self._refuse_closed("log_artifact"):
            self._uploads.add(local_path, artifact_path)

    def child(self, name: str) -> MlflowTracker:
        """A nested run ``name`` in the same experiment, with the same settings; the child is its own
        and is always ended by ``close()`` (even when the parent's status belongs to an orchestrator).

        Created now when the server answers; otherwise the child queues as usual and its run is created
        when the server is back (``run_id`` None until then). It shares no state with this tracker, so
        either may close first.
        """
        tags = {**resolve_tags({}), RUN_NAME_TAG: name}
        child = MlflowTracker.__new__(MlflowTracker)
        run_id: str | None = None
        if self.run_id is not None:
            tags[PARENT_TAG] = self.run_id
            try:
                run_id = self._backend.create_run(self.experiment_id, name, tags)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                logger.warning(
                    "MLflow server unreachable; child run %r will be created when it is back", name
                )
        child._setup(
            self._client,
            dataclasses.replace(self._settings, terminate_on_close=True),
            run_id=run_id,
            experiment_id=self.experiment_id,
            run_name=name,
            known_params={},
            pending_tags=None if run_id else tags,
            parent=None if run_id else self,
        )
        return child

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait up to ``timeout_s`` for the queues to drain; True when everything reached the server."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            self._records.urgent = True
            self._cv.notify_all()
            while self._busy() and not self._records.stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            return not self._busy() and not self._records.rejected and not self._uploads.failed

    def close(self, status: str = "FINISHED") -> None:
        """Flush (up to ``close_timeout_s``), stop the threads and set the run's status.

        Whatever could not be sent is written to ``<fallback_dir>/mlflow-unsent-<run_id>.jsonl`` with a
        WARNING saying how to replay it. Closing twice does nothing.
        """
        RunStatus.from_string(status)  # an unknown status fails here, before anything is stopped
        self._shutdown(status)

    # --- internals ----------------------------------------------------------------------------------

    def _refuse_closed(self, what: str) -> bool:
        if not self._closed:
            return False
        if not self._warned_closed:
            self._warned_closed = True
            logger.warning("%s on closed MLflow run %s (%s): ignored", what, self.run_id, self.run_name)
        return True

    def _enqueue(self, records: list[Record]) -> None:
        if not records or self._refuse_closed("logging"):
            return
        self._records.put(records)

    def _busy(self) -> bool:
        return bool(self._records.busy() or self._uploads.pending or self.run_id is None)

    def _create_run(self) -> bool:
        """Create the run of a child made while the server was away (worker thread)."""
        tags = dict(self._pending_tags)
        if self._parent is not None:
            parent_id = self._parent.run_id
            if parent_id is None:
                return False  # the parent's run does not exist yet either
            tags[PARENT_TAG] = parent_id
        try:
            run_id = self._backend.create_run(self.experiment_id, self.run_name, tags)
        except Exception as exc:
            if not is_transient(exc) and not self._warned_create:
                self._warned_create = True  # retried like an outage; the fallback file keeps everything
                logger.error("MLflow refused to create run %r: %s", self.run_name, exc)
            return False
        with self._cv:
            self.run_id = run_id
            self._parent = None
            logger.info("created MLflow run %s (%s) now that the server answers", run_id, self.run_name)
        return True

    # --- closing ------------------------------------------------------------------------------------

    def _shutdown(self, status: str | None, flush_timeout_s: float | None = None) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
        _open_trackers.discard(self)
        if self._sampler is not None:
            self._sampler.stop()
        sent_all = self.flush(self._settings.close_timeout_s if flush_timeout_s is None else flush_timeout_s)
        with self._cv:  # both threads see the stop at once: neither starts more work after the other stops
            self._records.stop()
            self._uploads.stop()
        self._records.join(self._settings.request_timeout_s + 1.0)
        end_time = now_ms()
        terminated = status is None or not self._settings.terminate_on_close
        if not terminated and self.run_id is not None:
            for attempt in range(3):
                try:
                    self._backend.terminate(self.run_id, status or "FINISHED", end_time)
                    terminated = True
                    break
                except Exception as exc:
                    if not is_transient(exc) or not sent_all:
                        logger.debug("set_terminated of run %s failed: %s", self.run_id, exc)
                        break
                    time.sleep(FIRST_BACKOFF_S * 2**attempt)
        with self._cv:
            artifacts = self._uploads.abandon()
            records = self._records.unsent()
        records += [a.to_json() for a in artifacts]
        if not terminated:
            records.append({"kind": "status", "status": status, "end_time": end_time})
        if records:
            self._write_fallback(records)
        else:
            self._uploads.remove_staging()

    def _write_fallback(self, records: list[dict[str, Any]]) -> None:
        header: dict[str, Any] = {
            "kind": "run",
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "run_name": self.run_name,
            "tracking_uri": redact(self._client.tracking_uri),
            "written_ms": now_ms(),
        }
        if self.run_id is None:
            header["tags"] = self._pending_tags
            header["parent_run_id"] = self._parent.run_id if self._parent is not None else None
        self.fallback_path = write_fallback(self._settings.fallback_dir, header, records)


def _settings_from(
    *,
    fallback_dir: str | None = None,
    node_id: str | None = None,
    system_metrics: bool = False,
    flush_interval_s: float = 2.0,
    system_interval_s: float = 10.0,
    request_timeout_s: float = 10.0,
    close_timeout_s: float = 60.0,
    artifact_attempts: int = 3,
    terminate_on_close: bool = True,
) -> _Settings:
    """A tracker's settings, the one place their defaults live.

    ``fallback_dir``: where unsent data and staged artifacts go (default ``<tmp>/mlflow-unsent``).
    ``request_timeout_s``: per HTTP request of the flusher; ``close_timeout_s``: how long ``close()``
    waits for the queues; ``terminate_on_close=False`` leaves the run's status to its owner.
    """
    return _Settings(
        fallback_dir=os.path.abspath(fallback_dir or os.path.join(tempfile.gettempdir(), "mlflow-unsent")),
        system_metrics=system_metrics,
        node_id=node_id or socket.gethostname(),
        flush_interval_s=flush_interval_s,
        system_interval_s=system_interval_s,
        request_timeout_s=request_timeout_s,
        close_timeout_s=close_timeout_s,
        artifact_attempts=max(1, artifact_attempts),
        terminate_on_close=terminate_on_close,
    )
