"""Browser check of the MLflow UI: a run's metric charts render in headless Chromium.

    .venv/bin/python infra/ui_check.py                                   # own server + a demo run
    .venv/bin/python infra/ui_check.py --tracking-uri http://127.0.0.1:5000 --run-id RUN --out shot.png

Without ``--tracking-uri`` it starts its own ``MlflowServer`` in a temporary folder; without
``--run-id`` it logs a demo run (train/loss over 50 steps, val/CIDEr and val/BLEU-4 every 10) in
the experiment ``ui-check``. Then Chromium renders two pages of the MLflow 3.17 single-page app:

    {uri}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics   screenshot + DOM: one chart per metric
    {uri}/#/experiments/{experiment_id}/runs/{run_id}                 DOM: the Metrics table, name and value

The check passes when every metric name is in both rendered DOMs (charts below the fold render
lazily: when some are missing, the charts page is rendered once more through a tall window, DOM
only), each table value matches the run's latest value, and the screenshot is a valid PNG of the window size that is not one flat
colour. Exit 0 with ``UI check OK: <out> shows <metrics>``; 1 with the reason when the check fails;
2 when it cannot run (no Chromium on PATH, tracking server unreachable, unknown run).

Chromium runs with ``--no-sandbox`` (needed as root and in most containers), a throw-away profile,
and a wall-clock limit; its whole process group is killed on timeout, since headless Chromium can hang.
"""

from __future__ import annotations

import argparse
import contextlib
import html.parser
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1400, 1000)
DEFAULT_BUDGET_MS = 20_000
CHROMIUM_TIMEOUT_S = 120.0


class CheckFailed(Exception):
    """The UI did not show what it should (exit 1)."""


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


def find_chromium() -> str | None:
    """The first Chromium-family browser on PATH."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class _TextExtractor(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "noscript"):
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "noscript") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def visible_text(dom: str) -> str:
    """The text a person sees in a DOM dump: no scripts or styles, whitespace collapsed."""
    extractor = _TextExtractor()
    extractor.feed(dom)
    return " ".join(" ".join(extractor.parts).split())


def shown_value(text: str, name: str) -> float | None:
    """The number that follows ``name`` in the rendered text (the Metrics table: name, value)."""
    match = re.search(r"(?<![\w/.-])" + re.escape(name) + r"\s+(-?\d[\d,]*\.?\d*(?:[eE][-+]?\d+)?)", text)
    return float(match.group(1).replace(",", "")) if match else None


def image_problem(path: Path, size: tuple[int, int] = WINDOW) -> str | None:
    """Why the PNG at ``path`` is not a real screenshot (missing, invalid, wrong size, one colour)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file() or path.stat().st_size == 0:
        return f"no screenshot written to {path}"
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            if image.format != "PNG":
                return f"{path} is a {image.format}, not a PNG"
            if image.size != size:
                return f"{path} is {image.size[0]}x{image.size[1]}, not {size[0]}x{size[1]}"
            colours = image.convert("RGB").getcolors(maxcolors=2)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        return f"{path} is not a valid image: {exc}"
    if colours is not None and len(colours) < 2:
        return f"{path} is blank: every pixel is {colours[0][1]}"
    return None


@dataclass(frozen=True)
class RunToCheck:
    experiment_id: str
    run_id: str
    metrics: dict[str, float]  # name -> latest value


def log_demo_run(tracking_uri: str) -> RunToCheck:
    """A finished run in experiment ``ui-check`` with a few metric histories, in one request."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("ui-check")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("ui-check")
    run = client.create_run(experiment_id, run_name=f"ui-check-{time.strftime('%Y%m%d-%H%M%S')}")
    now = int(time.time() * 1000)
    history = [Metric("train/loss", round(4.0 * math.exp(-s / 12) + 0.5, 4), now + s, s) for s in range(50)]
    for s in range(0, 50, 10):
        history.append(Metric("val/CIDEr", round(0.2 + 0.15 * s / 10, 4), now + s, s))
        history.append(Metric("val/BLEU-4", round(0.05 + 0.04 * s / 10, 4), now + s, s))
    client.log_batch(run.info.run_id, metrics=history)
    client.set_terminated(run.info.run_id)
    latest = {m.key: m.value for m in sorted(history, key=lambda m: m.step)}
    return RunToCheck(experiment_id, run.info.run_id, latest)


def existing_run(tracking_uri: str, run_id: str, names: Sequence[str]) -> RunToCheck:
    """The given run and its latest metric values (model metrics only: ``system/`` ones have their own tab)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
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
    return RunToCheck(run.info.experiment_id, run_id, metrics)


