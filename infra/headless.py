"""Headless Chromium for checks of web pages: find the browser, render a page to its DOM (and a
screenshot) under a wall-clock limit, read the text a person sees, and judge the images it wrote.

    chromium = find_chromium()                                   # None: not installed
    dom, seconds = render(chromium, url, budget_ms=20_000, screenshot=Path("shot.png"))
    text = visible_text(dom)                                     # shows(text, "val/CIDEr")
    image_problem(Path("shot.png"))                              # None, or why it is no real screenshot
    colour_hues(Path("map.png"))                                 # hues a colour map spans (MIN_HUES)

Chromium runs with ``--no-sandbox`` (needed as root and in most containers), a throw-away profile,
and a wall-clock limit; its whole process group is killed on timeout, since headless Chromium can hang.
Used by ``infra/ui_check.py``.
"""

from __future__ import annotations

import contextlib
import html.parser
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1400, 1000)
CHROMIUM_TIMEOUT_S = 120.0
# A colour map's sheet: strongly coloured pixels (max - min over R, G, B >= STRONG) in at least
# MIN_HUES of 12 hue bins, each bin >= HUE_SHARE of the sheet. A heat map over a grey image spans
# 8-10; a sheet that only lights the image keeps its objects' few hues (2-3 on the demo scenes).
STRONG, MIN_HUES, HUE_SHARE = 60, 6, 0.002


class CheckFailed(Exception):
    """The page did not show what it should, or the browser failed on it."""


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


def colour_hues(path: Path) -> int:
    """How many of 12 hue bins the image's strongly coloured pixels fill (see ``MIN_HUES``)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
        pixels = np.asarray(rgb, dtype=np.int16)
        hue = np.asarray(rgb.convert("HSV"))[:, :, 0].astype(np.int64)  # 0..255
    strong = (pixels.max(-1) - pixels.min(-1)) >= STRONG
    shares = np.bincount(hue[strong] * 12 // 256, minlength=12) / strong.size
    return int((shares >= HUE_SHARE).sum())


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
