"""A local tracker: every call one JSON line in a file, artifacts copied next to it.

tracker = JsonlTracker("runs/demo/metrics.jsonl", run_name="pipeline")
tracker.child("xe").log_metrics({"train/loss": 3.2}, step=10)
metric_history(read_jsonl("runs/demo/metrics.jsonl"), "pipeline/xe", "train/loss")   # [(10, 3.2)]
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections.abc import Mapping
from typing import Any


def _finite(value: float) -> float | str:
    """JSON has no NaN/inf: keep them readable as strings instead of writing invalid JSON."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


class JsonlTracker:
    """One JSON object per line in ``path``; artifacts copied under ``<dir of path>/artifacts/<run>/``.

    Lines: ``{"time", "run", "kind": "params"|"metrics"|"tags"|"artifact"|"start"|"end", ...}``.
    Children share the file; their run name is ``parent/child``. Appends, so a resumed run continues
    the same file.
    """

    def __init__(
        self, path: str | os.PathLike[str], run_name: str = "run", *, _lock: threading.Lock | None = None
    ):
        self.path = os.fspath(path)
        self.run_name = run_name
        self._lock = _lock or threading.Lock()
        self.closed = False
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._write({"kind": "start"})

    @property
    def artifact_dir(self) -> str:
        return os.path.join(
            os.path.dirname(os.path.abspath(self.path)), "artifacts", *self.run_name.split("/")
        )

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps({"time": round(time.time(), 3), "run": self.run_name, **record}, sort_keys=True)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._write({"kind": "params", "params": {k: str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._write({"kind": "metrics", "step": step, "metrics": {k: _finite(v) for k, v in metrics.items()}})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._write({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        target_dir = os.path.join(self.artifact_dir, artifact_path or "")
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, os.path.basename(local_path))
        if os.path.isdir(local_path):
            shutil.copytree(local_path, target, dirs_exist_ok=True)
        else:
            shutil.copy2(local_path, target)
        self._write({"kind": "artifact", "path": os.path.relpath(target, os.path.dirname(self.path))})

    def child(self, name: str) -> JsonlTracker:
        return JsonlTracker(self.path, f"{self.run_name}/{name}", _lock=self._lock)

    def close(self, status: str = "FINISHED") -> None:
        if not self.closed:
            self.closed = True
            self._write({"kind": "end", "status": status})


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a ``JsonlTracker`` file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def metric_history(records: list[dict[str, Any]], run: str, name: str) -> list[tuple[int | None, float]]:
    """``(step, value)`` of metric ``name`` in run ``run``, in logging order."""
    return [
        (r["step"], float(r["metrics"][name]))
        for r in records
        if r["kind"] == "metrics" and r["run"] == run and name in r["metrics"]
    ]
