"""The unsent-data file of an ``MlflowTracker``: written at close when the server is away, read, replayed.

    python -m captioning.tracking.fallback replay runs/demo/mlflow-unsent-<run_id>.jsonl [--tracking-uri URI]

``<fallback_dir>/mlflow-unsent-<run_id>.jsonl`` (``mlflow-unsent-pending-<id>.jsonl`` for a run that was
never created) holds JSON lines: a ``run`` header (run id, experiment, name, tracking URI; the tags and
parent of a run still to be created), then ``metric``, ``param``, ``tag``, ``artifact`` and ``status``
records. A tracker that closes unsent twice appends a second block.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from captioning.tracking import TrackingUnavailable
from captioning.tracking.client import PARENT_TAG, connect

logger = logging.getLogger(__name__)


def write_fallback(folder: str, header: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """Append ``header`` and ``records`` to the run's file in ``folder`` (else in the temporary folder);
    returns its path. A WARNING says what was saved and how to replay it."""
    run_id = header["run_id"]
    name = f"mlflow-unsent-{run_id or 'pending-' + uuid.uuid4().hex[:12]}.jsonl"
    lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in [header, *records])
    for place in (folder, tempfile.gettempdir()):  # never lose it quietly
        path = os.path.join(place, name)
        try:
            os.makedirs(place, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:  # appends: a resumed run may close unsent twice
                f.write(lines)
            break
        except OSError as exc:
            logger.error("cannot write MLflow fallback file %s: %s", path, exc)
    else:
        raise OSError(f"no place to save {len(records)} unsent MLflow records of run {run_id}")
    kinds: dict[str, int] = {}
    for record in records:
        kinds[record["kind"]] = kinds.get(record["kind"], 0) + 1
    logger.warning(
        "MLflow run %s (%s): %s not sent to %s; saved to %s. Replay when the server is back: "
        "python -m captioning.tracking.fallback replay %s --tracking-uri %s",
        run_id or "(not created)",
        header["run_name"],
        ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
        header["tracking_uri"],
        path,
        path,
        header["tracking_uri"],
    )
    return path


def read_fallback(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a fallback file (``kind``: run, metric, param, tag, artifact, status)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _rewrite(path: str | os.PathLike[str], records: list[dict[str, Any]]) -> None:
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, sort_keys=True) + "\n" for record in records)
    os.replace(tmp, path)


def replay_fallback(client: MlflowClient, path: str | os.PathLike[str]) -> int:
    """Upload a fallback file to its run (created first when it never was); returns the records replayed.

    Safe to run twice: metrics re-logged with the same key, step, timestamp and value are not stored
    again, params already on the run are skipped (a different value becomes tag ``param_changed.<key>``),
    tags are overwritten with the same value. Records the server had rejected (with an ``error`` and no
    ``kind`` of artifact) are skipped with a warning. Uses ``client`` with MLflow's usual retries.
    """
    records = read_fallback(path)
    count = 0
    run_id: str | None = None
    blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for record in records:
        if record["kind"] == "run":
            blocks.append((record, []))
        elif blocks:
            blocks[-1][1].append(record)
    for header, body in blocks:
        run_id = header.get("run_id") or run_id
        if run_id is None:
            tags = dict(header.get("tags") or {})
            if header.get("parent_run_id"):
                tags[PARENT_TAG] = header["parent_run_id"]
            run = client.create_run(header["experiment_id"], tags=tags, run_name=header["run_name"])
            run_id = header["run_id"] = str(run.info.run_id)
            _rewrite(path, records)  # a second replay goes to this run instead of creating another
            logger.info("created run %s (%s) for %s", run_id, header["run_name"], path)
        rejected = sum(1 for r in body if r.get("error") and r["kind"] in ("metric", "param", "tag"))
        if rejected:
            logger.warning("%d records in %s were rejected by the server before; skipped", rejected, path)
        body = [r for r in body if not (r.get("error") and r["kind"] in ("metric", "param", "tag"))]
        existing = dict(client.get_run(run_id).data.params)
        metrics = [
            Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"]))
            for r in body
            if r["kind"] == "metric"
        ]
        params: list[Param] = []
        tags_out: dict[str, str] = {}
        for r in body:
            if r["kind"] == "param":
                if r["key"] not in existing:
                    existing[r["key"]] = r["value"]
                    params.append(Param(r["key"], r["value"]))
                elif existing[r["key"]] != r["value"]:
                    tags_out[f"param_changed.{r['key']}"[:MAX_ENTITY_KEY_LENGTH]] = r["value"]
            elif r["kind"] == "tag":
                tags_out[r["key"]] = r["value"]
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=chunk)
        for chunk in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=chunk)
        for chunk in _chunks([RunTag(k, v) for k, v in tags_out.items()], MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=chunk)
        for r in body:
            if r["kind"] != "artifact":
                continue
            if os.path.exists(r["local_path"]):
                client.log_artifact(run_id, r["local_path"], r.get("artifact_path"))
            else:
                logger.warning(
                    "artifact %s (from %s) is gone; not uploaded", r["local_path"], r.get("source")
                )
        statuses = [r for r in body if r["kind"] == "status" and r.get("status")]
        if statuses:
            client.set_terminated(run_id, statuses[-1]["status"], int(statuses[-1]["end_time"]))
        count += len(body) + rejected
    logger.info("replayed %d records from %s to run %s", count, path, run_id)
    return count


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m captioning.tracking.fallback replay FILE... [--tracking-uri URI]``; returns records replayed."""
    parser = argparse.ArgumentParser(
        prog="python -m captioning.tracking.fallback", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    replay = sub.add_parser("replay", help="upload fallback files written while the server was away")
    replay.add_argument("files", nargs="+")
    replay.add_argument("--tracking-uri", default=None, help="default: the file's, else MLFLOW_TRACKING_URI")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    total = 0
    for path in args.files:
        headers = [r for r in read_fallback(path) if r["kind"] == "run"]
        uri = args.tracking_uri or (headers[0].get("tracking_uri") if headers else None)
        replayed = replay_fallback(connect(uri), path)
        print(f"{path}: {replayed} records replayed")
        total += replayed
    return total


if __name__ == "__main__":
    try:
        main()
    except TrackingUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
