"""The artifact uploads of one MLflow run: a staged copy taken when logged, uploaded by a background thread.

    uploads = ArtifactUploads(client, cv, staging_root, attempts=3, run_id=lambda: tracker.run_id, name="xe")
    uploads.add("runs/demo/xe/best.pt", "checkpoints")   # staged now, uploaded as ``checkpoints/best.pt``
    uploads.stop()                                      # at close; ``abandon()`` hands back what is unsent

The staged copy (hard links where the file system allows, else a copy) keeps a file in a temporary
folder, or one replaced later, as it was when logged. Uploads keep MLflow's own HTTP retries (a long
upload must not be cut short) and are retried ``attempts`` times with backoff on top.
``MlflowTracker`` owns one; they share its condition variable, so ``pending``, ``failed`` and the
run id are read and changed under one lock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from mlflow import MlflowClient

from captioning.tracking.client import FIRST_BACKOFF_S, MAX_BACKOFF_S

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class Artifact:
    staged: str  # our copy, uploaded under artifact_path/<basename>
    artifact_path: str | None
    source: str  # what the caller logged
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Its line in the fallback file."""
        return {
            "kind": "artifact",
            "local_path": self.staged,
            "artifact_path": self.artifact_path,
            "source": self.source,
            "error": self.error or "not uploaded before close",
        }


def link_or_copy(src: str, dst: str) -> str:
    """A hard link (instant, and it keeps the content if ``src`` is replaced or deleted), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


class ArtifactUploads:
    """Staged artifacts waiting for run ``run_id()`` (None until the run exists), and their thread."""

    def __init__(
        self,
        client: MlflowClient,
        cv: threading.Condition,
        staging_root: str,
        *,
        attempts: int,
        run_id: Callable[[], str | None],
        name: str,
    ) -> None:
        self._client = client
        self._cv = cv  # the owner's: guards pending, failed and the run id
        self.staging_root = staging_root
        self._attempts = attempts
        self._run_id = run_id
        self._name = name
        self.pending: deque[Artifact] = deque()
        self.failed: list[Artifact] = []
        self._stop = False
        self._stop_event = threading.Event()  # interrupts retry waits at close
        self._abandoned = False  # unsent things were handed to the fallback file: keep staged copies
        self._worker: threading.Thread | None = None

    def add(self, local_path: str, artifact_path: str | None) -> None:
        """Stage ``local_path`` now and queue it; a source that cannot be read goes to ``failed``."""
        try:
            staged = self._stage(local_path)
        except OSError as exc:
            logger.warning("artifact %s not logged: cannot read it (%s)", local_path, exc)
            with self._cv:
                self.failed.append(Artifact(local_path, artifact_path, local_path, repr(exc)))
            return
        with self._cv:
            self.pending.append(Artifact(staged, artifact_path, local_path))
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._loop, name=f"mlflow-artifacts-{self._name}", daemon=True
                )
                self._worker.start()
            self._cv.notify_all()

    def stop(self) -> None:
        """End the thread: an upload in progress finishes, a retry wait ends now."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._stop_event.set()

    def abandon(self) -> list[Artifact]:
        """What was not uploaded (failed first, then pending); their staged copies are kept from now on."""
        with self._cv:
            self._abandoned = True
            return [*self.failed, *self.pending]

    def remove_staging(self) -> None:
        if os.path.isdir(self.staging_root):
            shutil.rmtree(self.staging_root, ignore_errors=True)

    def _stage(self, local_path: str) -> str:
        """A snapshot of ``local_path`` under the staging folder: hard links where possible, else copies."""
        folder = os.path.join(self.staging_root, uuid.uuid4().hex[:12])
        os.makedirs(folder)
        target = os.path.join(folder, os.path.basename(os.path.normpath(local_path)))
        if os.path.isdir(local_path):
            shutil.copytree(local_path, target, copy_function=link_or_copy)
        else:
            link_or_copy(local_path, target)
        return target

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stop or (bool(self.pending) and self._run_id() is not None))
                if self._stop:
                    return
                item = self.pending[0]
                run_id = self._run_id()
            assert run_id is not None
            error = self._upload(run_id, item)
            with self._cv:
                self.pending.popleft()
                if error is not None:
                    item.error = error
                    self.failed.append(item)
                elif not self._abandoned:
                    shutil.rmtree(os.path.dirname(item.staged), ignore_errors=True)
                self._cv.notify_all()

    def _upload(self, run_id: str, item: Artifact) -> str | None:
        """Upload one staged artifact with retries; the last error, or None when it arrived."""
        error = ""
        for attempt in range(self._attempts):
            try:
                self._client.log_artifact(run_id, item.staged, item.artifact_path)
                return None
            except Exception as exc:
                error = str(exc).split("\n")[0]
                logger.warning(
                    "upload of artifact %s to run %s failed (attempt %d/%d): %s",
                    item.source,
                    run_id,
                    attempt + 1,
                    self._attempts,
                    error,
                )
            if self._stop_event.wait(min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2**attempt)):
                break
        return error
