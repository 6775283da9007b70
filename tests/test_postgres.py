"""PostgreSQL behind the stack's Prefect and MLflow servers (`captioning stack up --db postgres`).

The stack starts a local cluster in its state folder (loopback, a generated password), both servers
keep everything there (no SQLite file appears), `train-sat` runs end to end through a deployment and
the worker, and what it did is read back by SQL; four flow runs at once lose no run, task state or
metric; `down` keeps the data and the next `up` finds it. Existing servers are taken by URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from leftovers import owned_by_fixture
from s3server import free_port
from test_deployments import deploy
from test_train import TINY, data_overrides

from captioning.services import postgres
from captioning.services.postgres import LocalPostgres, PostgresError, PostgresTarget, redact
from captioning.services.stack import LocalStack
from captioning.services.stack_settings import COMPONENTS, POSTGRES, StackError, StackSettings, load_settings

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


def _needs_postgres() -> None:
    try:
        postgres.pg_bin_dir()
    except PostgresError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The local stack on a local PostgreSQL, with train-sat/demo deployed."""
    _needs_postgres()
    root = tmp_path_factory.mktemp("postgres")
    local = LocalStack(
        StackSettings(
            state_dir=root / "stack",
            prefect_port=free_port(),
            mlflow_port=free_port(),
            postgres_port=free_port(),
            db="postgres",
            workdir=REPO,
        )
    )
    try:
        env = {**os.environ, **local.up(timeout_s=240), "CAPTIONING_HOME": str(REPO)}
        own_components(local)
        record = json.loads(local.json_path.read_text())
        yield {"root": root, "env": env, "stack": local, "record": record}
    finally:
        local.down()


def own_components(local: LocalStack) -> None:
    """The stack's processes are the fixture's to stop, PostgreSQL's per-connection backends included
    (they start whenever a client connects, during any test)."""
    for component in COMPONENTS:
        if (pid := local.running_pid(component)) is not None:
            owned_by_fixture(pid)


