"""A multi-node stage as N node jobs on the work pool, orchestrated from the train-stage task.

    result = run_nodes(recipe, "xe", output, overrides, nnodes=2, nproc_per_node=1, logger=logger)

This task's process hosts the c10d rendezvous store (``captioning.torchrun.host_rendezvous_store``,
on ``rdzv_host``: 127.0.0.1 for loopback "nodes", else an address every node reaches, e.g. this
machine's in the cluster, from ``CAPTIONING_RDZV_HOST``), so the rendezvous outlives any node. It then
places ``nnodes`` runs of the ``train-node`` deployment (``flows/train_node.py``) on the pool, each
told the endpoint and a run id new to this launch, and waits for all of them:

- every node run's log lines are streamed into this task's log as ``node I | ...``;
- all Completed: the stage's result is read from the output folder once and returned;
- a worker process that dies costs one of torchrun's elastic restarts (``train.max_restarts``): every
  node's agent restarts its workers and training resumes from the last checkpoint;
- a node lost whole (its run Crashed: its worker or machine died; or its torchrun agent was killed by
  a signal) is replaced by a new node job, from the same ``train.max_restarts`` budget: the
  survivors' agents see a node waiting, restart their workers, and the group resumes from the last
  checkpoint;
- any node run that ends otherwise (Failed, Cancelled, restarts used up) fails the stage with a
  message naming every failed node, its flow run and the cause (its state message and torchrun's
  exit lines); running the flow again with the same output resumes;
- when this task stops for any reason (the flow cancelled, a failure, a time limit) every node run
  not yet final is cancelled, and the wait for them to stop is bounded: their workers kill the
  torchrun trees.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import LogSort
from prefect.deployments import run_deployment
from prefect.states import Cancelling

from captioning.config import load_config, normalize_overrides
from captioning.launch import LaunchError, LaunchTimeout
from captioning.stages import (
    Rendezvous,
    StageError,
    StageRuns,
    finished_stage,
    stop_reason,
)
from captioning.torchrun import LOOPBACK, host_rendezvous_store, is_loopback
from captioning.training.stage import read_stage_result, stage_status

NODE_DEPLOYMENT = "train-node/default"
POLL_S = 2.0
LOG_PAGE = 200
LOOKBACK = timedelta(seconds=15)  # how far back each poll asks again (lines already seen are skipped)
STOP_WAIT_S = 90.0
TAIL_LINES = 200  # searched for the cause when a node fails
FAILURE_GRACE_S = 15.0
# torchrun's lines that say why a worker group failed: "failed (exitcode: -9) local_rank: 0 ...",
# "Signal 9 (SIGKILL) received by PID ...", the root-cause table, an exception's last line.
AGENT_KILLED = re.compile(r"training stage \w+ failed \(exit -\d+\)")  # launch_stage's LaunchError
CAUSE = re.compile(
    r"failed \(exitcode: -?\d+\)|exitcode\s*: -?\d+|Signal \d+ \(\w+\) received|^\[rank\d+\]: \w+Error: "
)
FINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}


class NodeFailed(LaunchError):
    """A node of a multi-node stage ended without completing, and no restart is left for it."""


class _Node:
    """One node slot: its current flow run, and the last lines it logged."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.run: FlowRun | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.seen: set[uuid.UUID] = set()


def rdzv_host_default() -> str:
    return os.environ.get("CAPTIONING_RDZV_HOST", LOOPBACK)


