"""``train-sat``: [prepare-data] -> xe -> finetune -> scst (each a torchrun DDP job, tested on the test
split) -> register the best stage's model -> champion gate. The flow owns the MLflow parent run; the
stage sequence is ``captioning.stages.run_stages`` (the same one ``captioning train`` runs), each
stage a ``train-stage`` task. Its ``test-scores`` artifact links the run and the registered version
in the MLflow UI.

    prefect deployment run train-sat/demo --watch
    prefect deployment run train-sat/coco -p stages='["scst"]' -p init_from=s3://bucket/runs/coco/x/finetune/best.pt
    python -m flows.train_sat --recipe demo --train.xe.epochs=1      # without a deployment

Outputs go to ``{storage.run_dir}/{recipe}/{flow run name}`` unless ``output`` is given; a retried or
re-run flow with the same output skips finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from captioning.config import config_warnings, load_config, normalize_overrides, resolve_stages, without_keys
from captioning.evaluation.holdouts import load_holdout, version_tags
from captioning.stages import best_stage, final_metrics, run_output, run_stages
from captioning.tracking.links import run_links_markdown
from captioning.tracking.report import scores_table
from captioning.tracking.runs import ended_on_error, tracking_uri_of
from captioning.training.stage import StageResult
from flows import supervision
from flows.prepare_data import prepare_data
from tasks.nodes import NODE_DEPLOYMENT
from tasks.tracking import end_tracking_run, fetch_model, register_model, start_tracking_run
from tasks.training import GPU_LIMIT, train_stage


@flow(name="train-sat", log_prints=True)
def train_sat(
    recipe: str = "demo",
    stages: list[str] | None = None,
    overrides: list[str] | None = None,
    output: str | None = None,
    prepare: bool = True,
    register_best: bool = True,
    init_from: str | None = None,
    stage_timeout_s: float | None = None,
    gpu_limit: str = GPU_LIMIT,
    nnodes: int = 1,
    node_deployment: str = NODE_DEPLOYMENT,
) -> dict[str, Any]:
    """Train Show-Attend-Tell with ``recipe`` (configs/NAME.toml) and register the best stage's model.

    ``stages``: default the recipe's ``train.stages``. ``overrides``: dotted settings
    (``train.xe.epochs=2``). ``prepare``: build the shards first (a no-op when up to date). ``register_best``: register the
    best stage's model and run the champion gate.
    ``init_from``: the model the first stage starts from (a checkpoint path or s3:// URI, ``runs:/...``,
    ``models:/NAME@ALIAS``). ``stage_timeout_s``: per-stage limit. ``nnodes``: machines per stage,
    each a ``node_deployment`` run on the ``captioning-nodes`` pool running ``train.nproc_per_node``
    processes (``tasks.nodes``; the output must be storage every node reaches).
    """
    if nnodes < 1:
        raise ValueError(f"nnodes must be >= 1, got {nnodes}")
    supervision.stop_when_worker_dies()  # a dead worker stops this run now, not at a later log line
    cfg = load_config(recipe, normalize_overrides(overrides))
    stages = resolve_stages(stages, cfg)
    tracking_uri = tracking_uri_of(cfg)
    logger = get_run_logger()
    for warning in config_warnings(cfg):
        logger.warning("config: %s", warning)
    if prepare:
        prepare_data(recipe=recipe, overrides=overrides)
    # The test split the stages are scored on, named on the registered version: the champion gate
    # compares only scores measured on the same holdout. Read now, so a build without one fails
    # before any training rather than after it.
    holdout_tags = (
        version_tags(load_holdout(cfg.data.shard_dir, label=cfg.data.dataset)) if register_best else {}
    )
    name = flow_run.get_name() or "local"
    run_name = f"{recipe}-{name}"
    output = output or run_output(cfg, name)
    run_id = start_tracking_run(
        cfg,
        stages,
        run_name,
        nnodes * cfg.train.nproc_per_node,
        tags={"prefect_flow_run_id": str(flow_run.get_id()), "output": output, "orchestrator": "prefect"},
        output=output,
    )
    per_stage = without_keys(overrides, "train.stages")  # each launch trains its own stage

    def launch(stage: str, init: str | None) -> StageResult:
        return train_stage(
            recipe,
            stage,
            output,
            per_stage,
            init_from=init,
            parent_run_id=run_id,
            timeout_s=stage_timeout_s,
            gpu_limit=gpu_limit,
            nnodes=nnodes,
            node_deployment=node_deployment,
        )

    with (
        ended_on_error(run_id, tracking_uri=tracking_uri, reason=supervision.reason),
        supervision.tasks_cancelled_with_the_flow(),
    ):
        start = fetch_model(init_from, tracking_uri).checkpoint if init_from else None  # any model source
        results = run_stages(stages, launch, start)
        best = best_stage(results)
        promotion = (
            register_model(
                best,
                cfg.tracking.registered_model,
                recipe,
                tracking_uri,
                tags=holdout_tags,
            )
            if register_best
            else None
        )
    end_tracking_run(
        run_id,
        "FINISHED",
        final_metrics(results, best),
        tracking_uri,
        tags={"best_stage": best.stage},
    )
    table = scores_table({r.stage: r.test_scores for r in results})
    links = run_links_markdown(tracking_uri, run_id, promotion)
    create_markdown_artifact(
        key="test-scores", markdown=f"{table}\n\n{links}", description=f"{recipe}: test scores per stage"
    )
    logger.info("test scores (%s):\n%s\n%s", output, table, links)
    return {
        "recipe": recipe,
        "output": output,
        "mlflow_run_id": run_id,
        "stages": [r.to_json() for r in results],
        "best_stage": best.stage,
        "test_scores": best.test_scores,
        "registered": promotion,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m flows.train_sat", description=train_sat.description)
    p.add_argument("--recipe", default="demo")
    p.add_argument("--stages", nargs="+")
    p.add_argument("--output")
    p.add_argument("--no-prepare", action="store_true")
    p.add_argument("--no-register", action="store_true")
    p.add_argument("--init-from")
    args, overrides = p.parse_known_args(argv)
    return train_sat(
        recipe=args.recipe,
        stages=args.stages,
        overrides=overrides,
        output=args.output,
        prepare=not args.no_prepare,
        register_best=not args.no_register,
        init_from=args.init_from,
    )


if __name__ == "__main__":
    main()
