"""The test scores of the latest pipeline run, read back from MLflow; the project's one score table.

    python -m captioning.tracking.report             # experiment show-attend-tell at MLFLOW_TRACKING_URI
    python -m captioning.tracking.report --experiment NAME --run-id ID

A pipeline run (``train-sat``) logs ``<stage>/test_<metric>`` for each stage and ``test_<metric>``
for the best one on its parent run; the registered model's aliases say which version serves.
``make demo`` prints this report last. ``scores_table`` is the one score formatter: this report,
``captioning demo`` and the flows print their scores with it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
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


def main(argv: Sequence[str] | None = None) -> int:
    from captioning.registry import CHAMPION, champion
    from captioning.tracking import TrackingUnavailable
    from captioning.tracking.client import connect

    p = argparse.ArgumentParser(
        prog="python -m captioning.tracking.report", description=__doc__.split("\n")[0]
    )
    p.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI")
    p.add_argument("--experiment", default="show-attend-tell")
    p.add_argument("--registered-model", default="show-attend-tell")
    p.add_argument("--run-id", help="a pipeline run (default: the latest one)")
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
    try:
        found = champion(client, args.registered_model)
    except Exception as exc:  # a registry without the model, or a champion with no score tag
        found = None
        print(f"registry: {exc}")
    if found is not None:
        print(f"{args.registered_model}@{CHAMPION}: version {found[0]} (test CIDEr {found[1]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
