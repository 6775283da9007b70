"""The captioner as a servable MLflow pyfunc model: images in, one caption per image out.

    save_pyfunc("runs/demo/best.pt", "exported/model")            # a local MLflow model folder
    source = log_pyfunc(client, run_id, "s3://bucket/run/best.pt")  # <the run's artifact URI>/model
    model = mlflow.pyfunc.load_model(source)
    model.predict(pd.DataFrame({"image": [jpeg_bytes]}))                        # column "caption"
    model.predict(pd.DataFrame({"image": [jpeg_bytes]}), params={"beam_size": 5})
    mlflow.pyfunc.load_model(source, model_config={"file_root": "/data/photos"})   # paths under it too

    python -m mlflow models serve -m exported/model --env-manager local -p 5001
    curl -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]},
              "params": {"beam_size": 2}}' -H 'Content-Type: application/json' localhost:5001/invocations

The model folder holds the checkpoint (artifact ``checkpoint``), a copy of the ``captioning``
package (``code/``, put on ``sys.path`` by the loader, so the model loads where the project is not
installed), pinned pip requirements, a signature (one ``image`` column of strings: base64, what
JSON serving sends, or a file path, or raw bytes; the ``beam_size``, ``max_len`` and
``length_normalization`` params, whose defaults are the checkpoint's recorded ``eval`` settings) and
an input example (a small base64 JPEG of a synthetic scene) that the MLflow UI shows. It is an
MLflow model from code (``MODEL_CODE``, the ``python_model`` file): nothing is pickled.

What a request may ask is bounded (``ServingLimits``, the model's ``model_config``; override at load
time with ``mlflow.pyfunc.load_model(uri, model_config={...})`` or, under ``mlflow models serve``, the
``MLFLOW_PYFUNC_INFERENCE_CONFIG`` JSON): images per request, encoded bytes and pixels per image
(from the header, before decoding), ``beam_size`` and ``max_len``. Image cells are bytes or base64;
a cell is read as a file only under a configured ``file_root`` (off by default: a remote caller must
not read the server's files), and a string that is neither base64 nor a file there gets the same
answer whether or not such a file exists. ``captioning serve`` (``captioning.server``) is the HTTP
endpoint that adds the request size limit and one-line errors.

The captioning itself is ``captioning.inference.Predictor``, the one ``caption_images`` uses (the
project's own preprocessing, then beam search), with the same decoding defaults, so a caption equals
``caption_images(...)[i]["caption"]`` for the same checkpoint and settings, given or not; this module
holds what is MLflow's: input cells, params, signature, saving and logging. An image that cannot
be read or decoded fails the whole request with a ValueError naming its row: a serving client must
not mistake an empty caption for an answer.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import importlib.metadata
import io
import os
import random
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.pyfunc.model import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from captioning import storage
from captioning.data.images import ImageSkipped
from captioning.data.scenes import render_scene, sample_scene
from captioning.data.vocab import Vocab
from captioning.inference import Predictor, image_settings, load_image
from captioning.model.checkpoint import decoding_of, load_checkpoint
from captioning.model_uri import CHECKPOINT_ARTIFACT

IMAGE_COLUMN = "image"
CAPTION_COLUMN = "caption"
BATCH_SIZE = 16  # images per beam search, as caption_images' default; captions do not depend on it
# Distributions the loaded model imports (through captioning.inference). The project itself travels
# as code (code_paths), not as a requirement.
REQUIREMENTS = ("torch", "torchvision", "pillow", "numpy")
_PACKAGE_DIR = Path(__file__).resolve().parent
# The model from code: MLflow runs this file (saved as code/caption_model.py) to get the model object.
MODEL_CODE = '''"""The captioner as an MLflow model from code (captioning.serving.CaptionPyfunc)."""

from mlflow.models import set_model

from captioning.serving import CaptionPyfunc

set_model(CaptionPyfunc())
'''


@dataclass(frozen=True)
class ServingLimits:
    """What one request may ask of the served model; the keys of its MLflow ``model_config``."""

    file_root: str = ""  # image cells may name files under this folder; "": bytes and base64 only
    max_images: int = 64  # images per request
    max_image_bytes: int = 20 * 2**20  # encoded bytes per image (a file's size is checked before reading)
    max_image_pixels: int = 50_000_000  # width x height from the image's header, checked before decoding
    max_beam_size: int = 20
    max_len: int = 100  # the largest ``max_len`` param

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "file_root":
                if not isinstance(value, str):
                    raise ValueError(f"file_root must be a folder path or empty, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be an int >= 1, got {value!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> ServingLimits:
        """From a ``model_config`` (None or missing keys: the defaults; unknown keys are an error)."""
        given = dict(config or {})
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(given) - names):
            raise ValueError(f"unknown serving limit(s) {unknown}; valid: {sorted(names)}")
        if given.get("file_root") is None:
            given.pop("file_root", None)
        return cls(**given)

    def to_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _under_root(value: str, root: str) -> Path | None:
    """The regular file ``value`` names inside ``root`` (symlinks resolved), else None."""
    if not root or "\0" in value:
        return None
    base = Path(root).resolve()
    try:
        target = (base / value).resolve()  # an absolute value replaces base; .. and links resolve
    except (OSError, ValueError, RuntimeError):
        return None
    if not target.is_relative_to(base):
        return None
    try:
        return target if target.is_file() else None
    except OSError:
        return None


def image_bytes(value: Any, row: int, limits: ServingLimits | None = None) -> bytes:
    """One ``image`` cell -> encoded image bytes, at most ``limits.max_image_bytes``.

    bytes (raw); str: base64, or, only when ``limits.file_root`` is set, the path of a file inside
    that folder (relative to it or absolute; JPEG's base64 starts with ``/9j/``, which reads like an
    absolute path, so a string is a path only when such a file exists there). A string that is
    neither gets one answer whether or not a file of that name exists elsewhere. Raises ValueError
    naming the row.
    """
    limits = limits or ServingLimits()
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif isinstance(value, str):
        path = _under_root(value, limits.file_root)
        if path is not None:
            size = path.stat().st_size
            if size > limits.max_image_bytes:
                raise ValueError(
                    f"row {row}: the file has {size} bytes, over the limit of {limits.max_image_bytes}"
                )
            try:
                return path.read_bytes()
            except OSError as e:
                raise ValueError(
                    f"row {row}: cannot read the file ({e.strerror or type(e).__name__})"
                ) from None
        if len(value) > limits.max_image_bytes * 4 // 3 + 4:  # base64 of more than max_image_bytes
            raise ValueError(f"row {row}: the image is over the limit of {limits.max_image_bytes} bytes")
        try:
            data = base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            shown = value if len(value) <= 60 else value[:28] + "..." + value[-28:]
            if limits.file_root:
                raise ValueError(
                    f"row {row}: {shown!r} is neither base64 image data nor a file under the file root"
                ) from None
            raise ValueError(
                f"row {row}: {shown!r} is not base64 image data (file paths are not accepted)"
            ) from None
    elif value is None or (isinstance(value, float) and value != value):  # None or NaN: a missing cell
        raise ValueError(f"row {row}: no image (empty cell)")
    else:
        raise ValueError(f"row {row}: expected image bytes or base64, got {type(value).__name__}")
    if len(data) > limits.max_image_bytes:
        raise ValueError(
            f"row {row}: the image has {len(data)} bytes, over the limit of {limits.max_image_bytes}"
        )
    return data


def image_cells(model_input: Any) -> list[Any]:
    """The ``image`` cells of a DataFrame (or Series), or the items of a list, in order."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(
                f"the input needs a column {IMAGE_COLUMN!r}; got columns {list(model_input.columns)}"
            )
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, list | tuple):
        return list(model_input)
    raise ValueError(
        f"expected a DataFrame with an {IMAGE_COLUMN!r} column or a list of images, "
        f"got {type(model_input).__name__}"
    )


