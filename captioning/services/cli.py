"""The ``captioning mlflow`` and ``captioning stack`` subcommands: parsers and handlers.

    captioning mlflow start                         # a local MLflow server in the background; stop|status|ui
    captioning stack up [--s3]                      # Prefect server + worker, MLflow (+ S3); down|status|env

``captioning.cli`` calls ``add_parsers(sub)`` and dispatches through ``COMMANDS`` (name ->
handler(args, overrides) -> exit code); the servers themselves live in this package's
mlflow_server.py, s3_server.py and stack.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from captioning.config import ConfigError

if TYPE_CHECKING:
    from captioning.services.mlflow_server import MlflowServer


# --- captioning mlflow: a local tracking server (mlflow_server.py) -------------------------

MLFLOW_STATE_DIR = "demo-data/mlflow"
STACK_STATE_DIR = "demo-data/stack"  # `captioning stack`'s; its MLflow server keeps its state in mlflow/

MLFLOW_EPILOG = """\
Remote servers need no code changes: MLflow clients (the training included) log wherever
MLFLOW_TRACKING_URI points (http://host:5000, https://..., databricks). Artifacts in S3 (or an
S3-compatible store) need MLFLOW_S3_ENDPOINT_URL (when not AWS) and the usual AWS credentials
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) in the environment of whoever writes them: with
`start --artifacts s3://...` that is this server, which proxies artifact uploads for its clients.

  captioning mlflow start --port 5000      # prints the URL and the export line
  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
  captioning mlflow ui --open               # the UI in a browser
  captioning mlflow stop
"""


def _service_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    state_help: str,
    epilog: str,
    *,
    help: str,
    description: str,
) -> tuple[argparse._SubParsersAction[argparse.ArgumentParser], argparse.ArgumentParser]:
    """``captioning NAME ACTION``: its action subparsers, and the ``--state-dir`` option every action
    shares (a parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, help=state_help)
    p = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return p.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION"), common


def _add_mlflow_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions, common = _service_parser(
        sub,
        "mlflow",
        f"the server's folder: mlflow.db, artifacts/, server.log, server.pid, or a stack's folder (default: "
        f"{MLFLOW_STATE_DIR}; status and ui also look for the local stack's server in {STACK_STATE_DIR})",
        MLFLOW_EPILOG,
        help="start, stop, check or open a local MLflow tracking server",
        description="A local `mlflow server` (SQLite, local or S3 artifacts) that runs in the background "
        "until stopped; the state folder's pid file names it.",
    )
    start = actions.add_parser(
        "start", parents=[common], help="start the server in the background (a running one is reused)"
    )
    start.add_argument("--port", type=int, help="port (default 5000)")
    start.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; the server has no auth)"
    )
    start.add_argument(
        "--artifacts",
        metavar="URI",
        help="artifact destination, e.g. s3://bucket/mlflow (default: STATE_DIR/artifacts)",
    )
    actions.add_parser("stop", parents=[common], help="stop the server named in the state folder's pid file")
    actions.add_parser(
        "status",
        parents=[common],
        help=f"find the running server ({MLFLOW_STATE_DIR}'s, else the local stack's in "
        f"{STACK_STATE_DIR}, and $MLFLOW_TRACKING_URI's); exit 0 when one is healthy",
    )
    ui = actions.add_parser(
        "ui",
        parents=[common],
        help="print the UI URL: $MLFLOW_TRACKING_URI when it is http(s) and no --state-dir is "
        "given, else the running server that `status` finds",
    )
    ui.add_argument("--open", action="store_true", help="also open it in a web browser")


def _recorded_mlflow_server(state_dir: Path) -> tuple[MlflowServer, int | None]:
    """The server named by ``state_dir``'s pid file, with its real host and port, and its pid.

    The pid is None when the process is gone, a zombie, or not an ``mlflow server`` on this state
    folder (a recycled pid): stopping must never signal somebody else's process group.
    """
    import psutil

    from captioning.services.mlflow_server import MlflowServer

    server = MlflowServer(state_dir)
    pid = server.running_pid()
    if pid is None:
        return server, None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return server, None
        cmd = process.cmdline()
    except psutil.Error:
        return server, None
    if server.backend_store_uri not in cmd or "--port" not in cmd:
        return server, None
    host = cmd[cmd.index("--host") + 1] if "--host" in cmd else server.host
    port = int(cmd[cmd.index("--port") + 1])
    return MlflowServer(state_dir, host=host, port=port), pid


