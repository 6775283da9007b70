"""What a local stack is: its settings, the record of them in its state folder, its status lines.

    settings = load_settings("demo-data/stack", s3=True)   # the last ``up``'s settings, then these
    print(format_status(LocalStack(settings).status()))     # LocalStack: stack.py
    print(export_lines(env), end="")                        # ``captioning stack env``

The component names and the default bucket are here too, for stack.py and the CLI alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFECT_SERVER, WORKER, MLFLOW, S3, POSTGRES = "prefect-server", "worker", "mlflow", "s3", "postgres"
COMPONENTS = (PREFECT_SERVER, WORKER, MLFLOW, S3, POSTGRES)
S3_BUCKET = "captioning"
PORT_OPTIONS = {
    "prefect_port": "--prefect-port",
    "mlflow_port": "--mlflow-port",
    "s3_port": "--s3-port",
    "postgres_port": "--postgres-port",
}


class StackError(RuntimeError):
    """The stack could not start (a taken port, a component that died) or is in an unexpected state."""


@dataclass
class StackSettings:
    """Where the stack keeps its state, which ports it binds, and what runs."""

    state_dir: Path = Path("demo-data/stack")
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    s3: bool = False
    s3_port: int = 9000
    work_pool: str = "captioning-local"
    gpu_slots: int = 1
    worker: bool = True
    auth: bool = False  # MLflow basic auth + Prefect API auth string (stack_auth.py)
    # Where both servers keep their state: "sqlite" (files in the state folder), "postgres" (a local
    # cluster the stack runs) or an existing server's "postgresql://USER@HOST:PORT" (postgres.py).
    db: str = "sqlite"
    postgres_port: int = 5432
    workdir: Path = field(default_factory=Path.cwd)  # the worker's cwd: flow runs pull their code here

    @property
    def prefect_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def s3_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def __post_init__(self) -> None:
        if self.db not in ("sqlite", "postgres") and not self.db.startswith(("postgresql://", "postgres://")):
            raise StackError(
                f"--db {self.db!r}: expected sqlite, postgres or an existing server's "
                "postgresql://USER:PASSWORD@HOST:PORT"
            )

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state_dir"] = str(Path(self.state_dir).resolve())
        data["workdir"] = str(Path(self.workdir).resolve())
        return data


def load_settings(state_dir: str | os.PathLike[str], **given: Any) -> StackSettings:
    """Settings recorded by the last ``up`` in ``state_dir/stack.json`` (else the defaults), overridden by
    the ``given`` fields that are not None: what the command line passes."""
    state_dir = Path(state_dir)
    recorded = read_json(state_dir / "stack.json").get("settings", {})
    names = {f.name for f in dataclasses.fields(StackSettings)}
    unknown = set(given) - names
    if unknown:
        raise TypeError(f"unknown stack settings: {sorted(unknown)}; valid: {sorted(names)}")
    values = {k: v for k, v in recorded.items() if k in names}
    values.update({k: v for k, v in given.items() if v is not None})
    values["state_dir"] = state_dir
    if "workdir" in values:
        values["workdir"] = Path(values["workdir"])
    return StackSettings(**values)


def export_lines(env: dict[str, str]) -> str:
    """Shell ``export`` lines for ``env`` (``eval "$(captioning stack env)"``)."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())


def format_status(status: dict[str, dict[str, Any]]) -> str:
    """One line per component for ``captioning stack status``."""
    lines = []
    for name, info in status.items():
        if not info["enabled"] and not info["running"]:
            lines.append(f"{name:15} off")
            continue
        state = "stopped"
        if info["running"]:
            state = "running" if info["healthy"] else "unhealthy"
        where = info.get("url") or ""
        pid = f"pid {info['pid']}" if info["pid"] else ""
        lines.append(
            f"{name:15} {state:9} {pid:10} {where:28} log {info['log']}  pid file {info['pid_file']}"
        )
    return "\n".join(lines)


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} when there is no file (or it holds no object)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StackError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}
