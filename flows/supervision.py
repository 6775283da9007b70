"""How a flow run ends when it is stopped from outside: its worker dying, or a cancellation.

A flow run whose worker dies stops at once, saying why, instead of at a random later log line.

A process worker runs each flow run as a child process in a session of its own, so the flow run
outlives a worker that is killed; it only notices when a write to the dead worker's pipe fails,
which for a quiet stage can be hours later. ``stop_when_worker_dies()`` (called at the top of a flow)
watches the parent from a daemon thread; when the worker is gone (this process was re-parented) it
points stdout and stderr at /dev/null (writes to the dead worker's pipe can block) and sends this
process SIGTERM: Prefect's engine turns that into a crash, the training task's launcher
stops its torchrun tree on the way out, and the flow's ``ended_on_error`` ends the MLflow parent run
KILLED with ``reason()``. A retry of the flow run (the UI's Retry, on a live worker) continues the same
output and the same parent run.

A cancelled flow run (``prefect flow-run cancel``, the UI) reaches its running task as SIGTERM,
which Prefect records as a crash; ``tasks_cancelled_with_the_flow()`` marks the tasks that this
stopped Cancelled, so the run reads as what happened.

    stop_when_worker_dies()
    with ended_on_error(run_id, tracking_uri=uri, reason=supervision.reason), tasks_cancelled_with_the_flow():
        ...
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import psutil
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Cancelled

POLL_S = 2.0

logger = logging.getLogger(__name__)
_gone: list[str] = []  # set once: why this flow run stopped itself


def reason() -> str | None:
    """Why the watch stopped this flow run, or None when it did not."""
    return _gone[0] if _gone else None


def _under_a_worker(parent: psutil.Process | None) -> bool:
    try:
        command = " ".join(parent.cmdline()) if parent is not None else ""
    except psutil.Error:
        return False
    return "prefect" in command and "worker" in command


def stop_when_worker_dies(poll_s: float = POLL_S) -> bool:
    """Start the watch when this process runs under a Prefect worker; whether it started."""
    from prefect import get_run_logger

    run_logger = get_run_logger()
    parent = psutil.Process().parent()
    if parent is None or not _under_a_worker(parent):
        return False
    worker_pid = parent.pid

    def watch() -> None:
        while os.getppid() == worker_pid:
            time.sleep(poll_s)
        _gone.append(f"the Prefect worker running this flow run (pid {worker_pid}) died")
        # Our output went to the dead worker: a write there can block or fail at any later line, in
        # any thread, so it goes nowhere from now on (the run's logs still reach the Prefect API).
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(devnull, fd)
        os.kill(os.getpid(), signal.SIGTERM)
        run_logger.error("%s: stopping the flow run (retry it on a live worker to continue)", _gone[0])

    threading.Thread(target=watch, name="worker-watch", daemon=True).start()
    return True


@contextlib.contextmanager
def tasks_cancelled_with_the_flow() -> Iterator[None]:
    """Around a flow's tasks: when the flow run is being cancelled, the tasks the cancellation stopped
    (Crashed or still Running) become Cancelled before the stop propagates."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # bookkeeping: never in the way of the stop itself
            _mark_cancelled_tasks()
        raise


def _mark_cancelled_tasks() -> None:
    found = flow_run.get_id()
    if found is None:
        return
    run_id = uuid.UUID(str(found))
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
        if state is None or state.type not in (StateType.CANCELLING, StateType.CANCELLED):
            return
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        for task_run in task_runs:
            if task_run.state is not None and task_run.state.type in (StateType.CRASHED, StateType.RUNNING):
                client.set_task_run_state(
                    task_run.id, Cancelled(message="cancelled with its flow run"), force=True
                )
                logger.info("task run %s: Cancelled with its flow run", task_run.name)