def sql(stack: dict[str, Any], database: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    s = stack["stack"].settings
    target = PostgresTarget(s.host, s.postgres_port, postgres.SUPERUSER)
    password = stack["record"]["db_password"]
    with contextlib.closing(target.connect(password, database)) as conn, conn.cursor() as cur:
        cur.execute(query, args)
        return list(cur.fetchall())


def test_the_cluster_is_private_loopback_and_password_only(stack: dict[str, Any]) -> None:
    state = stack["stack"].state_dir
    record = stack["record"]
    assert record["settings"]["db"] == "postgres"
    assert set(record["databases"]) == {"prefect", "mlflow"}
    assert all(record["db_password"] not in url for url in record["databases"].values())
    assert (state / "postgres" / "data").stat().st_mode & 0o077 == 0
    assert (state / "stack.json").stat().st_mode & 0o077 == 0
    # Both servers hold their state in PostgreSQL: no SQLite database in the state folder.
    assert not list(state.rglob("*.db")), list(state.rglob("*.db"))
    # The password is on no command line, the server listens on loopback only and has no socket file.
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        assert record["db_password"] not in " ".join(process.info["cmdline"] or [])
    settings = dict(sql(stack, "postgres", "SELECT name, setting FROM pg_settings"))
    assert settings["listen_addresses"] == "127.0.0.1"
    assert settings["unix_socket_directories"] == ""
    assert settings["password_encryption"] == "scram-sha-256"
    roles = sql(stack, "postgres", "SELECT rolname FROM pg_roles WHERE rolcanlogin")
    assert roles == [(postgres.SUPERUSER,)]
    s = stack["stack"].settings
    wrong = PostgresTarget(s.host, s.postgres_port, postgres.SUPERUSER)
    assert not wrong.answers("not-the-password")
    assert not PostgresTarget(s.host, s.postgres_port, "postgres").answers(stack["record"]["db_password"])
    assert stack["stack"].status()[POSTGRES]["healthy"]


def test_train_sat_runs_end_to_end_with_its_results_in_postgres(stack: dict[str, Any]) -> None:
    env, root = stack["env"], stack["root"]
    deploy(env, "-n", "train-sat/demo")
    name = f"pg-{uuid.uuid4().hex[:8]}"
    output = root / "runs" / name
    overrides = [
        *data_overrides(root),
        *TINY,
        f"--storage.run_dir={root / 'runs'}",
        f"--tracking.experiment={name}",
        f"--tracking.registered_model={name}",
    ]
    params = {"stages": ["xe"], "overrides": overrides, "output": str(output)}
    done = subprocess.run(
        [*PREFECT, "deployment", "run", "train-sat/demo", "--params", json.dumps(params), "--watch"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((output / "xe" / "result.json").read_text())

    # Prefect: the flow run and every task run completed, in PostgreSQL.
    flow_runs = sql(
        stack,
        "prefect",
        "SELECT fr.id, fr.state_type FROM flow_run fr JOIN deployment d ON fr.deployment_id = d.id "
        "WHERE d.name = 'demo' AND fr.parameters->>'output' = %s",
        str(output),
    )
    assert [state for _, state in flow_runs] == ["COMPLETED"]
    tasks = sql(
        stack, "prefect", "SELECT name, state_type FROM task_run WHERE flow_run_id = %s", flow_runs[0][0]
    )
    assert tasks and all(state == "COMPLETED" for _, state in tasks), tasks
    assert "train-xe" in {task_name for task_name, _ in tasks}

    # MLflow: the stage's run with its test scores and loss curve, and the registered champion.
    scores = dict(
        sql(
            stack,
            "mlflow",
            "SELECT key, value FROM latest_metrics WHERE run_uuid = %s",
            result["run_id"],
        )
    )
    for key, value in result["test_scores"].items():
        assert scores[f"test/{key}"] == pytest.approx(value), key
    losses = sql(
        stack,
        "mlflow",
        "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key LIKE %s",
        result["run_id"],
        "train/%loss%",
    )
    assert losses[0][0] > 0
    champion = sql(
        stack,
        "mlflow",
        "SELECT mv.run_id FROM registered_model_aliases a JOIN model_versions mv "
        "ON mv.name = a.name AND mv.version = a.version WHERE a.name = %s AND a.alias = 'champion'",
        name,
    )
    assert champion == [(result["run_id"],)]


def test_four_concurrent_flow_runs_lose_nothing(stack: dict[str, Any], tmp_path: Path) -> None:
    n_runs, n_tasks, n_steps = 4, 6, 20
    names = [f"concurrent-{uuid.uuid4().hex[:6]}-{i}" for i in range(n_runs)]
    logs = [tmp_path / f"{name}.log" for name in names]
    processes = []
    for name, log in zip(names, logs, strict=True):
        with log.open("w") as out:
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(REPO / "tests" / "metrics_flow.py"),
                        name,
                        str(n_tasks),
                        str(n_steps),
                    ],
                    env=stack["env"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
    codes = [p.wait(timeout=600) for p in processes]
    assert codes == [0] * n_runs, "\n".join(log.read_text()[-2000:] for log in logs)

    states = sql(
        stack,
        "prefect",
        "SELECT fr.name, fr.state_type, fr.parameters->>'name' FROM flow_run fr JOIN flow f ON fr.flow_id = f.id "
        "WHERE f.name = 'record-metrics'",
    )
    ours = {params: state for _, state, params in states if params in names}
    assert ours == dict.fromkeys(names, "COMPLETED")
    tasks = sql(
        stack,
        "prefect",
        "SELECT fr.parameters->>'name', count(*) FROM task_run t JOIN flow_run fr ON t.flow_run_id = fr.id "
        "WHERE t.state_type = 'COMPLETED' AND fr.parameters->>'name' = ANY(%s) GROUP BY 1",
        names,
    )
    assert dict(tasks) == dict.fromkeys(names, n_tasks)
    metrics = sql(
        stack,
        "mlflow",
        "SELECT r.name, count(*), sum(m.value) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
        "WHERE r.name = ANY(%s) AND m.key LIKE 'series%%' GROUP BY r.name",
        names,
    )
    expected_sum = sum(i * 1000 + step for i in range(n_tasks) for step in range(n_steps))
    assert {name: (count, total) for name, count, total in metrics} == dict.fromkeys(
        names, (n_tasks * n_steps, pytest.approx(expected_sum))
    )
    finished = sql(stack, "mlflow", "SELECT name, status FROM runs WHERE name = ANY(%s)", names)
    assert dict(finished) == dict.fromkeys(names, "FINISHED")


def test_down_keeps_the_data_and_up_finds_it(stack: dict[str, Any]) -> None:
    local: LocalStack = stack["stack"]
    marker = f"kept-{uuid.uuid4().hex[:6]}"
    from mlflow import MlflowClient

    client = MlflowClient(stack["env"]["MLFLOW_TRACKING_URI"])
    client.create_experiment(marker)
    local.down()
    assert local.running_pid(POSTGRES) is None
    assert (local.state_dir / "postgres" / "data" / "PG_VERSION").is_file()
    again = LocalStack(load_settings(local.state_dir))  # what `captioning stack up` does with the record
    assert again.settings.db == "postgres"
    again.up(timeout_s=240)
    own_components(again)
    stack["stack"] = again
    assert MlflowClient(stack["env"]["MLFLOW_TRACKING_URI"]).get_experiment_by_name(marker) is not None
    assert sql(stack, "mlflow", "SELECT count(*) FROM experiments WHERE name = %s", marker) == [(1,)]


@pytest.mark.usefixtures("subprocess_tree")
def test_an_existing_server_is_taken_by_url_and_a_wrong_password_is_named(tmp_path: Path) -> None:
    _needs_postgres()
    server = LocalPostgres(tmp_path / "existing", port=free_port(), password="right-pw")
    server.start()
    try:
        url = f"postgresql://{postgres.SUPERUSER}:wrong-pw@127.0.0.1:{server.target.port}"
        settings = StackSettings(
            state_dir=tmp_path / "stack",
            prefect_port=free_port(),
            mlflow_port=free_port(),
            db=url,
            workdir=tmp_path,
        )
        local = LocalStack(settings)
        assert "wrong-pw" not in settings.db  # the password is a secret, not a setting
        with pytest.raises(StackError, match="does not accept the stack's login"):
            local.up(timeout_s=60)
        assert local.running_pid("prefect-server") is None
        record = json.loads(local.json_path.read_text())
        assert "wrong-pw" not in json.dumps(record["settings"]) and record["db_password"] == "wrong-pw"

        right = url.replace("wrong-pw", "right-pw")
        local = LocalStack(load_settings(tmp_path / "stack", db=right))
        try:
            local.up(timeout_s=240)
            created = PostgresTarget("127.0.0.1", server.target.port, postgres.SUPERUSER)
            with contextlib.closing(created.connect("right-pw")) as conn, conn.cursor() as cur:
                cur.execute("SELECT datname FROM pg_database WHERE datname IN ('prefect', 'mlflow')")
                assert sorted(r[0] for r in cur.fetchall()) == ["mlflow", "prefect"]
            assert not local.status()[POSTGRES]["enabled"]  # not ours to start or stop
        finally:
            local.down()
        assert server.running_pid() is not None  # an existing server is left running
    finally:
        server.stop()


def test_urls_never_show_the_password_and_bad_settings_are_named() -> None:
    target, password = PostgresTarget.parse("postgresql://u%40x:p%2Fw@db.example:6543/anything")
    assert (target, password) == (PostgresTarget("db.example", 6543, "u@x"), "p/w")
    assert target.url("prefect", driver="asyncpg") == "postgresql+asyncpg://u%40x@db.example:6543/prefect"
    assert redact("postgresql://u:secret@h:1/d") == "postgresql://u:***@h:1/d"
    with pytest.raises(PostgresError, match="expected postgresql://USER:PASSWORD@HOST:PORT"):
        PostgresTarget.parse("mysql://u:p@h/d")
    with pytest.raises(StackError, match="expected sqlite, postgres"):
        StackSettings(db="postgress")


def test_missing_binaries_name_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CAPTIONING_PG_BIN", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(postgres.glob, "glob", lambda pattern: [])
    with pytest.raises(PostgresError, match="apt-get install postgresql"):
        postgres.pg_bin_dir()
