"""captioning/tracking/client.py: connecting to an MLflow server (real ones on loopback) and flattening params."""

from __future__ import annotations

import time
from typing import Any

import pytest
from s3server import free_port

from captioning.tracking import TrackingUnavailable, flatten
from captioning.tracking.client import connect


def test_flatten_nests_with_dots() -> None:
    config = {"train": {"xe": {"lr": 4e-4, "stages": ["xe", "scst"]}, "empty": {}}, "seed": 1, "name": None}
    assert flatten(config) == {
        "train.xe.lr": "0.0004",
        "train.xe.stages": "['xe', 'scst']",
        "train.empty": "{}",
        "seed": "1",
        "name": "None",
    }
    assert flatten({"a": {"b": 1}}, prefix="cfg.") == {"cfg.a.b": "1"}


# --- connecting -------------------------------------------------------------------------------------


def test_connect_unreachable_fails_fast_and_says_how_to_start() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable) as info:
        connect(f"http://127.0.0.1:{port}", timeout_s=2.0)
    assert time.monotonic() - start < 30  # a hang guard, generous: MLflow's own retries take minutes
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "captioning mlflow start" in message


def test_connect_reads_mlflow_tracking_uri(mlflow_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    assert connect().tracking_uri == mlflow_server.url
