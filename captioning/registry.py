"""Registered model versions and the champion gate: a new version replaces the champion only if it scores higher.

    promotion = register_stage(best, "show-attend-tell", recipe="demo")   # a stage's best model, gated
    resolve_model("models:/show-attend-tell@champion")   # any model source -> checkpoint: captioning.model_uri

    version = register_model(client, "sat-captioner", source, run_id, tags={"git_sha": sha})
    promotion = promote_if_better(client, "sat-captioner", version, 1.12)   # metric="test_CIDEr"
    promotion.alias                        # "champion" (promoted) or "challenger"
    champion(client, "sat-captioner")      # ("3", 1.12), or None before any promotion
    promote_on_holdouts(client, "sat-captioner", "4", champion_version="3", original=HoldoutScores(...),
                        new=HoldoutScores(...), tolerance=0.01)   # retraining: both models, both holdouts
    mlflow.pyfunc.load_model("models:/sat-captioner@champion")

Everything goes through an explicit ``MlflowClient`` (never the fluent run state). Aliases, not
stages (deprecated in MLflow 3): ``champion`` is the version to serve, ``challenger`` the latest one
that did not beat it. A version's score lives in a version tag named after the metric, so the gate
compares like with like and the UI shows every version's score.

The gate: no champion yet -> the new version becomes champion; otherwise it becomes champion only
when its score is strictly greater than the champion's tag (a tie keeps the incumbent, so
re-running the gate is deterministic), else it takes the ``challenger`` alias. A champion with no
tag for the metric (set by hand, or scored on another metric) is never replaced automatically:
the gate fails closed and logs a warning. Two gates running at once for the same model can both
see the same champion; run promotions for one model from one place (the flow).

Retraining on newly landed data has its own gate (``promote_on_holdouts``): the champion and the
retrained version are scored on the same two identified holdouts, the original dataset's test split
and the new data's, and the rule is ``captioning.evaluation.holdouts.decide`` (better on the new data,
not worse on the original beyond a tolerance). The version's tags record the decision and every score
with the holdouts' names and ids; its ``test_<metric>`` is its score on the original holdout, so it
compares with the score every other version carries.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from captioning import model_uri
from captioning.evaluation.holdouts import HoldoutScores, decide, version_tags
from captioning.tracking.client import connect
from captioning.training.stage import StageResult

CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_METRIC = "test_CIDEr"
READY_TIMEOUT_S = 300.0

log = logging.getLogger(__name__)


# Nothing to register or fetch (a stage without a run or score, a source that names no model): defined
# with the one model-source resolver, captioning.model_uri, which raises it too.
RegistryError = model_uri.RegistryError


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
    reason: str = ""  # the holdout gate's one-line decision, with every score
    holdouts: dict[str, dict[str, Any]] = field(default_factory=dict)  # "original"/"new" -> id, name, scores

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

    ``source``: where the model folder lies, inside run ``run_id``'s artifacts (the server refuses
    others): ``captioning.serving.log_pyfunc``'s answer, the run's artifact URI + ``/model``, which the
    server resolves for the UI's get-artifact requests (a ``runs:/<run_id>/model`` URI registers but
    the UI cannot read its MLmodel: HTTP 500).
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
) -> Promotion:
    """Tag ``version`` with its score and move ``champion`` to it if it beats the champion (see the module doc)."""
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"{name} version {version}: {metric} must be finite to compare, got {score}")
    version = str(version)
    client.set_model_version_tag(name, version, metric, repr(score))
    aliases = _aliases(client, name)
    previous = aliases.get(CHAMPION)
    previous_score = None if previous is None else _score_tag(client, name, previous, metric)
    holdouts = _holdout_ids(client, name, version, previous)
    if previous is None or previous == version:
        promoted = True
    elif holdouts is not None:  # scored on other test data: the numbers do not compare
        log.warning(
            "%s: version %s was scored on holdout %s, champion version %s on %s; not replacing it "
            "(re-score the champion on the same data, e.g. with the evaluate flow)",
            name, version, holdouts[0], previous, holdouts[1],
        )  # fmt: skip
        promoted = False
    elif previous_score is None:
        log.warning(
            "%s: champion version %s has no numeric %s tag; not replacing it with version %s",
            name, previous, metric, version,
        )  # fmt: skip
        promoted = False
    else:
        promoted = score > previous_score  # strictly: a tie keeps the incumbent
    alias = _move_alias(client, name, version, promoted, aliases)
    return Promotion(
        name=name,
        version=version,
        alias=alias,
        score=score,
        previous_champion=previous,
        previous_score=previous_score,
        metric=metric,
    )


def actor() -> str:
    """Who is moving an alias: the MLflow user (with authentication on), the OS user and host, the
    program, and the Prefect flow run when there is one."""
    import getpass
    import os
    import socket
    import sys

    parts = []
    if mlflow_user := os.environ.get("MLFLOW_TRACKING_USERNAME"):
        parts.append(f"mlflow user {mlflow_user}")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    parts.append(f"{user}@{socket.gethostname()}")
    parts.append(os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python")
    try:
        from prefect.runtime import flow_run  # only where Prefect runs the code

        if flow_run.id:
            parts.append(f"flow run {flow_run.id}")
    except ImportError:
        pass
    return ", ".join(parts)


def _move_alias(
    client: MlflowClient, name: str, version: str, promote: bool, aliases: Mapping[str, str]
) -> str:
    """Point ``champion`` (promote) or ``challenger`` at ``version``; a challenger that now wins is no
    longer one. The version records who moved it and when (tags ``<alias>_set_by``, ``<alias>_set_at``),
    and the registered model who moved it last (``<alias>_set_by``: "vN by ...")."""
    alias = CHAMPION if promote else CHALLENGER
    who, when = actor(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(name, version, f"{alias}_set_by", who)
    client.set_model_version_tag(name, version, f"{alias}_set_at", when)
    client.set_registered_model_alias(name, alias, version)
    client.set_registered_model_tag(name, f"{alias}_set_by", f"v{version} at {when} by {who}")
    if promote and aliases.get(CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    return alias


def _holdout_ids(
    client: MlflowClient, name: str, version: str, previous: str | None
) -> tuple[str, str] | None:
    """(version's, champion's) ``test_holdout_id`` tags when both are known and differ, else None:
    a score on one test split cannot decide against a score on another."""
    if previous is None or previous == version:
        return None
    ours = client.get_model_version(name, version).tags.get("test_holdout_id")
    theirs = client.get_model_version(name, previous).tags.get("test_holdout_id")
    return (ours, theirs) if ours and theirs and ours != theirs else None


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


def register_version(
    client: MlflowClient, name: str, run_id: str, checkpoint_uri: str, *, tags: Mapping[str, str]
) -> str:
    """The checkpoint as a pyfunc model of run ``run_id``, then a new version of ``name`` (no gate)."""
    from captioning.serving import log_pyfunc

    source = log_pyfunc(client, run_id, checkpoint_uri)
    return register_model(client, name, source, run_id, tags=tags)


def register_checkpoint(
    client: MlflowClient,
    name: str,
    run_id: str,
    checkpoint_uri: str,
    score: float,
    *,
    tags: Mapping[str, str],
    metric: str = DEFAULT_METRIC,
) -> Promotion:
    """The checkpoint as a pyfunc model of run ``run_id``, a new version of ``name``, then the gate."""
    version = register_version(client, name, run_id, checkpoint_uri, tags=tags)
    return promote_if_better(client, name, version, score, metric=metric)


def register_stage(
    result: StageResult,
    model_name: str,
    *,
    recipe: str,
    metric: str = "CIDEr",
    gate: bool = True,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Register a finished stage's best model as a new version of ``model_name`` (a pyfunc logged to
    the stage's run), then the champion gate on its test ``metric``.

    Returns the gate's decision as a dict (``Promotion`` plus ``promoted``). ``gate=False`` registers
    only (no score tag, no alias): retraining scores the version on its holdouts first, then runs
    ``promote_on_holdouts``. Once per stage run: when its run already has a version of
    ``model_name`` (a resumed pipeline whose stages were all done, a retried task) that version is
    returned as it stands (``already_registered``), gate not re-run.
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
    all_tags = {"stage": result.stage, "recipe": recipe, **(tags or {})}
    if not gate:
        version = register_version(client, model_name, result.run_id, result.checkpoint, tags=all_tags)
        log.info("registered %s version %s (gate to follow)", model_name, version)
        return {"name": model_name, "version": version, "alias": None, "score": None, "metric": f"test_{metric}",
                "previous_champion": None, "previous_score": None, "promoted": False,
                "already_registered": False}  # fmt: skip
    promotion = register_checkpoint(
        client,
        model_name,
        result.run_id,
        result.checkpoint,
        result.test_scores[metric],
        tags=all_tags,
        metric=f"test_{metric}",
    )
    log.info("registered %s version %s (test %s %.4f): %s", model_name, promotion.version, metric,
             promotion.score, promotion.alias)  # fmt: skip
    return {**dataclasses.asdict(promotion), "promoted": promotion.promoted}


def promote_on_holdouts(
    client: MlflowClient,
    name: str,
    version: str,
    *,
    champion_version: str,
    original: HoldoutScores,
    new: HoldoutScores,
    tolerance: float,
    metric: str = "CIDEr",
) -> Promotion:
    """The retraining gate: ``version`` (trained on new data) against ``champion_version``, both scored
    on the original dataset's holdout and the new data's (``holdouts.decide``); tags, then the alias.

    Tags on ``version``: ``test_<metric>`` / ``test_holdout`` / ``test_holdout_id`` (its score on the
    original holdout, comparable with every version's), the same with ``new_`` for the new holdout,
    ``gate_champion_test_<metric>`` and ``gate_champion_new_test_<metric>`` (the champion's scores),
    ``gate_champion``, ``gate_tolerance``, ``gate`` (promoted / not promoted) and ``gate_reason``. When
    the champion moved to another version meanwhile, nothing is promoted (the scores compare with a
    champion that no longer is); re-running the gate for the same scores decides the same.
    """
    version, champion_version = str(version), str(champion_version)
    decision = decide(original, new, tolerance=tolerance)
    aliases = _aliases(client, name)
    current = aliases.get(CHAMPION)
    promote, reason = decision.promote, decision.reason
    if current not in (champion_version, version):  # version: an earlier run of this gate promoted it
        moved = f"v{current}" if current else "no version"
        promote, reason = False, f"not promoted: the champion moved from v{champion_version} to {moved}"
    tags = {"gate_champion": champion_version, "gate_tolerance": repr(float(tolerance))}
    holdouts: dict[str, dict[str, Any]] = {}
    for role, prefix, scores in (("original", "", original), ("new", "new_", new)):
        tags[f"{prefix}test_{metric}"] = repr(float(scores.challenger))
        tags.update(version_tags(scores.holdout, prefix))
        tags[f"gate_champion_{prefix}test_{metric}"] = repr(float(scores.champion))
        holdouts[role] = {"name": scores.holdout.name, "id": scores.holdout.id,
                          "champion": scores.champion, "challenger": scores.challenger}  # fmt: skip
    tags.update(gate="promoted" if promote else "not promoted", gate_reason=reason)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    alias = _move_alias(client, name, version, promote, aliases)
    log.info("%s version %s: %s", name, version, reason)
    return Promotion(
        name=name,
        version=version,
        alias=alias,
        score=original.challenger,
        previous_champion=champion_version,
        previous_score=original.champion,
        metric=f"test_{metric}",
        reason=reason,
        holdouts=holdouts,
    )


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
