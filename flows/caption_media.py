"""``caption-media``: a folder or s3:// prefix of images and videos -> captions, batch by batch.

    prefect deployment run caption-media/demo -p source=s3://bucket/holiday/
    prefect deployment run caption-media/demo -p source=/data/clips -p output=/data/captions -p fps=2
    python -m flows.caption_media --source /data/clips --model runs/demo/x/scst/best.pt

Files are listed once, split into batches of ``batch_size`` and captioned by mapped ``caption-batch``
tasks (``captioning.media``: outputs, naming and resumption are described there). A re-run skips the
finished batches; a bad file is skipped, counted under its reason and named in its batch's results.
The model is any source ``captioning caption`` takes (resolved once with the recipe's tracking
server), or an ONNX export folder with ``engine="onnxruntime"``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_markdown_artifact

from captioning.config import load_config
from captioning.media import plan_batches
from captioning.registry import CHAMPION
from captioning.tracking.runs import tracking_uri_of
from tasks import media
from tasks.tracking import fetch_model


@flow(name="caption-media", log_prints=True)
def caption_media(
    source: str,
    model: str | None = None,
    output: str | None = None,
    recipe: str = "demo",
    engine: str = "torch",
    batch_size: int = 32,
    fps: float = 1.0,
    stable_frames: int = 2,
    beam_size: int | None = None,
    max_len: int | None = None,
) -> dict[str, Any]:
    """Caption every image and video under ``source`` (a folder or s3:// prefix); results go under
    ``output`` (default: ``source``, beside the inputs). ``model``: default the recipe's registered
    champion (``models:/<tracking.registered_model>@champion``). Returns the totals and each batch's counts."""
    logger = get_run_logger()
    files, others = media.list_media(source)
    batches = plan_batches(files, batch_size)
    logger.info(
        "%d media files under %s (%d other files ignored) in %d batches",
        len(files),
        source,
        len(others),
        len(batches),
    )
    cfg = load_config(recipe)
    model = model or f"models:/{cfg.tracking.registered_model}@{CHAMPION}"
    if engine == "torch":
        registry = model.startswith(("models:/", "runs:/"))  # only these need the recipe's tracking server
        model = fetch_model(model, tracking_uri_of(cfg) if registry else None).checkpoint
    decoding = {"beam_size": beam_size, "max_len": max_len}
    results = media.caption_batch.map(
        batches,
        model=unmapped(model),
        engine=unmapped(engine),
        source=unmapped(source),
        output=unmapped(output or source),
        fps=unmapped(fps),
        stable_frames=unmapped(stable_frames),
        decoding=unmapped(decoding),
    ).result()
    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result["errors"])
    summary = {
        "source": source,
        "output": output or source,
        "files": len(files),
        "ignored": len(others),
        "batches": len(batches),
        "batches_done_before": sum(r["done_before"] for r in results),
        "captioned": sum(r["captioned"] for r in results),
        "images": sum(r["images"] for r in results),
        "videos": sum(r["videos"] for r in results),
        "skipped": dict(sorted(errors.items())),
        "results": results,
    }
    skipped = ", ".join(f"{n} {reason}" for reason, n in summary["skipped"].items()) or "none"
    report = (
        f"**{summary['captioned']} of {len(files)} files captioned** (images: {summary['images']}, "
        f"videos: {summary['videos']}) from `{source}` into `{summary['output']}`; skipped: {skipped}; "
        f"{summary['batches_done_before']} of {len(batches)} batches were already done."
    )
    logger.info(report.replace("**", "").replace("`", ""))
    create_markdown_artifact(report, key="caption-media", description="caption-media totals")
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m flows.caption_media", description=caption_media.description)
    p.add_argument("--source", required=True)
    p.add_argument("--model", help="default: the recipe's registered champion")
    p.add_argument("--output")
    p.add_argument("--recipe", default="demo")
    p.add_argument("--engine", default="torch", choices=["torch", "onnxruntime"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fps", type=float, default=1.0)
    args = p.parse_args(argv)
    return caption_media(
        source=args.source,
        model=args.model,
        output=args.output,
        recipe=args.recipe,
        engine=args.engine,
        batch_size=args.batch_size,
        fps=args.fps,
    )


if __name__ == "__main__":
    main()
