"""The captioner as a servable MLflow pyfunc model: images in, one caption per image out.

    save_pyfunc("runs/demo/best.pt", "exported/model")            # a local MLflow model folder
    source = log_pyfunc(client, run_id, "s3://bucket/run/best.pt")  # <the run's artifact URI>/model
    model = mlflow.pyfunc.load_model(source)
    model.predict(pd.DataFrame({"image": [jpeg_bytes]}))                        # column "caption"
    model.predict(pd.DataFrame({"image": [jpeg_bytes]}), params={"beam_size": 5})

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

The captioning itself is ``captioning.inference.Predictor``, the one ``caption_images`` uses (the
project's own preprocessing, then beam search), with the same decoding defaults, so a caption equals
``caption_images(...)[i]["caption"]`` for the same checkpoint and settings, given or not; this module
holds what is MLflow's: input cells, params, signature, saving and logging. An image that cannot
be read or decoded fails the whole request with a ValueError naming its row: a serving client must
not mistake an empty caption for an answer. File-path cells are read on the machine that serves
the model: expose the server only to clients trusted with its files.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import os
import random
import shutil
import tempfile
from collections.abc import Mapping, Sequence
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
from captioning.inference import Predictor, image_settings
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


def image_bytes(value: Any, row: int) -> bytes:
    """One ``image`` cell -> encoded image bytes.

    bytes (raw), ``os.PathLike`` (a file), or str: an existing file's path, else base64. JPEG's
    base64 starts with ``/9j/``, which reads like an absolute path, so a string is a path only when
    that file exists. Raises ValueError naming the row.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if os.path.isfile(value):  # never raises (long base64 strings are ENAMETOOLONG)
            try:
                return Path(value).read_bytes()
            except OSError as e:
                raise ValueError(f"row {row}: cannot read {value!r}: {e.strerror or e}") from None
        try:
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            shown = value if len(value) <= 200 else value[:197] + "..."
            raise ValueError(f"row {row}: {shown!r} is neither an existing file nor base64") from None
    if value is None or (isinstance(value, float) and value != value):  # None or NaN: a missing cell
        raise ValueError(f"row {row}: no image (empty cell)")
    raise ValueError(f"row {row}: expected image bytes, base64 or a file path, got {type(value).__name__}")


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


def _positive_int(params: Mapping[str, Any], name: str) -> int | None:
    """The param as an int >= 1; None when not given (the model's own setting)."""
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
    Returns a DataFrame with one ``caption`` per input row, in order.
    """

    def __init__(self) -> None:
        self.predictor: Predictor | None = None

    def load_context(self, context: Any) -> None:
        self.load(context.artifacts[CHECKPOINT_ARTIFACT])

    def load(self, checkpoint_path: str, device: str | torch.device | None = None) -> None:
        """What ``load_context`` does, from a local checkpoint path (CUDA when available)."""
        self.predictor = Predictor.from_checkpoint(checkpoint_path, device)

    # model_input is annotated DataFrame only: MLflow inspects the hint, and warns on a Union.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if self.predictor is None:
            raise RuntimeError("the model is not loaded: load it with mlflow.pyfunc.load_model")
        given = params or {}
        images = _preprocess(self.predictor, image_cells(model_input))
        captions = self.predictor.caption(
            images,
            beam_size=_positive_int(given, "beam_size"),
            max_len=_positive_int(given, "max_len"),
            length_normalization=_flag(given, "length_normalization"),
            batch_size=BATCH_SIZE,
        )
        return pd.DataFrame({CAPTION_COLUMN: pd.Series([c.text for c in captions], dtype=object)})


def _preprocess(predictor: Predictor, cells: Sequence[Any]) -> list[Image.Image]:
    """Every cell decoded as in training, or one ValueError naming all the bad rows."""
    images: list[Image.Image] = []
    errors: list[str] = []
    for row, cell in enumerate(cells):
        try:
            images.append(predictor.load_image(image_bytes(cell, row)))
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
