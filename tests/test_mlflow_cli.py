"""`captioning mlflow start|stop|status|ui` against a real `mlflow server` on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
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
