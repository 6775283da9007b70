"""``python -m captioning.tracking.report``: the latest pipeline run's stage scores, read back from MLflow,
the one score table, and the champion with the commands that caption with it and serve it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from s3server import free_port
from test_caption_cli import write_image, write_tiny_checkpoint

from captioning.inference import caption_images
from captioning.registry import promote_if_better, register_model
from captioning.serving import log_pyfunc
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


def test_report_ends_with_the_champion_and_commands_that_run_as_printed(
    mlflow_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], subprocess_tree: None
) -> None:
    client = MlflowClient(mlflow_server.url)
    name = f"report-{uuid.uuid4().hex[:8]}"
    experiment = client.create_experiment(name)
    raw = tmp_path / "raw" / "images"
    raw.mkdir(parents=True)
    image = write_image(raw / "b.png", seed=3)
    write_image(raw / "c.jpg", seed=4)
    parent = client.create_run(experiment, tags={"orchestrator": "prefect"}, run_name="pipeline").info.run_id
    client.log_param(parent, "data.raw_dir", str(tmp_path / "raw"))
    client.log_metric(parent, "scst/test_CIDEr", 0.75)
    stage = client.create_run(experiment, tags={"mlflow.parentRunId": parent}, run_name="scst").info.run_id
    for metric, value in {"CIDEr": 0.75, "BLEU-4": 0.25}.items():
        client.log_metric(stage, f"test/{metric}", value)
    checkpoint = write_tiny_checkpoint(tmp_path / "model.pt")
    version = register_model(
        client, name, log_pyfunc(client, stage, checkpoint), stage, tags={"stage": "scst"}
    )
    promote_if_better(client, name, version, 0.75)

    argv = ["--tracking-uri", mlflow_server.url, "--experiment", name, "--registered-model", name]
    assert report.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    start = out.index(f"{name}@champion: version 1 (stage scst, run scst ({stage}))")
    assert out[start + 1] == "test scores of version 1's stage:"
    assert out[start + 4].startswith("| v1 |") and "0.7500" in out[start + 4] and "0.2500" in out[start + 4]
    assert out[start + 5] == "registry scores: test_CIDEr 0.7500"
    env = f"MLFLOW_TRACKING_URI={mlflow_server.url}"
    caption = out[start + 7].strip()
    command = os.path.relpath(Path(sys.executable).parent / "captioning")  # this venv's, from here
    assert caption == f"{env} {command} caption {image} --checkpoint models:/{name}@champion"
    serve = out[start + 9].strip()
    assert serve == f"{env} {command} serve models:/{name}@champion --port 5001"
    curl = out[start + 10].strip()
    assert curl.startswith("curl -s localhost:5001/invocations") and out[-1] == out[start + 10]

    # The caption command, run as printed by a shell without MLFLOW_TRACKING_URI, captions the image.
    shell_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(["bash", "-c", caption], env=shell_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = caption_images([image], checkpoint, device="cpu")[0]["caption"]
    assert done.stdout == f"{image}: {expected}\n"
    # So do the serve command and the curl, run as printed (port 5001 made free for them).
    port = str(free_port())
    serve, curl = serve.replace("5001", port), curl.replace("5001", port)
    server = subprocess.Popen(["bash", "-c", serve], env=shell_env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            asked = subprocess.run(["bash", "-c", curl], env=shell_env, capture_output=True, text=True)
            if asked.stdout:
                break
            assert server.poll() is None and time.monotonic() < deadline, "the printed serve command failed"
            time.sleep(0.5)
        assert json.loads(asked.stdout) == {"predictions": [{"caption": expected}]}
    finally:  # the shell and the server it started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_report_without_a_champion_says_so(mlflow_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    client = MlflowClient(mlflow_server.url)
    name = f"report-{uuid.uuid4().hex[:8]}"
    run = client.create_run(client.create_experiment(name), tags={"orchestrator": "prefect"}).info.run_id
    client.set_terminated(run)
    assert (
        report.main(["--tracking-uri", mlflow_server.url, "--experiment", name, "--registered-model", name])
        == 0
    )
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"registry: {name!r} has no champion yet (the train-sat flow registers one)"
    )
