"""The test scores of the latest pipeline run and the champion, read back from MLflow; the one score table.

    python -m captioning.tracking.report             # experiment show-attend-tell at MLFLOW_TRACKING_URI
    python -m captioning.tracking.report --experiment NAME --run-id ID --image photo.jpg

A pipeline run (``train-sat``) logs ``<stage>/test_<metric>`` for each stage and ``test_<metric>``
for the best one on its parent run; the registered model's aliases say which version serves. The
report ends with the champion: its version, stage and run, its run's test scores and the scores the
registry records (holdouts included), then the exact commands to caption an image with
``models:/NAME@champion`` and to serve it (``champion_lines``). The image is ``--image``, else the
first image under the pipeline run's ``data.raw_dir``. ``make demo`` prints this report last.
``scores_table`` is the one score formatter: this report, ``captioning demo`` and the flows print
their scores with it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from captioning.config import STAGES
from captioning.evaluation.metrics import METRICS


def scores_table(rows: Mapping[str, Mapping[str, float]], metrics: Sequence[str] | None = None) -> str:
    """A Markdown table: one row per name (stage, model), one column per metric (default: ``METRICS``)."""
    cols = list(metrics or METRICS)
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, scores in rows.items():
        cells = [f"{scores[m]:.4f}" if m in scores else "-" for m in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_scores(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"xe/test_CIDEr": 1.2}`` -> ``{"xe": {"CIDEr": 1.2}}``, stages in pipeline order."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        stage, _, name = key.partition("/test_")
        if name:
            rows.setdefault(stage, {})[name] = value
    order = {s: i for i, s in enumerate(STAGES)}
    return dict(sorted(rows.items(), key=lambda kv: order.get(kv[0], len(order))))


def latest_pipeline_run(client: Any, experiment: str) -> Any:
    """The newest run of ``experiment`` that the orchestrator created (tag orchestrator=prefect)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string="tags.orchestrator = 'prefect'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def example_image(raw_dir: str | None) -> str | None:
    """An image under ``raw_dir`` for a caption command that runs as printed: the first by path, one
    outside a training folder where there is one."""
    if not raw_dir or not os.path.isdir(raw_dir):
        return None
    found = [p for p in Path(raw_dir).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    return (
        str(min(found, key=lambda p: ("train" in p.name or "train" in p.parent.name, str(p))))
        if found
        else None
    )


def _command(name: str) -> str:
    """``name`` as this interpreter's environment has it: ``.venv/bin/name`` (relative when under the
    working folder) where it is there, else the bare name (from PATH)."""
    path = os.path.join(os.path.dirname(sys.executable), name)  # not resolved: a venv's python is a link
    if not os.path.exists(path):
        return name
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else path


def usage_lines(model_uri: str, tracking_uri: str, image: str | None, *, port: int = 5001) -> list[str]:
    """The commands that caption an image with ``model_uri`` and serve it, exactly as they run."""
    from captioning.tracking.client import redact

    env = f"MLFLOW_TRACKING_URI={shlex.quote(redact(tracking_uri))}"
    shown = shlex.quote(image) if image else "IMAGE"
    body = '{"dataframe_split": {"columns": ["image"], "data": [["\'"$(base64 -w0 ' + shown + ')"\'"]]}}'
    return [
        "caption an image with it" + ("" if image else " (IMAGE: any .jpg or .png)") + ":",
        f"  {env} {_command('captioning')} caption {shown} --checkpoint {model_uri}",
        "serve it (and ask it from another terminal):",
        f"  {env} {_command('captioning')} serve {model_uri} --port {port}",
        f"  curl -s localhost:{port}/invocations -H 'Content-Type: application/json' -d '{body}'",
    ]


def champion_lines(client: Any, model_name: str, *, image: str | None = None) -> list[str]:
    """The champion of ``model_name``: version, stage, run, test scores, and the commands to use it."""
    from mlflow.exceptions import MlflowException

    from captioning.registry import CHAMPION

    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return [f"registry: {model_name!r} has no {CHAMPION} yet (the train-sat flow registers one)"]
    tags = dict(version.tags)
    run = client.get_run(version.run_id) if version.run_id else None
    where = f"stage {tags['stage']}, " if "stage" in tags else ""
    run_name = f"run {run.info.run_name} ({run.info.run_id})" if run else "no run"
    lines = [f"{model_name}@{CHAMPION}: version {version.version} ({where}{run_name})"]
    scores = {
        k.removeprefix("test/"): v
        for k, v in (run.data.metrics if run else {}).items()
        if k.startswith("test/")
    }
    if scores:  # its stage's own test evaluation: the test split of the data it was trained on
        on = f" on {tags['new_test_holdout']}" if "new_test_holdout" in tags else ""
        lines += [
            f"test scores of version {version.version}'s stage{on}:",
            scores_table({f"v{version.version}": scores}),
        ]
    recorded = _recorded_scores(tags)
    if recorded:
        lines.append("registry scores: " + ", ".join(recorded))
    uri = f"models:/{model_name}@{CHAMPION}"
    return lines + usage_lines(uri, client.tracking_uri, image)


def _recorded_scores(tags: Mapping[str, str]) -> list[str]:
    """The version's score tags (``test_CIDEr``; ``new_test_CIDEr`` from the retraining gate), each
    with the holdout it was scored on where the tags name one."""
    out = []
    for key, value in sorted(tags.items(), key=lambda kv: (kv[0].startswith("new_"), kv[0])):
        prefix, found, metric = key.partition("test_")
        if not found or prefix not in ("", "new_") or metric in ("holdout", "holdout_id"):
            continue
        try:
            score = float(value)
        except ValueError:
            continue
        holdout = tags.get(f"{prefix}test_holdout")
        out.append(f"{key} {score:.4f}" + (f" on {holdout}" if holdout else ""))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from captioning.tracking import TrackingUnavailable
    from captioning.tracking.client import connect
    from captioning.tracking.links import run_url

    p = argparse.ArgumentParser(
        prog="python -m captioning.tracking.report", description=__doc__.split("\n")[0]
    )
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI")
    p.add_argument("--experiment", default="show-attend-tell")
    p.add_argument("--registered-model", default="show-attend-tell")
    p.add_argument("--run-id", help="a pipeline run (default: the latest one)")
    p.add_argument(
        "--image", help="the image of the printed caption command (default: one of the run's data)"
    )
    args = p.parse_args(argv)
    try:
        client = connect(args.tracking_uri)
    except TrackingUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run = client.get_run(args.run_id) if args.run_id else latest_pipeline_run(client, args.experiment)
    if run is None:
        print(f"no pipeline run in experiment {args.experiment!r} at {client.tracking_uri}", file=sys.stderr)
        return 1
    rows = stage_scores(dict(run.data.metrics))
    print(f"test scores of run {run.info.run_name} ({run.info.run_id}, {run.info.status}):")
    print(scores_table(rows) if rows else "(no stage finished)")
    page = run_url(client.tracking_uri, run.info.experiment_id, run.info.run_id)
    if page:  # opens on the model-training view (see tracking/links.py)
        print(f"in the MLflow UI: {page}")
    image = args.image or example_image(run.data.params.get("data.raw_dir"))
    print("\n".join(champion_lines(client, args.registered_model, image=image)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
