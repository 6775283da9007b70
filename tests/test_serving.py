"""The pyfunc model: same captions as ``caption_images`` and the CLI, every input form, params, bad
rows, serving, registration (signature, input example, the UI's get-artifact), every model source.

The checkpoint is a random-weights Show-Attend-Tell (ResNet-18, tiny decoder) with the demo config
(64 px squash images; decoding: beam 3, max_len 16). Its decoder weights are scaled up so that
captions differ between images and between beam sizes (at initial scale every caption is the same
word repeated).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image
from s3server import free_port
from test_caption_cli import write_tiny_checkpoint

from captioning.cli import main as cli_main
from captioning.inference import caption_images
from captioning.registry import promote_if_better, register_model
from captioning.services.mlflow_server import MlflowServer
from captioning.serving import CaptionPyfunc, ServingLimits, log_pyfunc, pip_requirements, save_pyfunc

SIZES = ((80, 60), (50, 90), (200, 100))  # (width, height): landscape, portrait, wide

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    # Sharpened decoder: at normal scale every caption repeats one word, and beam sizes or image
    # order could not be told apart.
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", decoder_scale=4.0, step=7)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (width, height) in enumerate(SIZES):
        rng = np.random.default_rng(10 + i)
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def model_dir(checkpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pyfunc") / "model"
    save_pyfunc(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def model(model_dir: Path, images: list[str]) -> Any:
    """The saved model, loaded with its images' folder as the file root (path cells are read from it)."""
    return mlflow.pyfunc.load_model(str(model_dir), model_config={"file_root": str(Path(images[0]).parent)})


def reference(
    checkpoint: str, paths: list[str], beam_size: int | None = None, max_len: int | None = None
) -> list[str]:
    """``caption_images``' captions; a setting left None is the model's own (as the pyfunc's default)."""
    results = caption_images(paths, checkpoint, beam_size=beam_size, max_len=max_len, device="cpu")
    return [r["caption"] for r in results]


def b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def test_bytes_base64_and_paths_give_the_captions_of_caption_images(
    model: Any, checkpoint: str, images: list[str]
) -> None:
    expected = reference(checkpoint, images)
    assert len(set(expected)) > 1  # the model tells the images apart, so order is checked too
    raw = [Path(p).read_bytes() for p in images]
    for cells in (raw, [b64(p) for p in images], images, [raw[0], b64(images[1]), images[2]]):
        out = model.predict(pd.DataFrame({"image": cells}))
        assert list(out.columns) == ["caption"]
        assert list(out["caption"]) == expected


def test_params_set_beam_size_and_max_len(model: Any, checkpoint: str, images: list[str]) -> None:
    greedy = reference(checkpoint, images, beam_size=1, max_len=8)
    beam = reference(checkpoint, images, beam_size=3, max_len=8)
    assert greedy != beam  # otherwise this test could not tell the beam sizes apart
    frame = pd.DataFrame({"image": images})
    assert list(model.predict(frame, params={"beam_size": 1, "max_len": 8})["caption"]) == greedy
    assert list(model.predict(frame, params={"beam_size": 3, "max_len": 8})["caption"]) == beam
    short = model.predict(frame, params={"max_len": 2})["caption"]
    assert all(1 <= len(caption.split()) <= 2 for caption in short)
    with pytest.raises(ValueError, match="beam_size"):
        model.predict(frame, params={"beam_size": 0})


def test_a_bad_image_fails_the_request_naming_its_row(model: Any, images: list[str], tmp_path: Path) -> None:
    frame = pd.DataFrame({"image": [images[0], b"not an image", str(tmp_path / "missing.jpg")]})
    with pytest.raises(
        ValueError,
        match=r"2 of 3 images unusable: row 1: cannot decode.*; row 2: '.*missing\.jpg' is neither base64 image "
        r"data nor a file under the file root",
    ):
        model.predict(frame)
    with pytest.raises(ValueError, match=r"row 0: '\*\*\*' is neither base64"):
        model.predict(pd.DataFrame({"image": ["***"]}))


def test_series_and_plain_lists(model: Any, checkpoint: str, images: list[str]) -> None:
    expected = reference(checkpoint, images)
    # Through the loaded model a Series named "image" works; MLflow's schema enforcement turns a
    # bare list into a column named 0, so lists go to the python model itself.
    assert list(model.predict(pd.Series(images, name="image"))["caption"]) == expected
    python_model = model.unwrap_python_model()
    assert isinstance(python_model, CaptionPyfunc)
    cells = [Path(images[0]).read_bytes(), b64(images[1]), images[2]]
    assert list(python_model.predict(None, cells)["caption"]) == expected


