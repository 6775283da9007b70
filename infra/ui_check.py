"""Browser check of the MLflow UI: the experiment opens on its runs list, a run's metric charts render,
and a colour attention map is among its artifacts, in headless Chromium.

    .venv/bin/python infra/ui_check.py                                   # own server + a demo run
    .venv/bin/python infra/ui_check.py --tracking-uri http://127.0.0.1:5000 --run-id RUN --out shot.png

Without ``--tracking-uri`` it starts its own ``MlflowServer`` in a temporary folder; without
``--run-id`` it logs a demo run (train/loss over 50 steps, val/CIDEr and val/BLEU-4 every 10, and an
attention sheet drawn by ``captioning.model.visualize``) in the experiment ``ui-check``. A training
run's attention maps sit in its stage runs (``attention/epoch-NNN/ID.png``): for a pipeline's parent
run they are looked up in its child runs. Then Chromium renders pages of the MLflow 3.17 single-page
app, at the addresses the project hands out (``captioning.tracking.links``: they carry the UI's
model-training view, since MLflow 3.17 opens experiments in its GenAI view otherwise):

    {uri}/#/experiments/{experiment_id}/runs?...                         DOM: the runs list, with the run
    {uri}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?...  screenshot + DOM: one chart per metric
    {uri}/#/experiments/{experiment_id}/runs/{run_id}?...                DOM: the Metrics table, name and value
    {uri}/#/experiments/{e}/runs/{r}/artifacts/attention/...png?...      screenshot + DOM: the map's preview

The check passes when the experiment page lists the run under a "Run Name" column (not the GenAI
overview), every metric name is in both rendered DOMs (charts below the fold render lazily: when
some are missing, the charts page is rendered once more through a tall window, DOM only), each
table value matches the run's latest value, the artifact page previews the attention map, that map
(as the server serves it) spans a colour map (``MIN_HUES`` hues), and both screenshots are valid
PNGs of the window size that are not one flat colour. Exit 0 with ``UI check OK: ...``; 1 with the
reason when the check fails; 2 when it cannot run (no Chromium on PATH, tracking server unreachable,
unknown run).

Chromium is driven by ``infra/headless.py`` (no sandbox, a throw-away profile, a wall-clock limit).
"""

from __future__ import annotations

import argparse
import html
import math
import os
import re
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: infra/ holds headless.py

from headless import (
    CHROMIUM_NAMES,
    MIN_HUES,
    WINDOW,
    CheckFailed,
    colour_hues,
    find_chromium,
    image_problem,
    render,
    shown_value,
    shows,
    visible_text,
)

from captioning.tracking.links import experiment_url, run_url

__all__ = ["CHROMIUM_NAMES", "WINDOW", "CheckFailed", "image_problem", "main", "shown_value", "visible_text"]
DEFAULT_BUDGET_MS = 20_000


class CannotCheck(Exception):
    """The check cannot run here (exit 2)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reachability_problem(url: str, timeout_s: float = 10.0) -> str | None:
    """Why nothing answers HTTP at ``url`` (any status counts as an answer: the UI may sit behind auth)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"nothing answers at {url}: {getattr(exc, 'reason', exc)}"


@dataclass(frozen=True)
class RunToCheck:
    experiment_id: str
    run_id: str
    metrics: dict[str, float]  # name -> latest value
    listed_name: str  # what the runs list shows for it: its top-level run's name


