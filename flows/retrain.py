"""``retrain``: newly landed data -> shards for it alone (the champion's vocabulary) -> fine-tune the
champion on the existing training shards plus the new ones -> champion and new version scored on the
same two holdouts (the original dataset's test split, the new data's) -> the gate decides.

Started by the ``captioning.data.landed`` event (``flows/watch.py`` emits it when a dataset lands;
see prefect.yaml), by its cron schedule, or by hand:

    prefect deployment run retrain/demo -p karpathy_json=/data/inbox/2026-11/dataset_coco.json
    prefect deployment run retrain/demo -p karpathy_json=... -p 'overrides=["data.retrain_on=new"]'

``data.retrain_on=all`` (the default) trains on the old and the new training data together, so the
model learns the new data without forgetting what the champion was chosen for; ``new`` trains on the
new data alone. Either way only the new data gets shards built. The new version becomes champion only
when it beats the champion on the new holdout and is at most ``tracking.promotion_tolerance`` worse
on the original one (``captioning.evaluation.holdouts.decide``); every score is an MLflow evaluation
run named after the version and holdout (``v2 on synthetic-test:ab12cd``) and a tag of the version.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from captioning.config import load_config, normalize_overrides, without_keys
from captioning.data.inbox import dataset_label, new_data_overrides
from captioning.evaluation.holdouts import (
    Holdout,
    HoldoutScores,
    evaluation_run_name,
    gate_table,
    holdout_tags,
    load_holdout,
)
from captioning.stages import run_output
from captioning.tracking.links import run_links_markdown
from captioning.tracking.runs import ended_on_error, tracking_uri_of
from flows import supervision
from flows.prepare_data import prepare_data
from tasks.nodes import NODE_DEPLOYMENT
from tasks.tracking import (
    end_tracking_run,
    evaluate_on_holdout,
    fetch_champion,
    gate_on_holdouts,
    log_evaluation,
    register_model,
    start_tracking_run,
)
from tasks.training import GPU_LIMIT, train_stage

METRIC = "CIDEr"  # the gate's score (the versions' test_CIDEr tags)


@flow(name="retrain", log_prints=True)
def retrain(
    karpathy_json: str,
    image_dir: str | None = None,
    recipe: str = "demo",
    overrides: list[str] | None = None,
    stage: str = "finetune",
    stage_timeout_s: float | None = None,
    gpu_limit: str = GPU_LIMIT,
    nnodes: int = 1,
    node_deployment: str = NODE_DEPLOYMENT,
) -> dict[str, Any]:
    """Fine-tune the registered champion on the dataset at ``karpathy_json`` (Karpathy format; images
    under ``image_dir``, default the JSON's folder) plus, by default, the recipe's own training data
    (``data.retrain_on``), and promote the result if the holdout gate says so. ``nnodes``: machines
    for the stage, as in train-sat (``tasks.nodes``)."""
    supervision.stop_when_worker_dies()  # a dead worker stops this run now, not at a later log line
    base = load_config(recipe, normalize_overrides(overrides))
    tracking_uri = tracking_uri_of(base)
    model_name = base.tracking.registered_model
    version, champion = fetch_champion(model_name, tracking_uri)
    prepare_data(recipe=recipe, overrides=overrides)  # the original shards and holdout: a no-op when built
    data_overrides = new_data_overrides(base, karpathy_json, image_dir, overrides)
    cfg = load_config(recipe, data_overrides)
    data = prepare_data(recipe=recipe, overrides=data_overrides, vocab_from=champion)  # the new data only
    original = load_holdout(base.data.shard_dir, label=base.data.dataset)
    new = load_holdout(cfg.data.shard_dir, label=dataset_label(karpathy_json))
    name = flow_run.get_name() or "local"
    output = run_output(cfg, f"retrain-{name}")
    run_id = start_tracking_run(
        cfg,
        [stage],
        f"{recipe}-retrain-{name}",
        nnodes * cfg.train.nproc_per_node,
        tags={
            "retrain_of_version": version,
            "new_data": karpathy_json,
            "retrain_on": cfg.data.retrain_on,
            "original_holdout": original.name,
            "new_holdout": new.name,
            "prefect_flow_run_id": str(flow_run.get_id()),
        },
        output=output,
    )

    def scored(role: str, model_version: str, checkpoint: str, holdout: Holdout) -> dict[str, float]:
        result = evaluate_on_holdout(checkpoint, model_version, holdout, cfg)
        log_evaluation(
            result["scores"],
            cfg,
            evaluation_run_name(model_version, holdout),
            tags={
                "model_name": model_name,
                "model_version": model_version,
                "model_uri": f"models:/{model_name}/{model_version}",
                "role": role,
                **holdout_tags(holdout),
            },
            parent_run_id=run_id,
        )
        return dict(result["scores"])

    with (
        ended_on_error(run_id, tracking_uri=tracking_uri, reason=supervision.reason),
        supervision.tasks_cancelled_with_the_flow(),
    ):
        retrained = train_stage(
            recipe,
            stage,
            output,
            without_keys(data_overrides, "train.stages"),
            init_from=champion,
            parent_run_id=run_id,
            timeout_s=stage_timeout_s,
            gpu_limit=gpu_limit,
            nnodes=nnodes,
            node_deployment=node_deployment,
        )
        registered = register_model(
            retrained,
            model_name,
            recipe,
            tracking_uri,
            gate=False,  # scored on both holdouts first, then gate-on-holdouts
            tags={"retrained_from": version, "new_data": karpathy_json, "retrain_on": cfg.data.retrain_on},
        )
        challenger = registered["version"]
        champion_original = scored("champion", version, champion, original)
        champion_new = scored("champion", version, champion, new)
        retrained_original = scored("challenger", challenger, retrained.checkpoint, original)
        retrained_new = scored("challenger", challenger, retrained.checkpoint, new)
        on_original = HoldoutScores(original, champion_original[METRIC], retrained_original[METRIC])
        on_new = HoldoutScores(new, champion_new[METRIC], retrained_new[METRIC])
        promotion = gate_on_holdouts(
            model_name,
            challenger,
            version,
            on_original,
            on_new,
            cfg.tracking.promotion_tolerance,
            tracking_uri,
        )
    end_tracking_run(
        run_id,
        "FINISHED",
        {
            **{f"test_{k}": v for k, v in retrained_original.items()},
            **{f"new_test_{k}": v for k, v in retrained_new.items()},
        },
        tracking_uri,
        tags={"promoted": str(promotion["promoted"]), "gate_reason": promotion["reason"]},
    )
    table = gate_table(version, challenger, on_original, on_new, metric=METRIC)
    version_info = {"name": model_name, "version": challenger, "alias": promotion.get("alias")}
    links = run_links_markdown(tracking_uri, run_id, version_info)
    create_markdown_artifact(
        key="retrain-gate",
        markdown=f"{table}\n\n{promotion['reason']}\n\n{links}",
        description="holdout gate",
    )
    get_run_logger().info(
        "retrained on %s: version %s %s\n%s", karpathy_json, challenger, promotion["reason"], table
    )
    return {
        "data": data,
        "champion_before": version,
        "holdouts": {"original": holdout_tags(original), "new": holdout_tags(new)},
        "scores": {
            "champion": {"original": champion_original, "new": champion_new},
            "retrained": {"original": retrained_original, "new": retrained_new},
        },
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