def run_nodes(
    recipe: str,
    stage: str,
    output: str,
    overrides: Sequence[str] = (),
    *,
    nnodes: int,
    nproc_per_node: int | None = None,
    init_from: str | None = None,
    parent_run_id: str | None = None,
    timeout_s: float | None = None,
    deployment: str = NODE_DEPLOYMENT,
    rdzv_host: str | None = None,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> Any:
    """Train ``stage`` on ``nnodes`` node jobs (module docstring); its StageResult."""
    cfg = load_config(recipe, normalize_overrides(overrides))
    if stage_status(output, stage) == "finished":
        return finished_stage(cfg, output, stage, logger.info)
    leftovers = StageRuns(cfg, "mlflow", parent_run_id, stage, output)
    leftovers.end("left RUNNING by an earlier attempt whose process ended without closing it")
    host = rdzv_host or rdzv_host_default()
    store = host_rendezvous_store(host)
    rendezvous = Rendezvous(
        endpoint=f"{host}:{store.port}",
        run_id=f"{stage}-{uuid.uuid4().hex[:12]}",
        nnodes=nnodes,
        local_addr=LOOPBACK if is_loopback(host) else None,
    )
    parameters = {
        "recipe": recipe,
        "stage": stage,
        "output": output,
        "rendezvous": asdict(rendezvous),
        "overrides": list(overrides),
        "init_from": init_from,
        "parent_run_id": parent_run_id,
        "nproc_per_node": nproc_per_node,
    }
    nodes = [_Node(i) for i in range(nnodes)]
    logger.info(
        "stage %s on %d nodes: rendezvous %s (id %s), node jobs %s, %d elastic restart(s) allowed",
        stage,
        nnodes,
        rendezvous.endpoint,
        rendezvous.run_id,
        deployment,
        cfg.train.max_restarts,
    )
    replacements_left = cfg.train.max_restarts
    deadline = time.monotonic() + timeout_s if timeout_s else None
    try:
        for node in nodes:
            node.run = _submit(deployment, parameters, node.index)
        since = None
        while True:
            since = _stream_logs(nodes, since, logger)
            states = _refresh(nodes)
            if all(state == StateType.COMPLETED for state in states):
                break
            for node, state in zip(nodes, states, strict=True):
                if state not in FINAL or state == StateType.COMPLETED:
                    continue
                _stream_logs(nodes, since, logger)
                if _lost(node) and replacements_left > 0 and not _all_final(states):
                    replacements_left -= 1
                    logger.warning(
                        "node %d (flow run %s) lost: %s; placing a replacement node job (%d left): the group "
                        "resumes from the last checkpoint",
                        node.index,
                        _name(node),
                        _message(node).splitlines()[0][:200],
                        replacements_left,
                    )
                    node.run = _submit(deployment, parameters, node.index)
                    continue
                raise _failure(stage, output, nodes, since, logger)
            if deadline is not None and time.monotonic() > deadline:
                raise LaunchTimeout(f"stage {stage} ran past its time limit ({timeout_s:.0f} s)", None, [])
            time.sleep(POLL_S)
    except BaseException as exc:
        _stop(nodes, f"stopped with the stage: {type(exc).__name__}", logger)
        failed = isinstance(exc, LaunchError)
        leftovers.end(stop_reason(stage, exc), status="FAILED" if failed else "KILLED", stopped=not failed)
        raise
    finally:
        del store  # the rendezvous closes with the launch
    result = read_stage_result(output, stage)
    if result is None:
        raise StageError(f"stage {stage}: every node completed but no result is in {output}/{stage}")
    return result


def _failure(
    stage: str,
    output: str,
    nodes: list[_Node],
    since: Any,
    logger: logging.Logger | logging.LoggerAdapter[Any],
) -> NodeFailed:
    """The error for a node that ended without completing: every failed node named with its cause
    (the others follow within seconds when one dies, so they get a moment to say why)."""
    deadline = time.monotonic() + FAILURE_GRACE_S
    while time.monotonic() < deadline and not _all_final(_refresh(nodes)):
        time.sleep(1.0)
    _stream_logs(nodes, since, logger)
    failed = [n for n in nodes if n.run and n.run.state and n.run.state.type in FINAL - {StateType.COMPLETED}]
    lines = []
    for node in failed:
        assert node.run is not None and node.run.state is not None
        causes = [line for message in node.tail for line in message.splitlines() if CAUSE.search(line)][-3:]
        lines.append(
            f"node {node.index} (flow run {_name(node)}) ended {node.run.state.type.value}: "
            f"{_message(node).splitlines()[0][:300]}"
        )
        lines += [f"    {cause.strip()[:300]}" for cause in causes]
    return NodeFailed(
        f"stage {stage} failed on {len(failed)} of {len(nodes)} nodes; running the flow again with the same "
        f"output ({output}) resumes the stage.\n" + "\n".join(lines),
        None,
        [],
    )


def _submit(deployment: str, parameters: dict[str, Any], index: int) -> FlowRun:
    run = run_deployment(
        deployment,
        parameters={**parameters, "node": index},
        timeout=0,  # placed on the pool; this task watches it
        as_subflow=True,  # a child of this task: cancelling the parent flow cancels it on the server too
        tags=[f"node-{index}"],
    )
    assert isinstance(run, FlowRun)
    return run


def _refresh(nodes: list[_Node]) -> list[StateType | None]:
    with get_client(sync_client=True) as client:
        for node in nodes:
            assert node.run is not None
            node.run = client.read_flow_run(node.run.id)
    return [node.run.state.type if node.run and node.run.state else None for node in nodes]


def _lost(node: _Node) -> bool:
    """Whether the node itself was lost (its flow run Crashed: the worker or machine died; or its
    torchrun agent was killed by a signal), rather than its training failing (restarts used up)."""
    state = node.run.state if node.run is not None else None
    if state is None:
        return False
    return state.type == StateType.CRASHED or bool(AGENT_KILLED.search(state.message or ""))


def _all_final(states: list[StateType | None]) -> bool:
    return all(state in FINAL for state in states)


def _name(node: _Node) -> str:
    return f"{node.run.name} ({node.run.id})" if node.run is not None else "not started"


def _message(node: _Node) -> str:
    state = node.run.state if node.run is not None else None
    return (state.message or state.name or "no message") if state is not None else "no state"


def _stream_logs(nodes: list[_Node], since: Any, logger: logging.Logger | logging.LoggerAdapter[Any]) -> Any:
    """Re-log every new line of the node runs as ``node I | line``; the newest timestamp seen."""
    by_run = {node.run.id: node for node in nodes if node.run is not None}
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(by_run)))
    if since is not None:  # each node's lines land in batches of their own: a later batch can be older
        log_filter.timestamp = LogFilterTimestamp(after_=since - LOOKBACK)
    logs: list[Any] = []
    with get_client(sync_client=True) as client:
        while True:  # every page: the lookback window repeats lines already seen
            page = client.read_logs(
                log_filter=log_filter, sort=LogSort.TIMESTAMP_ASC, limit=LOG_PAGE, offset=len(logs)
            )
            logs += page
            if len(page) < LOG_PAGE:
                break
    for log in logs:
        node = by_run.get(log.flow_run_id) if log.flow_run_id is not None else None
        if node is None or log.id in node.seen:
            continue
        node.seen.add(log.id)
        node.tail.append(log.message)
        logger.info("node %d | %s", node.index, log.message)
        since = log.timestamp if since is None or log.timestamp > since else since
    return since


def _stop(nodes: list[_Node], reason: str, logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """Cancel every node run not yet final and wait (bounded) until they are: their workers stop them."""
    try:
        with get_client(sync_client=True) as client:
            for node in nodes:
                if node.run is None:
                    continue
                state = client.read_flow_run(node.run.id).state
                if state is not None and state.type not in FINAL and state.type != StateType.CANCELLING:
                    client.set_flow_run_state(node.run.id, Cancelling(message=reason), force=True)
            deadline = time.monotonic() + STOP_WAIT_S
            while time.monotonic() < deadline:
                states = [client.read_flow_run(n.run.id).state for n in nodes if n.run is not None]
                if all(s is None or s.type in FINAL for s in states):
                    return
                time.sleep(1.0)
            logger.warning("node runs still stopping after %.0f s", STOP_WAIT_S)
    except Exception as exc:  # never mask why the stage stopped
        logger.warning("could not cancel every node run: %s", exc)
