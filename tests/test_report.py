"""``python -m captioning.tracking.report``: the latest pipeline run's stage scores, read back from MLflow,
and the one score table."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from mlflow import MlflowClient

from captioning.tracking import report


def test_stage_scores_groups_per_stage_in_pipeline_order() -> None:
    rows = report.stage_scores(
        {
            "scst/test_CIDEr": 1.5,
            "xe/test_CIDEr": 1.0,
            "xe/test_BLEU-4": 0.3,
            "test_CIDEr": 1.5,
            "val/CIDEr": 2,
        }
    )
    assert list(rows) == ["xe", "scst"]
    assert rows["xe"] == {"CIDEr": 1.0, "BLEU-4": 0.3}
    table = report.scores_table(rows)
    assert table.splitlines()[2].split()[:2] == ["|", "xe"] and "1.5000" in table and "-" in table


def test_scores_table() -> None:
    rows = {"xe": {"CIDEr": 1.23456, "BLEU-4": 0.5}, "scst": {"CIDEr": 2.0}}
    table = report.scores_table(rows, ["BLEU-4", "CIDEr", "METEOR"])
    assert table.splitlines() == [
        "| | BLEU-4 | CIDEr | METEOR |",
        "|---|---|---|---|",
        "| xe | 0.5000 | 1.2346 | - |",
        "| scst | - | 2.0000 | - |",
    ]
    header = report.scores_table({}).splitlines()[0]  # default: every metric the evaluator reports
    assert header == "| | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr |"


def test_report_prints_the_latest_pipeline_run(
    mlflow_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    client = MlflowClient(mlflow_server.url)
    name = f"report-{uuid.uuid4().hex[:8]}"
    experiment = client.create_experiment(name)
    for cider in (0.5, 0.9):  # the second (latest) run is the one reported
        run = client.create_run(experiment, tags={"orchestrator": "prefect"}, run_name=f"run-{cider}")
        client.log_metric(run.info.run_id, "xe/test_CIDEr", cider)
        client.log_metric(run.info.run_id, "scst/test_CIDEr", cider + 1)
        client.set_terminated(run.info.run_id)
    code = report.main(
        ["--tracking-uri", mlflow_server.url, "--experiment", name, "--registered-model", name]
    )
    out = capsys.readouterr().out
    assert code == 0 and "run-0.9" in out and "1.9000" in out and "0.5000" not in out
    assert report.main(["--tracking-uri", mlflow_server.url, "--experiment", f"{name}-none"]) == 1
