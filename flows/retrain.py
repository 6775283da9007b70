"""``retrain``: newly landed data -> shards for it (the champion's vocabulary) -> fine-tune from the
champion -> the champion and the new model scored on the new test split -> gated promotion.

Started by the ``captioning.data.landed`` event (``flows/watch.py`` emits it when a dataset lands;
see prefect.yaml), by its cron schedule, or by hand:

    prefect deployment run retrain/demo -p karpathy_json=/data/inbox/2026-11/dataset_coco.json

The new version becomes champion only when it beats the champion on the same new test images.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from captioning.config import load_config, normalize_overrides, without_keys
from captioning.data.inbox import new_data_overrides
from captioning.stages import run_output
from captioning.tracking.report import scores_table
from captioning.tracking.runs import ended_on_error, tracking_uri_of
from flows.prepare_data import prepare_data
from tasks.tracking import (
    end_tracking_run,
    evaluate,
    fetch_champion,
    log_evaluation,
    register_model,
    start_tracking_run,
)
from tasks.training import GPU_LIMIT, train_stage


@flow(name="retrain", log_prints=True)
def retrain(
    karpathy_json: str,
    image_dir: str | None = None,
    recipe: str = "demo",
    overrides: list[str] | None = None,
    stage: str = "finetune",
    stage_timeout_s: float | None = None,
    gpu_limit: str = GPU_LIMIT,
) -> dict[str, Any]:
    """Fine-tune the registered champion on the dataset at ``karpathy_json`` (Karpathy format; images
    under ``image_dir``, default the JSON's folder) and promote the result if it beats the champion."""
    base = load_config(recipe, normalize_overrides(overrides))
    tracking_uri = tracking_uri_of(base)
    model_name = base.tracking.registered_model
    version, champion = fetch_champion(model_name, tracking_uri)
    data_overrides = new_data_overrides(base, karpathy_json, image_dir, overrides)
    cfg = load_config(recipe, data_overrides)
    data = prepare_data(recipe=recipe, overrides=data_overrides, vocab_from=champion)
    name = flow_run.get_name() or "local"
    run_id = start_tracking_run(
        cfg,
        [stage],
        f"{recipe}-retrain-{name}",
        cfg.train.nproc_per_node,
        tags={
            "retrain_of_version": version,
            "new_data": karpathy_json,
            "prefect_flow_run_id": str(flow_run.get_id()),
        },
    )
    with ended_on_error(run_id, tracking_uri=tracking_uri):
        retrained = train_stage(
            recipe,
            stage,
            run_output(cfg, f"retrain-{name}"),
            without_keys(data_overrides, "train.stages"),
            init_from=champion,
            parent_run_id=run_id,
            timeout_s=stage_timeout_s,
            gpu_limit=gpu_limit,
        )
        incumbent = evaluate(champion, cfg, "test")
        log_evaluation(
            incumbent["scores"],
            cfg,
            f"champion-v{version}-test",
            tags={"model_version": version, "split": "test"},
            parent_run_id=run_id,
        )
        promotion = register_model(
            retrained,
            model_name,
            recipe,
            tracking_uri,
            champion_score=incumbent["scores"]["CIDEr"],
            tags={"retrained_from": version, "new_data": karpathy_json},
        )
    end_tracking_run(
        run_id,
        "FINISHED",
        {f"test_{k}": v for k, v in retrained.test_scores.items()},
        tracking_uri,
        tags={"promoted": str(promotion["promoted"])},
    )
    table = scores_table({f"champion v{version}": incumbent["scores"], "retrained": retrained.test_scores})
    create_markdown_artifact(key="retrain-scores", markdown=table, description="new test split")
    get_run_logger().info(
        "retrained on %s: %s (version %s)\n%s", karpathy_json, promotion["alias"], promotion["version"], table
    )
    return {
        "data": data,
        "champion_before": version,
        "champion_scores": incumbent["scores"],
        "outcome": retrained.to_json(),  # the fine-tuned stage's result
        "registered": promotion,
        "mlflow_run_id": run_id,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m flows.retrain", description=retrain.description)
    p.add_argument("--karpathy-json", required=True)
    p.add_argument("--image-dir")
    p.add_argument("--recipe", default="demo")
    args, overrides = p.parse_known_args(argv)
    return retrain(
        karpathy_json=args.karpathy_json, image_dir=args.image_dir, recipe=args.recipe, overrides=overrides
    )


if __name__ == "__main__":
    main()
