"""The local stack: a Prefect server and process worker, an MLflow server and (optionally) an S3 server.

    captioning stack up [--s3] [--db postgres]   # starts what is not running yet; prints the URLs
    eval "$(captioning stack env)"         # PREFECT_API_URL, MLFLOW_TRACKING_URI (and AWS_* with --s3)
    captioning stack status
    captioning stack down                  # the worker first (SIGINT), then the servers

    stack = LocalStack(StackSettings(state_dir=Path("demo-data/stack"), s3=True))
    env = stack.up()                       # what a client needs, as a dict
    stack.down()

Everything binds to 127.0.0.1 and keeps its state in one folder (default ``demo-data/stack``):

    stack.json             the settings of the last ``up`` (a later ``up`` reuses them), URLs, S3 keys
    env.sh                 ``export`` lines for clients (``captioning stack env`` prints the same)
    pids/{prefect-server,worker,s3}.pid     logs/{prefect-server,worker,s3}.log
    prefect/               PREFECT_HOME: the server's SQLite database, profiles, UI build
    postgres/              with ``--db postgres``: the PostgreSQL cluster (data/, server.log,
                           server.pid) that holds the Prefect and MLflow databases (postgres.py)
    mlflow/                the MLflow server's state (mlflow_server.py): mlflow.db,
                           artifacts/, and its own server.pid and server.log
    s3/                    the S3 root: each folder is a bucket (``captioning`` is made by default)
    rclone.conf            an empty rclone config, so a user's own never leaks in

Each component runs in a session of its own (``start_new_session``), so it outlives ``captioning stack
up`` and no terminal signal reaches it, and stopping takes its whole process group (a worker's flow-run
processes, a server's workers). A pid file counts only while its process is alive and is this stack's
(its command line or ``PREFECT_HOME`` names the state folder), so a recycled pid is never signalled.
Prefect is driven through its CLI and REST API as subprocesses (prefect_server.py): the library never
imports it. Both servers keep their state in SQLite by default; with ``db="postgres"`` in a local
PostgreSQL cluster the stack starts first and stops last, with ``db="postgresql://USER:PW@HOST:PORT"``
in an existing server (databases ``prefect`` and ``mlflow``, made when missing); migrations run at
each start (Prefect's on its own, MLflow's with ``mlflow db upgrade``). The settings, their record and the status lines are in stack_settings.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from captioning.launch import live_process, stop_process_group
from captioning.progress import QUIET_ENV
from captioning.services.mlflow_server import MlflowServer, is_healthy, port_is_open
from captioning.services.postgres import PostgresError, PostgresTarget, StackDatabase, redact
from captioning.services.prefect_server import (
    NODE_POOL,
    ensure_gpu_limit,
    ensure_work_pool,
    http_json,
    prefect_env,
    server_command,
    server_healthy,
    worker_command,
    worker_online,
)
from captioning.services.processes import private_dir, spawn_logged
from captioning.services.s3_server import S3Server
from captioning.services.stack_auth import StackSecrets
from captioning.services.stack_settings import (
    COMPONENTS,
    MLFLOW,
    PORT_OPTIONS,
    POSTGRES,
    PREFECT_SERVER,
    S3,
    S3_BUCKET,
    WORKER,
    StackError,
    StackSettings,
    export_lines,
    read_json,
)

LOG_TAIL_LINES = 20
WORKER_GRACE_S = 20.0  # after SIGINT, a worker stops polling and waits for its flow runs


# --- processes ----------------------------------------------------------------------------------------


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _read_pid(pid_path: Path) -> int | None:
    try:
        return int(pid_path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


# --- the stack ----------------------------------------------------------------------------------------


class LocalStack:
    """Start, stop and inspect the stack that ``settings.state_dir`` records (module docstring)."""

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir).resolve()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # what this object started
        self._mlflow_server: MlflowServer | None = None
        self._secrets = StackSecrets(read_json(self.json_path), auth=settings.auth)
        if settings.db.startswith(("postgresql:", "postgres:")):  # an existing server: the URL's password
            self._secrets.db_password(PostgresTarget.parse(settings.db)[1])  # is a secret, the rest a setting
            settings.db = redact(settings.db).replace(":***@", "@")
        self._db = StackDatabase(
            settings.db,
            self.state_dir / "postgres",
            host=settings.host,
            port=settings.postgres_port,
            password=self._secrets.db_password,
        )

    # paths ---------------------------------------------------------------------------------------------

    @property
    def json_path(self) -> Path:
        return self.state_dir / "stack.json"

    @property
    def env_path(self) -> Path:
        return self.state_dir / "env.sh"

    def pid_path(self, component: str) -> Path:
        if component == MLFLOW:
            return self._mlflow().pid_path
        if component == POSTGRES:
            return self._db.server().pid_path
        return self.state_dir / "pids" / f"{component}.pid"

    def log_path(self, component: str) -> Path:
        if component == MLFLOW:
            return self._mlflow().log_path
        if component == POSTGRES:
            return self._db.server().log_path
        return self.state_dir / "logs" / f"{component}.log"

    def _mlflow(self) -> MlflowServer:
        if self._mlflow_server is None:
            s = self.settings
            self._mlflow_server = MlflowServer(
                self.state_dir / "mlflow",
                host=s.host,
                port=s.mlflow_port,
                auth=self._secrets.auth(),
                backend_store_uri=self._db.url("mlflow"),
                env=self._db.server_env(),
            )
        return self._mlflow_server

    def _s3(self) -> S3Server:
        access_key, secret_key = self._secrets.s3()
        return S3Server(
            self.state_dir / "s3",
            port=self.settings.s3_port,
            access_key=access_key,
            secret_key=secret_key,
            workdir=self.state_dir,
            log_path=self.log_path(S3),
            pid_path=self.pid_path(S3),
        )

    @property
    def _auth_string(self) -> str | None:
        return self._secrets.auth_string

    # identity and health ---------------------------------------------------------------------------------

    def _is_ours(self, component: str, process: Any) -> bool:
        """Whether a live process is this stack's ``component`` (a pid may have been recycled)."""
        import psutil

        try:
            cmdline = process.cmdline()
            if component == MLFLOW:
                return self._mlflow().backend_store_uri in cmdline
            if component == S3:
                return str(self.state_dir / "s3") in cmdline
            if component == POSTGRES:
                return str(self._db.server().data_dir) in cmdline
            home = process.environ().get("PREFECT_HOME")
        except psutil.Error:
            return False
        role = ["server", "start"] if component == PREFECT_SERVER else ["worker", "start"]
        return home == str(self.state_dir / "prefect") and all(word in cmdline for word in role)

    def running_pid(self, component: str) -> int | None:
        """The pid in ``component``'s pid file when that process is alive and this stack's."""
        pid = _read_pid(self.pid_path(component))
        if pid is None:
            return None
        process = live_process(pid)
        return pid if process is not None and self._is_ours(component, process) else None

    def _healthy(self, component: str) -> bool:
        s = self.settings
        if component == PREFECT_SERVER:
            return server_healthy(s.api_url)
        if component == MLFLOW:
            return is_healthy(s.mlflow_url)
        if component == S3:
            return http_json("GET", f"{s.s3_url}/", timeout_s=2.0)[0] != 0  # any answer (403) is serving
        if component == POSTGRES:
            return self._db.target is not None and self._db.target.answers(self._db.password)
        return worker_online(s.api_url, s.work_pool, self.worker_name, auth=self._auth_string)

    @property
    def worker_name(self) -> str:
        return f"{self.settings.work_pool}@{self.settings.host}:{self.settings.prefect_port}"

    def _enabled(self) -> dict[str, bool]:
        s = self.settings
        return {PREFECT_SERVER: True, WORKER: s.worker, MLFLOW: True, S3: s.s3, POSTGRES: s.db == "postgres"}

    # public API ------------------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """What a client needs: PREFECT_API_URL, MLFLOW_TRACKING_URI, the credentials with ``auth``, and
        the AWS_* variables with S3."""
        s = self.settings
        env = {"PREFECT_API_URL": s.api_url, "MLFLOW_TRACKING_URI": s.mlflow_url}
        if (auth := self._secrets.auth()) is not None:
            env.update(auth.client_env())
        if s.s3:
            access_key, secret_key = self._secrets.s3()
            env.update(
                {
                    "AWS_ACCESS_KEY_ID": access_key,
                    "AWS_SECRET_ACCESS_KEY": secret_key,
                    "AWS_ENDPOINT_URL_S3": s.s3_url,
                    "AWS_REGION": "us-east-1",
                    "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
                }
            )
        return env

    def status(self) -> dict[str, dict[str, Any]]:
        """Per component: enabled, running (pid alive and ours), healthy, pid, url, log and pid file."""
        s = self.settings
        urls = {
            PREFECT_SERVER: s.prefect_url,
            WORKER: f"pool {s.work_pool}",
            MLFLOW: s.mlflow_url,
            S3: s.s3_url,
            POSTGRES: f"postgresql://{s.host}:{s.postgres_port}",
        }
        enabled = self._enabled()
        result = {}
        for name in COMPONENTS:
            pid = self.running_pid(name)
            result[name] = {
                "enabled": enabled[name],
                "running": pid is not None,
                "healthy": pid is not None and self._healthy(name),
                "pid": pid,
                "url": urls[name],
                "log": str(self.log_path(name)),
                "pid_file": str(self.pid_path(name)),
            }
        return result

    def up(self, timeout_s: float = 120) -> dict[str, str]:
        """Start every enabled component that is not running; returns ``env()``.

        Idempotent: a component already running (pid alive and healthy) is kept. Never stops anything
        it did not start: a running S3 server stays up under ``s3=False``. When a step fails, what this
        call started is stopped again.
        """
        deadline = time.monotonic() + timeout_s
        running = {name: self.running_pid(name) for name in COMPONENTS}
        self._check_recorded_ports(running)
        to_start = [n for n, on in self._enabled().items() if on and running[n] is None]
        self._check_ports(to_start)
        private_dir(self.state_dir)
        self._write_record()
        started: list[str] = []
        try:
            if S3 in to_start:
                started.append(S3)
                self._start_s3(deadline)
            if POSTGRES in to_start:
                started.append(POSTGRES)
                self._start_postgres(deadline)
            try:
                self._db.prepare()
            except PostgresError as exc:
                raise StackError(str(exc)) from exc
            if PREFECT_SERVER in to_start:
                started.append(PREFECT_SERVER)
                self._spawn_prefect_server()
            # MLflow boots while the Prefect server does (each takes several seconds).
            if MLFLOW in to_start:
                started.append(MLFLOW)
                self._start_mlflow(deadline)
            self._wait_healthy(PREFECT_SERVER, deadline)
            for name in (MLFLOW, S3, POSTGRES):
                if self._enabled()[name] and name not in to_start:
                    self._wait_healthy(name, deadline)
            for pool in (self.settings.work_pool, NODE_POOL):  # NODE_POOL: multi-node stages' jobs
                ensure_work_pool(self.state_dir, self.settings.api_url, pool, self._auth_string)
            ensure_gpu_limit(self.settings.api_url, self.settings.gpu_slots, self._auth_string)
            if WORKER in to_start:
                started.append(WORKER)
                self._start_worker(deadline)
        except BaseException:
            self._stop(list(reversed(started)), time.monotonic() + 60)
            raise
        env = self.env()
        self.env_path.write_text(
            f"# the local stack in {self.state_dir}: source this file\n" + export_lines(env)
        )
        self.env_path.chmod(0o600)  # it holds the S3 secret
        return env

    def down(self, timeout_s: float = 60) -> None:
        """Stop every component that runs: the worker first (SIGINT, then SIGTERM/SIGKILL after a grace
        period), then MLflow, S3, the Prefect server and PostgreSQL (a fast shutdown: its data stays);
        removes the pid files. Idempotent."""
        self._stop([WORKER, MLFLOW, S3, PREFECT_SERVER, POSTGRES], time.monotonic() + timeout_s)

    # steps -----------------------------------------------------------------------------------------------

    def _check_recorded_ports(self, running: dict[str, int | None]) -> None:
        """A running component keeps the port it was started on: moving it needs a ``down`` first."""
        keys = {
            PREFECT_SERVER: ("host", "prefect_port", "auth", "db"),
            WORKER: ("host", "prefect_port", "work_pool", "auth"),
            MLFLOW: ("host", "mlflow_port", "auth", "db"),
            S3: ("host", "s3_port"),
            POSTGRES: ("host", "postgres_port"),
        }
        recorded = read_json(self.json_path).get("settings", {})
        wanted = self.settings.to_json()
        for key in sorted({key for name, pid in running.items() if pid is not None for key in keys[name]}):
            if key in recorded and recorded[key] != wanted[key]:
                option = PORT_OPTIONS.get(key, f"--{key.replace('_', '-')}")
                raise StackError(
                    f"the stack in {self.state_dir} is running with {option} {recorded[key]}, not "
                    f"{wanted[key]}: stop it first (captioning stack down --state-dir {self.settings.state_dir})"
                )

    def _check_ports(self, to_start: list[str]) -> None:
        s = self.settings
        ports = {PREFECT_SERVER: ("prefect_port", s.prefect_port), MLFLOW: ("mlflow_port", s.mlflow_port)}
        ports[S3] = ("s3_port", s.s3_port)
        ports[POSTGRES] = ("postgres_port", s.postgres_port)
        for name in to_start:
            if name in ports:
                key, port = ports[name]
                if port_is_open(s.host, port):
                    raise StackError(
                        f"port {port} on {s.host} is taken by another process (not this stack's {name}): "
                        f"choose another with {PORT_OPTIONS[key]} or stop that process"
                    )

    def _write_record(self) -> None:
        s = self.settings
        record = {
            "settings": s.to_json(),
            "urls": {
                "prefect_ui": s.prefect_url,
                "prefect_api": s.api_url,
                "mlflow": s.mlflow_url,
                **({"s3": s.s3_url} if s.s3 else {}),
            },
            "work_pool": s.work_pool,
            "worker_name": self.worker_name,
            **self._secrets.record(db=self._db.target is not None),
        }
        if self._db.target is not None:
            record["databases"] = {"prefect": self._db.url("prefect"), "mlflow": self._db.url("mlflow")}
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.chmod(0o600)  # it holds the S3 secret
        os.replace(tmp, self.json_path)

    def _start_s3(self, deadline: float) -> None:
        server = self._s3()
        server.start_timeout_s = max(1.0, deadline - time.monotonic())
        (server.root / S3_BUCKET).mkdir(parents=True, exist_ok=True)
        self._start_server(S3, server, server.start, f"the S3 server (rclone) on {self.settings.s3_url}")

    def _start_server(self, component: str, server: Any, start: Callable[[], object], what: str) -> None:
        """``start()`` the server, or a StackError naming it, why, and the end of its log."""
        try:
            start()
        except (RuntimeError, TimeoutError) as exc:
            raise StackError(
                f"{what} did not start: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}\n"
                f"last lines of {server.log_path}:\n{_log_tail(server.log_path)}"
            ) from exc
        if server.process is not None:
            self._procs[component] = server.process

    def _start_postgres(self, deadline: float) -> None:
        server = self._db.server()
        timeout_s = max(1.0, deadline - time.monotonic())
        self._start_server(
            POSTGRES,
            server,
            lambda: server.start(timeout_s),
            f"PostgreSQL on {server.target.host}:{server.target.port}",
        )

    def _spawn_prefect_server(self) -> None:
        s = self.settings
        cmd = server_command(s.host, s.prefect_port)
        (self.state_dir / "prefect").mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **prefect_env(self.state_dir, s.api_url, self._auth_string),
            **self._db.server_env(),
        }
        if (url := self._db.url("prefect", driver="asyncpg")) is not None:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = url
        self._procs[PREFECT_SERVER] = spawn_logged(
            cmd, env=env, log_path=self.log_path(PREFECT_SERVER), pid_path=self.pid_path(PREFECT_SERVER)
        )

    def _start_mlflow(self, deadline: float) -> None:
        server = self._mlflow()
        timeout_s = max(1.0, deadline - time.monotonic())
        self._start_server(
            MLFLOW, server, lambda: server.start(timeout_s=timeout_s), f"the MLflow server on {server.url}"
        )

    def _start_worker(self, deadline: float) -> None:
        s = self.settings
        cmd = worker_command(s.work_pool, self.worker_name)
        env = {**os.environ, **prefect_env(self.state_dir, s.api_url, self._auth_string)}
        env.update(QUIET_ENV)  # its log (and its flow runs' output in it) without bars or emoji lines
        env.update(self.env())  # its flow runs reach MLflow (and S3) with the stack's credentials
        since = datetime.now(UTC) - timedelta(seconds=2)
        self._procs[WORKER] = spawn_logged(
            cmd, env=env, log_path=self.log_path(WORKER), pid_path=self.pid_path(WORKER), cwd=Path(s.workdir)
        )
        self._wait(
            WORKER,
            lambda: worker_online(s.api_url, s.work_pool, self.worker_name, since, auth=self._auth_string),
            deadline,
            "is not online in its work pool",
        )

    def _wait_healthy(self, component: str, deadline: float) -> None:
        self._wait(component, lambda: self._healthy(component), deadline, "is not healthy")

    def _wait(self, component: str, ready: Callable[[], bool], deadline: float, what: str) -> None:
        log = self.log_path(component)
        while True:
            process = self._procs.get(component)
            died = process.poll() is not None if process is not None else self.running_pid(component) is None
            if died:
                code = f" with exit code {process.returncode}" if process is not None else ""
                raise StackError(
                    f"{component} exited{code} while starting; last lines of {log}:\n{_log_tail(log)}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"{component} {what} within the time allowed; last lines of {log}:\n{_log_tail(log)}"
                )
            time.sleep(0.25)

    def _stop(self, components: list[str], deadline: float) -> None:
        for name in components:
            process = self._procs.pop(name, None)
            # Our own child right after the fork has neither its command line nor its environment yet.
            pid = process.pid if process is not None and process.poll() is None else self.running_pid(name)
            if pid is not None:
                left = max(1.0, deadline - time.monotonic())
                signals: tuple[tuple[signal.Signals, float], ...]
                if name == WORKER:
                    signals = ((signal.SIGINT, min(WORKER_GRACE_S, left)), (signal.SIGTERM, 5.0))
                elif name == POSTGRES:  # SIGINT: a fast shutdown (SIGTERM waits for every client to leave)
                    signals = ((signal.SIGINT, min(30.0, left)), (signal.SIGTERM, 5.0))
                else:
                    signals = ((signal.SIGTERM, min(15.0, left)),)
                stop_process_group(pid, signals, reap=process)
            elif process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=5)
            self.pid_path(name).unlink(missing_ok=True)
            if name == MLFLOW and self._mlflow_server is not None:
                self._mlflow_server.process = None
