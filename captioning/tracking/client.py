"""Connecting to MLflow, and what the tracker and the fallback replay both need from it.

    client = connect()                  # MLFLOW_TRACKING_URI; fails fast, says how to start one
    connect("http://127.0.0.1:5000")    # raises TrackingUnavailable when nothing answers in time

Also here: ``Backend`` (a tracker's own calls to the server), ``is_transient`` (what is worth a
retry), ``ensure_experiment`` (tagged as a model-training experiment), and the param helper
``truncate``.

Why our own REST store: MLflow 3.17 reads MLFLOW_HTTP_REQUEST_MAX_RETRIES (default 7, backoff factor 2:
about four minutes of retries against a dead server) and MLFLOW_HTTP_REQUEST_TIMEOUT (120 s) from the
environment on every request. Rather than change those for the whole process, the tracker's own calls
(log_batch, get_run, create_run, update_run) go through a ``RestStore`` whose requests carry no MLflow
retries and a short timeout; the tracker's flusher backoff is the only retry loop. Artifact uploads
keep MLflow's own retries (they run on their own thread; a long upload must not be cut short).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.rest_store import RestStore
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.proto_json_utils import parse_dict
from mlflow.utils.rest_utils import http_request, verify_rest_response

from captioning.tracking import TrackingUnavailable

TRUNCATION_MARKER = "...[truncated]"
PARENT_TAG = "mlflow.parentRunId"
STAGING_PREFIX = "mlflow-staging-"  # FALLBACK_DIR/<prefix><run id>: a run's artifacts waiting to upload
RUN_NAME_TAG = "mlflow.runName"
# What an experiment holds, as MLflow's UI records it (3.17: mlflow/server/js ExperimentKind); the
# training kind, as opposed to "genai_development".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
# The retry policy of a tracker's background threads: 0.5 s doubling up to 5 s.
MAX_BACKOFF_S = 5.0
FIRST_BACKOFF_S = 0.5


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def redact(uri: str) -> str:
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
                f"MLflow tracking server at {redact(uri)} refused our credentials (HTTP "
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
                f"MLflow tracking server at {redact(uri)} did not answer within {timeout_s:g} s ({why}). "
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


class Backend:
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
            start_time=now_ms(),
            tags=[RunTag(k, v) for k, v in tags.items()],
            run_name=run_name,
        )
        return str(run.info.run_id)

    def terminate(self, run_id: str, status: str, end_time: int) -> None:
        if self.store is not None:
            self.store.update_run_info(run_id, RunStatus.from_string(status), end_time, None)
        else:
            self.client.set_terminated(run_id, status, end_time)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: no answer, a timeout, 5xx, 408 or 429 (MLflow wraps network errors as 500).

    Other 4xx, and errors raised before a request is made, are the request's own fault.
    """
    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return status >= 500 or status in (408, 429)
    return isinstance(exc, OSError)  # requests' ConnectionError and Timeout are OSErrors


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when missing, tagged as a model-training experiment.

    The tag ``EXPERIMENT_KIND_TAG`` = ``TRAINING_KIND`` is MLflow's own record of what an experiment
    holds (the UI's experiment-kind setting writes it); an existing experiment without it gets it,
    one a person set to another kind keeps theirs. MLflow 3.17's UI opens an experiment in the view
    of its GenAI / Model training switch rather than from this tag, so the addresses the project
    prints carry the view too (``captioning.tracking.links``).
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return str(client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}))
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
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return str(experiment.experiment_id)


def truncate(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, ending with a visible marker when cut."""
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def now_ms() -> int:
    return int(time.time() * 1000)
