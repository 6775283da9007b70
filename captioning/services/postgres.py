"""PostgreSQL behind the stack's Prefect and MLflow servers: a local cluster, or an existing server.

    db = LocalPostgres(state_dir / "postgres", port=5432, password=generated)
    db.start()                         # initdb on first use, then the server; waits until it answers
    db.ensure_databases()              # CREATE DATABASE prefect / mlflow where missing
    db.url("prefect", driver="asyncpg")     # postgresql+asyncpg://captioning@127.0.0.1:5432/prefect
    db.stop()                          # a fast shutdown (SIGINT); the data stays for the next start

    remote = PostgresTarget.parse("postgresql://USER:PASSWORD@HOST:5432")   # an existing server

The local cluster (Debian's ``postgresql`` server binaries, found on PATH, in ``CAPTIONING_PG_BIN`` or
under ``/usr/lib/postgresql/*/bin``) lives in ``state_dir/postgres/data``, listens on 127.0.0.1 only,
has no Unix socket, and its one superuser (``captioning``) logs in with a generated password over
SCRAM: there is no login without it, and none as ``root`` or ``postgres``. PostgreSQL refuses to run
as root; when the stack runs as root, the server runs in a user namespace in which it is an ordinary
user (``unshare --user --map-user``), so its files stay the stack user's and the state folder stays
private (0700) to that user.

Passwords never go on a command line (``ps`` shows those to every user): the servers get
``PGPASSWORD`` in their environment, which libpq (MLflow's psycopg2) and asyncpg (Prefect) read, and
the URLs they are given carry no password.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioning.launch import live_process, stop_process_group
from captioning.services.processes import private_dir, spawn_logged

SUPERUSER = "captioning"
DATABASES = ("prefect", "mlflow")  # one per server: both keep an `alembic_version` table
NAMESPACE_UID = 1000  # who the server is inside its user namespace when the stack runs as root


class PostgresError(RuntimeError):
    """The PostgreSQL server is missing, did not start, or refused us."""


def pg_bin_dir() -> Path:
    """Where ``initdb`` and ``postgres`` are: ``CAPTIONING_PG_BIN``, else PATH, else Debian's
    ``/usr/lib/postgresql/<newest>/bin``."""
    given = os.environ.get("CAPTIONING_PG_BIN")
    candidates = [Path(given)] if given else []
    if (on_path := shutil.which("initdb")) is not None:
        candidates.append(Path(on_path).parent)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    candidates += [Path(p) for p in reversed(versions)]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise PostgresError(
        "no PostgreSQL server binaries (initdb, postgres) found on PATH, in CAPTIONING_PG_BIN or under "
        "/usr/lib/postgresql/*/bin: install Debian's server package (apt-get install postgresql), or "
        "give an existing server's URL (--db postgresql://USER:PASSWORD@HOST:PORT)"
    )


@dataclass(frozen=True)
class PostgresTarget:
    """A PostgreSQL server to connect to: host, port, user; the password is passed separately."""

    host: str
    port: int
    user: str

    @classmethod
    def parse(cls, url: str) -> tuple[PostgresTarget, str]:
        """``postgresql://USER:PASSWORD@HOST[:PORT][/anything]`` -> (target, password)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.username:
            raise PostgresError(
                f"not a PostgreSQL server URL: {redact(url)!r}; expected postgresql://USER:PASSWORD@HOST:PORT"
            )
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        return cls(parts.hostname, parts.port or 5432, user), password

    def url(self, database: str, driver: str | None = None) -> str:
        """A SQLAlchemy URL without the password (``driver``: asyncpg for Prefect, none for MLflow)."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        user = urllib.parse.quote(self.user, safe="")
        return f"{scheme}://{user}@{self.host}:{self.port}/{database}"

    def connect(self, password: str, database: str = "postgres", timeout_s: float = 5.0) -> Any:
        import psycopg2

        return psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=password,
            dbname=database,
            connect_timeout=max(1, int(timeout_s)),
        )

    def answers(self, password: str) -> bool:
        """Whether the server accepts our login and a query now."""
        import psycopg2

        try:
            with contextlib.closing(self.connect(password, timeout_s=2.0)) as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
                return cur.fetchone() == (1,)
        except psycopg2.Error:
            return False

    def ensure_databases(self, password: str, names: tuple[str, ...] = DATABASES) -> list[str]:
        """``CREATE DATABASE`` each of ``names`` that is missing; returns those created."""
        import psycopg2
        from psycopg2 import sql

        created = []
        try:
            with contextlib.closing(self.connect(password)) as conn:
                conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
                with conn.cursor() as cur:
                    for name in names:
                        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                        if cur.fetchone() is None:
                            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                            created.append(name)
        except psycopg2.Error as exc:
            raise PostgresError(
                f"cannot prepare the databases {', '.join(names)} on {self.host}:{self.port} as "
                f"{self.user}: {str(exc).strip()}"
            ) from exc
        return created


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class LocalPostgres:
    """A PostgreSQL cluster in ``folder`` (``data/``, ``server.log``, ``server.pid``) on loopback."""

    def __init__(self, folder: Path, *, port: int, password: str, host: str = "127.0.0.1") -> None:
        self.folder = Path(folder).resolve()
        self.target = PostgresTarget(host, port, SUPERUSER)
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def log_path(self) -> Path:
        return self.folder / "server.log"

    @property
    def pid_path(self) -> Path:
        return self.folder / "server.pid"

    def _as_user(self, cmd: list[str]) -> list[str]:
        """``cmd`` as an ordinary user: itself, or in a user namespace when we are root."""
        if os.geteuid() != 0:
            return cmd
        unshare = shutil.which("unshare")
        if unshare is None:
            raise PostgresError("PostgreSQL does not run as root and `unshare` (util-linux) is missing")
        ids = str(NAMESPACE_UID)
        return [unshare, "--user", f"--map-user={ids}", f"--map-group={ids}", *cmd]

    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def init(self) -> None:
        """``initdb``: the ``captioning`` superuser with ``password``, SCRAM for every TCP login."""
        private_dir(self.folder)
        pwfile = self.folder / "initdb.pw"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        cmd = [
            str(pg_bin_dir() / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
            f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8",
        ]  # fmt: skip
        try:
            done = subprocess.run(
                self._as_user(cmd), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)  # a half-made cluster would block the next try
            raise PostgresError(f"initdb failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")

    def command(self) -> list[str]:
        t = self.target
        settings = {
            "listen_addresses": t.host,
            "port": str(t.port),
            "unix_socket_directories": "",  # TCP on loopback only, with the password
            "max_connections": "200",  # Prefect's pool per server worker, MLflow's, concurrent flow runs
            "fsync": "on",
        }
        flags = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
        return self._as_user([str(pg_bin_dir() / "postgres"), "-D", str(self.data_dir), *flags])

    def running_pid(self) -> int | None:
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        process = live_process(pid)
        if process is None:
            return None
        with contextlib.suppress(Exception):
            if str(self.data_dir) in process.cmdline():
                return pid
        return None

    def start(self, timeout_s: float = 60.0) -> None:
        """initdb on first use, then the server; returns once it accepts our login."""
        if self.running_pid() is not None and self.target.answers(self.password):
            return
        if not self.initialised():
            self.init()
        self.process = spawn_logged(
            self.command(), env=dict(os.environ), log_path=self.log_path, pid_path=self.pid_path
        )
        deadline = time.monotonic() + timeout_s
        while not self.target.answers(self.password):
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
                raise PostgresError(
                    f"postgres exited with {self.process.returncode} while starting; last lines of "
                    f"{self.log_path}:\n" + "\n".join(tail)
                )
            if time.monotonic() > deadline:
                self.stop()
                raise PostgresError(
                    f"postgres did not accept a login within {timeout_s:.0f} s; see {self.log_path}"
                )
            time.sleep(0.25)

    def stop(self, timeout_s: float = 30.0) -> None:
        """A fast shutdown: SIGINT to the server (clients disconnected, a checkpoint written), then the
        usual SIGTERM/SIGKILL of its process group for whatever is left."""
        pid = (
            self.process.pid
            if self.process is not None and self.process.poll() is None
            else self.running_pid()
        )
        if pid is not None:
            stop_process_group(pid, ((signal.SIGINT, timeout_s), (signal.SIGTERM, 5.0)), reap=self.process)
        self.pid_path.unlink(missing_ok=True)
        self.process = None


class StackDatabase:
    """Where a stack's Prefect and MLflow servers keep their state (``StackSettings.db``): SQLite
    (``target`` None), the local cluster in ``folder`` (``server()``; its paths exist for every
    setting, so a status can look for it), or an existing server (``db`` its URL, the password
    already taken out). ``password`` is read when needed (the stack's secrets hold it)."""

    def __init__(self, db: str, folder: Path, *, host: str, port: int, password: Callable[[], str]) -> None:
        self._password = password
        self._local = LocalPostgres(folder, host=host, port=port, password="")
        self.target: PostgresTarget | None = self._local.target if db == "postgres" else None
        if db.startswith(("postgresql:", "postgres:")):
            self.target = PostgresTarget.parse(db)[0]

    @property
    def password(self) -> str:
        return self._password()

    def server(self) -> LocalPostgres:
        """The local cluster (started only where ``db`` is "postgres"), with the password."""
        self._local.password = self.password
        return self._local

    def url(self, database: str, driver: str | None = None) -> str | None:
        return self.target.url(database, driver) if self.target is not None else None

    def server_env(self) -> dict[str, str]:
        """What a server process needs to log in (``PGPASSWORD``; the URLs carry no password)."""
        return {"PGPASSWORD": self.password} if self.target is not None else {}

    def prepare(self) -> None:
        """The ``prefect`` and ``mlflow`` databases exist on the server (when there is one)."""
        if self.target is None:
            return
        if not self.target.answers(self.password):
            raise PostgresError(
                f"the PostgreSQL server {self.target.url('postgres')} does not accept the stack's login "
                "(a wrong password, or it is down)"
            )
        self.target.ensure_databases(self.password)
