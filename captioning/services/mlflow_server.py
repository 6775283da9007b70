"""A local MLflow tracking server on loopback: SQLite (or a PostgreSQL database) backend, local or S3 artifacts.

    server = MlflowServer(state_dir="demo-data/mlflow", port=5000).start()   # waits until /health is OK
    server.url                                                                 # http://127.0.0.1:5000
    server.stop()

    captioning mlflow start [--port 5000] [--state-dir DIR] [--artifacts s3://bucket/mlflow]   # cli.py
    captioning mlflow ui                                                      # print (and open) the UI URL
    captioning mlflow stop

The server runs ``mlflow server --workers 1`` with job execution off (MLflow 3.17 otherwise starts
job consumers that outlive it) in a session of its own, so ``stop`` takes its whole process group.
State under ``state_dir``: ``mlflow.db`` (runs, metrics, registry), ``artifacts/`` (unless an
``s3://`` destination is given; then ``MLFLOW_S3_ENDPOINT_URL`` and AWS credentials come from the
environment), ``server.log`` and ``server.pid``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from captioning.launch import live_process, stop_process_group
from captioning.services.processes import private_dir, spawn_logged
from captioning.services.stack_auth import StackCredentials

DEFAULT_PORT = 5000
READY_TIMEOUT_S = 90.0


class MlflowServerError(RuntimeError):
    """The server did not start, or a stale one is in the way."""


def port_is_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def is_healthy(url: str, timeout_s: float = 2.0) -> bool:
    """True when ``{url}/health`` answers OK."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


class MlflowServer:
    """One ``mlflow server`` process and its state folder."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        artifacts_destination: str | None = None,
        auth: StackCredentials | None = None,
        backend_store_uri: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self._backend_store_uri = backend_store_uri  # None: mlflow.db in state_dir
        self.env = env or {}  # e.g. PGPASSWORD for a PostgreSQL backend (never on the command line)
        self.auth = auth  # None: open; else MLflow's basic-auth app with this admin (stack_auth.py)
        self.host = host
        self.port = port
        self.artifacts_destination = artifacts_destination or (self.state_dir / "artifacts").as_uri()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def backend_store_uri(self) -> str:
        return self._backend_store_uri or f"sqlite:///{self.state_dir / 'mlflow.db'}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "server.log"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "server.pid"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", self.artifacts_destination,
            "--host", self.host, "--port", str(self.port), "--workers", "1",
            *(["--app-name", "basic-auth"] if self.auth is not None else []),
        ]  # fmt: skip

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> MlflowServer:
        """Start the server and wait for /health; an already-running one of ours is reused."""
        if self.running_pid() is not None and is_healthy(self.url):
            return self
        if port_is_open(self.host, self.port):
            raise MlflowServerError(
                f"port {self.port} on {self.host} is taken by another process: choose --port or stop it"
            )
        private_dir(self.state_dir)
        env = {**os.environ, **self.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if self.auth is not None:
            env.update(self.auth.mlflow_server_env(self.state_dir))
        self.migrate(env)
        self.process = spawn_logged(self.command(), log_path=self.log_path, env=env, pid_path=self.pid_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise MlflowServerError(f"mlflow server exited with {self.process.returncode}:\n{tail}")
            if is_healthy(self.url):
                return self
            time.sleep(0.25)
        self.stop()
        raise MlflowServerError(
            f"mlflow server not healthy at {self.url} after {timeout_s:.0f} s; see {self.log_path}"
        )

    def migrate(self, env: dict[str, str]) -> None:
        """``mlflow db upgrade`` on a database server's store that has MLflow's tables (the server
        refuses an older schema; an empty one it creates at the newest itself). SQLite files are left
        to the server, as before."""
        if self.backend_store_uri.startswith("sqlite:") or not _has_table(self.backend_store_uri, env):
            return
        cmd = [sys.executable, "-m", "mlflow", "db", "upgrade", self.backend_store_uri]
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300
        )
        if done.returncode != 0:
            raise MlflowServerError(
                f"mlflow db upgrade failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
            )

    def running_pid(self) -> int | None:
        """The pid in server.pid when that process is alive."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if live_process(pid) is not None else None

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the server's process group (job consumers and workers included), SIGKILL what is left
        after ``timeout_s`` (``captioning.launch.stop_process_group``)."""
        pid = self.process.pid if self.process is not None else self.running_pid()
        if pid is None:
            return
        stop_process_group(pid, ((signal.SIGTERM, timeout_s),), reap=self.process)
        self.pid_path.unlink(missing_ok=True)
        self.process = None


def _has_table(store_uri: str, env: dict[str, str], table: str = "alembic_version") -> bool:
    """Whether the database at ``store_uri`` has ``table`` (its password from ``env``'s PGPASSWORD)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(store_uri, connect_args={"password": env.get("PGPASSWORD", "")})
    try:
        with engine.connect() as conn:
            return bool(sqlalchemy.inspect(conn).has_table(table))
    finally:
        engine.dispose()
