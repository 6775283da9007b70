"""MLflow behind the ``Tracker`` protocol: an explicit run id, a background flusher, a local fallback.

    client = connect()                                   # MLFLOW_TRACKING_URI; fails fast, says how to start one
    tracker = MlflowTracker.start_run(client, "sat-coco", "pipeline", fallback_dir="runs/demo")
    stage = tracker.child("xe")                          # nested run: tag mlflow.parentRunId
    stage.log_params({"train": {"lr_decoder": 4e-4}})    # -> param train.lr_decoder
    stage.log_metrics({"train/loss": 3.2}, step=10)      # appends to a buffer; never waits on the network
    stage.log_artifact("runs/demo/xe/best.pt", "checkpoints")
    stage.close()                                        # flush, FINISHED; what could not be sent -> fallback file
    tracker.close()

    MlflowTracker.attach(client, run_id)                 # a run the orchestrator created (STYLE habit 8)
    python -m captioning.mlflow_tracker replay runs/demo/mlflow-unsent-<run_id>.jsonl [--tracking-uri URI]

Never touches MLflow's fluent global state (``mlflow.start_run``): every call names its run id.

Why a background flusher: a training step must not wait for, or die of, the tracking server. Metrics,
params and tags go to an in-memory queue (timestamps taken when logged); one thread per run sends them
in order with ``log_batch`` (at most 1000 metrics, 100 params, 100 tags, about 1 MB per call) and, when
the server is away, retries with backoff (0.5 s doubling up to 5 s) until it is back. Artifacts are
uploaded by a second thread from a staged copy (hard links where the file system allows, else a copy),
so a file in a temporary folder, or one replaced later, still uploads as it was when logged.
``close()`` waits a bounded time; whatever is still unsent then is written to
``<fallback_dir>/mlflow-unsent-<run_id>.jsonl`` and ``replay_fallback`` uploads it later.

Why our own REST store: MLflow 3.17 reads MLFLOW_HTTP_REQUEST_MAX_RETRIES (default 7, backoff factor 2:
about four minutes of retries against a dead server) and MLFLOW_HTTP_REQUEST_TIMEOUT (120 s) from the
environment on every request. Rather than change those for the whole process, the tracker's own calls
(log_batch, get_run, create_run, update_run) go through a ``RestStore`` whose requests carry no MLflow
retries and a short timeout; the flusher's backoff is the only retry loop. Artifact uploads keep
MLflow's own retries (they run on their own thread; a long upload must not be cut short).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.rest_store import RestStore
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.proto_json_utils import parse_dict
from mlflow.utils.rest_utils import http_request, verify_rest_response
from mlflow.utils.validation import (
    MAX_BATCH_LOG_REQUEST_SIZE,
    MAX_ENTITIES_PER_BATCH,
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

logger = logging.getLogger(__name__)

TRUNCATION_MARKER = "...[truncated]"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
NODE_TAG = "node_id"
MAX_BACKOFF_S = 5.0
FIRST_BACKOFF_S = 0.5
# A log_batch body must stay under MLflow's 1 MB request limit; each record's JSON overhead is a guess.
_MAX_BATCH_BYTES = int(MAX_BATCH_LOG_REQUEST_SIZE * 0.8)
_RECORD_OVERHEAD_BYTES = 80


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server does not answer."""


