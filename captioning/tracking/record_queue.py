"""The metrics, params and tags of one MLflow run on their way to the server: a queue and its thread.

    records = RecordQueue(backend, cv, known_params, flush_interval_s=2.0, run_id=..., create_run=..., name="xe")
    records.start()
    records.put([Record("metric", "train/loss", 3.2, step=10, timestamp=now_ms())])
    records.stop(); records.join(timeout_s=11.0)
    records.unsent()                   # what never arrived, as fallback-file lines

The thread sends the queue in order, the longest prefix that fits one ``log_batch`` under MLflow's
limits (at most 1000 metrics, 100 params, 100 tags, about 1 MB per call), every ``flush_interval_s``
(at once while a flush waits or the queue is full); while the server is away it retries with backoff
(0.5 s doubling up to 5 s). A call the server rejects is split in halves until the bad records are
found; they are kept for the fallback file instead of blocking the queue.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.validation import (
    MAX_BATCH_LOG_REQUEST_SIZE,
    MAX_ENTITIES_PER_BATCH,
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from captioning.tracking.client import FIRST_BACKOFF_S, MAX_BACKOFF_S, Backend, is_transient

logger = logging.getLogger(__name__)

# A log_batch body must stay under MLflow's 1 MB request limit; each record's JSON overhead is a guess.
_MAX_BATCH_BYTES = int(MAX_BATCH_LOG_REQUEST_SIZE * 0.8)
_RECORD_OVERHEAD_BYTES = 80


def _json_number(value: float) -> float | str:
    """JSON has no NaN/inf: ``"nan"``, ``"inf"``, ``"-inf"`` instead (``float()`` reads them back)."""
    return value if math.isfinite(value) else str(value)


@dataclasses.dataclass(slots=True)
class Record:
    """One metric, param or tag waiting for the server."""

    kind: str  # "metric" | "param" | "tag"
    key: str
    value: Any  # float for metrics, str otherwise
    step: int = 0
    timestamp: int = 0

    def to_json(self) -> dict[str, Any]:
        if self.kind == "metric":
            return {
                "kind": "metric",
                "key": self.key,
                "value": _json_number(self.value),
                "step": self.step,
                "timestamp": self.timestamp,
            }
        return {"kind": self.kind, "key": self.key, "value": self.value}


class RecordQueue:
    """The metrics, params and tags of one run on their way to the server, and the thread that sends them.

    Shares its owner's condition variable ``cv``: ``pending``, ``inflight``, ``rejected``, ``urgent`` and
    ``stopped`` are read and changed under it. While ``run_id()`` is None (a run not created yet) the
    thread calls ``create_run()``, True once the run exists, instead of sending.
    """

    def __init__(
        self,
        backend: Backend,
        cv: threading.Condition,
        known_params: dict[str, str],
        *,
        flush_interval_s: float,
        run_id: Callable[[], str | None],
        create_run: Callable[[], bool],
        name: str,
    ) -> None:
        self._backend = backend
        self._cv = cv
        self._known_params = known_params  # the server's params for this run (worker thread only)
        self._flush_interval_s = flush_interval_s
        self._run_id = run_id
        self._create_run = create_run
        self.pending: deque[Record] = deque()
        self.inflight: list[Record] = []
        self.rejected: list[tuple[Record, str]] = []
        self.urgent = False  # a flush() waits: send now, and until the queue is empty
        self.stopped = False
        self._worker = threading.Thread(target=self._loop, name=f"mlflow-flush-{name}", daemon=True)

    def start(self) -> None:
        self._worker.start()

    def put(self, records: list[Record]) -> None:
        with self._cv:
            self.pending.extend(records)

    def busy(self) -> bool:
        return bool(self.pending or self.inflight)

    def stop(self) -> None:
        """Tell the thread to end (a request in flight finishes); ``join`` waits for it."""
        with self._cv:
            self.stopped = True
            self._cv.notify_all()

    def join(self, timeout_s: float) -> None:
        self._worker.join(timeout=timeout_s)

    def unsent(self) -> list[dict[str, Any]]:
        """What did not reach the server, as fallback-file lines (rejected ones with their ``error``)."""
        with self._cv:
            records = [r.to_json() for r in [*self.inflight, *self.pending]]
            return records + [{**r.to_json(), "error": why} for r, why in self.rejected]

    def _loop(self) -> None:
        failures = 0
        wait_s = self._flush_interval_s
        while True:
            with self._cv:
                if not self.stopped and not self.urgent and wait_s > 0:
                    self._cv.wait(wait_s)
                if self.stopped:
                    return
                creating = self._run_id() is None
                batch = [] if creating else self._take_batch()
                self.inflight = batch
            if creating:
                ok = self._create_run()
                done = 0
            else:
                done = self._send(batch) if batch else 0
                ok = done == len(batch)
            with self._cv:
                self.pending.extendleft(reversed(batch[done:]))  # unsent ones go back first, in order
                self.inflight = []
                if ok:
                    failures = 0
                    if not self.pending:
                        self.urgent = False  # a flush() keeps the worker sending until the queue is empty
                    full = len(self.pending) >= MAX_METRICS_PER_BATCH
                    wait_s = 0.0 if creating or full else self._flush_interval_s
                else:
                    failures += 1
                    wait_s = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (failures - 1))
                    self.urgent = False  # a waiting flush() must not turn the backoff into a busy loop
                self._cv.notify_all()

    def _take_batch(self) -> list[Record]:
        """The longest prefix of the queue that fits one log_batch (called under the lock).

        A param the run already has (``known_params``) with the same value is dropped; with another
        value it becomes tag ``param_changed.<key>``, with a warning.
        """
        batch: list[Record] = []
        counts = {"metric": 0, "param": 0, "tag": 0}
        limits = {
            "metric": MAX_METRICS_PER_BATCH,
            "param": MAX_PARAMS_TAGS_PER_BATCH,
            "tag": MAX_PARAMS_TAGS_PER_BATCH,
        }
        batch_params: dict[str, str] = {}
        batch_tags: set[str] = set()
        size = 0
        while self.pending:
            record = self.pending[0]
            if record.kind == "param":
                known = self._known_params.get(record.key, batch_params.get(record.key))
                if known == record.value:
                    self.pending.popleft()  # already on the run (a resumed run re-logs its config)
                    continue
                if known is not None:
                    logger.warning(
                        "param %s of run %s is %r; MLflow cannot change it, so the new value %r is kept as tag %s",
                        record.key,
                        self._run_id(),
                        known[:200],
                        record.value[:200],
                        f"param_changed.{record.key}",
                    )
                    record = Record(
                        "tag", f"param_changed.{record.key}"[:MAX_ENTITY_KEY_LENGTH], record.value
                    )
                    self.pending[0] = record
            if record.kind == "tag" and record.key in batch_tags:
                break  # the same tag twice: the later value goes in the next call, so it wins
            cost = len(record.key) + len(str(record.value)) + _RECORD_OVERHEAD_BYTES
            if batch and (
                counts[record.kind] >= limits[record.kind]
                or len(batch) >= MAX_ENTITIES_PER_BATCH
                or size + cost > _MAX_BATCH_BYTES
            ):
                break
            batch.append(self.pending.popleft())
            counts[record.kind] += 1
            size += cost
            if record.kind == "param":
                batch_params[record.key] = record.value
            elif record.kind == "tag":
                batch_tags.add(record.key)
        return batch

    def _send(self, records: list[Record]) -> int:
        """Send ``records`` in order; how many leading ones are done (sent, or rejected by the server).

        A request the server rejects (4xx) is split in halves until the bad records are found; they are
        kept for the fallback file instead of blocking the queue. Stops at the first transient failure.
        """
        run_id = self._run_id()
        assert run_id is not None
        try:
            self._backend.log_batch(
                run_id,
                [Metric(r.key, r.value, r.timestamp, r.step) for r in records if r.kind == "metric"],
                [Param(r.key, r.value) for r in records if r.kind == "param"],
                [RunTag(r.key, r.value) for r in records if r.kind == "tag"],
            )
        except Exception as exc:
            if is_transient(exc):
                logger.debug("MLflow log_batch for run %s failed (will retry): %s", run_id, exc)
                return 0
            if len(records) == 1:
                logger.warning(
                    "MLflow rejected %s %s of run %s: %s", records[0].kind, records[0].key, run_id, exc
                )
                with self._cv:
                    self.rejected.append((records[0], str(exc).split("\n")[0]))
                return 1
            half = len(records) // 2
            done = self._send(records[:half])
            return done if done < half else half + self._send(records[half:])
        for record in records:
            if record.kind == "param":
                self._known_params[record.key] = record.value
        return len(records)