def _server_dirs(given: Path | None) -> list[tuple[Path, str]]:
    """The state folders to look in, each with how to name it: the one given (a stack's folder means its
    ``mlflow/``), else ``captioning mlflow start``'s default and then the local stack's."""
    if given is not None:
        is_stack = (given / "stack.json").is_file()
        return [(given / "mlflow", "the local stack's server")] if is_stack else [(given, "")]
    stack = Path(STACK_STATE_DIR) / "mlflow"
    return [(Path(MLFLOW_STATE_DIR), ""), (stack, "the local stack's server")]


def _find_running(given: Path | None) -> tuple[MlflowServer, int, str, Path] | None:
    """The first live server recorded in ``_server_dirs(given)``: server, pid, how to name it, folder."""
    for state_dir, what in _server_dirs(given):
        server, pid = _recorded_mlflow_server(state_dir)
        if pid is not None:
            return server, pid, what, state_dir
    return None


def _free_port(host: str, port: int) -> int | None:
    from captioning.services.mlflow_server import port_is_open

    return next((p for p in range(port + 1, port + 50) if not port_is_open(host, p)), None)


def _start_advice(state_dir: Path | None, host: str = "127.0.0.1", port: int | None = None) -> str:
    """What to do when no server of ours runs, true for this machine now: whatever holds the port."""
    from captioning.services.mlflow_server import DEFAULT_PORT, is_healthy, port_is_open

    port = DEFAULT_PORT if port is None else port
    start = "captioning mlflow start" + (f" --state-dir {state_dir}" if state_dir is not None else "")
    if not port_is_open(host, port):
        stack = "" if state_dir is not None else " (or the whole local stack: `captioning stack up`)"
        return f"start one: `{start}`{stack}"
    free = _free_port(host, port)
    start += f" --port {free if free is not None else 'PORT'}"
    url = f"http://{host}:{port}"
    if is_healthy(url):
        elsewhere = f"an MLflow server started elsewhere answers at {url}"
        return f"{elsewhere}: use it (export MLFLOW_TRACKING_URI={url}) or `{start}`"
    return f"port {port} is taken by another program: start one with `{start}`"


def _mlflow_start(args: argparse.Namespace, state_dir: Path) -> int:
    from captioning.services.mlflow_server import DEFAULT_PORT, MlflowServer, is_healthy, port_is_open

    if args.state_dir is None and args.port is None:  # the local stack's server is the one to use
        found = _find_running(None)
        if found is not None and found[2] and is_healthy(found[0].url):
            stack_server, stack_pid, what, where = found
            print(f"{what} already runs at {stack_server.url} (pid {stack_pid}, state {where}); use it:")
            print(f"export MLFLOW_TRACKING_URI={stack_server.url}")
            return 0
    args.port = DEFAULT_PORT if args.port is None else args.port
    running, pid = _recorded_mlflow_server(state_dir)
    if pid is not None:
        if not is_healthy(running.url):
            print(
                f"captioning mlflow start: pid {pid} of {state_dir} is alive but {running.url}/health does "
                f"not answer; see {running.log_path}, or `captioning mlflow stop --state-dir {state_dir}`",
                file=sys.stderr,
            )
            return 1
        moved = f" (not port {args.port}: stop it first to move it)" if running.port != args.port else ""
        print(f"MLflow server already running at {running.url}{moved} (pid {pid}, state {state_dir})")
        print(f"export MLFLOW_TRACKING_URI={running.url}")
        return 0
    if port_is_open(args.host, args.port):
        url = f"http://{args.host}:{args.port}"
        free = _free_port(args.host, args.port)
        other = f"--port {free}" if free is not None else "--port PORT"
        if is_healthy(url):
            print(
                f"captioning mlflow start: an MLflow server not recorded in {state_dir} already answers at "
                f"{url}: use it (export MLFLOW_TRACKING_URI={url}) or start another with {other}",
                file=sys.stderr,
            )
        else:
            print(
                f"captioning mlflow start: error: port {args.port} on {args.host} is taken by another "
                f"process: start on a free one with {other}",
                file=sys.stderr,
            )
        return 1
    server = MlflowServer(state_dir, host=args.host, port=args.port, artifacts_destination=args.artifacts)
    start = time.perf_counter()
    server.start()
    assert server.process is not None
    print(
        f"MLflow server started at {server.url} in {time.perf_counter() - start:.1f} s "
        f"(pid {server.process.pid}, state {state_dir}, log {server.log_path})"
    )
    print(f"export MLFLOW_TRACKING_URI={server.url}")
    print(f"stop it with: captioning mlflow stop --state-dir {state_dir}")
    return 0


