"""``evaluate``: any model source -> pycocoevalcap scores on a split -> an MLflow run named after it.

prefect deployment run evaluate/demo -p source=models:/show-attend-tell@champion
prefect deployment run evaluate/demo -p source=models:/show-attend-tell/2 -p 'overrides=["eval.beam_size=5"]'
python -m flows.evaluate --recipe demo --source runs/demo/x/scst/best.pt --split test

The source is resolved once (``captioning.model_uri.resolve_model``: a checkpoint path or s3:// URI,
``runs:/ID/model``, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``). The model decodes as it
was scored in training (its checkpoint's recorded ``eval`` settings) unless the overrides set
``eval.beam_size``, ``eval.max_len`` or ``eval.length_normalization``. The MLflow run is named after
the resolved model and the data as the retraining gate names its evaluations (``v3 on
synthetic-test:ab12cd``: the dataset, the split and its holdout id) and tagged with the version, its
run and the decoding used.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger

from captioning.config import Config, load_config, normalize_overrides
from captioning.evaluation.holdouts import load_holdout
from captioning.model.checkpoint import decoding_given
from captioning.tracking.report import scores_table
from captioning.tracking.runs import tracking_uri_of
from tasks.tracking import evaluate, fetch_model, log_evaluation


def data_name(cfg: Config, split: str) -> str:
    """``synthetic-test:ab12cd`` when ``split`` is the build's identified holdout, else ``synthetic-val``."""
    try:
        holdout = load_holdout(cfg.data.shard_dir, label=cfg.data.dataset)
    except (ValueError, OSError):  # a build without a holdout id, or no build there (evaluate says so)
        return f"{cfg.data.dataset}-{split}"
    return holdout.name if holdout.split == split else f"{cfg.data.dataset}-{split}"


@flow(name="evaluate", log_prints=True)
def evaluate_model(
    source: str = "models:/show-attend-tell@champion",
    recipe: str = "demo",
    overrides: list[str] | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Score ``source`` (checkpoint path or s3:// URI, ``runs:/ID/model``, ``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION``) on ``split`` of the recipe's shards, decoded as the model was scored in
    training unless the overrides set eval decoding; the scores go to a new MLflow run."""
    given = normalize_overrides(overrides)
    cfg = load_config(recipe, given)
    tracking_uri = tracking_uri_of(cfg)
    model = fetch_model(source, tracking_uri)
    explicit = decoding_given(given)
    result = evaluate(model.checkpoint, cfg, split, explicit=explicit)
    decoding = ",".join(f"{k}={v}" for k, v in result["decoding"].items())
    tags = {**model.tags(), "split": split, "recipe": recipe, "decoding": decoding}
    run_id = log_evaluation(result["scores"], cfg, f"{model.label} on {data_name(cfg, split)}", tags=tags)
    get_run_logger().info(
        "%s (%s) on %s:\n%s", source, model.label, split, scores_table({model.label: result["scores"]})
    )
    return {**result, "mlflow_run_id": run_id, "source": source, "split": split, "model": model.tags()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m flows.evaluate", description=evaluate_model.description)
    p.add_argument("--source", default="models:/show-attend-tell@champion")
    p.add_argument("--recipe", default="demo")
    p.add_argument("--split", default="test")
    args, overrides = p.parse_known_args(argv)
    return evaluate_model(source=args.source, recipe=args.recipe, overrides=overrides, split=args.split)


if __name__ == "__main__":
    main()
