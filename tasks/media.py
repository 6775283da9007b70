"""Media tasks: list a folder or s3:// prefix, caption one batch of its images and videos.

Each task is a few lines around one ``captioning.media`` call; a finished batch is skipped (its
results file exists), so a retry or a re-run of the flow resumes where it stopped.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from captioning import media
from captioning.inference import Predictor

RETRY_DELAYS_S: list[float] = [10, 60]


@task(name="list-media", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=RETRY_DELAYS_S)
def list_media(source: str) -> tuple[list[str], list[str]]:
    """(media files, other files) under ``source``."""
    return media.list_media(source)


@task(
    name="caption-batch",
    task_run_name="caption-{batch.name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=RETRY_DELAYS_S,
)
def caption_batch(
    batch: media.MediaBatch,
    model: str,
    engine: str,
    source: str,
    output: str,
    fps: float,
    stable_frames: int,
    decoding: dict[str, Any],
) -> dict[str, Any]:
    """Caption one batch (skipped when its results exist); returns its counts."""
    predictor = Predictor.load(model, engine, "cpu" if engine == "onnxruntime" else None)  # type: ignore[arg-type]
    return media.caption_batch(
        batch, predictor, source=source, output=output, fps=fps, stable_frames=stable_frames, **decoding
    )