def test_model_folder_has_checkpoint_code_requirements_and_signature(model_dir: Path) -> None:
    assert (model_dir / "artifacts" / "model.pt").is_file()
    assert (model_dir / "code" / "captioning" / "serving.py").is_file()
    assert not list((model_dir / "code").rglob("__pycache__"))
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert set(pip_requirements()) <= set(requirements)
    assert {r.split("==")[0] for r in pip_requirements()} >= {"torch", "torchvision", "pillow", "numpy"}
    assert not any(r.startswith("sat-captioning") for r in requirements)  # the project is code
    meta = mlflow.models.Model.load(str(model_dir))
    assert meta.signature is not None and meta.signature.params is not None
    assert meta.signature.inputs.input_names() == ["image"]
    defaults = {p.name: p.default for p in meta.signature.params.params}  # the checkpoint's eval settings
    assert defaults == {"beam_size": 3, "max_len": 16, "length_normalization": False}
    assert meta.metadata is not None and meta.metadata["checkpoint_step"] == 7
    # A model from code (the python_model is a file MLflow runs), nothing pickled; an input example
    # that the UI shows: one base64 JPEG.
    flavor = meta.flavors["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "model_code_path" in flavor
    assert not list(model_dir.rglob("*.pkl"))
    assert flavor["config"] == ServingLimits().to_config()  # the default limits, overridable at load
    assert meta.saved_input_example_info is not None
    example = json.loads((model_dir / meta.saved_input_example_info["artifact_path"]).read_text())
    assert example["columns"] == ["image"] and len(example["data"]) == 1
    jpeg = base64.b64decode(example["data"][0][0])
    assert jpeg[:2] == b"\xff\xd8" and len(jpeg) < 10_000


def test_the_model_loads_and_captions_with_unpickling_disabled(
    model_dir: Path, images: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pickle

    import cloudpickle

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("something was unpickled")

    class Refusing(pickle.Unpickler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            refuse()

    for module in (pickle, cloudpickle):
        monkeypatch.setattr(module, "load", refuse)
        monkeypatch.setattr(module, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refusing)
    with pytest.raises(AssertionError, match="unpickled"):  # the guard is armed
        pickle.loads(pickle.dumps(1))
    loaded = mlflow.pyfunc.load_model(str(model_dir))
    assert len(loaded.predict(pd.DataFrame({"image": [b64(images[0])]}))) == 1


def test_saving_warns_of_no_pickling_and_no_missing_example(checkpoint: str, tmp_path: Path) -> None:
    class Collect(logging.Handler):  # MLflow's loggers do not propagate to pytest's caplog
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    handler = Collect()
    logger = logging.getLogger("mlflow")
    logger.addHandler(handler)
    try:
        save_pyfunc(checkpoint, tmp_path / "model")
    finally:
        logger.removeHandler(handler)
    warned = [r.getMessage() for r in handler.records]
    assert not [w for w in warned if "CloudPickle" in w or "input example" in w.lower()], warned


def test_loads_from_its_own_code_where_captioning_is_not_installed(
    model_dir: Path, checkpoint: str, images: list[str], tmp_path: Path
) -> None:
    # A fresh interpreter in an unrelated folder, with the editable install's finder removed:
    # `captioning` must come from the model's code/ folder.
    script = textwrap.dedent(
        f"""
        import importlib.util, json, sys
        sys.meta_path[:] = [
            f for f in sys.meta_path
            if not (f.__module__ if isinstance(f, type) else type(f).__module__).startswith("__editable__")
        ]
        assert importlib.util.find_spec("captioning") is None, "captioning is importable without the model"
        import mlflow.pyfunc, pandas as pd
        model = mlflow.pyfunc.load_model({str(model_dir)!r}, model_config={{"file_root": {str(Path(images[0]).parent)!r}}})
        out = model.predict(pd.DataFrame({{"image": {images!r}}}))
        print(json.dumps({{"file": sys.modules["captioning"].__file__, "captions": list(out["caption"])}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(model_dir / "code")
    assert result["captions"] == reference(checkpoint, images)


def test_logged_to_a_run_loads_registers_and_serves_by_alias(
    mlflow_server: MlflowServer,
    checkpoint: str,
    images: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment(f"serving-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment).info.run_id
    source = log_pyfunc(client, run_id, checkpoint)
    assert source == f"{client.get_run(run_id).info.artifact_uri}/model"  # its real location
    assert source.startswith("mlflow-artifacts:/")
    assert "model/MLmodel" in {f.path for f in client.list_artifacts(run_id, "model")}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # load_model resolves URIs through it
    assert mlflow.get_tracking_uri() == mlflow_server.url
    expected = reference(checkpoint, images)
    assert (
        list(
            mlflow.pyfunc.load_model(source).predict(pd.DataFrame({"image": [b64(p) for p in images]}))[
                "caption"
            ]
        )
        == expected
    )

    name = f"captioner-{uuid.uuid4().hex[:8]}"
    version = register_model(client, name, source, run_id, tags={"checkpoint": checkpoint})
    assert promote_if_better(client, name, version, 0.5).promoted
    by_alias = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert list(by_alias.predict(pd.DataFrame({"image": [b64(images[0])]}))["caption"]) == expected[:1]


def _post_json(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_mlflow_models_serve_answers_invocations_with_params(
    model_dir: Path, checkpoint: str, images: list[str], tmp_path: Path, subprocess_tree: None
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # `mlflow models serve` execs `uvicorn` from PATH: put this venv's bin first.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir),
             "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log_path.read_text(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no /ping after 180 s:\n" + log_path.read_text()[-3000:]
            time.sleep(0.25)

        frame = {"columns": ["image"], "data": [[b64(images[0])]]}
        status, body = _post_json(
            f"{url}/invocations", {"dataframe_split": frame, "params": {"beam_size": 2}}
        )
        assert status == 200, body
        assert body == {"predictions": [{"caption": reference(checkpoint, images[:1], beam_size=2)[0]}]}

        bad = {"columns": ["image"], "data": [[b64(images[0])], ["not base64!"]]}
        status, body = _post_json(f"{url}/invocations", {"dataframe_split": bad})
        assert status == 400 and "row 1" in body["message"] + body.get("stack_trace", "")
    finally:  # the whole session: the CLI and the uvicorn it started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def test_cli_and_pyfunc_give_the_same_caption_by_default(
    images: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Recorded decoding (beam 1, 8 tokens) unlike both old defaults (CLI beam 5, pyfunc beam 3, 20 tokens).
    ckpt = write_tiny_checkpoint(
        tmp_path / "m.pt", decoder_scale=4.0, overrides=["--eval.beam_size=1", "--eval.max_len=8"]
    )
    recorded = reference(ckpt, images, beam_size=1, max_len=8)
    assert recorded != reference(ckpt, images, beam_size=5, max_len=20)
    assert recorded != reference(ckpt, images, beam_size=3, max_len=20)
    save_pyfunc(ckpt, tmp_path / "model")
    raw = [Path(p).read_bytes() for p in images]
    served = mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(pd.DataFrame({"image": raw}))
    assert cli_main(["caption", *images, "--checkpoint", ckpt]) == 0
    printed = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert printed == list(served["caption"]) == recorded


@pytest.fixture(scope="module")
def registered(mlflow_server: MlflowServer, checkpoint: str) -> dict[str, str]:
    """The checkpoint as version 1 (champion) of a new registered model, logged to a run that also
    holds the checkpoint file under ``checkpoints/``."""
    client = MlflowClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment(f"sources-{uuid.uuid4().hex[:8]}")).info.run_id
    client.log_artifact(run_id, checkpoint, "checkpoints")
    name = f"captioner-{uuid.uuid4().hex[:8]}"
    version = register_model(client, name, log_pyfunc(client, run_id, checkpoint), run_id, tags={})
    promote_if_better(client, name, version, 0.5)
    return {"name": name, "version": version, "run_id": run_id, "url": mlflow_server.url}


def test_the_ui_reads_the_registered_versions_mlmodel_signature_and_example(
    registered: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(registered["url"])
    version = client.get_model_version(registered["name"], registered["version"])
    assert version.source == f"{client.get_run(registered['run_id']).info.artifact_uri}/model"
    query = urllib.parse.urlencode({"name": registered["name"], "version": registered["version"]})
    artifact = f"{registered['url']}/model-versions/get-artifact?{query}"  # what the UI's model page asks
    with urllib.request.urlopen(f"{artifact}&path=MLmodel", timeout=30) as response:
        assert response.status == 200
        mlmodel = yaml.safe_load(response.read())
    assert json.loads(mlmodel["signature"]["inputs"]) == [
        {"type": "string", "name": "image", "required": True}
    ]
    example_path = mlmodel["saved_input_example_info"]["artifact_path"]
    with urllib.request.urlopen(f"{artifact}&path={example_path}", timeout=30) as response:
        assert response.status == 200
        assert json.loads(response.read())["columns"] == ["image"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["url"])
    signature = mlflow.models.get_model_info(
        f"models:/{registered['name']}/{registered['version']}"
    ).signature
    assert signature is not None and signature.inputs.input_names() == ["image"]
    assert signature.outputs.input_names() == ["caption"] and signature.params is not None


def test_every_model_source_captions_alike_in_the_cli_the_flows_and_serving(
    registered: dict[str, str],
    checkpoint: str,
    model_dir: Path,
    images: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tasks.tracking import fetch_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["url"])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # fetch_model's downloads go here
    name, version, run_id = registered["name"], registered["version"], registered["run_id"]
    expected = reference(checkpoint, images[:1])
    mlflow_sources = {
        f"models:/{name}@champion": (name, version, run_id),
        f"models:/{name}/{version}": (name, version, run_id),
        f"runs:/{run_id}/model": (None, None, run_id),
        f"runs:/{run_id}/checkpoints/model.pt": (None, None, run_id),
    }
    for source in [checkpoint, str(model_dir), *mlflow_sources]:
        assert cli_main(["caption", images[0], "--checkpoint", source]) == 0, source
        assert capsys.readouterr().out == f"{images[0]}: {expected[0]}\n", source
        resolved = fetch_model.fn(source, registered["url"])  # the evaluate flow's resolution
        assert Path(resolved.checkpoint).read_bytes() == Path(checkpoint).read_bytes(), source
        assert (resolved.name, resolved.version, resolved.run_id) == mlflow_sources.get(source, (None,) * 3)
    assert fetch_model.fn(f"models:/{name}@champion", registered["url"]).label == f"v{version}"
    for source in list(mlflow_sources)[:3]:  # what `mlflow models serve -m SOURCE` loads
        served = mlflow.pyfunc.load_model(source).predict(pd.DataFrame({"image": [b64(images[0])]}))
        assert list(served["caption"]) == expected, source


# --- limits: what a request may ask ---------------------------------------------------------------------


def _message(model: Any, cell: Any, **params: Any) -> str:
    with pytest.raises(ValueError) as info:
        model.predict(pd.DataFrame({"image": [cell]}), params=params or None)
    return str(info.value)


def test_no_file_is_read_without_a_file_root_and_none_is_told_to_exist(
    model_dir: Path, tmp_path: Path
) -> None:
    plain = mlflow.pyfunc.load_model(str(model_dir))  # the saved defaults: bytes and base64 only
    real = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(real)
    absent = tmp_path / "absent.png"
    said = _message(plain, str(real))
    assert said == _message(plain, str(absent)).replace("absent", "secret")
    assert "not base64 image data (file paths are not accepted)" in said
    # With a root: files outside it, .. escapes and links out of it read like absent files.
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "ok.png")
    (root / "out.png").symlink_to(real)
    rooted = mlflow.pyfunc.load_model(str(model_dir), model_config={"file_root": str(root)})
    assert list(rooted.predict(pd.DataFrame({"image": ["ok.png", str(root / "ok.png")]}))["caption"])
    template = _message(rooted, str(root / "nothing.png"))
    for outside in (str(real), "../secret.png", "out.png"):
        assert "nor a file under the file root" in _message(rooted, outside), outside
    assert template.endswith("is neither base64 image data nor a file under the file root")


def test_requests_are_bounded_by_the_serving_limits(
    model_dir: Path, images: list[str], tmp_path: Path
) -> None:
    limits = {"max_images": 2, "max_image_bytes": 30_000, "max_image_pixels": 100_000, "max_beam_size": 4}
    with pytest.raises(ValueError, match="decodes with max_len 16, over the serving limit of 12"):
        mlflow.pyfunc.load_model(str(model_dir), model_config=limits | {"max_len": 12})
    model = mlflow.pyfunc.load_model(str(model_dir), model_config=limits | {"max_len": 16})
    buffer = io.BytesIO()
    Image.open(images[0]).save(buffer, format="JPEG", quality=50)
    small = buffer.getvalue()
    with pytest.raises(ValueError, match="3 images in one request, over the limit of 2"):
        model.predict(pd.DataFrame({"image": [small] * 3}))
    assert "over the limit of 30000" in _message(model, b"\xff" * 30_001)
    assert "over the limit of 30000" in _message(model, base64.b64encode(b"\xff" * 45_000).decode())
    # A 13000 x 13000 PNG (20 KB, 507 MB once decoded) is refused from its header.
    bomb = tmp_path / "bomb.png"
    Image.new("1", (13000, 13000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 30_000
    assert "too_large" in _message(model, bomb.read_bytes())
    assert "must be at most 4 (this model's serving limit), got 100000" in _message(
        model, small, beam_size=100000
    )
    assert "must be at most 16" in _message(model, small, max_len=100000)
    assert len(model.predict(pd.DataFrame({"image": [small] * 2}), params={"beam_size": 4})) == 2


def test_serving_limits_are_the_saved_model_config_and_checked() -> None:
    assert (
        ServingLimits.from_config(None) == ServingLimits() == ServingLimits.from_config({"file_root": None})
    )
    assert ServingLimits.from_config({"max_beam_size": 3}).max_beam_size == 3
    with pytest.raises(ValueError, match=r"unknown serving limit\(s\) \['beam'\]"):
        ServingLimits.from_config({"beam": 3})
    for bad in ({"max_images": 0}, {"max_len": "5"}, {"max_beam_size": True}, {"file_root": 3}):
        with pytest.raises(ValueError):
            ServingLimits.from_config(bad)
