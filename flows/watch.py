"""New data lands -> an event -> the ``retrain`` deployment's trigger starts a run.

``announce-data`` checks a landed dataset (Karpathy split file + images) and emits
``captioning.data.landed`` (resource ``captioning.dataset.<recipe>.<id>``, payload: karpathy_json, image_dir,
counts). ``watch-inbox`` looks for datasets dropped into an inbox folder (a folder holding a
``dataset*.json`` and a ``READY`` file, written last by whoever copies the data in) and announces each
once. The event can also come from anywhere else:

    prefect events emit captioning.data.landed --resource-id captioning.dataset.coco.nov \\
        --payload '{"karpathy_json": "/data/inbox/nov/dataset_coco.json", "image_dir": "/data/inbox/nov"}'
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from captioning.data import inbox


@task(name="check-new-data", cache_policy=NO_CACHE)
def check_new_data(karpathy_json: str, image_dir: str | None) -> dict[str, Any]:
    """Validate the split file (named errors) and count images, captions and missing image files."""
    return inbox.check_dataset(karpathy_json, image_dir)


@task(name="emit-new-data", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=5)
def emit_new_data(report: dict[str, Any], recipe: str) -> str | None:
    event = emit_event(
        inbox.NEW_DATA_EVENT,
        resource={"prefect.resource.id": f"captioning.dataset.{recipe}.{report['id']}"},
        payload=report,
    )
    return str(event.id) if event is not None else None


@flow(name="announce-data", log_prints=True)
def announce_data(karpathy_json: str, image_dir: str | None = None, recipe: str = "demo") -> dict[str, Any]:
    """Check a landed dataset and emit the new-data event for ``recipe`` (its retrain deployment starts)."""
    report = check_new_data(karpathy_json, image_dir)
    report["event_id"] = emit_new_data(report, recipe)
    get_run_logger().info("announced %s: %s", karpathy_json, report["counts"])
    return report


@task(name="find-new-data", cache_policy=NO_CACHE)
def find_new_data(inbox_dir: str) -> list[str]:
    return [str(p) for p in inbox.find_ready(inbox_dir)]


@task(name="mark-announced", cache_policy=NO_CACHE)
def mark_announced(karpathy_json: str, report: dict[str, Any]) -> None:
    inbox.mark_announced(karpathy_json, report)


@flow(name="watch-inbox", log_prints=True)
def watch_inbox(inbox_dir: str = "demo-data/inbox", recipe: str = "demo") -> list[dict[str, Any]]:
    """Announce every dataset that is ready in ``inbox_dir`` and was not announced yet."""
    reports = []
    for karpathy_json in find_new_data(inbox_dir):
        report = announce_data(karpathy_json, recipe=recipe)
        mark_announced(karpathy_json, report)
        reports.append(report)
    return reports