def _mlflow_stop(args: argparse.Namespace) -> int:
    state_dir = args.state_dir or Path(MLFLOW_STATE_DIR)
    server, pid = _recorded_mlflow_server(state_dir)
    if pid is None:
        stale = server.pid_path.is_file()
        server.pid_path.unlink(missing_ok=True)
        print(f"no MLflow server running for {state_dir}" + (" (removed a stale pid file)" if stale else ""))
        found = _find_running(None) if args.state_dir is None else None
        if found is not None and found[2]:
            print(f"{found[2]} at {found[0].url} stops with the stack: `captioning stack down`")
        return 0
    server.stop()  # the pid file's process, checked above to be this state folder's server
    print(f"stopped the MLflow server at {server.url} (pid {pid})")
    return 0


def _mlflow_status(args: argparse.Namespace) -> int:
    from captioning.services.mlflow_server import is_healthy

    found = _find_running(args.state_dir)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    healthy = False
    if found is None:
        where = " or ".join(str(d / "server.pid") for d, _ in _server_dirs(args.state_dir))
        print(f"not running: no live MLflow server recorded in {where}")
    else:
        server, pid, what, state_dir = found
        named = f"{what}, " if what else ""
        healthy = is_healthy(server.url)
        if healthy:
            print(f"running: {server.url} is healthy (pid {pid}, {named}state {state_dir})")
            if uri.rstrip("/") != server.url:
                print(f"export MLFLOW_TRACKING_URI={server.url}")
        else:
            print(
                f"not healthy: pid {pid} is alive but {server.url}/health does not answer; "
                f"see {server.log_path}"
            )
    if (
        args.state_dir is None
        and uri.startswith(("http://", "https://"))
        and (found is None or uri.rstrip("/") != found[0].url)
    ):
        answers = is_healthy(uri)
        healthy = healthy or answers
        print(f"MLFLOW_TRACKING_URI={uri} " + ("answers /health" if answers else "does not answer /health"))
    if not healthy and found is None:
        print(_start_advice(args.state_dir))
    return 0 if healthy else 1


def _mlflow_ui(args: argparse.Namespace) -> int:
    from captioning.services.mlflow_server import is_healthy

    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if args.state_dir is None and uri.startswith(("http://", "https://")):
        url = uri
        if not is_healthy(url):
            print(f"captioning mlflow ui: note: {url}/health does not answer", file=sys.stderr)
    else:
        found = _find_running(args.state_dir)
        if found is None:
            where = " or ".join(str(d) for d, _ in _server_dirs(args.state_dir))
            advice = _start_advice(args.state_dir)
            print(f"captioning mlflow ui: no MLflow server running for {where}; {advice}", file=sys.stderr)
            return 1
        url = found[0].url
    print(url)
    if args.open:
        import webbrowser

        if not webbrowser.open(url):
            print(f"captioning mlflow ui: no web browser found; open {url} yourself", file=sys.stderr)
    return 0


def _cmd_mlflow(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from captioning.services.mlflow_server import MlflowServerError

    if overrides:
        raise ConfigError(f"mlflow takes no config overrides: {' '.join(overrides)}")
    state_dir = args.state_dir or Path(MLFLOW_STATE_DIR)
    try:
        if args.mlflow_command == "start":
            return _mlflow_start(args, state_dir)
        if args.mlflow_command == "stop":
            return _mlflow_stop(args)
        if args.mlflow_command == "status":
            return _mlflow_status(args)
        return _mlflow_ui(args)
    except MlflowServerError as exc:
        print(f"captioning mlflow {args.mlflow_command}: error: {exc}", file=sys.stderr)
        return 1


# --- end captioning mlflow ----------------------------------------------------------------------------


# --- captioning stack: the local Prefect + MLflow (+ S3) stack (stack.py) ------------------

STACK_EPILOG = """\
Everything binds to 127.0.0.1; pid files, logs, databases and S3 data live in the state folder.
A later `up` reuses the settings the last one recorded there (STATE_DIR/stack.json) unless given
again, so `down`, `status` and `env` need only --state-dir.

  captioning stack up --s3                 # prints the Prefect and MLflow UI URLs
  captioning stack up --db postgres        # both servers on a local PostgreSQL (default: SQLite)
  eval "$(captioning stack env)"           # PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_* (with --s3)
  captioning stack status
  captioning stack down
"""


def _add_stack_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    actions, common = _service_parser(
        sub,
        "stack",
        f"the stack's folder: state, pid files, logs (default: {STACK_STATE_DIR})",
        STACK_EPILOG,
        help="start, stop or check the local stack: Prefect server + worker, MLflow, optional S3",
        description="A local Prefect server with a process worker, an MLflow server and optionally an "
        "S3-compatible server (rclone), each in the background until `captioning stack down`.",
    )
    up = actions.add_parser("up", parents=[common], help="start what is not running (running parts are kept)")
    up.add_argument("--s3", action=argparse.BooleanOptionalAction, help="also an S3 server (default: off)")
    up.add_argument("--worker", action=argparse.BooleanOptionalAction, help="a process worker (default: on)")
    up.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        help="MLflow basic auth and a Prefect API auth string, with generated credentials (`stack env` "
        "prints them); for servers others can reach (default: off, loopback)",
    )
    up.add_argument("--prefect-port", type=int, help="Prefect server port (default 4200)")
    up.add_argument("--mlflow-port", type=int, help="MLflow server port (default 5000)")
    up.add_argument("--s3-port", type=int, help="S3 server port (default 9000)")
    up.add_argument(
        "--db",
        metavar="sqlite|postgres|URL",
        help="where Prefect and MLflow keep their state: sqlite (files, the default), postgres (a local "
        "PostgreSQL cluster in the state folder, loopback, generated password) or an existing server's "
        "postgresql://USER:PASSWORD@HOST:PORT (databases prefect and mlflow are made there when missing)",
    )
    up.add_argument("--postgres-port", type=int, help="the local PostgreSQL's port (default 5432)")
    up.add_argument("--work-pool", help="process work pool name (default captioning-local)")
    up.add_argument("--gpu-slots", type=int, help="limit of the `gpu` global concurrency limit (default 1)")
    up.add_argument("--workdir", type=Path, help="the worker's working folder (default: the current one)")
    actions.add_parser("down", parents=[common], help="stop the worker, then the servers")
    actions.add_parser("status", parents=[common], help="each component's state; exit 0 when all run")
    actions.add_parser("env", parents=[common], help="print the export lines for clients")