def render(
    chromium: str, url: str, *, budget_ms: int, screenshot: Path | None = None, height: int = WINDOW[1]
) -> tuple[str, float]:
    """Chromium's DOM after ``budget_ms`` of virtual time at ``url`` (and a screenshot); with its wall time."""
    with tempfile.TemporaryDirectory(prefix="ui-check-profile-") as profile:
        cmd = [
            chromium,
            "--headless=new",
            "--no-sandbox",  # root and most containers cannot use Chromium's sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",  # containers often have a 64 MB /dev/shm
            "--no-first-run",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW[0]},{height}",
            f"--virtual-time-budget={budget_ms}",
            "--run-all-compositor-stages-before-draw",
            *([f"--screenshot={screenshot}"] if screenshot else []),
            "--dump-dom",
            url,
        ]
        start = time.perf_counter()
        # Its own session, so that a hang is ended with the whole group (renderer, GPU, zygote...).
        process = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            dom, err = process.communicate(timeout=CHROMIUM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise CheckFailed(
                f"chromium did not finish within {CHROMIUM_TIMEOUT_S:.0f} s on {url} (killed)"
            ) from None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # helpers that outlived the browser
        elapsed = time.perf_counter() - start
    if process.returncode != 0:
        tail = "\n".join(line for line in err.splitlines() if "dbus" not in line)[-2000:]
        raise CheckFailed(f"chromium exited with {process.returncode} on {url}:\n{tail}")
    return dom, elapsed


def shows(text: str, name: str) -> bool:
    """``name`` as a whole metric name in ``text`` (``val/loss`` is not in ``val/loss_ema``)."""
    return re.search(r"(?<![\w/.-])" + re.escape(name) + r"(?![\w/.-])", text) is not None


def check_run_pages(
    chromium: str, tracking_uri: str, run: RunToCheck, out: Path, budget_ms: int
) -> tuple[str, list[float]]:
    """Render the model-metrics tab (screenshot) and the overview; the summary line's metric list."""
    run_url = f"{tracking_uri.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
    charts_url = f"{run_url}/model-metrics"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    timings: list[float] = []
    # The screenshot must show charts; one retry with twice the budget for a slow (loaded) machine.
    for budget in (budget_ms, 2 * budget_ms):
        dom, seconds = render(chromium, charts_url, budget_ms=budget, screenshot=out)
        timings.append(seconds)
        charts = visible_text(dom)
        if any(shows(charts, name) for name in run.metrics):
            break
    else:
        raise CheckFailed(
            f"{charts_url} shows no chart of {', '.join(run.metrics)}; its text: {charts[:600]!r}"
        )
    problem = image_problem(out)
    if problem:
        raise CheckFailed(problem)
    missing = [name for name in run.metrics if not shows(charts, name)]
    if missing:
        # Charts below the fold are rendered lazily: look again through a window tall enough for all.
        height = min(WINDOW[1] + 400 * len(run.metrics), 20_000)
        dom, seconds = render(chromium, charts_url, budget_ms=2 * budget_ms, height=height)
        timings.append(seconds)
        charts = visible_text(dom)
        missing = [name for name in run.metrics if not shows(charts, name)]
        if missing:
            raise CheckFailed(f"{charts_url} has no chart of {', '.join(missing)} (window height {height})")

    dom, seconds = render(chromium, run_url, budget_ms=budget_ms)
    timings.append(seconds)
    table = visible_text(dom)
    shown: list[str] = []
    for name, expected in run.metrics.items():
        value = shown_value(table, name)
        if value is None:
            raise CheckFailed(f"{run_url} shows no value for {name}; its text: {table[:600]!r}")
        if math.isfinite(expected) and not math.isclose(value, expected, rel_tol=1e-3, abs_tol=1e-9):
            raise CheckFailed(f"{run_url} shows {name} = {value}, the run has {expected}")
        shown.append(f"{name}={value:g}")
    return ", ".join(shown), timings


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
    parser.add_argument("--out", type=Path, default=Path("demo-output/mlflow-ui.png"), help="screenshot path")
    parser.add_argument(
        "--budget-ms", type=int, default=DEFAULT_BUDGET_MS, help="Chromium virtual time per page"
    )
    args = parser.parse_args(argv)

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
            shown, timings = check_run_pages(chromium, tracking_uri, run, args.out, args.budget_ms)
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
    print(f"UI check OK: {args.out} shows {shown} (run {run.run_id} at {tracking_uri}; chromium {renders} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
