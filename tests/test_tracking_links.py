"""captioning/tracking/links.py: MLflow UI addresses that open on training runs, and the flows' link lines."""

from __future__ import annotations

from typing import Any

from mlflow import MlflowClient
from s3server import free_port

from captioning.tracking.links import (
    TRAINING_VIEW,
    experiment_url,
    model_version_url,
    run_links_markdown,
    run_url,
    ui_base,
)


def test_addresses_open_the_training_view_without_credentials() -> None:
    uri = "https://alice:secret@mlflow.example.org:8443/prefix/"
    assert ui_base(uri) == "https://mlflow.example.org:8443/prefix"
    assert (
        experiment_url(uri, "7")
        == f"https://mlflow.example.org:8443/prefix/#/experiments/7/runs?{TRAINING_VIEW}"
    )
    assert run_url("http://127.0.0.1:5000", "7", "abc") == (
        "http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    )
    assert run_url("http://h", "7", "abc", tab="artifacts/attention/epoch 1/3.png") == (
        f"http://h/#/experiments/7/runs/abc/artifacts/attention/epoch%201/3.png?{TRAINING_VIEW}"
    )
    assert (
        model_version_url("http://h", "my model/x", 3)
        == f"http://h/#/models/my%20model%2Fx/versions/3?{TRAINING_VIEW}"
    )
    for no_ui in (None, "", "sqlite:///mlflow.db", "file:///tmp/mlruns", "databricks"):
        assert ui_base(no_ui) is None and experiment_url(no_ui, "1") is None


def test_link_lines_without_a_server_name_the_run_and_model() -> None:
    text = run_links_markdown("sqlite:///x.db", "r1", {"name": "sat", "version": "4", "alias": "challenger"})
    assert text.splitlines() == [
        "- MLflow run: r1 (`r1`)",
        "- registered model: sat version 4 (challenger), `models:/sat/4`",
    ]
    assert run_links_markdown(None, "r1", None) == "- MLflow run: r1 (`r1`)"


def test_an_unreachable_server_costs_only_the_links() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    text = run_links_markdown(uri, "r1", {"name": "sat", "version": "2", "alias": "champion"})
    assert text.splitlines()[0] == "- MLflow run: r1 (`r1`)"
    assert f"[sat version 2]({uri}/#/models/sat/versions/2?{TRAINING_VIEW}) (champion)" in text


def test_link_lines_point_at_the_run_its_experiment_and_the_version(mlflow_server: Any) -> None:
    client = MlflowClient(mlflow_server.url)
    experiment_id = client.create_experiment(f"links-{free_port()}")
    run = client.create_run(experiment_id, run_name="demo-brave-fox")
    text = run_links_markdown(
        mlflow_server.url, run.info.run_id, {"name": "sat", "version": "1", "alias": None}
    )
    base = mlflow_server.url
    assert text.splitlines() == [
        f"- MLflow run: [demo-brave-fox]({base}/#/experiments/{experiment_id}/runs/{run.info.run_id}?"
        f"{TRAINING_VIEW}) (`{run.info.run_id}`)",
        f"- all runs of the experiment: [runs list]({base}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW})",
        f"- registered model: [sat version 1]({base}/#/models/sat/versions/1?{TRAINING_VIEW}), `models:/sat/1`",
    ]
