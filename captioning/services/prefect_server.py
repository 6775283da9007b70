"""The Prefect side of the local stack, driven through its CLI and REST API as subprocesses (the library
never imports Prefect): the server and worker commands and environment, health and worker checks, the
process work pool and the ``gpu`` global concurrency limit.

    env = {**os.environ, **prefect_env(state_dir, "http://127.0.0.1:4200/api")}
    server_command("127.0.0.1", 4200)                        # python -m prefect server start ...
    worker_online(api_url, "captioning-local", worker_name)  # True once it polls its pool
    ensure_work_pool(state_dir, api_url, "captioning-local"); ensure_gpu_limit(api_url, slots=1)
    spawn_logged(server_command(...), env=env, log_path=..., pid_path=...)   # services/processes.py
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import urllib.parse
from datetime import datetime
from pathlib import Path
from typing import Any

from captioning.services.stack_auth import basic_header
from captioning.services.stack_settings import StackError

GPU_LIMIT = "gpu"
NODE_POOL = "captioning-nodes"  # the train-node jobs of multi-node stages (prefect.yaml, tasks/nodes.py)
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"


def prefect_env(state_dir: str | os.PathLike[str], api_url: str, auth: str | None = None) -> dict[str, str]:
    """The environment the Prefect server, its CLI and the worker need: a PREFECT_HOME (and SQLite
    database) under ``state_dir/prefect``, the API URL, no analytics, and log lines streamed to
    watchers. ``auth``: the API auth string (``user:password``) the server requires and clients send.
    """
    home = Path(state_dir).resolve() / "prefect"
    secured = {"PREFECT_SERVER_API_AUTH_STRING": auth, "PREFECT_API_AUTH_STRING": auth} if auth else {}
    return secured | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Concurrency leases on disk (PREFECT_HOME/concurrency_leases), not in the server's memory: a
        # restarted server still knows who holds the `gpu` slot, so the holder's release frees it (with
        # the default in-memory storage the slot stayed taken by nobody, and every later stage waited).
        # A holder that dies stops renewing; its lease expires and the server's repossessor frees it.
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": LEASE_STORAGE,
        # Off by default: without them `prefect deployment run --watch` shows state events but no log line.
        "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true",
        "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
        "DO_NOT_TRACK": "1",
    }


def http_json(
    method: str, url: str, body: dict[str, Any] | None = None, timeout_s: float = 5.0, auth: str | None = None
) -> tuple[int, Any]:
    """(status, parsed JSON or None) of one request (``auth``: ``user:password`` basic credentials);
    status 0 when nothing answers. http.client, unlike urllib, never goes through an HTTP(S)_PROXY
    from the environment."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=timeout_s)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        headers.update(basic_header(auth))
        conn.request(method, parsed.path or "/", body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except OSError:
        return 0, None
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw) if raw else None
    except ValueError:
        return response.status, None


def server_command(host: str, port: int) -> list[str]:
    """``prefect server start`` on ``host:port`` with this interpreter."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]


def worker_command(work_pool: str, worker_name: str) -> list[str]:
    """A process worker named ``worker_name`` that polls ``work_pool``."""
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", work_pool]
    return [*cmd, "--type", "process", "--name", worker_name]


def server_healthy(api_url: str) -> bool:
    return http_json("GET", f"{api_url}/health", timeout_s=2.0)[0] == 200


def worker_online(
    api_url: str, work_pool: str, worker_name: str, since: datetime | None = None, auth: str | None = None
) -> bool:
    """Whether worker ``worker_name`` is ONLINE in ``work_pool`` (with a heartbeat after ``since``)."""
    status, workers = http_json("POST", f"{api_url}/work_pools/{work_pool}/workers/filter", {}, auth=auth)
    if status != 200 or not isinstance(workers, list):
        return False
    for worker in workers:
        if worker.get("name") != worker_name or worker.get("status") != "ONLINE":
            continue
        beat = worker.get("last_heartbeat_time")
        if since is None or (beat and datetime.fromisoformat(beat.replace("Z", "+00:00")) >= since):
            return True
    return False


def prefect_cli(
    state_dir: str | os.PathLike[str], api_url: str, *args: str, auth: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``prefect ARGS...`` against the stack's server; output captured."""
    env = {**os.environ, **prefect_env(state_dir, api_url, auth)}
    return subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def ensure_work_pool(
    state_dir: str | os.PathLike[str], api_url: str, pool: str, auth: str | None = None
) -> None:
    """A process work pool, made through the CLI (which fills in the process worker's job template)."""
    if http_json("GET", f"{api_url}/work_pools/{pool}", auth=auth)[0] == 200:
        return
    done = prefect_cli(state_dir, api_url, "work-pool", "create", pool, "--type", "process", auth=auth)
    if done.returncode != 0 and "already exists" not in done.stdout + done.stderr:
        raise StackError(f"prefect work-pool create {pool} failed:\n{done.stdout}{done.stderr}")


def ensure_gpu_limit(api_url: str, slots: int, auth: str | None = None) -> None:
    """The global concurrency limit ``gpu`` (slots = GPUs that flows may use at once); an existing
    one is left as it is."""
    url = f"{api_url}/v2/concurrency_limits/"
    if http_json("GET", f"{url}{GPU_LIMIT}", auth=auth)[0] == 200:
        return
    status, answer = http_json("POST", url, {"name": GPU_LIMIT, "limit": slots}, auth=auth)
    if status not in (200, 201, 409):
        raise StackError(f"creating the {GPU_LIMIT!r} concurrency limit failed: HTTP {status} {answer}")