def _cmd_stack(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    from captioning.services.stack import LocalStack
    from captioning.services.stack_settings import (
        S3_BUCKET,
        StackError,
        export_lines,
        format_status,
        load_settings,
    )

    if overrides:
        raise ConfigError(f"stack takes no config overrides: {' '.join(overrides)}")
    state_dir = args.state_dir or Path(STACK_STATE_DIR)
    names = (
        "s3",
        "worker",
        "auth",
        "prefect_port",
        "mlflow_port",
        "s3_port",
        "db",
        "postgres_port",
        "work_pool",
        "gpu_slots",
        "workdir",
    )
    stack = LocalStack(load_settings(state_dir, **{name: getattr(args, name, None) for name in names}))
    where = f" --state-dir {state_dir}" if args.state_dir else ""
    try:
        if args.stack_command == "up":
            start = time.perf_counter()
            stack.up()
            s = stack.settings
            print(f"local stack up in {time.perf_counter() - start:.1f} s (state {state_dir})")
            print(f"  Prefect UI: {s.prefect_url}   (work pool {s.work_pool})")
            print(f"  MLflow UI:  {s.mlflow_url}")
            if s.auth:
                print("  auth: on (MLflow basic auth, Prefect API auth string; credentials: `stack env`)")
            if s.s3:
                print(f"  S3:         {s.s3_url}   (bucket s3://{S3_BUCKET})")
            if s.db != "sqlite":
                where_db = f"local cluster on {s.host}:{s.postgres_port}" if s.db == "postgres" else s.db
                print(f"  database:   PostgreSQL, {where_db} (databases prefect and mlflow)")
            print(f'clients: eval "$(captioning stack env{where})"  or  source {stack.env_path}')
            print(f"stop with: captioning stack down{where}")
            return 0
        if args.stack_command == "down":
            stack.down()
            print(f"local stack in {state_dir} stopped")
            return 0
        if args.stack_command == "status":
            status = stack.status()
            print(format_status(status))
            return 0 if all(c["running"] and c["healthy"] for c in status.values() if c["enabled"]) else 1
        if not stack.json_path.is_file():
            raise StackError(f"no stack recorded in {state_dir}: start one with `captioning stack up{where}`")
        print(export_lines(stack.env()), end="")
        return 0
    except StackError as exc:
        print(f"captioning stack {args.stack_command}: error: {exc}", file=sys.stderr)
        return 1


# --- end captioning stack -----------------------------------------------------------------------------


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``mlflow`` and ``stack`` subcommands to the ``captioning`` parser's ``sub``."""
    _add_mlflow_parser(sub)
    _add_stack_parser(sub)


COMMANDS: dict[str, Callable[[argparse.Namespace, Sequence[str]], int]] = {
    "mlflow": _cmd_mlflow,
    "stack": _cmd_stack,
}
