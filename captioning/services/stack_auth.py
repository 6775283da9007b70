"""Authentication for a shared stack (``captioning stack up --auth``): MLflow's basic-auth app and
Prefect's API auth string, with credentials generated once per state folder.

Off by default: the stack listens on 127.0.0.1 and its state folder is its owner's only, so only this
machine's users reach it, and only the owner reads its secrets. Turn it on before the servers are
reachable by others (``--host`` on a shared network, a tunnel, a shared machine):

- MLflow runs ``--app-name basic-auth`` with an admin user whose password is generated here
  (``basic_auth.ini`` and its user database live in the MLflow state folder); every request but
  ``/health`` needs HTTP basic credentials. Clients pass ``MLFLOW_TRACKING_USERNAME`` and
  ``MLFLOW_TRACKING_PASSWORD``.
- Prefect's server takes ``PREFECT_SERVER_API_AUTH_STRING`` (``user:password``); every API call but
  ``/api/health`` needs it as basic credentials. Clients (the worker, the CLI, flow runs) pass
  ``PREFECT_API_AUTH_STRING``.

``captioning stack env`` (and ``env.sh``, 0600) prints what clients export. The credentials are kept
in ``stack.json`` (0600) next to the S3 keys, so restarting the stack keeps them valid.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

MLFLOW_ADMIN = "admin"
PREFECT_USER = "captioning"


@dataclass(frozen=True)
class StackCredentials:
    mlflow_user: str
    mlflow_password: str
    mlflow_secret_key: str  # the server's Flask secret (CSRF protection of its auth pages); never a client's
    prefect_auth_string: str  # user:password

    @classmethod
    def generate(cls) -> StackCredentials:
        return cls(
            MLFLOW_ADMIN,
            secrets.token_urlsafe(18),
            secrets.token_urlsafe(32),
            f"{PREFECT_USER}:{secrets.token_urlsafe(18)}",
        )

    @classmethod
    def from_json(cls, data: Any) -> StackCredentials | None:
        try:
            return cls(**{f.name: str(data[f.name]) for f in fields(cls)})
        except (KeyError, TypeError):
            return None

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    def client_env(self) -> dict[str, str]:
        """What a client of both servers exports."""
        return {
            "MLFLOW_TRACKING_USERNAME": self.mlflow_user,
            "MLFLOW_TRACKING_PASSWORD": self.mlflow_password,
            "PREFECT_API_AUTH_STRING": self.prefect_auth_string,
        }

    def prefect_env(self) -> dict[str, str]:
        """The Prefect server's setting and its clients' (the stack's CLI calls and worker)."""
        return {
            "PREFECT_SERVER_API_AUTH_STRING": self.prefect_auth_string,
            "PREFECT_API_AUTH_STRING": self.prefect_auth_string,
        }

    def mlflow_server_env(self, state_dir: Path) -> dict[str, str]:
        """Write the basic-auth app's config under ``state_dir`` (0600); the server's environment."""
        config = state_dir / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{state_dir / 'basic_auth.db'}\n"
            f"admin_username = {self.mlflow_user}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "grant_default_workspace_access = false\n"
        )
        config.chmod(0o600)
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_USERNAME": self.mlflow_user,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.mlflow_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.mlflow_secret_key,
        }


def basic_header(auth_string: str | None) -> dict[str, str]:
    """The Authorization header for ``user:password`` (empty without one)."""
    if not auth_string:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode("ascii")}


class StackSecrets:
    """The secrets a stack makes once per state folder and keeps in ``stack.json`` (0600), so that a
    restart keeps clients' environments valid: the S3 keys, the ``auth`` credentials and the
    PostgreSQL password (generated for a local cluster, or the one an existing server's URL gave)."""

    def __init__(self, recorded: dict[str, Any], *, auth: bool) -> None:
        self._recorded = recorded
        self._auth_on = auth
        self._s3: tuple[str, str] | None = None
        self._auth: StackCredentials | None = None
        self._db_password: str | None = None

    def s3(self) -> tuple[str, str]:
        keys = self._recorded.get("s3_credentials") or {}
        if keys.get("access_key") and keys.get("secret_key"):
            return keys["access_key"], keys["secret_key"]
        if self._s3 is None:
            self._s3 = (f"stack-{secrets.token_hex(6)}", secrets.token_urlsafe(24))
        return self._s3

    def auth(self) -> StackCredentials | None:
        """With ``auth`` on: the credentials of both servers; None otherwise."""
        if not self._auth_on:
            return None
        recorded = StackCredentials.from_json(self._recorded.get("auth_credentials"))
        if recorded is not None:
            return recorded
        if self._auth is None:
            self._auth = StackCredentials.generate()
        return self._auth

    @property
    def auth_string(self) -> str | None:
        auth = self.auth()
        return auth.prefect_auth_string if auth is not None else None

    def db_password(self, given: str | None = None) -> str:
        """``given`` (from an existing server's URL) when there is one, else the recorded password,
        else a new one (a local cluster's superuser's)."""
        if given:
            self._db_password = given
        if self._db_password is None:
            self._db_password = self._recorded.get("db_password") or secrets.token_urlsafe(24)
        return self._db_password

    def record(self, *, db: bool) -> dict[str, Any]:
        """What ``stack.json`` keeps."""
        access_key, secret_key = self.s3()
        record: dict[str, Any] = {"s3_credentials": {"access_key": access_key, "secret_key": secret_key}}
        if (auth := self.auth()) is not None:
            record["auth_credentials"] = auth.to_json()
        if db:
            record["db_password"] = self.db_password()
        return record
