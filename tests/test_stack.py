"""`captioning stack`: the whole local stack (Prefect server + worker, MLflow, S3) on free loopback ports."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import socket
import stat
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from s3server import free_port

from captioning.cli import main
from captioning.services.stack import LocalStack
from captioning.services.stack_settings import COMPONENTS, StackError, StackSettings, load_settings


def _get(url: str) -> tuple[int, bytes]:
    # No proxy: loopback only.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return int(response.status), response.read()


def _post(url: str, body: dict[str, object]) -> object:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with opener.open(request, timeout=10) as response:
        return json.loads(response.read())


def _leftovers(state_dir: Path, ports: list[int], pids: set[int]) -> list[str]:
    """Live (non-zombie) processes that are one of ``pids`` or name the state folder or a port."""
    marks = [str(state_dir), *(f"127.0.0.1:{port}" for port in ports)]
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE or process.pid == os.getpid():
            continue
        argv = process.info["cmdline"] or []
        cmdline = " ".join(argv)
        if (
            process.pid in pids
            or any(mark in cmdline for mark in marks)
            or any(str(port) in argv for port in ports)
        ):
            found.append(f"{process.pid}: {cmdline}")
    return found


def _group_members(pgids: set[int]) -> set[int]:
    members = set()
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) in pgids:
                members.add(process.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[StackSettings]:
    """Settings on free ports; whatever the test started is stopped afterwards, even when it fails."""
    settings = StackSettings(
        state_dir=tmp_path / "stack",
        prefect_port=free_port(),
        mlflow_port=free_port(),
        s3_port=free_port(),
        s3=True,
        workdir=tmp_path,
    )
    yield settings
    LocalStack(settings).down()


@pytest.mark.usefixtures("subprocess_tree")
def test_up_is_idempotent_and_down_leaves_nothing(
    settings: StackSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    state = settings.state_dir.resolve()
    stack = LocalStack(settings)
    env = stack.up(timeout_s=240)

    prefect, mlflow, s3 = settings.prefect_port, settings.mlflow_port, settings.s3_port
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{prefect}/api"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{mlflow}"
    assert env["AWS_ENDPOINT_URL_S3"] == f"http://127.0.0.1:{s3}"
    assert (
        env["AWS_REQUEST_CHECKSUM_CALCULATION"] == env["AWS_RESPONSE_CHECKSUM_VALIDATION"] == "when_required"
    )
    assert env == stack.env()
    env_sh = (state / "env.sh").read_text()
    assert f"export PREFECT_API_URL=http://127.0.0.1:{prefect}/api" in env_sh
    assert f"export AWS_ACCESS_KEY_ID={env['AWS_ACCESS_KEY_ID']}" in env_sh
    assert json.loads((state / "stack.json").read_text())["settings"]["prefect_port"] == prefect
    # Its state (databases, logs, S3 keys) is its owner's only; its servers listen on loopback only.
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    listening = set()
    enabled = [name for name, info in stack.status().items() if info["enabled"]]
    assert enabled == [name for name in COMPONENTS if name != "postgres"]  # SQLite: the default
    for name in enabled:
        pid = stack.running_pid(name)
        assert pid is not None, name
        root = psutil.Process(pid)
        for process in (root, *root.children(recursive=True)):
            listening |= {
                (c.laddr.ip, c.laddr.port)
                for c in process.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            }
    assert {port for _, port in listening} >= {prefect, mlflow, s3}
    assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in listening), listening

    # Each server answers.
    assert _get(f"{env['PREFECT_API_URL']}/health")[0] == 200
    assert _get(f"{env['MLFLOW_TRACKING_URI']}/health")[0] == 200
    import boto3.session
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            response_checksum_validation="when_required",
            request_checksum_calculation="when_required",
        ),
    )
    assert "captioning" in [b["Name"] for b in client.list_buckets()["Buckets"]]
    client.put_object(Bucket="captioning", Key="hello.txt", Body=b"hi")
    assert client.get_object(Bucket="captioning", Key="hello.txt")["Body"].read() == b"hi"

    # The work pool, the `gpu` limit and an online worker.
    api = env["PREFECT_API_URL"]
    pool = json.loads(_get(f"{api}/work_pools/{settings.work_pool}")[1])
    assert pool["type"] == "process"
    gpu = json.loads(_get(f"{api}/v2/concurrency_limits/gpu")[1])
    assert gpu["limit"] == 1
    workers = _post(f"{api}/work_pools/{settings.work_pool}/workers/filter", {})
    assert isinstance(workers, list)
    assert [w["status"] for w in workers] == ["ONLINE"]

    for name in ("prefect-server", "worker", "s3"):
        assert (state / "pids" / f"{name}.pid").is_file()
        assert (state / "logs" / f"{name}.log").is_file()
    assert (state / "mlflow" / "server.pid").is_file()
    status = {name: c for name, c in stack.status().items() if c["enabled"]}
    assert all(c["running"] and c["healthy"] for c in status.values()), status
    pids = {name: c["pid"] for name, c in status.items()}

    # Again, from the recorded settings (as the CLI does): a no-op that keeps every process.
    again = LocalStack(load_settings(settings.state_dir))
    assert again.up(timeout_s=60) == env
    assert {name: c["pid"] for name, c in again.status().items() if c["enabled"]} == pids
    moved = dataclasses.replace(settings, mlflow_port=free_port())
    with pytest.raises(StackError, match=f"running with --mlflow-port {mlflow}"):
        LocalStack(moved).up(timeout_s=60)
    assert main(["stack", "status", "--state-dir", str(settings.state_dir)]) == 0
    assert main(["stack", "env", "--state-dir", str(settings.state_dir)]) == 0
    assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow}" in capsys.readouterr().out

    # Down (from another object, as `captioning stack down` is) stops every process of every group.
    members = _group_members(set(pids.values())) | set(pids.values())
    again.down()
    assert not _leftovers(state, [prefect, mlflow, s3], members)
    assert not list((state / "pids").glob("*.pid")) and not (state / "mlflow" / "server.pid").exists()
    assert not any(c["running"] for c in stack.status().values())
    stack.down()  # idempotent; also reaps the children this object started


@pytest.mark.usefixtures("subprocess_tree")
def test_a_taken_port_names_the_port_and_the_option(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = StackSettings(
            state_dir=tmp_path / "stack", prefect_port=port, mlflow_port=free_port(), workdir=tmp_path
        )
        stack = LocalStack(settings)
        try:
            with pytest.raises(StackError, match=rf"port {port} .*--prefect-port"):
                stack.up(timeout_s=60)
        finally:
            stack.down()
        assert not any(c["running"] for c in stack.status().values())


@pytest.mark.usefixtures("subprocess_tree")
def test_a_component_dying_at_start_stops_what_up_started(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An invalid setting makes the Prefect server exit at start, after S3 is up and while MLflow starts.
    monkeypatch.setenv("PREFECT_SERVER_LOGGING_LEVEL", "bogus")
    stack = LocalStack(settings)
    with pytest.raises(StackError, match="prefect-server exited") as raised:
        stack.up(timeout_s=240)
    assert "logging_level" in str(raised.value)  # the log's last lines say why
    assert not any(c["running"] for c in stack.status().values())
    ports = [settings.prefect_port, settings.mlflow_port, settings.s3_port]
    assert not _leftovers(settings.state_dir.resolve(), ports, set())


def test_status_of_an_empty_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "nothing"
    assert main(["stack", "status", "--state-dir", str(state)]) == 1
    out = capsys.readouterr().out
    assert "prefect-server  stopped" in out and "s3              off" in out
    assert main(["stack", "env", "--state-dir", str(state)]) == 1
    assert "no stack recorded" in capsys.readouterr().err


def test_settings_come_from_stack_json_unless_given(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    state.mkdir()
    recorded = StackSettings(
        state_dir=state, prefect_port=4999, s3=True, work_pool="pool-a", workdir=tmp_path
    )
    (state / "stack.json").write_text(json.dumps({"settings": recorded.to_json()}))
    loaded = load_settings(state, prefect_port=None, mlflow_port=5111, s3=None, worker=False)
    assert (loaded.prefect_port, loaded.mlflow_port, loaded.s3, loaded.worker) == (4999, 5111, True, False)
    assert (loaded.work_pool, loaded.workdir, loaded.state_dir) == ("pool-a", tmp_path.resolve(), state)
    assert load_settings(tmp_path / "none") == StackSettings(state_dir=tmp_path / "none")


def _status(method: str, url: str, auth: str | None = None, body: bytes | None = None) -> int:
    """The HTTP status of one request (basic credentials ``user:password`` when given)."""
    import base64
    import urllib.error

    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(
            urllib.request.Request(url, data=body, headers=headers, method=method), timeout=10
        ) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.mark.usefixtures("subprocess_tree")  # starts the stack's servers: the integration tier
def test_auth_on_refuses_unauthenticated_mlflow_and_prefect_calls(
    settings: StackSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    secured = dataclasses.replace(settings, auth=True, s3=False)
    stack = LocalStack(secured)
    env = stack.up(timeout_s=240)  # the worker comes online through the auth string too
    user, password = env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    prefect_auth = env["PREFECT_API_AUTH_STRING"]
    assert len(password) >= 20 and prefect_auth.startswith("captioning:")
    env_sh = (secured.state_dir / "env.sh").read_text()
    assert f"export PREFECT_API_AUTH_STRING={prefect_auth}" in env_sh
    assert stat.S_IMODE((secured.state_dir / "env.sh").stat().st_mode) == 0o600
    # MLflow: every call but /health needs the credentials.
    search = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=5"
    assert _status("GET", f"{env['MLFLOW_TRACKING_URI']}/health") == 200
    assert _status("GET", search) == 401
    assert _status("GET", search, f"{user}:wrong") == 401
    assert _status("GET", search, f"{user}:{password}") == 200
    # Prefect: every API call but /health needs the auth string.
    flows = f"{env['PREFECT_API_URL']}/flows/filter"
    assert _status("GET", f"{env['PREFECT_API_URL']}/health") == 200
    assert _status("POST", flows, body=b"{}") == 401
    assert _status("POST", flows, prefect_auth, body=b"{}") == 200
    # Clients with the exported environment just work.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from mlflow import MlflowClient

    assert MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()
    # The credentials outlive a restart; the same stack is not re-opened without auth.
    stack.down()
    again = LocalStack(secured)
    assert again.up(timeout_s=240)["MLFLOW_TRACKING_PASSWORD"] == password
    with pytest.raises(StackError, match="--auth"):
        LocalStack(dataclasses.replace(secured, auth=False)).up(timeout_s=60)
