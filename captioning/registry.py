"""Registered model versions and the champion gate: a new version replaces the champion only if it scores higher.

    promotion = register_stage(best, "show-attend-tell", recipe="demo")   # a stage's best model, gated
    version, path = champion_checkpoint("show-attend-tell")                # the champion's checkpoint file
    checkpoint_from_model("models:/show-attend-tell@champion")             # any model URI -> checkpoint

    version = register_model(client, "sat-captioner", source, run_id, tags={"git_sha": sha})
    promotion = promote_if_better(client, "sat-captioner", version, 1.12)   # metric="test_CIDEr"
    promotion.alias                        # "champion" (promoted) or "challenger"
    champion(client, "sat-captioner")      # ("3", 1.12), or None before any promotion
    mlflow.pyfunc.load_model("models:/sat-captioner@champion")

Everything goes through an explicit ``MlflowClient`` (never the fluent run state). Aliases, not
stages (deprecated in MLflow 3): ``champion`` is the version to serve, ``challenger`` the latest one
that did not beat it. A version's score lives in a version tag named after the metric, so the gate
compares like with like and the UI shows every version's score.

The gate: no champion yet -> the new version becomes champion; otherwise it becomes champion only
when its score is strictly greater than the champion's tag (a tie keeps the incumbent, so
re-running the gate is deterministic), else it takes the ``challenger`` alias. A champion with no
tag for the metric (set by hand, or scored on another metric) is never replaced automatically:
the gate fails closed and logs a warning. When the challenger was scored on other data than the
champion's tag (retraining on newly landed data), pass ``champion_score``: the champion re-scored on
the same data, which the gate then compares with instead. Two gates running at once for the same model can both
see the same champion; run promotions for one model from one place (the flow).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from captioning.tracking.client import connect
from captioning.training.stage import StageResult

CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_METRIC = "test_CIDEr"
READY_TIMEOUT_S = 300.0

log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """Nothing to register or fetch: a stage without a tracking run or score, a model without a champion."""


@dataclass(frozen=True)
class Promotion:
    """What the gate decided for ``version``: the alias it now holds and the champion it was compared with."""

    name: str
    version: str
    alias: str  # CHAMPION or CHALLENGER
    score: float
    previous_champion: str | None  # the champion before the gate ran (None: there was none)
    previous_score: float | None  # its score (None: no champion, or it has no tag for the metric)
    metric: str

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION


def register_model(
    client: MlflowClient,
    name: str,
    source: str,
    run_id: str,
    *,
    tags: Mapping[str, str],
    timeout_s: float = READY_TIMEOUT_S,
) -> str:
    """Create version N of registered model ``name`` (created if missing) from ``source``; N once READY.

    ``source`` is a model URI such as ``runs:/<run_id>/model`` (``captioning.serving.log_pyfunc``);
    the server only accepts a run-relative source whose run is ``run_id``.
    """
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":  # another registration got there first: fine
            raise
    created = client.create_model_version(
        name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}, await_creation_for=0
    )
    version = str(created.version)
    deadline = time.monotonic() + timeout_s
    while True:
        current = client.get_model_version(name, version)
        if current.status == "READY":
            return version
        if current.status == "FAILED_REGISTRATION":
            raise RuntimeError(f"{name} version {version} failed to register: {current.status_message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} version {version} still {current.status} after {timeout_s:.0f} s")
        time.sleep(0.5)


def _score_tag(client: MlflowClient, name: str, version: str, metric: str) -> float | None:
    value = client.get_model_version(name, version).tags.get(metric)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        log.warning("%s version %s: tag %s=%r is not a number", name, version, metric, value)
        return None


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """alias -> version of registered model ``name``; empty when the model does not exist."""
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    return {str(alias): str(version) for alias, version in aliases.items()}


def promote_if_better(
    client: MlflowClient,
    name: str,
    version: str,
    score: float,
    *,
    metric: str = DEFAULT_METRIC,
    champion_score: float | None = None,
) -> Promotion:
    """Tag ``version`` with its score and move ``champion`` to it if it beats the champion (see the module doc).

    ``champion_score``: the current champion's score on the same data as ``score``, replacing its tag
    in the comparison (the champion's tag is left as it is).
    """
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"{name} version {version}: {metric} must be finite to compare, got {score}")
    version = str(version)
    client.set_model_version_tag(name, version, metric, repr(score))
    aliases = _aliases(client, name)
    previous = aliases.get(CHAMPION)
    previous_score = None if previous is None else _score_tag(client, name, previous, metric)
    if previous is not None and champion_score is not None:
        previous_score = float(champion_score)
    if previous is None or previous == version:
        promoted = True
    elif previous_score is None:
        log.warning(
            "%s: champion version %s has no numeric %s tag; not replacing it with version %s",
            name, previous, metric, version,
        )  # fmt: skip
        promoted = False
    else:
        promoted = score > previous_score  # strictly: a tie keeps the incumbent
    alias = CHAMPION if promoted else CHALLENGER
    client.set_registered_model_alias(name, alias, version)
    if promoted and aliases.get(CHALLENGER) == version:  # a challenger that now wins is no longer one
        client.delete_registered_model_alias(name, CHALLENGER)
    return Promotion(
        name=name,
        version=version,
        alias=alias,
        score=score,
        previous_champion=previous,
        previous_score=previous_score,
        metric=metric,
    )


def champion(client: MlflowClient, name: str, *, metric: str = DEFAULT_METRIC) -> tuple[str, float] | None:
    """(version, score) of the version holding ``champion``; None when there is none (or no such model).

    Raises ValueError when the champion has no numeric tag for ``metric``.
    """
    version = _aliases(client, name).get(CHAMPION)
    if version is None:
        return None
    score = _score_tag(client, name, version, metric)
    if score is None:
        raise ValueError(f"{name}: champion version {version} has no numeric {metric!r} tag")
    return version, score


def register_checkpoint(
    client: MlflowClient,
    name: str,
    run_id: str,
    checkpoint_uri: str,
    score: float,
    *,
    tags: Mapping[str, str],
    metric: str = DEFAULT_METRIC,
    champion_score: float | None = None,
) -> Promotion:
    """The checkpoint as a pyfunc model of run ``run_id``, a new version of ``name``, then the gate."""
    from captioning.serving import log_pyfunc

    source = log_pyfunc(client, run_id, checkpoint_uri)
    version = register_model(client, name, source, run_id, tags=tags)
    return promote_if_better(client, name, version, score, metric=metric, champion_score=champion_score)


def register_stage(
    result: StageResult,
    model_name: str,
    *,
    recipe: str,
    metric: str = "CIDEr",
    champion_score: float | None = None,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Register a finished stage's best model as a new version of ``model_name`` (a pyfunc logged to
    the stage's run), then the champion gate on its test ``metric``.

    ``champion_score``: the champion re-scored on the same test data (retraining on new data).
    Returns the gate's decision as a dict (``Promotion`` plus ``promoted``). Once per stage run: when
    its run already has a version of ``model_name`` (a resumed pipeline whose stages were all done,
    a retried task) that version is returned as it stands (``already_registered``), gate not re-run.
    """
    if result.run_id is None:
        raise RegistryError(f"stage {result.stage} has no MLflow run: cannot register its model")
    if metric not in result.test_scores:
        raise RegistryError(f"stage {result.stage} has no test {metric}: {sorted(result.test_scores)}")
    client = connect(tracking_uri)
    existing = registered_version(client, model_name, result.run_id, metric=f"test_{metric}")
    if existing is not None:
        log.info("%s: stage run %s is already version %s", model_name, result.run_id, existing["version"])
        return existing
    promotion = register_checkpoint(
        client,
        model_name,
        result.run_id,
        result.checkpoint,
        result.test_scores[metric],
        tags={"stage": result.stage, "recipe": recipe, **(tags or {})},
        metric=f"test_{metric}",
        champion_score=champion_score,
    )
    log.info("registered %s version %s (test %s %.4f): %s", model_name, promotion.version, metric,
             promotion.score, promotion.alias)  # fmt: skip
    return {**dataclasses.asdict(promotion), "promoted": promotion.promoted}


def registered_version(client: MlflowClient, name: str, run_id: str, *, metric: str) -> dict[str, Any] | None:
    """The version of ``name`` made from run ``run_id`` (its alias, score and the champion), or None."""
    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if not found:
        return None
    version = str(min(int(v.version) for v in found))
    aliases = _aliases(client, name)
    alias = next((a for a, v in aliases.items() if v == version), None)
    champ = aliases.get(CHAMPION)
    return {
        "name": name,
        "version": version,
        "alias": alias,
        "score": _score_tag(client, name, version, metric),
        "previous_champion": champ,
        "previous_score": None if champ is None else _score_tag(client, name, champ, metric),
        "metric": metric,
        "promoted": alias == CHAMPION,
        "already_registered": True,
    }


def checkpoint_from_model(model_uri: str, *, tracking_uri: str | None = None, dst: str | None = None) -> str:
    """A registered or logged pyfunc model (``models:/name@champion``, ``runs:/id/model``) -> the local
    path of the checkpoint it packs."""
    import mlflow.artifacts

    from captioning.serving import CHECKPOINT_ARTIFACT

    connect(tracking_uri)  # fail fast with a clear message when the server is down
    folder = dst or tempfile.mkdtemp(prefix="captioning-model-")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=model_uri, dst_path=folder, tracking_uri=tracking_uri
    )
    candidates = sorted(glob.glob(os.path.join(local, "artifacts", "**", "*"), recursive=True))
    files = [c for c in candidates if os.path.isfile(c)]
    if not files:
        raise RegistryError(f"{model_uri} holds no {CHECKPOINT_ARTIFACT} artifact (not a captioning model?)")
    return files[0]


def champion_checkpoint(
    model_name: str, *, tracking_uri: str | None = None, dst: str | None = None
) -> tuple[str, str]:
    """(version, local checkpoint path) of ``model_name@champion``; RegistryError when there is none."""
    found = champion(connect(tracking_uri), model_name)
    if found is None:
        raise RegistryError(
            f"registered model {model_name!r} has no {CHAMPION}: train one first (train-sat flow)"
        )
    version, _ = found
    return version, checkpoint_from_model(
        f"models:/{model_name}@{CHAMPION}", tracking_uri=tracking_uri, dst=dst
    )
