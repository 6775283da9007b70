"""The Prefect flows against a real (temporary) Prefect server and a real MLflow server.

train-sat end to end on the synthetic dataset with tiny settings: shards written by mapped tasks,
three stages each launched as torchrun with 2 gloo processes, scores in MLflow under the flow's
parent run, the best stage registered as champion; prepare-data again does no work; retrain on a
newly landed dataset builds shards for it alone, fine-tunes the champion on the old and the new
training shards and gates the promotion on both holdouts.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from test_train import TINY, data_overrides

from captioning import storage
from captioning.data.synthetic import generate_synthetic
from captioning.model.checkpoint import load_checkpoint
from captioning.registry import RegistryError


@pytest.fixture(scope="module")
def setup(
    prefect_server: None, mlflow_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("flows")
    name = f"flows-{uuid.uuid4().hex[:8]}"
    overrides = [
        *data_overrides(root),
        *TINY,
        f"--storage.run_dir={root / 'runs'}",
        f"--tracking.experiment={name}",
        f"--tracking.registered_model={name}",
    ]
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.url
    yield {"root": root, "overrides": overrides, "name": name, "client": MlflowClient(mlflow_server.url)}
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def task_runs(flow_run_id: Any) -> list[Any]:
    """Task runs of a flow run, as the server recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_train_sat_end_to_end(setup: dict[str, Any]) -> None:
    from flows.train_sat import train_sat

    state = train_sat(recipe="demo", overrides=setup["overrides"], return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    setup["train"] = result

    # Shards: written by the prepare-data subflow's mapped write-shards tasks.
    shard_dir = setup["root"] / "shards"
    manifest = storage.read_json(str(shard_dir / "manifest.json"))
    assert manifest["splits"]["train"]["num_samples"] == 96 and len(manifest["shards"]) == 6

    # Three stages, each its own torchrun launch with 2 processes, each tested.
    assert [s["stage"] for s in result["stages"]] == ["xe", "finetune", "scst"]
    output = Path(result["output"])
    for stage in result["stages"]:
        assert Path(stage["checkpoint"]).is_file() and stage["world_size"] == 2
        assert set(stage["test_scores"]) >= {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
        assert storage.read_json(str(output / stage["stage"] / "result.json")) == stage
    names = [t.name for t in task_runs(state.state_details.flow_run_id)]
    assert {"train-xe", "train-finetune", "train-scst"} <= set(names)
    assert any(n.startswith("register-model") for n in names)

    # MLflow: the flow's parent run holds the description and the final scores; one child per stage.
    client: MlflowClient = setup["client"]
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["recipe"] == "demo" and parent.data.params["train.xe.epochs"] == "1"
    assert parent.data.tags["best_stage"] == result["best_stage"]
    assert parent.data.tags["stages"] == "xe,finetune,scst"
    assert parent.data.metrics["test_CIDEr"] == pytest.approx(result["test_scores"]["CIDEr"])
    experiment = client.get_experiment_by_name(setup["name"])
    assert experiment is not None
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {r.info.run_name: r for r in children}
    assert {"xe", "finetune", "scst"} <= set(by_name)
    for stage in result["stages"]:
        assert by_name[stage["stage"]].info.run_id == stage["run_id"]
        assert by_name[stage["stage"]].info.status == "FINISHED"

    # Registry: the best stage's model is version 1 and, being the first, the champion.
    registered = result["registered"]
    assert registered["version"] == "1" and registered["alias"] == "champion" and registered["promoted"]
    version = client.get_model_version_by_alias(setup["name"], "champion")
    assert version.run_id == next(s["run_id"] for s in result["stages"] if s["stage"] == result["best_stage"])


def test_prepare_data_again_does_no_work(setup: dict[str, Any]) -> None:
    from flows.prepare_data import prepare_data

    shard_dir = setup["root"] / "shards"
    before = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    state = prepare_data(recipe="demo", overrides=setup["overrides"], return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["rebuilt"] is False and summary["num_built"] == 0
    assert summary["samples"] == {"train": 96, "val": 12, "test": 10}
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()} == before  # nothing rewritten
    names = {t.name.rsplit("-", 1)[0] for t in task_runs(state.state_details.flow_run_id)}
    assert "check-shards" in names and not names & {"plan-shards", "write-shards", "finish-shards"}

    # A shard that went missing is noticed: the build runs again and rebuilds only that shard.
    (shard_dir / "train-000001.tar").unlink()
    summary = prepare_data(recipe="demo", overrides=setup["overrides"])
    assert summary["rebuilt"] is True and summary["num_built"] == 1 and summary["num_skipped"] == 5


def test_train_sat_rerun_with_the_same_output_launches_nothing(setup: dict[str, Any]) -> None:
    from flows.train_sat import train_sat

    first = setup["train"]
    output = Path(first["output"])
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file()}
    again = train_sat(
        recipe="demo",
        overrides=setup["overrides"],
        output=first["output"],
        prepare=False,
        register_best=False,
    )
    assert again["stages"] == first["stages"]  # every stage's recorded result, none launched again
    assert again["test_scores"] == first["test_scores"] and again["registered"] is None
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*") if p.is_file()} == before


def test_evaluate_flow_scores_a_registered_model_and_a_checkpoint(setup: dict[str, Any]) -> None:
    from flows.evaluate import evaluate_model

    best = next(s for s in setup["train"]["stages"] if s["stage"] == setup["train"]["best_stage"])
    by_model = evaluate_model(
        source=f"models:/{setup['name']}@champion", recipe="demo", overrides=setup["overrides"]
    )
    by_path = evaluate_model(source=best["checkpoint"], recipe="demo", overrides=setup["overrides"])
    assert by_model["num_images"] == by_path["num_images"] == 10
    # The registered model packs the best stage's checkpoint: same captions, same scores.
    assert by_model["scores"] == pytest.approx(by_path["scores"])
    assert by_path["scores"] == pytest.approx(best["test_scores"])  # as the stage's own test evaluation
    client: MlflowClient = setup["client"]
    run = client.get_run(by_model["mlflow_run_id"])
    assert run.data.tags["kind"] == "evaluation" and run.data.tags["split"] == "test"
    assert run.data.metrics["CIDEr"] == pytest.approx(by_model["scores"]["CIDEr"])


def test_prepare_data_publishes_finished_shards_to_s3(setup: dict[str, Any], s3_env: str) -> None:
    from flows.prepare_data import prepare_data

    destination = f"{s3_env}/shards"
    summary = prepare_data(recipe="demo", overrides=setup["overrides"], publish_to=destination)
    assert summary["rebuilt"] is False and summary["shard_dir"] == destination
    local = sorted(p.name for p in (setup["root"] / "shards").iterdir() if p.is_file())
    published = sorted(uri.rsplit("/", 1)[-1] for uri in storage.list_files(destination))
    assert published == local and summary["published"]["copied"] == len(local)
    assert storage.read_json(f"{destination}/manifest.json") == storage.read_json(
        str(setup["root"] / "shards" / "manifest.json")
    )


def test_a_stage_from_the_cli_equals_the_same_stage_from_the_flow(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    """One driver: `captioning train` and train-sat launch the same stage the same way (same seed, same
    world size), so their checkpoints are identical."""
    from captioning.cli import main as cli_main

    flow_output = Path(setup["train"]["output"])
    cli_output = tmp_path / "cli-run"
    argv = ["train", "--recipe", "demo", "--stages", "xe", "--no-register", "--output", str(cli_output)]
    assert cli_main([*argv, *setup["overrides"]]) == 0
    for name in ("best.pt", "last.pt"):
        a, b = (load_checkpoint(str(folder / "xe" / name)) for folder in (flow_output, cli_output))
        assert a.keys() == b.keys() and a["step"] == b["step"]
        assert a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        assert a["config"] == b["config"]
    a, b = (load_checkpoint(str(folder / "xe" / "last.pt")) for folder in (flow_output, cli_output))
    assert a["train_state"] == b["train_state"]
    flow_xe = storage.read_json(str(flow_output / "xe" / "result.json"))
    cli_xe = storage.read_json(str(cli_output / "xe" / "result.json"))
    assert cli_xe["test_scores"] == flow_xe["test_scores"] and cli_xe["history"] == flow_xe["history"]


def test_shards_built_by_the_cli_are_up_to_date_for_the_prepare_data_flow(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    """One build key: `captioning shards` records what prepare-data checks, so the flow does no work."""
    from captioning.cli import main as cli_main
    from flows.prepare_data import prepare_data

    shard_dir = tmp_path / "cli-shards"
    kept = [o for o in setup["overrides"] if not o.startswith("--data.shard_dir=")]
    overrides = [*kept, f"--data.shard_dir={shard_dir}"]
    assert cli_main(["shards", "--recipe", "demo", "--no-progress", *overrides]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()}
    state = prepare_data(recipe="demo", overrides=overrides, return_state=True)
    summary = state.result()
    assert summary["rebuilt"] is False and summary["shard_dir"] == str(shard_dir)
    names = {t.name.rsplit("-", 1)[0] for t in task_runs(state.state_details.flow_run_id)}
    assert "check-shards" in names and not names & {"plan-shards", "write-shards", "finish-shards"}
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.iterdir()} == before


# Last: retraining may move the champion, which the tests above evaluate as train-sat left it.
def test_retrain_reads_old_and_new_shards_builds_only_new_ones_and_gates_on_both_holdouts(
    setup: dict[str, Any],
) -> None:
    from captioning.data.epoch import plan_epoch
    from captioning.data.format import read_holdout, read_split_sizes
    from captioning.evaluation.holdouts import Holdout, HoldoutScores, decide
    from flows.retrain import retrain

    old = setup["root"] / "shards"
    before = {p.name: p.stat().st_mtime_ns for p in old.iterdir()}
    drop = setup["root"] / "inbox" / "batch-1"
    generate_synthetic(drop, num_train=48, num_val=8, num_test=8, image_size=64, seed=7, make_archives=False)
    result = retrain(
        karpathy_json=str(drop / "dataset_coco.json"),
        recipe="demo",
        overrides=setup["overrides"],
    )
    assert result["champion_before"] == "1"

    # Shards were built for the new data only: the original build is untouched.
    data = result["data"]
    assert data["samples"] == {"train": 48, "val": 8, "test": 8}
    assert data["rebuilt"] is True and data["num_built"] > 0 and data["shard_dir"] != str(old)
    assert {p.name: p.stat().st_mtime_ns for p in old.iterdir()} == before

    # Training read both builds' train splits (96 + 48 images): the stage's steps are the batches
    # of one epoch planned over both, not over the new 48 alone.
    both = read_split_sizes(data["shard_dir"], "train", extra=[str(old)])
    assert sum(both.values()) == 144

    def batches(sizes: dict[str, int]) -> int:  # per rank in one epoch (TINY: batch 8, 1 worker, 2 ranks)
        plan = plan_epoch(sizes, train=True, batch_size=8, num_workers=1, world_size=2, seed=0, epoch=0)
        return plan.batches_for_rank(0)

    new_only = read_split_sizes(data["shard_dir"], "train")
    assert result["outcome"]["steps"] == batches(both) > batches(new_only)

    # Champion and retrained version scored on the same two identified holdouts.
    original, new = read_holdout(str(old)), read_holdout(data["shard_dir"])
    assert result["holdouts"]["original"]["holdout_id"] == original["id"]
    assert result["holdouts"]["new"]["holdout_id"] == new["id"]
    scores = result["scores"]
    client: MlflowClient = setup["client"]
    v1 = client.get_model_version(setup["name"], "1").tags
    # The same holdout as version 1's own test evaluation in train-sat: the same score.
    assert scores["champion"]["original"]["CIDEr"] == pytest.approx(float(v1["test_CIDEr"]))

    # The gate's decision follows the rule on those scores, and every score is on version 2.
    registered = result["registered"]
    assert registered["version"] == "2" and registered["previous_champion"] == "1"
    holdout = {k: Holdout(k, "", "test", v["id"], v["num_images"]) for k, v in (("o", original), ("n", new))}
    expected = decide(
        HoldoutScores(
            holdout["o"], scores["champion"]["original"]["CIDEr"], scores["retrained"]["original"]["CIDEr"]
        ),
        HoldoutScores(holdout["n"], scores["champion"]["new"]["CIDEr"], scores["retrained"]["new"]["CIDEr"]),
        tolerance=0.01,
    )
    assert registered["promoted"] is expected.promote
    assert registered["alias"] == ("champion" if expected.promote else "challenger")
    assert client.get_model_version_by_alias(setup["name"], registered["alias"]).version == "2"
    tags = client.get_model_version(setup["name"], "2").tags
    assert tags["retrained_from"] == "1" and tags["stage"] == "finetune" and tags["retrain_on"] == "all"
    assert tags["test_holdout_id"] == original["id"] and tags["new_test_holdout_id"] == new["id"]
    assert float(tags["test_CIDEr"]) == pytest.approx(scores["retrained"]["original"]["CIDEr"])
    assert float(tags["new_test_CIDEr"]) == pytest.approx(scores["retrained"]["new"]["CIDEr"])
    assert float(tags["gate_champion_test_CIDEr"]) == pytest.approx(scores["champion"]["original"]["CIDEr"])
    assert float(tags["gate_champion_new_test_CIDEr"]) == pytest.approx(scores["champion"]["new"]["CIDEr"])
    assert tags["gate"] == ("promoted" if expected.promote else "not promoted")
    assert tags["gate_reason"] == registered["reason"] and registered["reason"].startswith(
        expected.reason[:12]
    )

    # One MLflow evaluation run per model and holdout, named after both, under the retrain run.
    experiment = client.get_experiment_by_name(setup["name"])
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'"
    )
    by_name = {r.info.run_name: r for r in runs}
    for version, role in (("1", "champion"), ("2", "retrained")):
        for which, label, found in (("original", "synthetic", original), ("new", "batch-1", new)):
            run = by_name[f"v{version} on {label}-test:{found['id'][:6]}"]
            assert run.data.tags["holdout_id"] == found["id"] and run.data.tags["model_version"] == version
            assert run.data.metrics["CIDEr"] == pytest.approx(scores[role][which]["CIDEr"])


def test_retrain_without_a_champion_fails_clearly(setup: dict[str, Any]) -> None:
    from flows.retrain import retrain

    drop = setup["root"] / "inbox" / "batch-1"
    state = retrain(
        karpathy_json=str(drop / "dataset_coco.json"),
        recipe="demo",
        overrides=[
            *[o for o in setup["overrides"] if not o.startswith("--tracking.registered_model")],
            f"--tracking.registered_model=none-{uuid.uuid4().hex[:6]}",
        ],
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(RegistryError, match="has no champion"):
        state.result()
