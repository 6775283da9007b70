"""Addresses in the MLflow UI: an experiment's runs list, a run, a registered model version.

    experiment_url("http://127.0.0.1:5000", "1")      # .../#/experiments/1/runs?workflowType=machine_learning
    run_url(uri, "1", run_id)                          # .../#/experiments/1/runs/<run_id>?workflowType=...
    model_version_url(uri, "show-attend-tell", "3")    # .../#/models/show-attend-tell/versions/3?workflowType=...
    run_links_markdown(uri, run_id, registered)        # the Prefect artifacts' lines, one request to the server

Why ``workflowType=machine_learning`` on every address: the UI of MLflow 3.17 chooses between its
GenAI view (an Overview of traces) and its model-training view (the runs list) from the sidebar's
"GenAI / Model training" switch, which the browser remembers, or from this query parameter; the
experiment's own ``mlflow.experimentKind`` tag (set by ``client.ensure_experiment``) is not read by
that release's navigation. An address carrying the parameter opens on training runs in any browser.

Addresses exist only for http(s) tracking servers (a file or database store has no UI of its own);
the functions return None otherwise. Credentials in the tracking URI never appear in an address.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

TRAINING_VIEW = "workflowType=machine_learning"  # the UI's model-training view (see module doc)


def ui_base(tracking_uri: str | None) -> str | None:
    """The UI's root for an http(s) tracking URI (no credentials, no trailing slash), else None."""
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return None
    parts = urllib.parse.urlsplit(tracking_uri)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _page(tracking_uri: str | None, route: str) -> str | None:
    base = ui_base(tracking_uri)
    return None if base is None else f"{base}/#/{route}?{TRAINING_VIEW}"


def _quote(part: str) -> str:
    return urllib.parse.quote(str(part), safe="")


def experiment_url(tracking_uri: str | None, experiment_id: str) -> str | None:
    """The experiment's runs list."""
    return _page(tracking_uri, f"experiments/{_quote(experiment_id)}/runs")


def run_url(tracking_uri: str | None, experiment_id: str, run_id: str, tab: str | None = None) -> str | None:
    """A run's page; ``tab``: ``model-metrics``, ``artifacts``, ``artifacts/attention/x.png``..."""
    route = f"experiments/{_quote(experiment_id)}/runs/{_quote(run_id)}"
    if tab:
        route += "/" + "/".join(_quote(part) for part in tab.split("/"))
    return _page(tracking_uri, route)


def model_version_url(tracking_uri: str | None, name: str, version: str | int) -> str | None:
    """A registered model version's page (its source run, signature, tags and aliases)."""
    return _page(tracking_uri, f"models/{_quote(name)}/versions/{_quote(str(version))}")


def _link(text: str, url: str | None) -> str:
    return f"[{text}]({url})" if url else text


def run_links_markdown(
    tracking_uri: str | None, run_id: str, registered: Mapping[str, Any] | None = None
) -> str:
    """Markdown lines linking the run ``run_id`` (and its experiment) and, when given, the registered
    version (``registry.register_stage``'s dict: name, version, alias, promoted) in the MLflow UI.

    Looks the run's experiment up on the server; when that fails, the lines name the run without a
    link rather than fail the caller (a report must not be lost to a link).
    """
    experiment_id, run_name = None, run_id
    if ui_base(tracking_uri) is not None:
        from mlflow.exceptions import MlflowException

        from captioning.tracking import TrackingUnavailable
        from captioning.tracking.client import connect

        try:
            run = connect(tracking_uri, timeout_s=5.0).get_run(run_id)
            experiment_id, run_name = str(run.info.experiment_id), run.info.run_name or run_id
        except (TrackingUnavailable, MlflowException, OSError) as exc:  # only the links are lost
            log.warning("no MLflow links for run %s: %s", run_id, (str(exc).splitlines() or [""])[0])
    run_page = run_url(tracking_uri, experiment_id, run_id) if experiment_id else None
    runs_page = experiment_url(tracking_uri, experiment_id) if experiment_id else None
    lines = [f"- MLflow run: {_link(run_name, run_page)} (`{run_id}`)"]
    if runs_page:
        lines.append(f"- all runs of the experiment: {_link('runs list', runs_page)}")
    if registered:
        name, version = str(registered["name"]), str(registered["version"])
        alias = registered.get("alias")
        state = f" ({alias})" if alias else ""
        lines.append(
            f"- registered model: {_link(f'{name} version {version}', model_version_url(tracking_uri, name, version))}"
            f"{state}, `models:/{name}/{version}`"
        )
    return "\n".join(lines)
