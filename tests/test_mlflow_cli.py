"""`captioning mlflow start|stop|status|ui` against a real `mlflow server` on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from s3server import free_port

from captioning.cli import main
from captioning.launch import stop_process_group


def _alive_servers(state_dir: Path) -> list[psutil.Process]:
    """Live (non-zombie) processes whose command line names ``state_dir``."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(state_dir) in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


@pytest.fixture
def no_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.mark.usefixtures("no_tracking_uri", "subprocess_tree")
def test_start_status_ui_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "mlflow"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    where = ["--state-dir", str(state)]
    # A separate process, as a person runs it: the command returns while the server keeps running.
    started = subprocess.run(
        [sys.executable, "-m", "captioning.cli", "mlflow", "start", *where, "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=150,
    )
    pid = int((state / "server.pid").read_text()) if (state / "server.pid").is_file() else None
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        assert f"MLflow server started at {url}" in started.stdout
        assert f"export MLFLOW_TRACKING_URI={url}" in started.stdout
        assert pid is not None and psutil.pid_exists(pid)

        assert main(["mlflow", "status", *where]) == 0
        assert f"running: {url} is healthy (pid {pid}" in capsys.readouterr().out

        assert main(["mlflow", "start", *where, "--port", str(port)]) == 0
        out = capsys.readouterr().out
        assert f"already running at {url} (pid {pid}" in out and f"MLFLOW_TRACKING_URI={url}" in out

        assert main(["mlflow", "ui", *where]) == 0
        assert capsys.readouterr().out.strip() == url
        # An http tracking URI in the environment wins unless a state folder is named.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
        assert main(["mlflow", "ui", "--state-dir", str(state)]) == 0
        assert capsys.readouterr().out.strip() == url
        assert main(["mlflow", "ui"]) == 0
        assert capsys.readouterr().out.strip() == "http://tracking.example:5000"
        monkeypatch.delenv("MLFLOW_TRACKING_URI")

        assert main(["mlflow", "stop", *where]) == 0
        assert f"stopped the MLflow server at {url} (pid {pid})" in capsys.readouterr().out
        assert main(["mlflow", "status", *where]) == 1
        assert "not running" in capsys.readouterr().out
        assert not (state / "server.pid").exists()
        assert _alive_servers(state) == []
        assert main(["mlflow", "stop", *where]) == 0
        assert "no MLflow server running" in capsys.readouterr().out
    finally:
        if pid is not None and _alive_servers(state):
            stop_process_group(pid)


@pytest.mark.usefixtures("no_tracking_uri")
def test_start_refuses_a_port_taken_by_another_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "mlflow"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert main(["mlflow", "start", "--state-dir", str(state), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"error: port {port} on 127.0.0.1 is taken by another process" in err
    assert not (state / "server.pid").exists()
    assert _alive_servers(state) == []


@pytest.mark.usefixtures("no_tracking_uri")
def test_a_stale_pid_file_is_never_signalled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The recorded pid is alive but is not an mlflow server on this folder (here: pytest itself).
    (tmp_path / "server.pid").write_text(str(os.getpid()))
    where = ["--state-dir", str(tmp_path)]
    assert main(["mlflow", "status", *where]) == 1
    assert "not running" in capsys.readouterr().out
    assert main(["mlflow", "ui", *where]) == 1
    assert "captioning mlflow start" in capsys.readouterr().err
    assert main(["mlflow", "stop", *where]) == 0
    assert "removed a stale pid file" in capsys.readouterr().out
    assert not (tmp_path / "server.pid").exists()


def test_help_documents_remote_servers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["mlflow", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for needle in ("start", "stop", "status", "ui", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"):
        assert needle in out


def test_overrides_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mlflow", "status", "--seed=3"]) == 2
    assert "mlflow takes no config overrides" in capsys.readouterr().err


# --- finding the local stack's server, and advice that works on this machine --------------------------

FAKE_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("--port") + 1])), Health).serve_forever()
"""


def _fake_stack_server(stack_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """A process the stack's pid file names, whose command line is an mlflow server's on that folder
    (what `captioning mlflow` checks before trusting a pid) and which answers /health."""
    state = (stack_dir / "mlflow").resolve()
    state.mkdir(parents=True)
    (stack_dir / "stack.json").write_text("{}")
    backend = f"sqlite:///{state / 'mlflow.db'}"
    cmd = [sys.executable, "-c", FAKE_SERVER, "--backend-store-uri", backend, "--host", "127.0.0.1"]
    # Its own session, as a real server started by `captioning stack up`: the test stops its group.
    process = subprocess.Popen([*cmd, "--port", str(port)], start_new_session=True)
    (state / "server.pid").write_text(str(process.pid))
    return process


@pytest.mark.usefixtures("no_tracking_uri", "subprocess_tree")
def test_status_ui_start_and_stop_find_the_local_stacks_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the default folders demo-data/mlflow and demo-data/stack are relative
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _fake_stack_server(tmp_path / "demo-data" / "stack", port)
    try:
        from captioning.services.mlflow_server import is_healthy

        deadline = time.monotonic() + 30
        while not is_healthy(url) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert main(["mlflow", "status"]) == 0
        out = capsys.readouterr().out
        assert f"running: {url} is healthy (pid {server.pid}, the local stack's server" in out
        assert f"export MLFLOW_TRACKING_URI={url}" in out
        assert main(["mlflow", "ui"]) == 0
        assert capsys.readouterr().out.strip() == url
        assert main(["mlflow", "ui", "--state-dir", "demo-data/stack"]) == 0  # a stack's folder works too
        assert capsys.readouterr().out.strip() == url
        # `start` points at it instead of failing on the port it holds; `stop` leaves it to the stack.
        assert main(["mlflow", "start"]) == 0
        out = capsys.readouterr().out
        assert (
            f"the local stack's server already runs at {url}" in out and f"MLFLOW_TRACKING_URI={url}" in out
        )
        assert not (tmp_path / "demo-data" / "mlflow" / "server.pid").exists()
        assert main(["mlflow", "stop"]) == 0
        assert "stops with the stack: `captioning stack down`" in capsys.readouterr().out
        assert server.poll() is None
        # Its port held by a server this folder did not record: start says to use it, or a free port.
        assert main(["mlflow", "start", "--port", str(port)]) == 1
        err = capsys.readouterr().err
        assert f"already answers at {url}: use it (export MLFLOW_TRACKING_URI={url})" in err
        assert "start another with --port " in err
    finally:
        stop_process_group(server.pid)


@pytest.mark.usefixtures("no_tracking_uri")
@pytest.mark.parametrize("holder", ["nobody", "another program", "an unrecorded mlflow"])
def test_nothing_running_gives_advice_that_works_here(
    holder: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from captioning.services import mlflow_server

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mlflow_server, "DEFAULT_PORT", 5000)
    taken = {"nobody": set(), "another program": {5000, 5001}, "an unrecorded mlflow": {5000}}[holder]
    monkeypatch.setattr(mlflow_server, "port_is_open", lambda host, port: port in taken)
    monkeypatch.setattr(
        mlflow_server, "is_healthy", lambda url, timeout_s=2.0: holder == "an unrecorded mlflow"
    )
    assert main(["mlflow", "status"]) == 1
    out = capsys.readouterr().out
    assert "not running: no live MLflow server recorded in demo-data/mlflow/server.pid or " in out
    assert "demo-data/stack/mlflow/server.pid" in out
    assert main(["mlflow", "ui"]) == 1
    err = capsys.readouterr().err
    advice = {
        "nobody": "start one: `captioning mlflow start` (or the whole local stack: `captioning stack up`)",
        "another program": "port 5000 is taken by another program: start one with "
        "`captioning mlflow start --port 5002`",
        "an unrecorded mlflow": "answers at http://127.0.0.1:5000: use it "
        "(export MLFLOW_TRACKING_URI=http://127.0.0.1:5000) or `captioning mlflow start --port 5001`",
    }[holder]
    assert advice in out and advice in err
    if holder == "another program":
        assert main(["mlflow", "start"]) == 1
        assert (
            "error: port 5000 on 127.0.0.1 is taken by another process: start on a free one with --port 5002"
            in (capsys.readouterr().err)
        )


@pytest.mark.usefixtures("no_tracking_uri")
def test_status_reports_the_tracking_uri_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from captioning.services import mlflow_server

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mlflow_server, "is_healthy", lambda url, timeout_s=2.0: "remote" in url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://remote.example:5000")
    assert main(["mlflow", "status"]) == 0
    assert "MLFLOW_TRACKING_URI=http://remote.example:5000 answers /health" in capsys.readouterr().out
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://down.example:5000")
    assert main(["mlflow", "ui"]) == 0  # the URL the user named, with a note that it does not answer
    captured = capsys.readouterr()
    assert captured.out.strip() == "http://down.example:5000" and "does not answer" in captured.err
