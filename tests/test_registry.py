"""The champion gate against a real MLflow server: versions, score tags, aliases, ties.

Registration does not look inside the source, so every version here points at one tiny run artifact;
``tests/test_serving.py`` registers and loads a real pyfunc model.
"""

from __future__ import annotations

import uuid

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from captioning.registry import CHALLENGER, CHAMPION, Promotion, champion, promote_if_better, register_model
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


def test_a_source_from_another_run_is_refused(client: MlflowClient, run_source: tuple[str, str]) -> None:
    run_id, source = run_source
    other = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    with pytest.raises(MlflowException, match="Invalid model version source"):
        register_model(client, unique_name(), source, other, tags={})