def _bounded_int(params: Mapping[str, Any], name: str, maximum: int) -> int | None:
    """The param as an int in [1, maximum]; None when not given (the model's own setting)."""
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"param {name} must be an int >= 1, got {value!r}")
    try:
        number = int(value)
    except (ValueError, OverflowError):  # "2.5", nan, inf
        raise ValueError(f"param {name} must be an int >= 1, got {value!r}") from None
    if number < 1 or number != float(value):
        raise ValueError(f"param {name} must be an int >= 1, got {value!r}")
    if number > maximum:
        raise ValueError(f"param {name} must be at most {maximum} (this model's serving limit), got {number}")
    return number


def _flag(params: Mapping[str, Any], name: str) -> bool | None:
    """The param as a bool (true/false, 1/0 accepted); None when not given."""
    value = params.get(name)
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "false", "0"):
        return text in ("true", "1")
    raise ValueError(f"param {name} must be true or false, got {value!r}")


class CaptionPyfunc(PythonModel):
    """Rebuilds the captioner from the ``checkpoint`` artifact; ``predict`` captions a batch of images.

    ``model_input``: a DataFrame with an ``image`` column, or a list of cells (see ``image_bytes``).
    Through ``mlflow.pyfunc.load_model`` give a DataFrame or a Series named ``image``: MLflow's
    schema enforcement turns a bare list into a column named ``0`` before ``predict`` sees it.
    ``params``: ``beam_size``, ``max_len``, ``length_normalization``; each defaults to the
    checkpoint's recorded ``eval`` setting (the signature's param defaults are the same values).
    Every request is held to ``limits`` (the ``model_config``). Returns a DataFrame with one
    ``caption`` per input row, in order.
    """

    def __init__(self) -> None:
        self.predictor: Predictor | None = None
        self.limits = ServingLimits()

    def load_context(self, context: Any) -> None:
        self.load(
            context.artifacts[CHECKPOINT_ARTIFACT], limits=ServingLimits.from_config(context.model_config)
        )

    def load(
        self,
        checkpoint_path: str,
        device: str | torch.device | None = None,
        limits: ServingLimits | None = None,
    ) -> None:
        """What ``load_context`` does, from a local checkpoint path (CUDA when available)."""
        predictor = Predictor.from_checkpoint(checkpoint_path, device)
        limits = limits or ServingLimits()
        own = predictor.decoding
        for name, limit in (("beam_size", limits.max_beam_size), ("max_len", limits.max_len)):
            if int(own[name]) > limit:  # every request would be refused (MLflow sends the defaults)
                raise ValueError(
                    f"the model decodes with {name} {own[name]}, over the serving limit of {limit}"
                )
        self.predictor, self.limits = predictor, limits

    # model_input is annotated DataFrame only: MLflow inspects the hint, and warns on a Union.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if self.predictor is None:
            raise RuntimeError("the model is not loaded: load it with mlflow.pyfunc.load_model")
        given, limits = params or {}, self.limits
        beam_size = _bounded_int(given, "beam_size", limits.max_beam_size)
        max_len = _bounded_int(given, "max_len", limits.max_len)
        cells = image_cells(model_input)
        if len(cells) > limits.max_images:
            raise ValueError(f"{len(cells)} images in one request, over the limit of {limits.max_images}")
        images = _preprocess(self.predictor, cells, limits)
        captions = self.predictor.caption(
            images,
            beam_size=beam_size,
            max_len=max_len,
            length_normalization=_flag(given, "length_normalization"),
            batch_size=BATCH_SIZE,
        )
        return pd.DataFrame({CAPTION_COLUMN: pd.Series([c.text for c in captions], dtype=object)})