# --- connecting -------------------------------------------------------------------------------------


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _redact(uri: str) -> str:
    """The URI without user:password@ (for messages and the fallback file)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _probe(uri: str, timeout_s: float) -> tuple[bool, str]:
    """(answers, why not): GET /health, else a one-experiment search (servers behind a path prefix)."""
    creds = get_default_host_creds(uri)
    for endpoint in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        try:
            response = http_request(
                creds,
                endpoint,
                "GET",
                max_retries=0,
                backoff_factor=0,
                timeout=timeout_s,
                raise_on_status=False,
            )
        except MlflowException as exc:
            return False, str(exc).split("\n")[0]
        if response.status_code == 200:
            return True, ""
        if response.status_code in (401, 403):
            raise TrackingUnavailable(
                f"MLflow tracking server at {_redact(uri)} refused our credentials (HTTP "
                f"{response.status_code}): set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or "
                "MLFLOW_TRACKING_TOKEN"
            )
        if response.status_code != 404:
            return False, f"HTTP {response.status_code} from {endpoint}"
    return False, "HTTP 404 from /health and the REST API: is this an MLflow server?"


def connect(tracking_uri: str | None = None, *, timeout_s: float = 10.0) -> MlflowClient:
    """An ``MlflowClient`` for ``tracking_uri`` (None: MLflow's resolution, i.e. MLFLOW_TRACKING_URI).

    For http(s) URIs the server must answer within ``timeout_s`` (polled every 0.5 s, no MLflow
    retries), else ``TrackingUnavailable`` says which URI and how to start a local server.
    """
    client = MlflowClient(tracking_uri)
    uri = client.tracking_uri
    if not _is_http(uri):
        return client
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        answers, why = _probe(uri, timeout_s=max(0.5, min(remaining, 5.0)))
        if answers:
            return client
        if time.monotonic() + 0.5 >= deadline:
            raise TrackingUnavailable(
                f"MLflow tracking server at {_redact(uri)} did not answer within {timeout_s:g} s ({why}). "
                "Start a local one with `captioning mlflow start` (it serves http://127.0.0.1:5000), "
                "or point MLFLOW_TRACKING_URI at a running server."
            )
        time.sleep(0.5)


class _QuickRestStore(RestStore):
    """MLflow's REST store with no HTTP retries and a short timeout on every request (see module doc)."""

    def __init__(self, tracking_uri: str, timeout_s: float) -> None:
        super().__init__(lambda: get_default_host_creds(tracking_uri))
        self.timeout_s = timeout_s

    def _call_endpoint(
        self,
        api: Any,
        json_body: Any = None,
        endpoint: Any = None,
        retry_timeout_seconds: Any = None,
        response_proto: Any = None,
    ) -> Any:
        method_to_info = self._V3_METHOD_TO_INFO if api in self._V3_APIS else self._METHOD_TO_INFO
        self._validate_workspace_support_if_specified()
        default_endpoint, method = method_to_info[api]
        endpoint = endpoint or default_endpoint
        body = json.loads(json_body) if json_body is not None else None
        response = http_request(
            self.get_host_creds(),
            endpoint,
            method,
            max_retries=0,
            backoff_factor=0,
            timeout=self.timeout_s,
            **({"params": body} if method == "GET" else {"json": body}),
        )
        response = verify_rest_response(response, endpoint)
        proto = response_proto or api.Response()
        parse_dict(js_dict=json.loads(response.text or "{}"), message=proto)
        return proto


class _Backend:
    """The tracker's calls to the server: through ``_QuickRestStore`` for http(s), else the client."""

    def __init__(self, client: MlflowClient, timeout_s: float) -> None:
        self.client = client
        uri = client.tracking_uri
        self.store = _QuickRestStore(uri, timeout_s) if _is_http(uri) else None

    def log_batch(self, run_id: str, metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> None:
        if self.store is not None:
            self.store.log_batch(run_id, metrics, params, tags)
        else:
            self.client.log_batch(run_id, metrics, params, tags)

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
        if self.store is None:
            return str(self.client.create_run(experiment_id, tags=dict(tags), run_name=run_name).info.run_id)
        run = self.store.create_run(
            experiment_id=experiment_id,
            user_id=tags.get("mlflow.user", "unknown"),
            start_time=_now_ms(),
            tags=[RunTag(k, v) for k, v in tags.items()],
            run_name=run_name,
        )
        return str(run.info.run_id)

    def terminate(self, run_id: str, status: str, end_time: int) -> None:
        if self.store is not None:
            self.store.update_run_info(run_id, RunStatus.from_string(status), end_time, None)
        else:
            self.client.set_terminated(run_id, status, end_time)


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: no answer, a timeout, 5xx, 408 or 429 (MLflow wraps network errors as 500).

    Other 4xx, and errors raised before a request is made, are the request's own fault.
    """
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status in (408, 429)
    return isinstance(exc, OSError)  # requests' ConnectionError and Timeout are OSErrors


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return str(client.create_experiment(name))
        except MlflowException as exc:  # created meanwhile by another process
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
            assert experiment is not None
    if experiment.lifecycle_stage == "deleted":
        raise MlflowException(
            f"experiment {name!r} (id {experiment.experiment_id}) is deleted: restore it with "
            f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` or choose another name"
        )
    return str(experiment.experiment_id)


# --- values -----------------------------------------------------------------------------------------


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings (and dataclass instances) to dotted keys with ``str()`` values.

    ``flatten({"train": {"xe": {"lr": 4e-4}}, "seed": 1})`` -> ``{"train.xe.lr": "0.0004", "seed": "1"}``.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def _truncate(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, ending with a visible marker when cut."""
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def _now_ms() -> int:
    return int(time.time() * 1000)


def _json_number(value: float) -> float | str:
    """JSON has no NaN/inf: ``"nan"``, ``"inf"``, ``"-inf"`` instead (``float()`` reads them back)."""
    return value if math.isfinite(value) else str(value)


@dataclasses.dataclass(slots=True)
class _Record:
    """One metric, param or tag waiting for the server."""

    kind: str  # "metric" | "param" | "tag"
    key: str
    value: Any  # float for metrics, str otherwise
    step: int = 0
    timestamp: int = 0

    def to_json(self) -> dict[str, Any]:
        if self.kind == "metric":
            return {
                "kind": "metric",
                "key": self.key,
                "value": _json_number(self.value),
                "step": self.step,
                "timestamp": self.timestamp,
            }
        return {"kind": self.kind, "key": self.key, "value": self.value}


@dataclasses.dataclass(slots=True)
class _Artifact:
    staged: str  # our copy, uploaded under artifact_path/<basename>
    artifact_path: str | None
    source: str  # what the caller logged
    error: str | None = None


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
        experiment_id = _experiment_id(client, experiment)
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
        self._backend = _Backend(client, settings.request_timeout_s)
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.run_name = run_name
        self.fallback_path = None
        self._known_params = known_params  # the server's params for this run (worker thread only)
        self._pending_tags = dict(pending_tags or {})  # tags of a run still to be created
        self._parent = parent
        self._cv = threading.Condition()
        self._pending: deque[_Record] = deque()
        self._inflight: list[_Record] = []
        self._rejected: list[tuple[_Record, str]] = []
        self._artifacts: deque[_Artifact] = deque()
        self._failed_artifacts: list[_Artifact] = []
        self._staging_root = os.path.join(
            settings.fallback_dir, f"mlflow-staging-{run_id or uuid.uuid4().hex}"
        )
        self._urgent = False
        self._stop = False
        self._stop_event = threading.Event()  # interrupts artifact retry waits at close
        self._abandoned = False  # unsent things were handed to the fallback file: keep staged copies
        self._closed = False
        self._warned_closed = False
        self._warned_create = False
        self._worker = threading.Thread(target=self._flush_loop, name=f"mlflow-flush-{run_name}", daemon=True)
        self._artifact_worker: threading.Thread | None = None
        self._sampler: _SystemSampler | None = None
        self._worker.start()
        _open_trackers.add(self)
        if settings.system_metrics:
            self.set_tags({NODE_TAG: settings.node_id})
            self._sampler = _SystemSampler(self, settings.system_interval_s)

    # --- the Tracker protocol -----------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested dicts flattened with dots; values ``str()``, cut to MLflow's limit with a marker.

        A key the run already has with the same value is skipped (resume); with a different value it is
        kept as tag ``param_changed.<key>`` and a warning (MLflow forbids changing a param).
        """
        records = [
            _Record("param", key, _truncate(value, MAX_PARAM_VAL_LENGTH))
            for key, value in flatten(params).items()
        ]
        self._enqueue(records)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queue ``metrics`` at ``step`` (default 0), stamped now; NaN and inf go as MLflow takes them."""
        timestamp = _now_ms()
        records = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                logger.warning("metric %s=%r is not a number; not logged", key, value)
                continue
            records.append(_Record("metric", str(key), number, int(step or 0), timestamp))
        self._enqueue(records)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._enqueue(
            [_Record("tag", str(k), _truncate(str(v), MAX_TAG_VAL_LENGTH)) for k, v in tags.items()]
        )

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a file or a folder (as ``artifact_path/<basename>``) in the background.

        A staged copy is taken now, so the source may change or go away after this returns: hard links
        (instant) when ``fallback_dir`` is on the same file system, else a copy (time in proportion to
        size). Failures are retried, then reported in the fallback file at ``close()``; never raised here.
        """
        local_path = os.fspath(local_path)
        if self._refuse_closed("log_artifact"):
            return
        try:
            staged = self._stage(local_path)
        except OSError as exc:
            logger.warning("artifact %s not logged: cannot read it (%s)", local_path, exc)
            with self._cv:
                self._failed_artifacts.append(_Artifact(local_path, artifact_path, local_path, repr(exc)))
            return
        with self._cv:
            self._artifacts.append(_Artifact(staged, artifact_path, local_path))
            if self._artifact_worker is None:
                self._artifact_worker = threading.Thread(
                    target=self._artifact_loop, name=f"mlflow-artifacts-{self.run_name}", daemon=True
                )
                self._artifact_worker.start()
            self._cv.notify_all()

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
                if not _is_transient(exc):
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
            self._urgent = True
            self._cv.notify_all()
            while self._busy() and not self._stop:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            return not self._busy() and not self._rejected and not self._failed_artifacts

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

    def _enqueue(self, records: list[_Record]) -> None:
        if not records or self._refuse_closed("logging"):
            return
        with self._cv:
            self._pending.extend(records)

    def _busy(self) -> bool:
        return bool(self._pending or self._inflight or self._artifacts or self.run_id is None)

    def _flush_loop(self) -> None:
        failures = 0
        wait_s = self._settings.flush_interval_s
        while True:
            with self._cv:
                if not self._stop and not self._urgent and wait_s > 0:
                    self._cv.wait(wait_s)
                if self._stop:
                    return
                creating = self.run_id is None
                batch = [] if creating else self._take_batch()
                self._inflight = batch
            if creating:
                ok = self._create_run()
                done = 0
            else:
                done = self._send(batch) if batch else 0
                ok = done == len(batch)
            with self._cv:
                self._pending.extendleft(reversed(batch[done:]))  # unsent ones go back first, in order
                self._inflight = []
                if ok:
                    failures = 0
                    if not self._pending:
                        self._urgent = False  # a flush() keeps the worker sending until the queue is empty
                    full = len(self._pending) >= MAX_METRICS_PER_BATCH
                    wait_s = 0.0 if creating or full else self._settings.flush_interval_s
                else:
                    failures += 1
                    wait_s = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (failures - 1))
                    self._urgent = False  # a waiting flush() must not turn the backoff into a busy loop
                self._cv.notify_all()

    def _take_batch(self) -> list[_Record]:
        """The longest prefix of the queue that fits one log_batch (called under the lock)."""
        batch: list[_Record] = []
        counts = {"metric": 0, "param": 0, "tag": 0}
        limits = {
            "metric": MAX_METRICS_PER_BATCH,
            "param": MAX_PARAMS_TAGS_PER_BATCH,
            "tag": MAX_PARAMS_TAGS_PER_BATCH,
        }
        batch_params: dict[str, str] = {}
        batch_tags: set[str] = set()
        size = 0
        while self._pending:
            record = self._pending[0]
            if record.kind == "param":
                known = self._known_params.get(record.key, batch_params.get(record.key))
                if known == record.value:
                    self._pending.popleft()  # already on the run (a resumed run re-logs its config)
                    continue
                if known is not None:
                    logger.warning(
                        "param %s of run %s is %r; MLflow cannot change it, so the new value %r is kept as tag %s",
                        record.key,
                        self.run_id,
                        known[:200],
                        record.value[:200],
                        f"param_changed.{record.key}",
                    )
                    record = _Record(
                        "tag", f"param_changed.{record.key}"[:MAX_ENTITY_KEY_LENGTH], record.value
                    )
                    self._pending[0] = record
            if record.kind == "tag" and record.key in batch_tags:
                break  # the same tag twice: the later value goes in the next call, so it wins
            cost = len(record.key) + len(str(record.value)) + _RECORD_OVERHEAD_BYTES
            if batch and (
                counts[record.kind] >= limits[record.kind]
                or len(batch) >= MAX_ENTITIES_PER_BATCH
                or size + cost > _MAX_BATCH_BYTES
            ):
                break
            batch.append(self._pending.popleft())
            counts[record.kind] += 1
            size += cost
            if record.kind == "param":
                batch_params[record.key] = record.value
            elif record.kind == "tag":
                batch_tags.add(record.key)
        return batch

    def _send(self, records: list[_Record]) -> int:
        """Send ``records`` in order; how many leading ones are done (sent, or rejected by the server).

        A request the server rejects (4xx) is split in halves until the bad records are found; they are
        kept for the fallback file instead of blocking the queue. Stops at the first transient failure.
        """
        assert self.run_id is not None
        try:
            self._backend.log_batch(
                self.run_id,
                [Metric(r.key, r.value, r.timestamp, r.step) for r in records if r.kind == "metric"],
                [Param(r.key, r.value) for r in records if r.kind == "param"],
                [RunTag(r.key, r.value) for r in records if r.kind == "tag"],
            )
        except Exception as exc:
            if _is_transient(exc):
                logger.debug("MLflow log_batch for run %s failed (will retry): %s", self.run_id, exc)
                return 0
            if len(records) == 1:
                logger.warning(
                    "MLflow rejected %s %s of run %s: %s", records[0].kind, records[0].key, self.run_id, exc
                )
                with self._cv:
                    self._rejected.append((records[0], str(exc).split("\n")[0]))
                return 1
            half = len(records) // 2
            done = self._send(records[:half])
            return done if done < half else half + self._send(records[half:])
        for record in records:
            if record.kind == "param":
                self._known_params[record.key] = record.value
        return len(records)

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
            if not _is_transient(exc) and not self._warned_create:
                self._warned_create = True  # retried like an outage; the fallback file keeps everything
                logger.error("MLflow refused to create run %r: %s", self.run_name, exc)
            return False
        with self._cv:
            self.run_id = run_id
            self._parent = None
            logger.info("created MLflow run %s (%s) now that the server answers", run_id, self.run_name)
        return True

    # --- artifacts ----------------------------------------------------------------------------------

    def _stage(self, local_path: str) -> str:
        """A snapshot of ``local_path`` under the staging folder: hard links where possible, else copies."""
        folder = os.path.join(self._staging_root, uuid.uuid4().hex[:12])
        os.makedirs(folder)
        target = os.path.join(folder, os.path.basename(os.path.normpath(local_path)))
        if os.path.isdir(local_path):
            shutil.copytree(local_path, target, copy_function=_link_or_copy)
        else:
            _link_or_copy(local_path, target)
        return target

    def _artifact_loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stop or (bool(self._artifacts) and self.run_id is not None))
                if self._stop:
                    return
                item = self._artifacts[0]
                run_id = self.run_id
            assert run_id is not None
            error = self._upload(run_id, item)
            with self._cv:
                self._artifacts.popleft()
                if error is not None:
                    item.error = error
                    self._failed_artifacts.append(item)
                elif not self._abandoned:
                    shutil.rmtree(os.path.dirname(item.staged), ignore_errors=True)
                self._cv.notify_all()

    def _upload(self, run_id: str, item: _Artifact) -> str | None:
        """Upload one staged artifact with retries; the last error, or None when it arrived."""
        error = ""
        for attempt in range(self._settings.artifact_attempts):
            try:
                self._client.log_artifact(run_id, item.staged, item.artifact_path)
                return None
            except Exception as exc:
                error = str(exc).split("\n")[0]
                logger.warning(
                    "upload of artifact %s to run %s failed (attempt %d/%d): %s",
                    item.source,
                    run_id,
                    attempt + 1,
                    self._settings.artifact_attempts,
                    error,
                )
            if self._stop_event.wait(min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2**attempt)):
                break
        return error

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
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._stop_event.set()
        self._worker.join(timeout=self._settings.request_timeout_s + 1.0)
        end_time = _now_ms()
        terminated = status is None or not self._settings.terminate_on_close
        if not terminated and self.run_id is not None:
            for attempt in range(3):
                try:
                    self._backend.terminate(self.run_id, status or "FINISHED", end_time)
                    terminated = True
                    break
                except Exception as exc:
                    if not _is_transient(exc) or not sent_all:
                        logger.debug("set_terminated of run %s failed: %s", self.run_id, exc)
                        break
                    time.sleep(FIRST_BACKOFF_S * 2**attempt)
        with self._cv:
            self._abandoned = True
            records = [r.to_json() for r in [*self._inflight, *self._pending]]
            records += [{**r.to_json(), "error": why} for r, why in self._rejected]
            artifacts = [*self._failed_artifacts, *self._artifacts]
        records += [
            {
                "kind": "artifact",
                "local_path": a.staged,
                "artifact_path": a.artifact_path,
                "source": a.source,
                "error": a.error or "not uploaded before close",
            }
            for a in artifacts
        ]
        if not terminated:
            records.append({"kind": "status", "status": status, "end_time": end_time})
        if records:
            self._write_fallback(records)
        elif os.path.isdir(self._staging_root):
            shutil.rmtree(self._staging_root, ignore_errors=True)

    def _write_fallback(self, records: list[dict[str, Any]]) -> None:
        name = f"mlflow-unsent-{self.run_id or 'pending-' + uuid.uuid4().hex[:12]}.jsonl"
        header: dict[str, Any] = {
            "kind": "run",
            "run_id": self.run_id,
            "experiment_id": self.experiment_id,
            "run_name": self.run_name,
            "tracking_uri": _redact(self._client.tracking_uri),
            "written_ms": _now_ms(),
        }
        if self.run_id is None:
            header["tags"] = self._pending_tags
            header["parent_run_id"] = self._parent.run_id if self._parent is not None else None
        lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in [header, *records])
        for folder in (self._settings.fallback_dir, tempfile.gettempdir()):  # never lose it quietly
            path = os.path.join(folder, name)
            try:
                os.makedirs(folder, exist_ok=True)
                with open(path, "a", encoding="utf-8") as f:  # appends: a resumed run may close unsent twice
                    f.write(lines)
                break
            except OSError as exc:
                logger.error("cannot write MLflow fallback file %s: %s", path, exc)
        else:
            raise OSError(f"no place to save {len(records)} unsent MLflow records of run {self.run_id}")
        self.fallback_path = path
        kinds: dict[str, int] = {}
        for record in records:
            kinds[record["kind"]] = kinds.get(record["kind"], 0) + 1
        logger.warning(
            "MLflow run %s (%s): %s not sent to %s; saved to %s. Replay when the server is back: "
            "python -m captioning.mlflow_tracker replay %s --tracking-uri %s",
            self.run_id or "(not created)",
            self.run_name,
            ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
            _redact(self._client.tracking_uri),
            path,
            path,
            _redact(self._client.tracking_uri),
        )


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


def _link_or_copy(src: str, dst: str) -> str:
    """A hard link (instant, and it keeps the content if ``src`` is replaced or deleted), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


# --- system metrics ---------------------------------------------------------------------------------


class _SystemSampler:
    """Every ``interval_s``: CPU, memory, process RSS, disk, network and GPU as ``system/<name>`` metrics.

    Names follow MLflow's own system metrics (``system/cpu_utilization_percentage``, ...), but samples go
    through the tracker's queue, so an outage loses none of them. GPU figures come from pynvml when it
    is installed, else from torch (only when the process already imported it).
    """

    def __init__(self, tracker: MlflowTracker, interval_s: float) -> None:
        import psutil

        self._psutil = psutil
        self._tracker = tracker
        self._interval_s = interval_s
        self._process = psutil.Process()
        self._cpu_last = self._cpu_times()
        self._net_start = self._net_counters()
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception:
            self._nvml = None
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    def _cpu_times(self) -> tuple[float, float]:
        """(busy, total) CPU seconds so far: our own window rather than psutil.cpu_percent's
        process-wide one, so a parent's and a child's sampler do not shorten each other's."""
        times = self._psutil.cpu_times()
        guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)  # counted in user too
        total = sum(times) - guest
        return total - times.idle - getattr(times, "iowait", 0.0), total

    def _cpu_percent(self) -> float:
        busy, total = self._cpu_times()
        busy_before, total_before = self._cpu_last
        self._cpu_last = (busy, total)
        return 100.0 * (busy - busy_before) / (total - total_before) if total > total_before else 0.0

    def _net_counters(self) -> tuple[float, float] | None:
        try:
            counters = self._psutil.net_io_counters()
        except Exception:
            return None
        return (counters.bytes_recv, counters.bytes_sent) if counters is not None else None

    def sample(self) -> dict[str, float]:
        psutil = self._psutil
        memory = psutil.virtual_memory()
        values = {
            "cpu_utilization_percentage": self._cpu_percent(),
            "system_memory_usage_megabytes": memory.used / 1e6,
            "system_memory_usage_percentage": memory.percent,
            "process_rss_megabytes": self._process.memory_info().rss / 1e6,
        }
        with contextlib.suppress(Exception):
            disk = psutil.disk_usage(os.path.abspath(os.sep))
            values |= {
                "disk_usage_percentage": disk.percent,
                "disk_usage_megabytes": disk.used / 1e6,
                "disk_available_megabytes": disk.free / 1e6,
            }
        net = self._net_counters()
        if net is not None and self._net_start is not None:
            values["network_receive_megabytes"] = (net[0] - self._net_start[0]) / 1e6
            values["network_transmit_megabytes"] = (net[1] - self._net_start[1]) / 1e6
        with contextlib.suppress(Exception):
            values |= self._gpu()
        return {f"system/{k}": float(v) for k, v in values.items()}

    def _gpu(self) -> dict[str, float]:
        values: dict[str, float] = {}
        if self._nvml is not None:
            nvml = self._nvml
            for i in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                values[f"gpu_{i}_utilization_percentage"] = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
                values[f"gpu_{i}_memory_usage_megabytes"] = memory.used / 1e6
                values[f"gpu_{i}_memory_usage_percentage"] = 100.0 * memory.used / max(memory.total, 1)
            return values
        torch = sys.modules.get("torch")  # importing torch just to sample would cost seconds
        if torch is None or not torch.cuda.is_available():
            return values
        for i in range(torch.cuda.device_count()):
            values[f"gpu_{i}_memory_allocated_megabytes"] = torch.cuda.memory_allocated(i) / 1e6
            values[f"gpu_{i}_memory_reserved_megabytes"] = torch.cuda.memory_reserved(i) / 1e6
            with contextlib.suppress(Exception):  # needs pynvml or amdsmi underneath
                values[f"gpu_{i}_utilization_percentage"] = float(torch.cuda.utilization(i))
        return values

    def _loop(self) -> None:
        step = 0
        while not self._stop_event.wait(self._interval_s):
            try:
                self._tracker.log_metrics(self.sample(), step=step)
            except Exception as exc:  # a sampler must never take the run down
                logger.debug("system metrics sample failed: %s", exc)
            step += 1

    def stop(self) -> None:
        self._stop_event.set()
        self._thread.join(timeout=5.0)


# --- replay -----------------------------------------------------------------------------------------


def read_fallback(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a fallback file (``kind``: run, metric, param, tag, artifact, status)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _rewrite(path: str | os.PathLike[str], records: list[dict[str, Any]]) -> None:
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, sort_keys=True) + "\n" for record in records)
    os.replace(tmp, path)


