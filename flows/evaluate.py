"""``evaluate``: a checkpoint or a registered model -> pycocoevalcap scores on a split -> an MLflow run.

prefect deployment run evaluate/demo -p source=models:/show-attend-tell@champion
python -m flows.evaluate --recipe demo --source runs/demo/x/scst/best.pt --split test
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger

from captioning.config import load_config, normalize_overrides
from captioning.tracking.report import scores_table
from captioning.tracking.runs import tracking_uri_of
from tasks.tracking import evaluate, fetch_model, log_evaluation


@flow(name="evaluate", log_prints=True)
def evaluate_model(
    source: str = "models:/show-attend-tell@champion",
    recipe: str = "demo",
    overrides: list[str] | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Score ``source`` (checkpoint path or s3:// URI, ``models:/NAME@ALIAS``, ``runs:/ID/model``) on
    ``split`` of the recipe's shards with its eval settings; the scores go to a new MLflow run."""
    cfg = load_config(recipe, normalize_overrides(overrides))
    tracking_uri = tracking_uri_of(cfg)
    checkpoint = fetch_model(source, tracking_uri)
    result = evaluate(checkpoint, cfg, split)
    run_id = log_evaluation(
        result["scores"], cfg, f"evaluate-{split}", tags={"source": source, "split": split, "recipe": recipe}
    )
    get_run_logger().info("%s on %s:\n%s", source, split, scores_table({source: result["scores"]}))
    return {**result, "mlflow_run_id": run_id, "source": source, "split": split}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m flows.evaluate", description=evaluate_model.description)
    p.add_argument("--source", default="models:/show-attend-tell@champion")
    p.add_argument("--recipe", default="demo")
    p.add_argument("--split", default="test")
    args, overrides = p.parse_known_args(argv)
    return evaluate_model(source=args.source, recipe=args.recipe, overrides=overrides, split=args.split)


if __name__ == "__main__":
    main()