def _preprocess(predictor: Predictor, cells: Sequence[Any], limits: ServingLimits) -> list[Image.Image]:
    """Every cell decoded as in training, or one ValueError naming all the bad rows. An image with more
    pixels than ``limits`` allow is refused from its header, before it is decoded."""
    settings = predictor.settings
    settings = dataclasses.replace(
        settings, max_image_pixels=min(settings.max_image_pixels, limits.max_image_pixels)
    )
    images: list[Image.Image] = []
    errors: list[str] = []
    for row, cell in enumerate(cells):
        try:
            images.append(load_image(image_bytes(cell, row, limits), settings))
        except ImageSkipped as e:
            errors.append(f"row {row}: cannot decode the image ({e})")
        except ValueError as e:
            errors.append(str(e))
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ValueError(f"{len(errors)} of {len(cells)} images unusable: " + "; ".join(errors[:5]) + more)
    return images


def signature(decoding: Mapping[str, Any] | None = None) -> ModelSignature:
    """``image`` (string: base64 or a path; raw bytes pass too) -> ``caption``; params ``beam_size``,
    ``max_len``, ``length_normalization`` defaulting to ``decoding`` (a checkpoint's ``decoding_of``;
    None: the schema's eval defaults)."""
    d = decoding_of({}) | dict(decoding or {})
    return ModelSignature(
        inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
        outputs=Schema([ColSpec("string", CAPTION_COLUMN)]),
        params=ParamSchema(
            [
                ParamSpec("beam_size", "long", int(d["beam_size"])),
                ParamSpec("max_len", "long", int(d["max_len"])),
                ParamSpec("length_normalization", "boolean", bool(d["length_normalization"])),
            ]
        ),
    )


