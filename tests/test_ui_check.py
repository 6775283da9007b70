"""infra/ui_check.py: the MLflow UI rendered by headless Chromium shows a run's metrics."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from captioning.services.mlflow_server import MlflowServer

SCRIPT = Path(__file__).resolve().parents[1] / "infra" / "ui_check.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ui_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ui_check = _load_script()
needs_chromium = pytest.mark.skipif(
    ui_check.find_chromium() is None,
    reason=f"no Chromium on PATH ({', '.join(ui_check.CHROMIUM_NAMES)}); infra/setup.sh installs "
    "Debian's `chromium` when run as root with apt-get",
)


def _run_script(*args: str, timeout_s: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout_s
    )


@needs_chromium
def test_ui_shows_the_metrics_of_a_run(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    shot = tmp_path / "ui.png"
    result = _run_script("--tracking-uri", mlflow_server.url, "--out", str(shot))
    assert result.returncode == 0, f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    ok = [line for line in result.stdout.splitlines() if line.startswith("UI check OK:")]
    assert ok and all(name in ok[0] for name in ("train/loss", "val/CIDEr", "val/BLEU-4")), result.stdout
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == ui_check.WINDOW
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 16  # a rendered page, not a flat or near-flat image


@needs_chromium  # the script stops before looking the run up
def test_unknown_run_is_reported_without_a_browser(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    result = _run_script(
        "--tracking-uri", mlflow_server.url, "--run-id", "nosuchrun", "--out", str(tmp_path / "x.png")
    )
    assert result.returncode == 2
    assert "run nosuchrun not found" in result.stderr


@needs_chromium  # the script stops before contacting the server
def test_unreachable_server_fails_fast(tmp_path: Path) -> None:
    from s3server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = _run_script(
        "--tracking-uri", url, "--run-id", "r", "--out", str(tmp_path / "x.png"), timeout_s=60
    )
    assert result.returncode == 2 and f"nothing answers at {url}" in result.stderr


def test_blank_wrong_size_and_broken_screenshots_are_rejected(tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.new("RGB", ui_check.WINDOW, "white").save(blank)
    assert "is blank" in ui_check.image_problem(blank)
    small = tmp_path / "small.png"
    Image.new("RGB", (10, 10), "white").save(small)
    assert "not 1400x1000" in ui_check.image_problem(small)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert "not a valid image" in ui_check.image_problem(broken)
    assert "no screenshot" in ui_check.image_problem(tmp_path / "missing.png")
    page = Image.new("RGB", ui_check.WINDOW, "white")
    page.paste((30, 100, 200), (100, 100, 400, 300))
    page.save(tmp_path / "page.png")
    assert ui_check.image_problem(tmp_path / "page.png") is None


def test_dom_text_and_metric_lookup() -> None:
    dom = (
        "<html><head><style>.a{}</style><script>var x = 'train/loss 9';</script></head>"
        "<body><div>Metric</div><div>Value</div><span>train/loss_ema</span> <span>7.5</span>"
        "<span>train/loss</span><span>0.6525</span><span>val/CIDEr</span><span>1,234.5</span></body></html>"
    )
    text = ui_check.visible_text(dom)
    assert "var x" not in text and ".a{}" not in text
    assert ui_check.shown_value(text, "train/loss") == 0.6525
    assert ui_check.shown_value(text, "val/CIDEr") == 1234.5
    assert ui_check.shown_value(text, "val/BLEU-4") is None
    assert ui_check.shows("run (val/loss_ema)", "val/loss_ema")
    assert not ui_check.shows("run (val/loss_ema)", "val/loss")
    assert not ui_check.shows("run (sec1/metric_13)", "sec1/metric_1")
