"""The test scores of the latest pipeline run, read back from MLflow: what ``make demo`` prints last.

    python -m captioning.report                      # experiment show-attend-tell at MLFLOW_TRACKING_URI
    python -m captioning.report --experiment NAME --run-id ID

A pipeline run (``train-sat``) logs ``<stage>/test_<metric>`` for each stage and ``test_<metric>``
for the best one on its parent run; the registered model's aliases say which version serves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from captioning.evaluation.metrics import METRICS


def stage_scores(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"xe/test_CIDEr": 1.2}`` -> ``{"xe": {"CIDEr": 1.2}}``, stages in pipeline order."""
    from captioning.train import STAGE_ORDER

    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        stage, _, name = key.partition("/test_")
        if name:
            rows.setdefault(stage, {})[name] = value
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return dict(sorted(rows.items(), key=lambda kv: order.get(kv[0], len(order))))


def format_table(rows: dict[str, dict[str, float]]) -> str:
    lines = [f"{'stage':<10}" + "".join(f"{m:>9}" for m in METRICS)]
    for stage, scores in rows.items():
        lines.append(
            f"{stage:<10}" + "".join(f"{scores[m]:>9.4f}" if m in scores else f"{'-':>9}" for m in METRICS)
        )
    return "\n".join(lines)


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
    from captioning.mlflow_tracker import TrackingUnavailable, connect
    from captioning.registry import CHAMPION, champion

    p = argparse.ArgumentParser(prog="python -m captioning.report", description=__doc__.split("\n")[0])
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
    print(format_table(rows) if rows else "(no stage finished)")
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