def input_example(image_size: int = 64) -> pd.DataFrame:
    """One ``image`` cell: a synthetic scene (``captioning.data.scenes``) as a base64 JPEG, a few KB."""
    image = render_scene(sample_scene(random.Random(0)), image_size, random.Random(1))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def pip_requirements() -> list[str]:
    """``name==version`` of the installed REQUIREMENTS, without local labels (2.13.0+cpu -> 2.13.0)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in REQUIREMENTS]


def _copy_package(target: Path) -> Path:
    """The ``captioning`` package without bytecode, as ``target/captioning``."""
    dest = target / _PACKAGE_DIR.name
    shutil.copytree(_PACKAGE_DIR, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def save_pyfunc(checkpoint_uri: str, path: str | os.PathLike[str]) -> None:
    """Write the MLflow model folder for the checkpoint at ``checkpoint_uri`` (local or s3://) to ``path``.

    ``path`` must not exist or be empty. The checkpoint is checked (format, ``data.shards``) first.
    """
    with tempfile.TemporaryDirectory(prefix="caption-pyfunc-") as tmp:
        local = os.fspath(checkpoint_uri)
        if storage.is_s3(local):
            local = os.path.join(tmp, "checkpoint.pt")
            storage.download_file(checkpoint_uri, local)
        ckpt = load_checkpoint(local)
        settings = image_settings(ckpt.get("config") or {})
        package = _copy_package(Path(tmp) / "code")
        model_code = Path(tmp) / "caption_model.py"
        model_code.write_text(MODEL_CODE, encoding="utf-8")
        mlflow.pyfunc.save_model(
            os.fspath(path),
            python_model=os.fspath(model_code),
            artifacts={CHECKPOINT_ARTIFACT: local},
            code_paths=[os.fspath(package)],
            signature=signature(decoding_of(ckpt)),
            input_example=input_example(min(settings.size, 64)),
            pip_requirements=pip_requirements(),
            model_config=ServingLimits().to_config(),  # the default limits; load-time overrides are checked
            metadata={
                "checkpoint_uri": os.fspath(checkpoint_uri),
                "checkpoint_step": int(ckpt.get("step", 0)),
                "image_size": settings.size,
                "vocab_size": len(Vocab.from_json(ckpt["vocab"])),
            },
        )


def log_pyfunc(client: MlflowClient, run_id: str, checkpoint_uri: str, artifact_path: str = "model") -> str:
    """Save the pyfunc model and upload it as ``artifact_path`` of run ``run_id``; its real location.

    The location is the run's artifact URI + ``/artifact_path`` (``mlflow-artifacts:/...``,
    ``s3://...``), not a ``runs:/`` URI: as the ``source`` of a registered version (with the same
    ``run_id``) the server resolves it, so the UI's model-versions/get-artifact requests (the
    version's MLmodel: its signature and input example) answer. It loads with
    ``mlflow.pyfunc.load_model`` too.
    """
    with tempfile.TemporaryDirectory(prefix="caption-pyfunc-") as tmp:
        folder = os.path.join(tmp, "model")
        save_pyfunc(checkpoint_uri, folder)
        client.log_artifacts(run_id, folder, artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
