"""The deployments of prefect.yaml on the local stack, as a user runs them.

`captioning stack up` (Prefect server on SQLite, a process worker, MLflow), `prefect deploy --all`, then:
`prefect deployment run train-sat/demo --watch` completes and registers a model; cancelling a
training run leaves no torchrun process behind, and a second run waits for the GPU slot meanwhile;
announcing new data (the event) starts a retrain run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from leftovers import owned_by_fixture
from s3server import free_port
from test_train import TINY, data_overrides

from captioning.services.stack import LocalStack
from captioning.services.stack_settings import StackSettings

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The local stack with every deployment of prefect.yaml registered."""
    root = tmp_path_factory.mktemp("deployments")
    local = LocalStack(
        StackSettings(
            state_dir=root / "stack",
            prefect_port=free_port(),
            mlflow_port=free_port(),
            workdir=REPO,
            work_pool="captioning-local",
        )
    )
    try:
        env = {**os.environ, **local.env(), **local.up(), "CAPTIONING_HOME": str(REPO)}
        deploy(env, "--all")
        name = f"deploy-{uuid.uuid4().hex[:8]}"
        overrides = [
            *data_overrides(root),
            *TINY,
            f"--storage.run_dir={root / 'runs'}",
            f"--tracking.experiment={name}",
            f"--tracking.registered_model={name}",
        ]
        yield {"root": root, "env": env, "overrides": overrides, "name": name, "stack": local}
    finally:
        local.down()


def deploy(env: dict[str, str], *which: str) -> None:
    """``prefect --no-prompt deploy WHICH...`` from this checkout (``--all``, or ``-n FLOW/NAME`` each)."""
    done = subprocess.run(
        [*PREFECT, "--no-prompt", "deploy", *which],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def ended(stack: dict[str, Any], flow_run_id: str, timeout_s: float = 900) -> str:
    """The flow run's final state type (COMPLETED, FAILED, CRASHED or CANCELLED) once it has one."""
    final = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
    return str(
        wait_for("the flow run to end", lambda: (s := state_of(stack, flow_run_id)) in final and s, timeout_s)
    )


def prefect_cli(stack: dict[str, Any], *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PREFECT, *args], cwd=REPO, env=stack["env"], capture_output=True, text=True, timeout=timeout
    )


def api(stack: dict[str, Any], method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    import httpx

    response = httpx.request(method, stack["env"]["PREFECT_API_URL"] + path, json=body, timeout=30)
    response.raise_for_status()
    return response.json() if response.content else None


def flow_runs_of(stack: dict[str, Any], deployment: str) -> list[dict[str, Any]]:
    flow_name, name = deployment.split("/")
    found = api(
        stack,
        "POST",
        "/deployments/filter",
        {"deployments": {"name": {"any_": [name]}}, "flows": {"name": {"any_": [flow_name]}}},
    )
    ids = [d["id"] for d in found]
    return api(stack, "POST", "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": ids}}})