def replay_fallback(client: MlflowClient, path: str | os.PathLike[str]) -> int:
    """Upload a fallback file to its run (created first when it never was); returns the records replayed.

    Safe to run twice: metrics re-logged with the same key, step, timestamp and value are not stored
    again, params already on the run are skipped (a different value becomes tag ``param_changed.<key>``),
    tags are overwritten with the same value. Records the server had rejected (with an ``error`` and no
    ``kind`` of artifact) are skipped with a warning. Uses ``client`` with MLflow's usual retries.
    """
    records = read_fallback(path)
    count = 0
    run_id: str | None = None
    blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for record in records:
        if record["kind"] == "run":
            blocks.append((record, []))
        elif blocks:
            blocks[-1][1].append(record)
    for header, body in blocks:
        run_id = header.get("run_id") or run_id
        if run_id is None:
            tags = dict(header.get("tags") or {})
            if header.get("parent_run_id"):
                tags[PARENT_TAG] = header["parent_run_id"]
            run = client.create_run(header["experiment_id"], tags=tags, run_name=header["run_name"])
            run_id = header["run_id"] = str(run.info.run_id)
            _rewrite(path, records)  # a second replay goes to this run instead of creating another
            logger.info("created run %s (%s) for %s", run_id, header["run_name"], path)
        rejected = sum(1 for r in body if r.get("error") and r["kind"] in ("metric", "param", "tag"))
        if rejected:
            logger.warning("%d records in %s were rejected by the server before; skipped", rejected, path)
        body = [r for r in body if not (r.get("error") and r["kind"] in ("metric", "param", "tag"))]
        existing = dict(client.get_run(run_id).data.params)
        metrics = [
            Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
            for r in body
            if r["kind"] == "metric"
        ]
        params: list[Param] = []
        tags_out: dict[str, str] = {}
        for r in body:
            if r["kind"] == "param":
                if r["key"] not in existing:
                    existing[r["key"]] = r["value"]
                    params.append(Param(r["key"], r["value"]))
                elif existing[r["key"]] != r["value"]:
                    tags_out[f"param_changed.{r['key']}"[:MAX_ENTITY_KEY_LENGTH]] = r["value"]
            elif r["kind"] == "tag":
                tags_out[r["key"]] = r["value"]
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=chunk)
        for chunk in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=chunk)
        for chunk in _chunks([RunTag(k, v) for k, v in tags_out.items()], MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=chunk)
        for r in body:
            if r["kind"] != "artifact":
                continue
            if os.path.exists(r["local_path"]):
                client.log_artifact(run_id, r["local_path"], r.get("artifact_path"))
            else:
                logger.warning(
                    "artifact %s (from %s) is gone; not uploaded", r["local_path"], r.get("source")
                )
        statuses = [r for r in body if r["kind"] == "status" and r.get("status")]
        if statuses:
            client.set_terminated(run_id, statuses[-1]["status"], int(statuses[-1]["end_time"]))
        count += len(body) + rejected
    logger.info("replayed %d records from %s to run %s", count, path, run_id)
    return count


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m captioning.mlflow_tracker replay FILE... [--tracking-uri URI]``; returns records replayed."""
    parser = argparse.ArgumentParser(
        prog="python -m captioning.mlflow_tracker", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="upload fallback files written while the server was away")
    replay.add_argument("files", nargs="+")
    replay.add_argument("--tracking-uri", default=None, help="default: the file's, else MLFLOW_TRACKING_URI")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    total = 0
    for path in args.files:
        headers = [r for r in read_fallback(path) if r["kind"] == "run"]
        uri = args.tracking_uri or (headers[0].get("tracking_uri") if headers else None)
        replayed = replay_fallback(connect(uri), path)
        print(f"{path}: {replayed} records replayed")
        total += replayed
    return total


if __name__ == "__main__":
    try:
        main()
    except TrackingUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
