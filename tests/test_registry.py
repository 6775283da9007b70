"""The champion gate against a real MLflow server: versions, score tags, aliases, ties.

Registration does not look inside the source, so every version here points at one tiny run artifact;
``tests/test_serving.py`` registers and loads a real pyfunc model.
"""

from __future__ import annotations

import getpass
import re
import socket
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from captioning.evaluation.holdouts import Holdout, HoldoutScores
from captioning.registry import (
    CHALLENGER,
    CHAMPION,
    Promotion,
    actor,
    champion,
    promote_if_better,
    promote_on_holdouts,
    register_model,
)
from captioning.services.mlflow_server import MlflowServer


@pytest.fixture(scope="module")
def client(mlflow_server: MlflowServer) -> MlflowClient:
    return MlflowClient(mlflow_server.url)


@pytest.fixture(scope="module")
def run_source(client: MlflowClient, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(run_id, runs:/<run_id>/model) for a run holding a placeholder model folder."""
    folder = tmp_path_factory.mktemp("placeholder")
    (folder / "MLmodel").write_text("flavors: {}\n")
    run_id = client.create_run(client.create_experiment(f"registry-{uuid.uuid4().hex[:8]}")).info.run_id
    client.log_artifacts(run_id, str(folder), "model")
    return run_id, f"runs:/{run_id}/model"


def unique_name() -> str:
    return f"captioner-{uuid.uuid4().hex[:12]}"


def test_champion_moves_only_to_strictly_better_versions(
    client: MlflowClient, run_source: tuple[str, str]
) -> None:
    run_id, source = run_source
    name = unique_name()
    versions = [register_model(client, name, source, run_id, tags={"stage": f"s{i}"}) for i in range(3)]
    assert versions == ["1", "2", "3"]
    assert client.get_model_version(name, "2").tags["stage"] == "s1"
    assert client.get_model_version(name, "2").status == "READY"

    first = promote_if_better(client, name, "1", 1.0)
    assert first == Promotion(name, "1", CHAMPION, 1.0, None, None, "test_CIDEr")
    second = promote_if_better(client, name, "2", 0.8)
    assert second == Promotion(name, "2", CHALLENGER, 0.8, "1", 1.0, "test_CIDEr")
    assert client.get_model_version_by_alias(name, CHAMPION).version == "1"
    assert client.get_model_version_by_alias(name, CHALLENGER).version == "2"
    third = promote_if_better(client, name, "3", 1.2)
    assert third == Promotion(name, "3", CHAMPION, 1.2, "1", 1.0, "test_CIDEr") and third.promoted

    assert champion(client, name) == ("3", 1.2)
    assert client.get_model_version_by_alias(name, CHAMPION).version == "3"
    assert client.get_model_version_by_alias(name, CHALLENGER).version == "2"
    assert [client.get_model_version(name, v).tags["test_CIDEr"] for v in versions] == ["1.0", "0.8", "1.2"]
    # Who moved each alias, and when: on the version, and the last move on the registered model.
    who = actor()
    assert getpass.getuser() in who and socket.gethostname() in who
    tags = client.get_model_version(name, "3").tags
    assert tags["champion_set_by"] == who and re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", tags["champion_set_at"]
    )
    assert client.get_model_version(name, "2").tags["challenger_set_by"] == who
    model_tags = client.get_registered_model(name).tags
    assert model_tags["champion_set_by"] == f"v3 at {tags['champion_set_at']} by {who}"


def test_a_tie_keeps_the_incumbent_every_time(client: MlflowClient, run_source: tuple[str, str]) -> None:
    run_id, source = run_source
    name = unique_name()
    for _ in range(2):
        register_model(client, name, source, run_id, tags={})
    assert promote_if_better(client, name, "1", 0.75).promoted
    for _ in range(2):  # re-running the gate decides the same
        tie = promote_if_better(client, name, "2", 0.75)
        assert (tie.alias, tie.previous_champion, tie.previous_score) == (CHALLENGER, "1", 0.75)
    assert champion(client, name) == ("1", 0.75)


def test_a_beaten_challenger_that_wins_later_drops_the_challenger_alias(
    client: MlflowClient, run_source: tuple[str, str]
) -> None:
    run_id, source = run_source
    name = unique_name()
    for _ in range(2):
        register_model(client, name, source, run_id, tags={})
    promote_if_better(client, name, "1", 0.9)
    assert not promote_if_better(client, name, "2", 0.5).promoted
    assert promote_if_better(client, name, "2", 1.5, metric="test_CIDEr").promoted  # re-scored
    assert client.get_registered_model(name).aliases == {CHAMPION: "2"}


def test_no_champion_and_unscored_champions(client: MlflowClient, run_source: tuple[str, str]) -> None:
    run_id, source = run_source
    name = unique_name()
    assert champion(client, name) is None  # no such registered model yet
    register_model(client, name, source, run_id, tags={})
    assert champion(client, name) is None  # registered, never promoted

    client.set_registered_model_alias(name, CHAMPION, "1")  # chosen by hand, no score
    with pytest.raises(ValueError, match="no numeric 'test_CIDEr' tag"):
        champion(client, name)
    register_model(client, name, source, run_id, tags={})
    kept = promote_if_better(client, name, "2", 9.0)  # fails closed: a hand-picked champion stays
    assert (kept.alias, kept.previous_champion, kept.previous_score) == (CHALLENGER, "1", None)
    with pytest.raises(ValueError, match="finite"):
        promote_if_better(client, name, "2", float("nan"))


def test_metrics_are_separate_tags(client: MlflowClient, run_source: tuple[str, str]) -> None:
    run_id, source = run_source
    name = unique_name()
    for _ in range(2):
        register_model(client, name, source, run_id, tags={})
    promote_if_better(client, name, "1", 2.0, metric="val_CIDEr")
    # the champion has no test_CIDEr score: the other metric is not compared, nothing moves
    assert not promote_if_better(client, name, "2", 3.0).promoted
    assert champion(client, name, metric="val_CIDEr") == ("1", 2.0)


def test_scores_on_different_holdouts_do_not_decide(
    client: MlflowClient, run_source: tuple[str, str]
) -> None:
    """A version scored on another dataset's test split never replaces the champion on numbers alone."""
    run_id, source = run_source
    name = unique_name()
    demo = {"test_holdout": "synthetic-test:aaaa", "test_holdout_id": "a" * 64}
    first = register_model(client, name, source, run_id, tags=demo)
    assert promote_if_better(client, name, first, 1.0).promoted
    other = register_model(client, name, source, run_id, tags={**demo, "test_holdout_id": "b" * 64})
    refused = promote_if_better(client, name, other, 9.0)  # far higher, but on other test data
    assert not refused.promoted and refused.alias == CHALLENGER
    assert champion(client, name) == (first, 1.0)
    same = register_model(client, name, source, run_id, tags=demo)
    assert promote_if_better(client, name, same, 1.5).promoted  # the same holdout: compared as ever
    untagged = register_model(client, name, source, run_id, tags={})
    assert promote_if_better(client, name, untagged, 2.0).promoted  # no holdout named: as before


def test_a_source_from_another_run_is_refused(client: MlflowClient, run_source: tuple[str, str]) -> None:
    run_id, source = run_source
    other = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    with pytest.raises(MlflowException, match="Invalid model version source"):
        register_model(client, unique_name(), source, other, tags={})


# --- the retraining gate: champion and retrained version on the same two holdouts -------------------

ORIGINAL = Holdout("coco", "data/shards", "test", "a1" * 32, 5000)
NEW = Holdout("2026-11", "data/shards-new/x", "test", "b2" * 32, 500)


def test_a_retrained_version_worse_on_the_original_beyond_the_tolerance_is_not_promoted(
    client: MlflowClient, run_source: tuple[str, str]
) -> None:
    run_id, source = run_source
    name = unique_name()
    for _ in range(2):
        register_model(client, name, source, run_id, tags={})
    promote_if_better(client, name, "1", 1.59)  # version 1: test CIDEr 1.59 on the original test split

    # The case: better where it was trained (1.32 vs 1.23), 0.03 worse on the original.
    original, new = HoldoutScores(ORIGINAL, 1.59, 1.56), HoldoutScores(NEW, 1.23, 1.32)
    kept = promote_on_holdouts(
        client, name, "2", champion_version="1", original=original, new=new, tolerance=0.01
    )
    assert (kept.alias, kept.promoted, kept.previous_champion) == (CHALLENGER, False, "1")
    assert (kept.score, kept.previous_score, kept.metric) == (1.56, 1.59, "test_CIDEr")
    assert kept.holdouts["new"] == {"name": NEW.name, "id": NEW.id, "champion": 1.23, "challenger": 1.32}
    assert champion(client, name) == ("1", 1.59)
    assert client.get_model_version_by_alias(name, CHALLENGER).version == "2"

    # Every score and both holdouts are on the version, and the decision with its reason.
    tags = client.get_model_version(name, "2").tags
    assert tags["test_CIDEr"] == "1.56" and tags["gate_champion_test_CIDEr"] == "1.59"
    assert tags["new_test_CIDEr"] == "1.32" and tags["gate_champion_new_test_CIDEr"] == "1.23"
    assert (tags["test_holdout"], tags["test_holdout_id"]) == ("coco-test:a1a1a1", ORIGINAL.id)
    assert (tags["new_test_holdout"], tags["new_test_holdout_id"]) == ("2026-11-test:b2b2b2", NEW.id)
    assert (tags["gate"], tags["gate_champion"], tags["gate_tolerance"]) == ("not promoted", "1", "0.01")
    assert tags["gate_reason"] == kept.reason
    assert "0.0300 worse on the original data (1.5600 vs 1.5900 on coco-test:a1a1a1)" in kept.reason
    # The champion's own score tag is its original-holdout score, comparable with version 2's.
    assert client.get_model_version(name, "1").tags["test_CIDEr"] == "1.59"

    # Within a wider tolerance the same scores promote it; re-running the gate decides the same.
    for _ in range(2):
        won = promote_on_holdouts(
            client, name, "2", champion_version="1", original=original, new=new, tolerance=0.05
        )
        assert won.promoted and won.reason.startswith("promoted: better on the new data")
    assert client.get_registered_model(name).aliases == {CHAMPION: "2"}
    assert client.get_model_version(name, "2").tags["gate"] == "promoted"


def test_a_retrained_version_is_not_promoted_over_a_champion_that_moved(
    client: MlflowClient, run_source: tuple[str, str]
) -> None:
    run_id, source = run_source
    name = unique_name()
    for _ in range(3):
        register_model(client, name, source, run_id, tags={})
    promote_if_better(client, name, "1", 1.0)
    promote_if_better(client, name, "2", 1.1)  # became champion while version 3 was retrained from 1
    late = promote_on_holdouts(
        client,
        name,
        "3",
        champion_version="1",
        original=HoldoutScores(ORIGINAL, 1.0, 1.2),
        new=HoldoutScores(NEW, 1.0, 1.5),
        tolerance=0.0,
    )
    assert not late.promoted and late.reason == "not promoted: the champion moved from v1 to v2"
    assert champion(client, name) == ("2", 1.1)
    assert client.get_model_version(name, "3").tags["gate"] == "not promoted"


# --- the model-source resolver (captioning.model_uri); every kind captioning alike: test_serving.py ----


def test_model_sources_that_name_nothing_say_what_was_looked_for(
    client: MlflowClient, run_source: tuple[str, str], tmp_path: Path
) -> None:
    from captioning import model_uri
    from captioning.registry import RegistryError

    assert model_uri.RegistryError is RegistryError  # one error for "nothing to fetch or register"
    run_id, source = run_source
    name = unique_name()
    register_model(client, name, source, run_id, tags={})
    uri = client.tracking_uri
    for model, message in (
        (f"models:/{name}@champion", f"registered model '{name}' has no champion"),
        (f"models:/{name}-gone@champion", f"'{name}-gone' does not exist, so it has no champion"),
        (f"models:/{name}/7", f"Model Version (name={name}, version=7) not found"),
        (f"models:/{name}/latest", "not a model URI; give a checkpoint path"),
        ("runs:/0123456789abcdef0123456789abcdef/model", "Run with id=0123456789abcdef0123456789abcdef"),
        (f"runs:/{run_id}/nothing-here", f"nothing at runs:/{run_id}/nothing-here"),
        (f"models:/{name}/1", "a model without a 'checkpoint' artifact (not a captioner)"),
    ):
        with pytest.raises(RegistryError, match="^" + re.escape(f"{model}: ")) as caught:
            model_uri.resolve_model(model, tracking_uri=uri, dst=str(tmp_path))
        assert message in str(caught.value) and "\n" not in str(caught.value)
