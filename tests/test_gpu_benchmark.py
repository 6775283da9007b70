"""benchmarks/gpu.py --tiny, run as the bare GPU machine would run it: with only the packages that
machine has (torch, torchvision, Pillow, NumPy, onnx, onnxruntime and what they need) and the wheels
its docstring lists; every other package of the project's environment is hidden."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
ON_THE_MACHINE = ("torch", "torchvision", "pillow", "numpy", "onnx", "onnxruntime")


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def listed_wheels() -> dict[str, str]:
    """The wheels benchmarks/gpu.py's docstring says to carry: {name: version}."""
    text = SCRIPT.read_text()
    line = next(line for line in text.splitlines() if line.strip().startswith("webdataset=="))
    return {_name(n): v for n, v in (item.split("==") for item in line.split())}


def allowed_distributions() -> set[str]:
    """The machine's packages, the listed wheels, and everything those require (not extras)."""
    todo = [*ON_THE_MACHINE, *listed_wheels()]
    allowed: set[str] = set()
    while todo:
        name = _name(todo.pop())
        if name in allowed:
            continue
        allowed.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r]
    return allowed


def bare_site(root: Path) -> Path:
    """A folder holding only the allowed distributions (links to their files): with ``python -S``
    (no site-packages) and it on PYTHONPATH, nothing else of this environment can be imported."""
    site = root / "site"
    site.mkdir()
    for name in sorted(allowed_distributions()):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement met by the standard library or not installed here
        for top in sorted({Path(f).parts[0] for f in dist.files or []} - {".."}):
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    return site


def run_bare(site: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-S", *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{site}:{ROOT}", "HOME": str(site.parent)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_listed_wheels_are_the_versions_this_project_runs() -> None:
    for name, version in listed_wheels().items():
        assert metadata.version(name) == version, f"{name}: benchmarks/gpu.py lists {version}"


def test_the_bare_site_has_the_machines_packages_and_nothing_else(tmp_path: Path) -> None:
    site = bare_site(tmp_path)
    for module in ("torch", "torchvision", "PIL", "numpy", "onnx", "onnxruntime", "webdataset", "yaml"):
        assert (site / module).exists() or (site / f"{module}.py").exists(), module
    check = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
    found = run_bare(site, "-c", check, "mlflow", "prefect", "boto3", "pycocoevalcap", "av", "cv2", "tqdm")
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stderr


@pytest.mark.integration
def test_tiny_runs_on_the_bare_machines_packages(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = run_bare(bare_site(tmp_path), str(SCRIPT), "--tiny", "--report", str(report), "--workers", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    values = dict(item.split("=") for item in last.removeprefix("RESULT ").split())
    assert last.startswith("RESULT ") and list(values) == [
        "xe_img_s",
        "finetune_img_s",
        "scst_img_s",
        "beam_img_s",
        "mfu_finetune",
    ]
    assert all(float(values[k]) > 0 for k in list(values)[:4])
    assert values["mfu_finetune"] == "nan"  # no peak is known for a CPU
    data = json.loads(report.read_text())
    assert set(data["stages"]) == {"xe", "finetune", "scst", "beam"}
    for rows in data["stages"].values():
        assert set(rows) == {"off", "on"}  # compile: CUDA only unless asked
        assert all(row["gflops_per_image"] > 0 and row["step_ms"] > 0 for row in rows.values())
    assert (
        data["stages"]["finetune"]["on"]["gflops_per_image"] > data["stages"]["xe"]["on"]["gflops_per_image"]
    )
    assert data["loader"]["images"] == 64 and data["loader"]["keeps_up"] in (True, False)
    assert data["epoch_pflop"]["finetune"] > data["epoch_pflop"]["xe"] > 0


def test_a_failed_measurement_is_reported_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A GPU session is short and may be the only one: torch.compile failing there (say) must not
    lose the other figures; the report names the failure and the command exits 1."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu

    def measure(stage: str, scale: Any, switches: Any, device: Any, peak: Any) -> dict[str, Any]:
        if switches.compile == "on":
            raise RuntimeError("inductor needs a C compiler")
        row = {"images_per_s": 10.0, "step_ms": 1.0, "first_call_s": 0.1, "peak_memory_gib": 1.0}
        return row | {"gflops_per_image": 2.0, "mfu": float("nan"), "batch": 8}

    monkeypatch.setattr(gpu, "measure_stage", measure)
    monkeypatch.setattr(gpu, "measure_loader", lambda *a: {"images_per_s": 5.0, "workers": 1, "images": 8})
    with pytest.raises(SystemExit) as exit_:
        gpu.main(["--tiny", "--compile", "--report", str(tmp_path / "r.json")])
    assert exit_.value.code == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["errors"] == {"finetune on+compile": "RuntimeError: inductor needs a C compiler"}
    assert set(report["stages"]["finetune"]) == {"off", "on"} and report["loader"]["keeps_up"] is False
    out = capsys.readouterr().out
    assert "finetune  switches on+compile: FAILED RuntimeError" in out
    assert out.strip().splitlines()[-1] == (
        "RESULT xe_img_s=10.0 finetune_img_s=10.0 scst_img_s=10.0 beam_img_s=10.0 mfu_finetune=nan"
    )
