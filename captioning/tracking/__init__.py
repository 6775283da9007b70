"""What the trainer reports to: the ``Tracker`` protocol, ``NullTracker`` that drops everything, the
tracker kinds a run may ask for, and what every kind shares (flat parameters, the unreachable-server
error). Nothing here imports MLflow: a run without it never loads it.

    tracker = JsonlTracker("runs/demo/metrics.jsonl", run_name="pipeline")   # tracking/jsonl.py
    stage = tracker.child("xe")                       # one child per stage or evaluation
    stage.log_params({"train.xe.lr_decoder": 4e-4})
    stage.log_metrics({"train/loss": 3.2}, step=10)
    stage.log_artifact("runs/demo/xe/best.pt", "checkpoints")
    stage.close()

The trainer only ever holds a ``Tracker`` and calls it on rank 0 (STYLE habit 8: never every rank).
Behind the protocol: ``JsonlTracker`` (jsonl.py, a local file) and ``MlflowTracker`` (mlflow_run.py:
client.py connects, record_queue.py and artifacts.py send in the background, fallback.py keeps and
replays what could not be sent, system.py samples system metrics). runs.py opens and ends a pipeline's
runs; ``python -m captioning.tracking.report`` reads their scores back. Metric names use ``/`` to group
them: ``train/loss``, ``train/lr_decoder``, ``val/CIDEr``, ``test/BLEU-4``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol

TRACKERS = ("auto", "mlflow", "jsonl", "none")  # auto: mlflow when a tracking URI is configured, else jsonl


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server does not answer (or none is configured where one is needed)."""


class Tracker(Protocol):
    """Where metrics, parameters and artifacts of one run go."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...

    def child(self, name: str) -> Tracker:
        """A nested run (a stage or an evaluation) under this one."""
        ...

    def close(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Drops everything: non-zero ranks and runs without tracking."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass

    def child(self, name: str) -> NullTracker:
        return self

    def close(self, status: str = "FINISHED") -> None:
        pass


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings (and dataclass instances) to dotted keys with ``str()`` values.

    ``flatten({"train": {"xe": {"lr": 4e-4}}, "seed": 1})`` -> ``{"train.xe.lr": "0.0004", "seed": "1"}``.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat
