"""MLflow tasks: the pipeline's parent run, registration with the champion gate, evaluation runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from captioning import registry
from captioning.config import Config
from captioning.evaluation.evaluate import score_checkpoint
from captioning.evaluation.holdouts import Holdout, HoldoutScores
from captioning.model.checkpoint import DECODING_KEYS
from captioning.model_uri import ResolvedModel, resolve_model
from captioning.tracking import runs
from captioning.tracking.client import connect
from captioning.training.stage import StageResult
from tasks.retries import unless

RETRY_DELAYS_S: list[float] = [5, 30, 120]
# A model without a champion or a stage without a run stays that way: fail at once, no retries.
NOT_REGISTRY_ERRORS = unless(registry.RegistryError)


@task(name="start-tracking-run", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=RETRY_DELAYS_S)
def start_tracking_run(
    cfg: Config,
    stages: Sequence[str],
    run_name: str,
    world_size: int,
    tags: Mapping[str, str],
    output: str | None = None,
) -> str:
    """The MLflow parent run every stage reports under; its id. With ``output``, a retry continues the
    parent run the first attempt recorded there (``captioning.tracking.lineage``)."""
    return runs.start_pipeline_run(
        cfg, stages, run_name=run_name, world_size=world_size, tags=tags, output=output
    )


@task(name="end-tracking-run", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=RETRY_DELAYS_S)
def end_tracking_run(
    run_id: str,
    status: str,
    metrics: Mapping[str, float],
    tracking_uri: str,
    tags: Mapping[str, str] | None = None,
) -> None:
    runs.end_pipeline_run(run_id, status, metrics=metrics, tags=tags, tracking_uri=tracking_uri)


@task(
    name="register-model",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=NOT_REGISTRY_ERRORS,
)
def register_model(
    result: StageResult,
    model_name: str,
    recipe: str,
    tracking_uri: str,
    gate: bool = True,
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A new registered version from the stage's best model, then (unless ``gate`` is false) the
    champion gate on its test score."""
    return registry.register_stage(
        result,
        model_name,
        recipe=recipe,
        gate=gate,
        tags=tags,
        tracking_uri=tracking_uri,
    )


@task(
    name="gate-on-holdouts",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=NOT_REGISTRY_ERRORS,
)
def gate_on_holdouts(
    model_name: str,
    version: str,
    champion_version: str,
    original: HoldoutScores,
    new: HoldoutScores,
    tolerance: float,
    tracking_uri: str,
) -> dict[str, Any]:
    """The retraining gate: promote ``version`` only when better on the new holdout and within
    ``tolerance`` on the original; the decision and every score go into its version tags."""
    promotion = registry.promote_on_holdouts(
        connect(tracking_uri),
        model_name,
        version,
        champion_version=champion_version,
        original=original,
        new=new,
        tolerance=tolerance,
    )
    return {**dataclasses.asdict(promotion), "promoted": promotion.promoted}


@task(
    name="fetch-model",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=NOT_REGISTRY_ERRORS,
)
def fetch_model(source: str, tracking_uri: str | None) -> ResolvedModel:
    """``source`` (a checkpoint path or s3:// URI, ``runs:/...``, ``models:/NAME@ALIAS|/VERSION``) -> its
    checkpoint and what it resolved to (registered version, run)."""
    return resolve_model(source, tracking_uri=tracking_uri)


@task(
    name="fetch-champion",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=RETRY_DELAYS_S,
    retry_condition_fn=NOT_REGISTRY_ERRORS,
)
def fetch_champion(model_name: str, tracking_uri: str) -> tuple[str, str]:
    """(version, local checkpoint) of the registered model's champion."""
    champion = resolve_model(f"models:/{model_name}@{registry.CHAMPION}", tracking_uri=tracking_uri)
    return str(champion.version), champion.checkpoint


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(
    checkpoint: str,
    cfg: Config,
    split: str,
    results_uri: str | None = None,
    explicit: Sequence[str] = (),
) -> dict[str, Any]:
    """Beam-search captions for ``split`` of ``cfg.data.shard_dir``, scored with pycocoevalcap; decoded
    as the model was scored in training, except the ``explicit`` eval settings (from ``cfg.eval``)."""
    return score_checkpoint(checkpoint, cfg, split, results_uri=results_uri, explicit=explicit)


@task(
    name="evaluate-on-holdout", task_run_name="evaluate-v{version}-on-{holdout.label}", cache_policy=NO_CACHE
)
def evaluate_on_holdout(checkpoint: str, version: str, holdout: Holdout, cfg: Config) -> dict[str, Any]:
    """Scores of model ``version`` (its checkpoint) on ``holdout``: its build's split, decoded with
    ``cfg``'s eval settings for every model alike (the gate compares champion and challenger under
    one decoding, not each model's own)."""
    return score_checkpoint(
        checkpoint,
        cfg.replace({"data.shard_dir": holdout.shard_dir}),
        holdout.split,
        explicit=DECODING_KEYS,
    )


@task(name="log-evaluation", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=RETRY_DELAYS_S)
def log_evaluation(
    scores: Mapping[str, float],
    cfg: Config,
    run_name: str,
    tags: Mapping[str, str],
    results_file: str | None = None,
    parent_run_id: str | None = None,
) -> str:
    return runs.log_evaluation(
        scores,
        tracking_uri=runs.tracking_uri_of(cfg),
        experiment=cfg.tracking.experiment,
        run_name=run_name,
        tags=tags,
        results_file=results_file,
        parent_run_id=parent_run_id,
    )