def log_demo_run(tracking_uri: str) -> RunToCheck:
    """A finished run in experiment ``ui-check`` with a few metric histories and an attention sheet."""
    import numpy as np
    from mlflow.entities import Metric
    from PIL import Image, ImageDraw

    from captioning.model.visualize import attention_overlay
    from captioning.tracking.client import connect, ensure_experiment

    client = connect(tracking_uri)
    experiment_id = ensure_experiment(client, "ui-check")
    name = f"ui-check-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(experiment_id, run_name=name)
    now = int(time.time() * 1000)
    history = [Metric("train/loss", round(4.0 * math.exp(-s / 12) + 0.5, 4), now + s, s) for s in range(50)]
    for s in range(0, 50, 10):
        history.append(Metric("val/CIDEr", round(0.2 + 0.15 * s / 10, 4), now + s, s))
        history.append(Metric("val/BLEU-4", round(0.05 + 0.04 * s / 10, 4), now + s, s))
    client.log_batch(run.info.run_id, metrics=history)
    image = Image.new("RGB", (64, 64), (200, 200, 200))  # a scene like the demo's: two shapes
    ImageDraw.Draw(image).rectangle((4, 4, 27, 27), fill=(220, 30, 30))
    ImageDraw.Draw(image).ellipse((36, 36, 59, 59), fill=(40, 60, 220))
    alphas = np.full((4, 16), 0.02)  # (T, P): each word looks at its shape's cell of a 4x4 grid
    for t, cell in enumerate((0, 0, 15, 5)):
        alphas[t, cell] = 1.0
    words = ["a", "red", "circle", "<end>"]
    sheet = attention_overlay(image, words, alphas / alphas.sum(1, keepdims=True), grid=4)
    with tempfile.TemporaryDirectory(prefix="ui-check-attention-") as folder:
        sheet.save(os.path.join(folder, "1.png"))
        client.log_artifact(run.info.run_id, os.path.join(folder, "1.png"), "attention/epoch-001")
    client.set_terminated(run.info.run_id)
    latest = {m.key: m.value for m in sorted(history, key=lambda m: m.step)}
    return RunToCheck(experiment_id, run.info.run_id, latest, name)


def existing_run(tracking_uri: str, run_id: str, names: Sequence[str]) -> RunToCheck:
    """The given run and its latest metric values (model metrics only: ``system/`` ones have their own tab)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise CannotCheck(f"run {run_id} not found at {tracking_uri}: {exc}") from exc
    metrics = {k: v for k, v in run.data.metrics.items() if not k.startswith("system/")}
    if names:
        missing = sorted(set(names) - set(metrics))
        if missing:
            raise CannotCheck(f"run {run_id} has no metric {', '.join(missing)}; it has {sorted(metrics)}")
        metrics = {name: metrics[name] for name in names}
    if not metrics:
        raise CannotCheck(f"run {run_id} has no model metrics to look for")
    top = run
    while "mlflow.parentRunId" in top.data.tags:  # the runs list shows nested runs under their parent
        top = client.get_run(top.data.tags["mlflow.parentRunId"])
    return RunToCheck(run.info.experiment_id, run_id, metrics, top.info.run_name or top.info.run_id)


def find_attention_map(tracking_uri: str, run: RunToCheck) -> tuple[str, str]:
    """(run id, artifact path) of the run's latest attention sheet, else its child runs'."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)

    def pngs(run_id: str, path: str) -> list[str]:
        found = []
        for info in client.list_artifacts(run_id, path):
            if info.is_dir:
                found += pngs(run_id, info.path)
            elif info.path.endswith(".png"):
                found.append(info.path)
        return found

    children = client.search_runs(
        [run.experiment_id], f"tags.mlflow.parentRunId = '{run.run_id}'", max_results=100
    )
    for run_id in [run.run_id, *(child.info.run_id for child in children)]:
        sheets = sorted(pngs(run_id, "attention"))  # attention/epoch-NNN/ID.png: the last epoch last
        if sheets:
            latest = [p for p in sheets if p.rsplit("/", 1)[0] == sheets[-1].rsplit("/", 1)[0]]
            return run_id, latest[0]
    raise CheckFailed(
        f"run {run.run_id} (and its {len(children)} child runs) has no attention map among its "
        "artifacts (attention/epoch-NNN/*.png): was it a model with attention, trained with MLflow tracking?"
    )


