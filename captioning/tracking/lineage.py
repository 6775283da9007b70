"""One parent run per pipeline output, across retries; no run left RUNNING by a process that died.

    run_id = parent_run_of(output, client)          # the parent run an earlier attempt opened, or None
    remember_parent_run(output, run_id, client)     # OUTPUT/tracking.json, written when a parent is made
    reopen_run(client, run_id)                      # RUNNING again, tagged with the attempt
    end_leftover_runs(client, parent_id, "the worker died", stage="finetune", output=output)

A pipeline's output folder is its identity: a retried flow run (same name, so same output) or
``captioning train --resume`` continues the parent run the first attempt opened, so finished stages
keep their child runs and scores under it. A stage process that dies without closing its run (SIGKILL,
a lost worker, a machine gone) leaves it RUNNING; the launcher, when the launch fails, and the next
attempt, before it launches, end such runs (KILLED, or FAILED) with the reason as the ``error`` tag, and
remove the staging folders of their unsent artifacts (``OUTPUT/mlflow-staging-<run id>``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from captioning import storage
from captioning.tracking.client import PARENT_TAG, STAGING_PREFIX, redact

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

PARENT_RUN_FILE = "tracking.json"


def parent_run_of(output: str, client: MlflowClient) -> str | None:
    """The parent run recorded in ``output`` for this tracking server, when it still exists (not deleted)."""
    from mlflow.exceptions import MlflowException

    path = storage.join(output, PARENT_RUN_FILE)
    if not storage.exists(path):
        return None
    try:
        record = storage.read_json(path)
        run_id = str(record["run_id"])
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("%s is unreadable (%s): a new parent run is made", path, exc)
        return None
    if record.get("tracking_uri") != _server(client):
        return None  # recorded against another server: that run is not here
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return None if run.info.lifecycle_stage == "deleted" else run_id


def remember_parent_run(output: str, run_id: str, client: MlflowClient) -> None:
    storage.write_json(
        storage.join(output, PARENT_RUN_FILE), {"run_id": run_id, "tracking_uri": _server(client)}
    )


def _server(client: MlflowClient) -> str:
    return redact(str(client.tracking_uri))


def reopen_run(client: MlflowClient, run_id: str) -> int:
    """Set ``run_id`` RUNNING again (a retried attempt continues it); the attempt number, also tagged."""
    run = client.get_run(run_id)
    attempt = int(run.data.tags.get("attempt", "1")) + 1
    client.set_tag(run_id, "attempt", str(attempt))
    client.set_tag(run_id, f"attempt_{attempt}_started", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    client.update_run(run_id, status="RUNNING")
    if "error" in run.data.tags:  # the earlier attempt's reason; this attempt's own outcome follows
        client.set_tag(run_id, f"attempt_{attempt - 1}_error", run.data.tags["error"])
        client.delete_tag(run_id, "error")
    return attempt


def _children(  # RUNNING ones unless told otherwise
    client: MlflowClient,
    parent_id: str,
    experiment_id: str,
    status: str = "RUNNING",
    since_ms: int | None = None,
) -> list[Any]:
    started = f" and attributes.start_time >= {since_ms}" if since_ms is not None else ""
    return list(
        client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = '{status}'{started}",
            max_results=1000,
        )
    )


def end_leftover_runs(
    client: MlflowClient,
    parent_id: str,
    reason: str,
    *,
    status: str = "KILLED",
    stage: str | None = None,
    output: str | None = None,
    failed_since_ms: int | None = None,
) -> list[str]:
    """End every RUNNING run below ``parent_id`` (only the child named ``stage`` and its descendants,
    when given) with ``status`` and the ``error`` tag ``reason``; remove their staging folders under a
    local ``output``. Returns the ids of the runs it ended.

    ``failed_since_ms``: also such runs that ended FAILED and started at or after that time (epoch ms).
    A stage stopped from outside ends KILLED, but its rank 0 can see a peer's collective break (the
    peer got its SIGTERM first) and end its run FAILED before its own SIGTERM arrives; the launcher
    passes its launch time, so that run ends KILLED too (its error is kept as ``error_while_stopping``).
    """
    experiment_id = client.get_run(parent_id).info.experiment_id
    ended: list[str] = []
    found = _children(client, parent_id, experiment_id)
    if failed_since_ms is not None:
        found += _children(client, parent_id, experiment_id, "FAILED", failed_since_ms)
    queue = [run for run in found if stage is None or run.info.run_name == stage]
    while queue:
        run = queue.pop()
        run_id = run.info.run_id
        queue.extend(_children(client, run_id, experiment_id))
        if run.info.status == "FAILED" and "error" in run.data.tags:
            client.set_tag(run_id, "error_while_stopping", run.data.tags["error"][:500])
        client.set_tag(run_id, "error", reason[:500])
        client.set_terminated(run_id, status)
        ended.append(run_id)
        if output is not None and not storage.is_s3(output):
            shutil.rmtree(os.path.join(output, f"{STAGING_PREFIX}{run_id}"), ignore_errors=True)
    if ended:
        logger.info("ended %d MLflow run(s) left RUNNING (%s): %s", len(ended), reason, ", ".join(ended))
    return ended
