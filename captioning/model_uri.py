"""The one resolver of model sources: whatever names a model -> the checkpoint to read, and what it was.

    resolved = resolve_model("models:/show-attend-tell@champion")   # MLFLOW_TRACKING_URI's registry
    resolved.checkpoint            # a local file: the checkpoint the registered pyfunc packs
    resolved.name, resolved.version, resolved.run_id, resolved.label   # "show-attend-tell", "3", "1a2b...", "v3"
    resolve_model("models:/show-attend-tell/2", tracking_uri="http://127.0.0.1:5000", dst="/tmp/m")
    resolve_model("runs:/1a2b3c/model")                  # a run's logged pyfunc model folder
    resolve_model("runs:/1a2b3c/checkpoints/best.pt")    # or a checkpoint file among its artifacts
    resolve_model("runs/demo/x/scst/best.pt")            # a checkpoint path (or an exported model folder)
    resolve_model("s3://bucket/runs/x/best.pt")          # read where it lies (captioning.storage)

Every front end that takes a model goes through ``resolve_model``: ``captioning caption
--checkpoint``, the ``fetch-model`` / ``fetch-champion`` tasks (evaluate and retrain flows). A
registered version or a run's model is an MLflow pyfunc folder (``captioning.serving``); its
MLmodel names the ``checkpoint`` artifact, and only that file is downloaded (into ``dst``, a new
temporary folder by default). Nothing is downloaded for a path or an ``s3://`` URI. Sources that
name nothing (a missing file, model, alias, version or run) raise ``RegistryError`` with one line
saying what was looked for and the forms a source can take; an unreachable server raises
``TrackingUnavailable``.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from captioning import storage
from captioning.tracking import TrackingUnavailable

if TYPE_CHECKING:
    from mlflow import MlflowClient

SOURCE_FORMS = (
    "a checkpoint path, an s3:// URI, runs:/RUN_ID/PATH, models:/NAME@ALIAS or models:/NAME/VERSION"
)
CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc's artifact key (captioning.serving)


class RegistryError(RuntimeError):
    """Nothing to fetch or register: a model source that names nothing (no such file, registered model,
    alias, version or run), a stage without a tracking run or score. Retrying gives the same answer."""


@dataclass(frozen=True)
class ResolvedModel:
    """What a model source resolved to: the checkpoint to read and, for MLflow sources, where it came from."""

    source: str  # as given
    checkpoint: str  # a local file, or the s3:// URI itself
    name: str | None = None  # registered model (models:/ sources)
    version: str | None = None  # its version number
    run_id: str | None = None  # the MLflow run that logged the model (runs:/ and models:/ sources)

    @property
    def label(self) -> str:
        """Short name for run names and tables: ``v3``, ``run 1a2b3c4d``, or the checkpoint's path."""
        if self.version is not None:
            return f"v{self.version}"
        if self.run_id is not None:
            return f"run {self.run_id[:8]}"
        return self.source

    def tags(self) -> dict[str, str]:
        """MLflow tags recording the model: ``source`` and, where known, ``model_name``,
        ``model_version``, ``model_run_id``."""
        known = {"model_name": self.name, "model_version": self.version, "model_run_id": self.run_id}
        return {"source": self.source, **{k: v for k, v in known.items() if v is not None}}


def resolve_model(source: str, *, tracking_uri: str | None = None, dst: str | None = None) -> ResolvedModel:
    """Resolve ``source`` (one of ``SOURCE_FORMS``) to its checkpoint; see the module doc.

    ``tracking_uri``: the MLflow server of ``models:/`` and ``runs:/`` sources (default
    MLFLOW_TRACKING_URI; one of them must be set). ``dst``: where downloads go.
    """
    source = os.fspath(source).strip()
    if source.startswith(("models:/", "runs:/")):
        return _resolve_mlflow(source, tracking_uri, dst)
    if re.match(r"^[a-z][a-z0-9+.-]*://", source) and not storage.is_s3(source):
        raise RegistryError(f"{source}: unknown kind of model source; give {SOURCE_FORMS}")
    if not storage.exists(source):
        raise RegistryError(f"{source}: no such checkpoint; give {SOURCE_FORMS}")
    if os.path.isfile(os.path.join(source, "MLmodel")):  # an exported pyfunc folder (save_pyfunc)
        checkpoint = os.path.join(source, _checkpoint_path(_read_mlmodel(source), source))
        if not os.path.isfile(checkpoint):
            raise RegistryError(f"{source}: its MLmodel names a {CHECKPOINT_ARTIFACT} that is not there")
        return ResolvedModel(source, checkpoint)
    return ResolvedModel(source, source)


