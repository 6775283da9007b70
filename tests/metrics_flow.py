"""A short flow for tests/test_postgres.py's concurrency check: one MLflow run, ``tasks`` mapped task
runs that each log ``steps`` values of their own metric into it, then the run is ended.

    python tests/metrics_flow.py NAME TASKS STEPS    # PREFECT_API_URL and MLFLOW_TRACKING_URI set
"""

from __future__ import annotations

import sys

from prefect import flow, task


@task(retries=0)
def log_series(run_id: str, index: int, steps: int) -> int:
    from mlflow import MlflowClient

    client = MlflowClient()
    for step in range(steps):
        client.log_metric(run_id, f"series_{index}", float(index * 1000 + step), step=step)
    return steps


@flow(name="record-metrics")
def record_metrics(name: str, tasks: int, steps: int) -> str:
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("concurrency") or None
    experiment_id = experiment.experiment_id if experiment else _create_experiment(client, "concurrency")
    run = client.create_run(experiment_id, run_name=name)
    logged = log_series.map(run.info.run_id, range(tasks), steps).result()
    client.log_metric(run.info.run_id, "logged", float(sum(logged)))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _create_experiment(client: object, name: str) -> str:
    """Several flow runs create the experiment at once: whoever loses the race reads the winner's."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.create_experiment(name))  # type: ignore[attr-defined]
    except MlflowException:
        return str(client.get_experiment_by_name(name).experiment_id)  # type: ignore[attr-defined]


if __name__ == "__main__":
    print(record_metrics(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