def start_run(stack: dict[str, Any], deployment: str, parameters: dict[str, Any]) -> str:
    """`prefect deployment run` without waiting; the flow run's id."""
    done = prefect_cli(
        stack, "deployment", "run", deployment, "--params", json.dumps(parameters), timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", done.stdout)
    assert found, done.stdout
    return found.group(1)


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 300) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def training_processes(marker: str) -> list[psutil.Process]:
    """torchrun launchers and workers whose command line names ``marker`` (a run's output folder)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if marker in cmdline and ("captioning.train" in cmdline or "captioning.torchrun" in cmdline):
            found.append(p)
    return found


def task_states(stack: dict[str, Any], flow_run_id: str) -> dict[str, str]:
    runs = api(stack, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {r["name"]: r["state"]["type"] for r in runs if r["state"]}


def mlflow_runs(stack: dict[str, Any], output: Path) -> list[Any]:
    """The parent run recorded in ``output`` and every run below it."""
    from mlflow import MlflowClient

    client = MlflowClient(stack["env"]["MLFLOW_TRACKING_URI"])
    parent = client.get_run(json.loads((output / "tracking.json").read_text())["run_id"])
    found, queue = [parent], [parent.info.run_id]
    while queue:
        below = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{queue.pop()}'"
        )
        found += below
        queue += [r.info.run_id for r in below]
    return found


def state_of(stack: dict[str, Any], flow_run_id: str) -> str:
    return str(api(stack, "GET", f"/flow_runs/{flow_run_id}")["state"]["type"])


def test_deployment_run_train_sat_demo_completes(stack: dict[str, Any]) -> None:
    output = stack["root"] / "runs" / "watched"
    params = {"overrides": stack["overrides"], "output": str(output)}
    done = prefect_cli(
        stack, "deployment", "run", "train-sat/demo", "--params", json.dumps(params), "--watch"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Completed" in done.stdout
    outcomes = {s: json.loads((output / s / "result.json").read_text()) for s in ("xe", "finetune", "scst")}
    assert all("CIDEr" in o["test_scores"] for o in outcomes.values())

    from mlflow import MlflowClient

    client = MlflowClient(stack["env"]["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(stack["name"], "champion")
    assert champion.run_id in {o["run_id"] for o in outcomes.values()}


def test_cancelling_a_training_run_leaves_no_torchrun_and_the_gpu_slot_is_exclusive(
    stack: dict[str, Any],
) -> None:
    # Long enough to be cancelled mid-stage: many epochs, none of them an early stop (the tiny model's
    # val CIDEr stays flat, so the default patience would end xe after a few epochs).
    long = [o for o in stack["overrides"] if not o.startswith("--train.xe.epochs")] + [
        "--train.xe.epochs=500",
        "--train.xe.early_stop_patience=1000",
    ]
    first_out = stack["root"] / "runs" / "cancel-1"
    second_out = stack["root"] / "runs" / "cancel-2"
    first = start_run(stack, "train-sat/demo", {"overrides": long, "output": str(first_out)})
    wait_for("two torchrun workers of the first run", lambda: len(training_processes(str(first_out))) >= 3)
    second = start_run(stack, "train-sat/demo", {"overrides": long, "output": str(second_out)})

    # The second run gets as far as its training task, then waits for the GPU slot the first holds.
    def second_waits_in_train_xe() -> bool:
        runs = api(
            stack,
            "POST",
            "/task_runs/filter",
            {"flow_runs": {"id": {"any_": [second]}}, "task_runs": {"name": {"like_": "train-xe"}}},
        )
        return any(r["state"] and r["state"]["type"] == "RUNNING" for r in runs)

    wait_for("the second run's train-xe task", second_waits_in_train_xe)
    time.sleep(5.0)  # long enough for a launch that the slot failed to hold back to show up
    assert training_processes(str(second_out)) == []
    limit = api(stack, "GET", "/v2/concurrency_limits/gpu")
    assert limit["limit"] == 1 and limit["active_slots"] == 1

    first_pids = [p.pid for p in training_processes(str(first_out))]
    cancel = prefect_cli(stack, "flow-run", "cancel", first, timeout=120)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    wait_for("the first run to be cancelled", lambda: state_of(stack, first) == "CANCELLED", timeout_s=180)
    wait_for("no process of the cancelled run", lambda: training_processes(str(first_out)) == [], 120)
    assert not [
        pid for pid in first_pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
    ]
    # The run reads as what happened: its training task Cancelled, every MLflow run it opened ended
    # KILLED with a reason, no staging folder left.
    assert task_states(stack, first)["train-xe"] == "CANCELLED"
    runs = mlflow_runs(stack, first_out)
    assert runs and all(r.info.status == "KILLED" and r.data.tags.get("error") for r in runs), [
        (r.info.run_name, r.info.status, r.data.tags.get("error")) for r in runs
    ]
    assert not list(first_out.glob("mlflow-staging-*"))

    # The slot went to the second run, which now trains; cancel it too.
    wait_for("the second run's torchrun", lambda: len(training_processes(str(second_out))) >= 3)
    assert prefect_cli(stack, "flow-run", "cancel", second, timeout=120).returncode == 0
    wait_for("the second run to be cancelled", lambda: state_of(stack, second) == "CANCELLED", timeout_s=180)
    wait_for("no process of the second run", lambda: training_processes(str(second_out)) == [], 120)


def test_a_dead_worker_stops_its_flow_run_now_and_a_retry_continues_the_lineage(
    stack: dict[str, Any],
) -> None:
    from captioning.services.stack_settings import WORKER

    local = stack["stack"]
    longer = [o for o in stack["overrides"] if not o.startswith("--train.finetune.epochs")]
    output = stack["root"] / "runs" / "worker-dies"
    run = start_run(
        stack, "train-sat/demo", {"overrides": [*longer, "--train.finetune.epochs=4"], "output": str(output)}
    )

    # Mid-stage: the finetune stage has its MLflow run and a checkpoint (every 2 steps).
    wait_for("the finetune stage to train", lambda: (output / "finetune" / "last.pt").exists(), timeout_s=600)
    worker = local.running_pid(WORKER)
    assert worker is not None
    os.kill(worker, signal.SIGKILL)
    # The flow run stops promptly (its watch polls every 2 s), with its torchrun tree, and says why.
    try:
        wait_for("the flow run to stop", lambda: state_of(stack, run) in ("CRASHED", "FAILED"), timeout_s=90)
    except AssertionError:
        logs = api(stack, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run]}}, "limit": 200})
        last = [entry["message"][:200] for entry in logs[-10:]]
        raise AssertionError(
            f"the flow run is still {state_of(stack, run)}; its last log lines: {last}"
        ) from None
    wait_for("no process of the run", lambda: training_processes(str(output)) == [], 60)
    first = {r.info.run_id: r for r in mlflow_runs(stack, output)}
    assert all(r.info.status != "RUNNING" for r in first.values()), [
        (r.info.run_name, r.info.status) for r in first.values()
    ]
    parent_id = json.loads((output / "tracking.json").read_text())["run_id"]
    assert "worker" in first[parent_id].data.tags["error"] and first[parent_id].info.status == "KILLED"
    # A retry (the UI's Retry) on a live worker continues the same output and the same parent run.
    local.up()
    owned_by_fixture(local.running_pid(WORKER))  # the stack fixture stops it
    retried = {"type": "SCHEDULED", "name": "AwaitingRetry"}
    api(stack, "POST", f"/flow_runs/{run}/set_state", {"state": retried, "force": True})
    wait_for("the retried run to complete", lambda: state_of(stack, run) == "COMPLETED", timeout_s=900)
    runs = mlflow_runs(stack, output)
    assert json.loads((output / "tracking.json").read_text())["run_id"] == parent_id
    by_stage: dict[str, list[str]] = {}
    for r in runs:
        by_stage.setdefault(r.info.run_name, []).append(r.info.status)
    assert by_stage[next(r.info.run_name for r in runs if r.info.run_id == parent_id)] == ["FINISHED"]
    assert by_stage["xe"] == ["FINISHED"]  # trained once, kept
    assert sorted(by_stage["finetune"]) == ["FINISHED", "KILLED"]  # the stopped attempt and the resumed one
    assert by_stage["scst"] == ["FINISHED"]
    parent = next(r for r in runs if r.info.run_id == parent_id)
    assert parent.data.tags["attempt"] == "2" and "error" not in parent.data.tags
    assert not list(output.glob("mlflow-staging-*"))


def test_new_data_event_starts_a_retrain_run(stack: dict[str, Any]) -> None:
    from captioning.data.synthetic import generate_synthetic

    drop = stack["root"] / "inbox" / "batch-1"
    generate_synthetic(drop, num_train=8, num_val=2, num_test=2, image_size=32, seed=3, make_archives=False)
    (drop / "READY").write_text("")
    before = {r["id"] for r in flow_runs_of(stack, "retrain/demo")}
    announce = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from flows.watch import watch_inbox; print(watch_inbox(sys.argv[1], recipe='demo'))",
            str(drop.parent),
        ],
        cwd=REPO,
        env=stack["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert announce.returncode == 0, announce.stdout[-3000:] + announce.stderr[-3000:]
    assert (drop / ".announced.json").exists()

    def new_retrain_runs() -> list[dict[str, Any]]:
        return [r for r in flow_runs_of(stack, "retrain/demo") if r["id"] not in before]

    (run,) = wait_for("a retrain run started by the event", new_retrain_runs, timeout_s=120)
    assert run["parameters"]["karpathy_json"] == str((drop / "dataset_coco.json").resolve())
    assert run["parameters"]["image_dir"] == str(drop.resolve())
    # The stack's registry has no champion for the deployment's default model: it fails, and says so.
    wait_for(
        "the retrain run to end", lambda: state_of(stack, run["id"]) in {"FAILED", "COMPLETED", "CRASHED"}
    )
    assert state_of(stack, run["id"]) == "FAILED"
