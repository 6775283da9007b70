"""infra/ui_check.py: the MLflow UI rendered by headless Chromium opens the experiment on its runs list,
shows a run's metrics and previews a colour attention map among its artifacts."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image, ImageDraw

from captioning.services.mlflow_server import MlflowServer
from captioning.tracking.client import EXPERIMENT_KIND_TAG, TRAINING_KIND

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
def test_ui_shows_the_runs_list_metrics_and_a_colour_attention_map(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    shot = tmp_path / "ui.png"
    result = _run_script("--tracking-uri", mlflow_server.url, "--out", str(shot))
    assert result.returncode == 0, f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"
    ok = [line for line in result.stdout.splitlines() if line.startswith("UI check OK:")]
    assert ok and all(name in ok[0] for name in ("train/loss", "val/CIDEr", "val/BLEU-4")), result.stdout
    assert "opens on its runs list" in ok[0] and "previews the colour attention map attention/" in ok[0]
    for path in (shot, tmp_path / "ui-attention.png"):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == ui_check.WINDOW
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 16  # a rendered page, not a flat or near-flat image
    # the experiment it logged to carries MLflow's training-kind tag
    experiment = MlflowClient(mlflow_server.url).get_experiment_by_name("ui-check")
    assert experiment is not None and experiment.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND


@needs_chromium  # the script looks for the map before it renders anything
def test_a_run_without_an_attention_map_fails_and_says_so(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    client = MlflowClient(mlflow_server.url)
    run = client.create_run(client.create_experiment(f"no-maps-{uuid.uuid4().hex[:8]}"), run_name="fc-model")
    client.log_metric(run.info.run_id, "val/CIDEr", 0.5)
    result = _run_script(
        "--tracking-uri", mlflow_server.url, "--run-id", run.info.run_id, "--out", str(tmp_path / "x.png")
    )
    assert result.returncode == 1, result.stderr
    assert f"run {run.info.run_id} (and its 0 child runs) has no attention map" in result.stderr


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


def test_colour_maps_are_told_from_images_that_are_only_lit(tmp_path: Path) -> None:
    from captioning.model.visualize import attention_overlay

    scene = Image.new("RGB", (64, 64), (200, 200, 200))
    ImageDraw.Draw(scene).rectangle((4, 4, 27, 27), fill=(220, 30, 30))
    ImageDraw.Draw(scene).ellipse((36, 36, 59, 59), fill=(40, 60, 220))
    alphas = np.full((3, 16), 0.02)
    alphas[[0, 1, 2], [0, 15, 6]] = 1.0
    attention_overlay(scene, ["a", "b", "c"], alphas, grid=4).save(tmp_path / "map.png")
    assert ui_check.colour_hues(tmp_path / "map.png") >= ui_check.MIN_HUES
    # the rendering this replaced: the image darkened away from the attention, no colour map
    pixels = np.asarray(scene.resize((192, 192)), dtype=np.float32)
    lit = [pixels * (0.25 + 0.75 * np.linspace(0, 1, 192)[None, :, None] ** k) for k in (1, 2, 3)]
    Image.fromarray(np.concatenate(lit, axis=1).astype(np.uint8)).save(tmp_path / "lit.png")
    assert ui_check.colour_hues(tmp_path / "lit.png") < ui_check.MIN_HUES


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
    # charts of metrics sharing a prefix sit in a section named after it, titled without it
    charts = "Search metric charts xe (2) test_BLEU-4 test_CIDEr Model metrics (1) test_CIDEr"
    assert ui_check.charted(charts, "xe/test_CIDEr") and ui_check.charted(charts, "test_CIDEr")
    assert not ui_check.charted(charts, "xe/test_METEOR") and not ui_check.charted(charts, "scst/test_CIDEr")
