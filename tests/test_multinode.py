"""Multi-node stages through the flow, rehearsed with two loopback "nodes" on this machine.

The local stack (Prefect server, MLflow), train-sat/demo and train-node/default deployed, and two
process workers on the ``captioning-nodes`` pool that take one job at a time: each node job is one
torchrun agent (gloo, one process), and the train-stage task hosts their c10d rendezvous. Two nodes of
one process train the same model as one node of two processes (same global batch); cancelling the
flow mid-stage leaves no process; a worker process killed mid-epoch costs one elastic restart and the
stage ends where an uninterrupted one does; with no restart left the stage fails naming the node.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from s3server import free_port
from test_deployments import api, deploy, ended, prefect_cli, start_run, state_of, wait_for
from test_train import data_overrides, tiny

from captioning import stages, storage
from captioning.config import load_config
from captioning.data.prepare import prepare_data
from captioning.launch import stop_process_group
from captioning.model.checkpoint import load_checkpoint
from captioning.progress import QUIET_ENV
from captioning.services.prefect_server import NODE_POOL, prefect_env, worker_command
from captioning.services.processes import spawn_logged
from captioning.services.stack import LocalStack
from captioning.services.stack_settings import StackSettings

REPO = Path(__file__).resolve().parents[1]
NODES = 2


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("multinode")
    local = LocalStack(
        StackSettings(
            state_dir=root / "stack",
            prefect_port=free_port(),
            mlflow_port=free_port(),
            gpu_slots=NODES,  # one slot per node's GPU set
            workdir=REPO,
        )
    )
    workers: list[subprocess.Popen[bytes]] = []
    try:
        env = {**os.environ, **local.up(timeout_s=240), "CAPTIONING_HOME": str(REPO)}
        deploy(env, "-n", "train-sat/demo", "-n", "train-node/default")
        worker_env = {**env, **prefect_env(local.state_dir, local.settings.api_url), **QUIET_ENV}
        logs = [root / f"node-worker-{i}.log" for i in range(NODES)]
        for i, log in enumerate(logs):
            cmd = [*worker_command(NODE_POOL, f"node-worker-{i}"), "--limit", "1"]
            workers.append(spawn_logged(cmd, env=worker_env, log_path=log, cwd=REPO, detached=False))
        common = [
            *data_overrides(root),
            *tiny("--train.xe.epochs=2", "--train.checkpoint_every_steps=1"),
            f"--tracking.experiment=multinode-{uuid.uuid4().hex[:6]}",
        ]
        prepare_data(load_config("demo", common), progress=False)
        yield {"root": root, "env": env, "common": common, "worker_logs": logs, "stack": local}
    finally:
        for worker in workers:
            stop_process_group(worker.pid, ((signal.SIGINT, 20.0), (signal.SIGTERM, 5.0)), reap=worker)
        local.down()


@pytest.fixture(scope="module")
def one_node(stack: dict[str, Any]) -> Path:
    """The reference: the same stage on one node with two processes (no Prefect, no tracking)."""
    output = stack["root"] / "one-node"
    stages.launch_stage("demo", "xe", str(output), stack["common"], tracker="none", nproc_per_node=2)
    return output


def run_params(stack: dict[str, Any], output: Path, *extra: str) -> dict[str, Any]:
    changed = {o.split("=")[0] for o in extra}
    return {
        "stages": ["xe"],
        "nnodes": NODES,
        "register_best": False,
        "prepare": False,
        "output": str(output),
        "overrides": [o for o in stack["common"] if o.split("=")[0] not in changed]
        + ["--train.nproc_per_node=1", *extra],
    }


def flow_logs(stack: dict[str, Any], flow_run_id: str) -> list[str]:
    found: list[str] = []
    offset = 0
    while True:
        page = api(
            stack,
            "POST",
            "/logs/filter",
            {
                "logs": {"flow_run_id": {"any_": [flow_run_id]}},
                "offset": offset,
                "limit": 200,
                "sort": "TIMESTAMP_ASC",
            },
        )
        found += [entry["message"] for entry in page]
        if len(page) < 200:
            return found
        offset += 200


def node_runs(stack: dict[str, Any], flow_run_id: str) -> list[dict[str, Any]]:
    """The train-node flow runs placed by ``flow_run_id``'s tasks."""
    tasks = api(stack, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    ids = [t["id"] for t in tasks]
    runs = api(stack, "POST", "/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"any_": ids}}})
    flows = {f["id"]: f["name"] for f in api(stack, "POST", "/flows/filter", {})}
    return [r for r in runs if flows.get(r["flow_id"]) == "train-node"]


def training_workers(output: Path) -> list[psutil.Process]:
    """The torchrun workers (not agents) training into ``output``."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(output) in cmdline and "captioning.train" in cmdline and "captioning.torchrun" not in cmdline:
            found.append(p)
    return found


def node_of(stack: dict[str, Any], process: psutil.Process) -> int:
    """The index of the node job (train-node flow run) a training process runs under."""
    for ancestor in process.parents():
        flow_run_id = ancestor.environ().get("PREFECT__FLOW_RUN_ID")
        if flow_run_id:
            return int(api(stack, "GET", f"/flow_runs/{flow_run_id}")["parameters"]["node"])
    raise AssertionError(f"process {process.pid} runs under no flow run")


def processes_of(output: Path) -> list[str]:
    return [
        " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["cmdline"])
        if str(output) in " ".join(p.info["cmdline"] or [])
    ]


def assert_same_training(a: Path, b: Path) -> None:
    """Same steps, weights and loss history to 1e-5."""
    x, y = (load_checkpoint(str(d / "xe" / "last.pt")) for d in (a, b))
    assert x["train_state"]["step"] == y["train_state"]["step"]
    assert x["model"].keys() == y["model"].keys()
    for key in x["model"]:
        torch.testing.assert_close(x["model"][key], y["model"][key], atol=1e-5, rtol=1e-5, msg=key)
    ha, hb = (storage.read_json(str(d / "xe" / "result.json"))["history"] for d in (a, b))
    assert len(ha) == len(hb)
    for ea, eb in zip(ha, hb, strict=True):
        for key, value in ea.items():
            if isinstance(value, float):
                assert eb[key] == pytest.approx(value, abs=1e-5), key


def test_two_nodes_train_the_model_one_node_of_two_processes_trains(
    stack: dict[str, Any], one_node: Path, java: str
) -> None:
    output = stack["root"] / "two-nodes"
    done = prefect_cli(
        stack,
        "deployment",
        "run",
        "train-sat/demo",
        "--params",
        json.dumps(run_params(stack, output)),
        "--watch",
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert_same_training(one_node, output)

    flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout).group(1)  # type: ignore[union-attr]
    nodes = node_runs(stack, flow_run_id)
    assert sorted(r["state"]["type"] for r in nodes) == ["COMPLETED"] * NODES
    # One node job per worker: each worker's log names exactly one of them.
    logs = [log.read_text() for log in stack["worker_logs"]]
    placed = [[r["id"] for r in nodes if r["id"] in log] for log in logs]
    assert sorted(len(p) for p in placed) == [1, 1] and placed[0] != placed[1], placed
    # Both nodes' output reached the parent's log; the group had two ranks on two nodes.
    lines = flow_logs(stack, flow_run_id)
    assert any(line.startswith("node 0 | ") for line in lines) and any(
        line.startswith("node 1 | ") for line in lines
    )
    # Evaluation ran once for the group: one test score, one validation score per epoch.
    from mlflow import MlflowClient

    result = storage.read_json(str(output / "xe" / "result.json"))
    client = MlflowClient(stack["env"]["MLFLOW_TRACKING_URI"])
    assert len(client.get_metric_history(result["run_id"], "test/CIDEr")) == 1
    assert len(client.get_metric_history(result["run_id"], "val/CIDEr")) == 2


def test_a_worker_killed_mid_epoch_costs_one_restart_and_the_stage_ends_as_if_not(
    stack: dict[str, Any], one_node: Path, java: str
) -> None:
    output = stack["root"] / "killed"
    flow_run_id = start_run(stack, "train-sat/demo", run_params(stack, output, "--train.max_restarts=1"))
    last = output / "xe" / "last.pt"
    wait_for(
        "a checkpoint and two training processes",
        lambda: last.exists() and len(training_workers(output)) == NODES,
    )
    time.sleep(1.0)  # a few more steps: the kill lands mid-epoch, after the last checkpoint
    victim = next(p for p in training_workers(output) if p.environ().get("RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    state = ended(stack, flow_run_id, 900)
    lines = flow_logs(stack, flow_run_id)
    assert state == "COMPLETED", "\n".join(lines[-60:])
    assert_same_training(one_node, output)
    # The kill, the restart and the resume are in the parent's log.
    assert any("exitcode: -9" in line for line in lines), "\n".join(lines[-60:])
    assert any("resum" in line and "xe" in line for line in lines)
    assert not processes_of(output)


def test_a_kill_with_no_restart_left_fails_naming_the_node_and_leaves_nothing(
    stack: dict[str, Any], java: str
) -> None:
    output = stack["root"] / "no-restart"
    flow_run_id = start_run(stack, "train-sat/demo", run_params(stack, output, "--train.max_restarts=0"))
    wait_for(
        "two training processes",
        lambda: len(training_workers(output)) == NODES and (output / "xe" / "last.pt").exists(),
    )
    victim = next(p for p in training_workers(output) if p.environ().get("RANK") == "1")
    victim_node = node_of(stack, victim)
    victim.send_signal(signal.SIGKILL)
    state = ended(stack, flow_run_id, 600)
    assert state == "FAILED"
    message = api(stack, "GET", f"/flow_runs/{flow_run_id}")["state"]["message"]
    lines = "\n".join(flow_logs(stack, flow_run_id))
    named = re.search(rf"node {victim_node} \(flow run [^\n]*\n((?:    .*\n?)*)", message)
    assert named and "exitcode: -9" in named.group(1), message + lines[-4000:]
    wait_for("no training process", lambda: not processes_of(output), 60)


def test_cancelling_a_two_node_stage_stops_every_node(stack: dict[str, Any], java: str) -> None:
    output = stack["root"] / "cancelled"
    params = run_params(stack, output, "--train.xe.epochs=50")
    flow_run_id = start_run(stack, "train-sat/demo", params)
    wait_for(
        "training on both nodes",
        lambda: (
            len(training_workers(output)) == NODES or state_of(stack, flow_run_id) in ("FAILED", "CRASHED")
        ),
    )
    assert state_of(stack, flow_run_id) == "RUNNING"
    done = prefect_cli(stack, "flow-run", "cancel", flow_run_id, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    wait_for("the flow run to be cancelled", lambda: state_of(stack, flow_run_id) == "CANCELLED", 180)
    wait_for(
        "the node runs to end",
        lambda: all(
            r["state"]["type"] in ("CANCELLED", "FAILED", "CRASHED") for r in node_runs(stack, flow_run_id)
        ),
        180,
    )
    wait_for("no training process", lambda: not processes_of(output), 60)
    assert not (output / "xe" / "result.json").exists()


def test_a_node_lost_mid_epoch_is_replaced_and_the_stage_ends_as_if_not(
    stack: dict[str, Any], one_node: Path, java: str
) -> None:
    """A whole node lost (its torchrun agent SIGKILLed; its worker dies with it): that node run fails
    with a signal exit, the task places a replacement node job (on the worker it freed), the survivor's
    agent restarts its workers, and the group resumes from the last checkpoint."""
    output = stack["root"] / "node-lost"
    flow_run_id = start_run(stack, "train-sat/demo", run_params(stack, output, "--train.max_restarts=1"))
    last = output / "xe" / "last.pt"
    wait_for(
        "a checkpoint and two training processes",
        lambda: last.exists() and len(training_workers(output)) == NODES,
    )
    time.sleep(1.0)
    worker = next(p for p in training_workers(output) if p.environ().get("RANK") == "1")
    agent = next(a for a in worker.parents() if "captioning.torchrun" in " ".join(a.cmdline()))
    lost = node_of(stack, worker)
    agent.send_signal(signal.SIGKILL)
    state = ended(stack, flow_run_id, 900)
    lines = flow_logs(stack, flow_run_id)
    assert state == "COMPLETED", "\n".join(lines[-80:])
    assert_same_training(one_node, output)
    assert any(line.startswith(f"node {lost} (flow run") and "replacement" in line for line in lines), lines
    runs = node_runs(stack, flow_run_id)
    assert sorted(r["state"]["type"] for r in runs) == ["COMPLETED", "COMPLETED", "FAILED"]
    assert not processes_of(output)