def _resolve_mlflow(source: str, tracking_uri: str | None, dst: str | None) -> ResolvedModel:
    from mlflow.exceptions import MlflowException

    from captioning.tracking.client import connect

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackingUnavailable(
            f"{source} lives in an MLflow registry: set MLFLOW_TRACKING_URI (for the local stack: "
            'eval "$(captioning stack env)")'
        )
    client = connect(uri)
    name: str | None = None
    version: str | None = None
    run_id: str | None
    try:
        if source.startswith("runs:/"):
            run_id, _, path = source[len("runs:/") :].strip("/").partition("/")
            path = path or "model"  # runs:/RUN_ID means the run's logged model, not all its artifacts
            client.get_run(run_id)  # a clear error for a run that does not exist
            root = f"runs:/{run_id}/{path}".rstrip("/")
        else:
            name, version, run_id = _registered_version(client, source)
            root = client.get_model_version_download_uri(name, version).rstrip("/")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            message = str(e).splitlines()[0].removeprefix(f"{e.error_code}: ")
            raise RegistryError(f"{source}: {message} (at {uri})") from None
        raise
    folder = dst or tempfile.mkdtemp(prefix="captioning-model-")
    return ResolvedModel(source, _download_checkpoint(root, uri, folder, source), name, version, run_id)


def _registered_version(client: MlflowClient, source: str) -> tuple[str, str, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version, run id)."""
    from mlflow.exceptions import MlflowException

    rest = source[len("models:/") :].strip("/")
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        try:
            found = client.get_model_version_by_alias(name, alias)
        except MlflowException as e:  # no such model: RESOURCE_DOES_NOT_EXIST; no such alias: invalid
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            what = "has" if e.error_code == "INVALID_PARAMETER_VALUE" else "does not exist, so it has"
            raise RegistryError(
                f"{source}: registered model {name!r} {what} no {alias} at {client.tracking_uri} "
                "(train one first: the train-sat flow)"
            ) from None
    else:
        name, _, version = rest.rpartition("/")
        if not name or not version.isdigit():
            raise RegistryError(f"{source}: not a model URI; give {SOURCE_FORMS}")
        found = client.get_model_version(name, version)
    return name, str(found.version), found.run_id or None


def _read_mlmodel(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, "MLmodel"), encoding="utf-8") as f:
        loaded = yaml.safe_load(f)
    return loaded if isinstance(loaded, dict) else {}


def _checkpoint_path(mlmodel: dict[str, Any], where: str) -> str:
    """The ``checkpoint`` artifact's path inside the model folder, from its MLmodel."""
    flavors = mlmodel.get("flavors")
    pyfunc = flavors.get("python_function") if isinstance(flavors, dict) else None
    artifacts = pyfunc.get("artifacts") if isinstance(pyfunc, dict) else None
    entry = artifacts.get(CHECKPOINT_ARTIFACT) if isinstance(artifacts, dict) else None
    path = entry.get("path") if isinstance(entry, dict) else None
    if not isinstance(path, str):
        raise RegistryError(f"{where}: a model without a {CHECKPOINT_ARTIFACT!r} artifact (not a captioner)")
    return path


def _download_checkpoint(root: str, tracking_uri: str, folder: str, source: str) -> str:
    """The checkpoint of the model folder at ``root`` (or the file ``root`` itself), downloaded into ``folder``."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    def download(uri: str) -> str | None:
        """The local copy of ``uri``; None when there is nothing there (other failures raise)."""
        try:
            return mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=folder, tracking_uri=tracking_uri
            )
        except FileNotFoundError:  # a local artifact store
            return None
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    mlmodel = download(f"{root}/MLmodel")
    if mlmodel is None:  # no model folder there: a checkpoint file among a run's artifacts?
        local = download(root)
        if local is None:
            raise RegistryError(f"{source}: nothing at {root}; give {SOURCE_FORMS}")
        if not os.path.isfile(local):
            raise RegistryError(f"{source}: {root} is neither a model folder nor a checkpoint file")
        return local
    checkpoint = download(f"{root}/{_checkpoint_path(_read_mlmodel(os.path.dirname(mlmodel)), source)}")
    if checkpoint is None:
        raise RegistryError(f"{source}: its MLmodel names a {CHECKPOINT_ARTIFACT} that is not there")
    return checkpoint