def charted(text: str, name: str) -> bool:
    """A chart of ``name`` on the charts tab: MLflow titles ``xe/test_CIDEr`` as ``test_CIDEr`` in a
    section ``xe (N)`` when several metrics share the prefix."""
    prefix, _, rest = name.partition("/")
    section = re.search(r"(?<![\w/.-])" + re.escape(prefix) + r" \(\d+\)", text) is not None
    return shows(text, name) or (bool(rest) and section and shows(text, rest))


def check_run_pages(
    chromium: str, tracking_uri: str, run: RunToCheck, out: Path, budget_ms: int
) -> tuple[str, list[float]]:
    """Render the model-metrics tab (screenshot) and the overview; the summary line's metric list."""
    overview_url = str(run_url(tracking_uri, run.experiment_id, run.run_id))
    charts_url = str(run_url(tracking_uri, run.experiment_id, run.run_id, tab="model-metrics"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    timings: list[float] = []
    # The screenshot must show charts; one retry with twice the budget for a slow (loaded) machine.
    for budget in (budget_ms, 2 * budget_ms):
        dom, seconds = render(chromium, charts_url, budget_ms=budget, screenshot=out)
        timings.append(seconds)
        charts = visible_text(dom)
        if any(charted(charts, name) for name in run.metrics):
            break
    else:
        raise CheckFailed(
            f"{charts_url} shows no chart of {', '.join(run.metrics)}; its text: {charts[:600]!r}"
        )
    problem = image_problem(out)
    if problem:
        raise CheckFailed(problem)
    missing = [name for name in run.metrics if not charted(charts, name)]
    if missing:
        # Charts below the fold are rendered lazily: look again through a window tall enough for all.
        height = min(WINDOW[1] + 400 * len(run.metrics), 20_000)
        dom, seconds = render(chromium, charts_url, budget_ms=2 * budget_ms, height=height)
        timings.append(seconds)
        charts = visible_text(dom)
        missing = [name for name in run.metrics if not charted(charts, name)]
        if missing:
            raise CheckFailed(f"{charts_url} has no chart of {', '.join(missing)} (window height {height})")

    dom, seconds = render(chromium, overview_url, budget_ms=budget_ms)
    timings.append(seconds)
    table = visible_text(dom)
    shown: list[str] = []
    for name, expected in run.metrics.items():
        value = shown_value(table, name)
        if value is None:
            raise CheckFailed(f"{overview_url} shows no value for {name}; its text: {table[:600]!r}")
        if math.isfinite(expected) and not math.isclose(value, expected, rel_tol=1e-3, abs_tol=1e-9):
            raise CheckFailed(f"{overview_url} shows {name} = {value}, the run has {expected}")
        shown.append(f"{name}={value:g}")
    return ", ".join(shown), timings


def check_experiment_page(chromium: str, tracking_uri: str, run: RunToCheck, budget_ms: int) -> list[float]:
    """The experiment's address opens on its runs list, the run listed (not the GenAI overview)."""
    url = str(experiment_url(tracking_uri, run.experiment_id))
    timings: list[float] = []
    for budget in (budget_ms, 2 * budget_ms):
        dom, seconds = render(chromium, url, budget_ms=budget)
        timings.append(seconds)
        text = visible_text(dom)
        if "Run Name" in text and shows(text, run.listed_name):
            return timings
    raise CheckFailed(f"{url} does not list run {run.listed_name!r} under Run Name; its text: {text[:600]!r}")


def check_attention_map(
    chromium: str, tracking_uri: str, run: RunToCheck, found: tuple[str, str], out: Path, budget_ms: int
) -> tuple[str, int, list[float]]:
    """The attention sheet ``found`` (run id, path) is in colour as the server serves it, and its
    artifact page previews it (screenshot)."""
    from mlflow import MlflowClient

    run_id, path = found
    with tempfile.TemporaryDirectory(prefix="ui-check-map-") as folder:
        hues = colour_hues(Path(MlflowClient(tracking_uri).download_artifacts(run_id, path, folder)))
    if hues < MIN_HUES:
        raise CheckFailed(
            f"{path} of run {run_id} is no colour attention map: its strong colours fill {hues} of 12 "
            f"hues (a colour map fills at least {MIN_HUES})"
        )
    url = str(run_url(tracking_uri, run.experiment_id, run_id, tab=f"artifacts/{path}"))
    out.unlink(missing_ok=True)
    timings: list[float] = []
    for budget in (budget_ms, 2 * budget_ms):
        dom, seconds = render(chromium, url, budget_ms=budget, screenshot=out)
        timings.append(seconds)
        if f'alt="{html.escape(path)}"' in dom:  # the artifact viewer's <img> of the file
            break
    else:
        raise CheckFailed(f"{url} shows no preview of {path}; its text: {visible_text(dom)[:600]!r}")
    problem = image_problem(out)
    if problem:
        raise CheckFailed(problem)
    return f"{path} of run {run_id}", hues, timings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tracking-uri", help="an http(s) MLflow server (default: start one in a temp folder)"
    )
    parser.add_argument("--run-id", help="check this run (default: log a demo run)")
    parser.add_argument(
        "--metric", action="append", default=[], help="with --run-id: a metric to look for (repeatable)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo-output/mlflow-ui.png"),
        help="screenshot of the charts (the attention map's: OUT-attention.png beside it)",
    )
    parser.add_argument(
        "--budget-ms", type=int, default=DEFAULT_BUDGET_MS, help="Chromium virtual time per page"
    )
    args = parser.parse_args(argv)

    attention_out = args.out.with_name(f"{args.out.stem}-attention{args.out.suffix or '.png'}")
    chromium = find_chromium()
    if chromium is None:
        print(
            f"UI check cannot run: no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)}); "
            "`apt-get install chromium` (infra/setup.sh does it as root)",
            file=sys.stderr,
        )
        return 2
    if args.tracking_uri and not args.tracking_uri.startswith(("http://", "https://")):
        print(f"UI check cannot run: {args.tracking_uri} is not an http(s) server", file=sys.stderr)
        return 2

    # MLflow's client retries a dead server with backoff for minutes; the check is meant to fail fast.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one attention map to fetch
    server = None
    with tempfile.TemporaryDirectory(prefix="ui-check-mlflow-") as state:
        try:
            tracking_uri = args.tracking_uri
            if tracking_uri is None:
                from captioning.services.mlflow_server import MlflowServer, MlflowServerError

                server = MlflowServer(state, port=free_port())
                try:
                    server.start()
                except MlflowServerError as exc:
                    raise CannotCheck(f"could not start an MLflow server: {exc}") from exc
                tracking_uri = server.url
            problem = reachability_problem(tracking_uri)
            if problem:
                raise CannotCheck(problem)
            if args.run_id:
                run = existing_run(tracking_uri, args.run_id, args.metric)
            else:
                run = log_demo_run(tracking_uri)
            attention = find_attention_map(tracking_uri, run)  # before any rendering: fail fast
            shown, timings = check_run_pages(chromium, tracking_uri, run, args.out, args.budget_ms)
            timings += check_experiment_page(chromium, tracking_uri, run, args.budget_ms)
            sheet, hues, more = check_attention_map(
                chromium, tracking_uri, run, attention, attention_out, args.budget_ms
            )
            timings += more
        except CheckFailed as exc:
            print(f"UI check FAILED: {exc}", file=sys.stderr)
            return 1
        except CannotCheck as exc:
            print(f"UI check cannot run: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # an unreachable server surfaces as one of many MLflow/requests errors
            print(f"UI check cannot run: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        finally:
            if server is not None:
                server.stop()
    renders = " + ".join(f"{t:.1f}" for t in timings)
    print(
        f"UI check OK: {args.out} shows {shown}; experiment {run.experiment_id} opens on its runs list; "
        f"{attention_out} previews the colour attention map {sheet} ({hues} hues) "
        f"(run {run.run_id} at {tracking_uri}; chromium {renders} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
