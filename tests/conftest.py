"""Shared pytest fixtures, and the two test tiers. Each block is self-contained; add yours as a new
delimited block.

Tiers: a test is in the integration tier when it uses (directly or through other fixtures) one of
INTEGRATION_FIXTURES: a real server (MLflow, S3, Prefect, the local stack, one the test starts),
torchrun or the JVM scorers. It is marked `integration` here, from its fixtures, never by hand.
`make test-fast` (`pytest -m "not integration"`) runs the rest after every edit; `make test` runs
all. In a fast-tier session `java` is a stub that fails, naming the fixture to request, so a test
that needs the JVM without saying so cannot hide in the fast tier.
"""

from __future__ import annotations

import os as _os
import shutil as _shutil
import stat as _stat
import tempfile as _tempfile

# --- S3: a real `rclone serve s3` on loopback (tests/s3server.py) ------------------------------------
import uuid as _uuid
from collections.abc import Iterator as _Iterator

import leftovers as _leftovers
import pytest
from s3server import S3Server


@pytest.fixture(scope="session")
def s3_server() -> _Iterator[S3Server]:
    """One `rclone serve s3` for the whole session (starts in about 0.1 s); stopped at the end."""
    with S3Server() as server:
        if server.process is not None:  # started by whichever test asks first (getfixturevalue too)
            _leftovers.owned_by_fixture(server.process.pid)
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3 at `s3_server` through the environment and make a fresh bucket; yields `s3://<bucket>`."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server.make_bucket(f"test-{_uuid.uuid4().hex[:12]}")


# --- end S3 -----------------------------------------------------------------------------------------


# --- torch threads ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_torch_thread() -> _Iterator[None]:
    """One intra-op thread for a module of tiny-tensor tests (`pytestmark = usefixtures(...)`).

    Tiny tensors gain nothing from a second thread, and on shared cores its barriers stall (a 32 px
    ResNet-18 forward went from 10 ms to 800 ms next to another busy process).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- end torch threads ------------------------------------------------------------------------------


# --- MLflow: a real `mlflow server` on loopback (captioning/services/mlflow_server.py) --------------


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> _Iterator[object]:
    """One MLflow server (SQLite, local artifacts) for the session; ``.url`` is its tracking URI."""
    from s3server import free_port

    from captioning.services.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), port=free_port()).start()
    if server.process is not None:  # started by whichever test asks first (getfixturevalue too)
        _leftovers.owned_by_fixture(server.process.pid)
    yield server
    server.stop()


# --- end MLflow -------------------------------------------------------------------------------------


# --- Prefect: a real (temporary) Prefect server per module ------------------------------------------


@pytest.fixture(scope="module")
def prefect_server() -> _Iterator[None]:
    """A real Prefect server (SQLite in a temporary folder) for the module's flow runs, run in-process.

    Running flows in-process makes Prefect 3.8.8 register threading atexit hooks that fail in any
    process forked later (exit code 1; fixed upstream in 3.9.1, see ENVIRONMENT.md): the hooks added
    here are removed at the end so the tests after this module that fork are not affected.
    """
    import threading

    from prefect.testing.utilities import prefect_test_harness

    hooks = getattr(threading, "_threading_atexits", None)
    before = list(hooks) if isinstance(hooks, list) else None
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        if isinstance(hooks, list) and before is not None:
            hooks[:] = before


# --- end Prefect ------------------------------------------------------------------------------------


# --- test tiers -------------------------------------------------------------------------------------

INTEGRATION_FIXTURES = frozenset(
    {
        "mlflow_server",  # a real `mlflow server`
        "s3_server",  # a real `rclone serve s3`
        "s3_env",
        "prefect_server",  # a real Prefect server (test_flows.py, test_caption_media.py)
        "stack",  # the local stack: Prefect server + worker, MLflow (test_deployments.py)
        "java",  # pycocoevalcap's scorers on the JVM
        "torchrun",  # training launched under torchrun
        "subprocess_tree",  # servers and process trees the test starts itself
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # A fixture parameter named after an integration fixture (`params=["local", "s3_env"]`, fetched
        # with request.getfixturevalue(request.param)) counts as using that fixture.
        callspec = getattr(item, "callspec", None)
        params = {p for p in (callspec.params.values() if callspec else ()) if isinstance(p, str)}
        used = INTEGRATION_FIXTURES.intersection({*getattr(item, "fixturenames", ()), *params})
        if used:
            item.add_marker(pytest.mark.integration(*sorted(used)))


def pytest_configure(config: pytest.Config) -> None:
    if (config.getoption("markexpr", "") or "").replace(" ", "") == "notintegration":
        stub_dir = _tempfile.mkdtemp(prefix="fast-tier-")
        stub = _os.path.join(stub_dir, "java")
        with open(stub, "w") as f:
            f.write(
                '#!/bin/sh\necho "fast tier: this test runs the JVM; request the java fixture" >&2\nexit 97\n'
            )
        _os.chmod(stub, _os.stat(stub).st_mode | _stat.S_IXUSR)
        _os.environ["PATH"] = stub_dir + _os.pathsep + _os.environ.get("PATH", "")
        config.add_cleanup(lambda: _shutil.rmtree(stub_dir, ignore_errors=True))


@pytest.fixture(scope="session")
def java() -> str:
    """The JVM that pycocoevalcap's tokenizer and METEOR need (a test that scores captions asks for it)."""
    found = _shutil.which("java")
    if found is None:
        pytest.skip("no java on PATH (pycocoevalcap needs a JRE: `make setup` installs one)")
    return found


@pytest.fixture
def torchrun() -> str:
    """The torchrun launcher module (a test that launches training under torchrun asks for it)."""
    return "torch.distributed.run"


@pytest.fixture
def subprocess_tree() -> None:
    """Requested by a test that starts real servers or process trees of its own (sessions, signals)."""


# --- end test tiers ---------------------------------------------------------------------------------


# --- no leftover processes --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_leftover_processes() -> _Iterator[None]:
    """Fail a test that leaves a process of its own alive (``tests/leftovers.py``); they are killed."""
    before = set(_leftovers.live_descendants())
    yield
    if left := _leftovers.leftovers(before):
        pytest.fail(
            "the test left processes alive (now killed): "
            + "; ".join(f"pid {pid}: {cmd[:200]}" for pid, cmd in left.items())
        )


# --- end no leftover processes ----------------------------------------------------------------------
