"""Progress of long jobs, decided in one place: a tqdm bar on a terminal, a plain line now and then otherwise.

    with show_progress(len(jobs), "shards", unit="shard", enabled=show) as bar:   # show: not --no-progress
        for job in jobs:
            ...
            bar.update(1)

``progress_mode`` is the one decision: ``off`` when the caller turned progress off, ``bar`` when the
stream (stderr) is a terminal and ``TQDM_DISABLE`` is not set, ``lines`` otherwise (a pipe, a log
file, a CI job, an orchestrator's worker). In ``lines`` mode a line such as
``shards: 40/120 shard (33%, 2.1 shard/s, ETA 38 s)`` is written every ``LINE_EVERY_S`` seconds and
once more at the end; a job that ends sooner writes nothing. Processes whose output goes into a log
get ``QUIET_ENV`` (torchrun children, the stack's worker, the deployments' job variables): no tqdm
bar from any library there and no MLflow emoji links.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any, Literal

Mode = Literal["bar", "lines", "off"]

LINE_EVERY_S = 30.0  # between plain progress lines: a few per long job, never a flood in a log

# Where output is a log: no progress bars (tqdm reads TQDM_DISABLE when imported, so it must be in the
# environment the process starts with), no MLflow artifact bars, no "🏃 View run ..." lines.
QUIET_ENV: dict[str, str] = {
    "TQDM_DISABLE": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def progress_mode(enabled: bool = True, stream: IO[str] | None = None) -> Mode:
    """How progress is shown on ``stream`` (default: stderr): ``off``, ``bar`` or ``lines``."""
    if not enabled:
        return "off"
    stream = sys.stderr if stream is None else stream
    if os.environ.get("TQDM_DISABLE", "").strip().lower() in {"1", "true", "yes"}:
        return "lines"
    try:
        return "bar" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "lines"


def format_duration(seconds: float) -> str:
    """``42 s``, ``4 min 07 s``, ``2 h 05 min``: what a person reads in an ETA."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _scaled(value: float, unit: str) -> str:
    """``1.2 GiB``: a byte count (or another binary-scaled unit) as a person reads it."""
    for prefix in ("", "Ki", "Mi", "Gi"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if not prefix else f"{value:.1f} {prefix}{unit}"
        value /= 1024
    return f"{value:.1f} Ti{unit}"


class Progress:
    """A counter towards ``total`` (None: unknown), shown as ``mode`` says."""

    def __init__(
        self,
        total: float | None,
        desc: str,
        *,
        mode: Mode,
        unit: str = "it",
        initial: float = 0,
        unit_scale: bool = False,
        stream: IO[str] | None = None,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.mode, self.unit, self.unit_scale = total, desc, mode, unit, unit_scale
        self.n = self.initial = initial
        self.stream = sys.stderr if stream is None else stream
        self.every_s = LINE_EVERY_S if every_s is None else every_s
        self.clock = clock
        self.start = self.last_line = clock()
        self.lines = 0
        self.last_n = initial
        self._bar: Any = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                unit_scale=unit_scale,
                unit_divisor=1024,
                file=self.stream,
                disable=False,  # the mode decided; an explicit value wins over tqdm's environment
            )

    def update(self, n: float = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and self.clock() - self.last_line >= self.every_s:
            self._write_line()

    def line(self) -> str:
        """What ``lines`` mode writes: ``shards: 40/120 shard (33%, 2.1 shard/s, ETA 38 s)``, or with
        ``unit_scale`` ``val2014.zip: 1.2 GiB/6.2 GiB (19%, 12.3 MiB/s, ETA 7 min 02 s)``."""
        rate = (self.n - self.initial) / max(self.clock() - self.start, 1e-9)
        if self.unit_scale:
            done, speed = _scaled(self.n, self.unit), f"{_scaled(rate, self.unit)}/s"
            total = "" if self.total is None else f"/{_scaled(self.total, self.unit)}"
        else:
            done, speed = f"{self.n:.0f}", f"{rate:.3g} {self.unit}/s"
            total = f" {self.unit}" if self.total is None else f"/{self.total:.0f} {self.unit}"
        if self.total is None:
            return f"{self.desc}: {done}{total} ({speed})"
        pct = 100.0 * self.n / self.total if self.total else 100.0
        remaining = self.total - self.n
        eta = f", ETA {format_duration(remaining / rate)}" if rate > 0 and remaining > 0 else ""
        return f"{self.desc}: {done}{total} ({pct:.0f}%, {speed}{eta})"

    def _write_line(self) -> None:
        self.last_line, self.last_n = self.clock(), self.n
        self.lines += 1
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and self.lines and self.n != self.last_n:  # a reported job's last line
            self._write_line()
        self.lines = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def show_progress(
    total: float | None,
    desc: str,
    *,
    unit: str = "it",
    initial: float = 0,
    unit_scale: bool = False,
    enabled: bool = True,
    stream: IO[str] | None = None,
) -> Progress:
    """A ``Progress`` on ``stream`` (default stderr) in the mode ``progress_mode`` picks for it."""
    return Progress(
        total,
        desc,
        mode=progress_mode(enabled, stream),
        unit=unit,
        initial=initial,
        unit_scale=unit_scale,
        stream=stream,
    )
