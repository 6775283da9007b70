"""The `gpu` concurrency slot survives a Prefect server restart: a real server (the stack's settings),
restarted while a flow's `train-stage` task holds the slot; the next stage and a second run proceed.

The stage itself is a stand-in (the test's own process waits for a file instead of launching torchrun):
what is under test is the slot's lease, held by tasks/training.py's `train_stage` exactly as in a real run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from s3server import free_port

from captioning.services.prefect_server import http_json, prefect_env, server_command, server_healthy
from captioning.services.processes import spawn_logged

REPO = Path(__file__).resolve().parents[1]
LIMIT = "gpu-restart-test"

# One flow run of two stages, each a real `train_stage` task whose launch waits for OUT/<stage>.release.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    from prefect import flow

    import tasks.training as training

    out, limit = Path(sys.argv[1]), sys.argv[2]

    def launch(recipe, stage, output, overrides, **kwargs):
        (out / f"{stage}.holding").touch()
        while not (out / f"{stage}.release").exists():
            time.sleep(0.1)
        return {"stage": stage}

    training.launch_stage = launch

    @flow(name="slot-holder")
    def two_stages():
        for stage in ("xe", "finetune"):
            training.train_stage("demo", stage, str(out), gpu_limit=limit)

    two_stages()
    print("flow done", flush=True)
    """
)


class PrefectServer:
    """`prefect server start` on loopback with the stack's environment (``prefect_env``), restartable."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, **prefect_env(state_dir, self.api_url)}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = spawn_logged(
            server_command("127.0.0.1", self.port),
            env=self.env,
            log_path=self.state_dir / "server.log",
            detached=False,
        )
        wait_for(lambda: server_healthy(self.api_url), 120, "the Prefect server")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=60)
            self.process = None


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def server(tmp_path: Path, subprocess_tree: None) -> Iterator[PrefectServer]:
    server = PrefectServer(tmp_path / "prefect-state")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def active_slots(server: PrefectServer) -> int:
    status, limit = http_json("GET", f"{server.api_url}/v2/concurrency_limits/{LIMIT}")
    assert status == 200, (status, limit)
    return int(limit["active_slots"])


def start_holder(server: PrefectServer, out: Path) -> subprocess.Popen[str]:
    out.mkdir()
    env = {**server.env, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), LIMIT],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def release(out: Path, stage: str) -> None:
    wait_for(lambda: (out / f"{stage}.holding").exists(), 180, f"{out.name}: stage {stage} to hold the slot")
    (out / f"{stage}.release").touch()


def finish(holder: subprocess.Popen[str]) -> str:
    try:
        output, _ = holder.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        holder.kill()
        output, _ = holder.communicate()
        raise AssertionError(f"the flow run hangs (a stage never got the slot):\n{output[-4000:]}") from None
    assert holder.returncode == 0 and "flow done" in output, output[-4000:]
    return output


@pytest.fixture
def holders() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for holder in started:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_server_restart_mid_stage_leaks_no_slot(
    server: PrefectServer, tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    first = start_holder(server, tmp_path / "run-1")
    holders.append(first)
    wait_for(lambda: (tmp_path / "run-1" / "xe.holding").exists(), 180, "stage xe to hold the slot")
    assert active_slots(server) == 1
    server.stop(signal.SIGKILL)  # a crash, not a clean shutdown: nothing is written on the way out
    server.start()
    assert active_slots(server) == 1  # still held, by a holder the restarted server knows
    (tmp_path / "run-1" / "xe.release").touch()
    release(tmp_path / "run-1", "finetune")  # the next stage gets the one slot
    finish(first)
    assert active_slots(server) == 0
    # A second run proceeds as well, with no manual reset of the limit.
    second = start_holder(server, tmp_path / "run-2")
    holders.append(second)
    release(tmp_path / "run-2", "xe")
    release(tmp_path / "run-2", "finetune")
    finish(second)
    assert active_slots(server) == 0
