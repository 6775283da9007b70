"""Shared pytest fixtures. Each block is self-contained; add yours as a new delimited block."""

from __future__ import annotations

# --- S3: a real `rclone serve s3` on loopback (tests/s3server.py) ------------------------------------
import uuid as _uuid
from collections.abc import Iterator as _Iterator

import pytest
from s3server import S3Server


@pytest.fixture(scope="session")
def s3_server() -> _Iterator[S3Server]:
    """One `rclone serve s3` for the whole session (starts in about 0.1 s); stopped at the end."""
    with S3Server() as server:
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


# --- MLflow: a real `mlflow server` on loopback (captioning/mlflow_server.py) -----------------------


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> _Iterator[object]:
    """One MLflow server (SQLite, local artifacts) for the session; ``.url`` is its tracking URI."""
    from s3server import free_port

    from captioning.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), port=free_port()).start()
    yield server
    server.stop()


# --- end MLflow -------------------------------------------------------------------------------------
