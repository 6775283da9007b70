"""The steps an orchestrator chains, as plain functions: no Prefect here (``tasks/`` wraps each one).

    key = shard_build_key(cfg, raw.karpathy_json, vocab)
    up_to_date_manifest(cfg.data.shard_dir, key)            # None: (re)build; else nothing to do
    run_id = start_pipeline_run(cfg, ["xe", "finetune", "scst"], run_name="demo-...")
    xe = train_stage("demo", "xe", "runs/demo/r1", parent_run_id=run_id, on_line=log.info)
    ft = train_stage("demo", "finetune", "runs/demo/r1", init_from=xe.checkpoint, parent_run_id=run_id)
    promotion = register_outcome(best_stage([xe, ft]), "show-attend-tell", recipe="demo")
    end_pipeline_run(run_id, "FINISHED", metrics={"test_CIDEr": ft.test_scores["CIDEr"]})

Training runs as ``torchrun -m captioning.train`` in a child process tree (``captioning.launch``), one
launch per stage, all reporting under one MLflow parent run that the orchestrator owns. A stage whose
``outcome.json`` exists is finished and is not launched again; one with a ``last.pt`` resumes from it,
so re-running a failed or cancelled pipeline with the same output continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from captioning import storage
from captioning.config import Config, load_config
from captioning.data.shards import MANIFEST_FILE, sha256_file
from captioning.data.vocab import Vocab
from captioning.inbox import dataset_id
from captioning.launch import LaunchError, run_streaming, torchrun_command

logger = logging.getLogger(__name__)

OUTCOME_FILE = "outcome.json"
DEFAULT_METRIC = "CIDEr"


class PipelineError(RuntimeError):
    """A pipeline step that cannot go on: no champion to retrain, a stage that reported no model."""


def normalize_overrides(overrides: Sequence[str] | None) -> list[str]:
    """Flow parameters take ``a.b=1`` or ``--a.b=1``; the CLI form (``--a.b=1``) comes out."""
    return [o if o.startswith("--") else f"--{o}" for o in (overrides or [])]


def load_recipe_config(recipe: str, overrides: Sequence[str] | None = None) -> Config:
    """The resolved config of a flow run (an unknown key or a bad value fails here, listing the valid keys)."""
    return load_config(recipe, normalize_overrides(overrides))


# --------------------------------------------------------------------------------------------------
# Data: is the shard build already done for these settings and inputs?
# --------------------------------------------------------------------------------------------------


def shard_build_key(cfg: Config, karpathy_json: str | os.PathLike[str], vocab: Vocab) -> str:
    """What decides a shard build: the shard settings, the split file's bytes and the vocabulary.

    Recorded as the manifest's ``config_hash``; image bytes are not hashed (too costly for COCO) - a
    dataset whose images change under an unchanged split file needs a new ``data.shard_dir``.
    """
    from captioning.data.prepare import shard_fingerprint

    payload = {
        "settings": shard_fingerprint(cfg),
        "karpathy_json": sha256_file(karpathy_json),
        "vocab": hashlib.sha256(json.dumps(vocab.to_json(), sort_keys=True).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def up_to_date_manifest(shard_dir: str, key: str) -> dict[str, Any] | None:
    """The finished build's manifest when it was made with ``key`` and every shard it lists is there
    with the size its stats file records (a stat and a small read per shard, no hashing); else None."""
    try:
        manifest = storage.read_json(storage.join(shard_dir, MANIFEST_FILE))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("config_hash") != key:
        return None
    for tar_name in manifest.get("shards") or {}:
        stem = tar_name.removesuffix(".tar")
        try:
            recorded = storage.read_json(storage.join(shard_dir, f"{stem}.stats.json")).get("bytes")
            if storage.size(storage.join(shard_dir, tar_name)) != recorded:
                return None
        except (FileNotFoundError, ValueError, AttributeError):
            return None
    return manifest


def group_config(cfg: Config, num_groups: int) -> Config:
    """Shard groups are written at the same time: split the process pool between them (a Dask
    cluster schedules for itself, so its settings stay)."""
    from captioning.config import apply_overrides

    sh = cfg.data.shards
    if sh.executor != "process" or num_groups <= 1:
        return cfg
    total = sh.num_procs or len(os.sched_getaffinity(0))
    return apply_overrides(cfg, {"data.shards.num_procs": str(max(1, total // num_groups))})


def manifest_summary(
    shard_dir: str, manifest: Mapping[str, Any], *, num_built: int = 0, num_skipped: int | None = None
) -> dict[str, Any]:
    """What a prepare-data run reports: samples and skipped images per split, shards built or kept
    (``num_skipped`` defaults to every shard: nothing was rebuilt)."""
    splits = manifest.get("splits") or {}
    kept = len(manifest.get("shards") or {}) if num_skipped is None else num_skipped
    return {
        "shard_dir": shard_dir,
        "build_key": manifest.get("config_hash"),
        "rebuilt": num_skipped is not None,
        "num_built": num_built,
        "num_skipped": kept,
        "samples": {split: v.get("num_samples", 0) for split, v in splits.items()},
        "skipped_images": {split: v.get("failures", {}) for split, v in splits.items()},
    }


def data_report(summary: Mapping[str, Any]) -> str:
    """Markdown for the orchestrator's UI: samples and skipped images per split."""
    lines = [
        f"Shards in `{summary.get('shard_dir')}`: "
        + (
            f"{summary['num_built']} built, {summary['num_skipped']} kept"
            if summary.get("rebuilt")
            else "up to date"
        ),
        "",
        "| split | samples | skipped images |",
        "|---|---|---|",
    ]
    for split, count in (summary.get("samples") or {}).items():
        skipped = (summary.get("skipped_images") or {}).get(split) or {}
        reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
        lines.append(f"| {split} | {count} | {reasons} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Training: one stage = one torchrun launch
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageOutcome:
    """A finished stage: where its best model is and how it scored on the test split."""

    stage: str
    checkpoint: str  # the stage's best.pt (local path or s3:// URI)
    test_scores: dict[str, float]
    run_id: str | None  # the stage's MLflow run (None without MLflow)
    output: str  # the run folder all stages share
    duration_s: float
    launched: bool = True  # False: it was finished already and was not launched again

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_command(
    recipe: str,
    stage: str,
    output: str,
    overrides: Sequence[str] = (),
    *,
    nproc_per_node: int,
    init_from: str | None = None,
    parent_run_id: str | None = None,
    resume: bool = False,
    register: bool = False,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
) -> list[str]:
    """The ``torchrun -m captioning.train`` command line for one stage."""
    args = ["-m", "captioning.train", "--config", recipe, "--output", output, f"--train.stages={stage}"]
    if init_from:
        args += ["--init-from", init_from]
    if parent_run_id:
        args += ["--parent-run-id", parent_run_id]
    if resume:
        args.append("--resume")
    if not register:
        args.append("--no-register")
    return torchrun_command(
        [*args, *overrides],
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        rdzv_endpoint=rdzv_endpoint,
        rdzv_id=f"{os.path.basename(output.rstrip('/'))}-{stage}" if rdzv_endpoint else None,
    )


def resolve_stages(stages: Sequence[str] | None, cfg: Config) -> list[str]:
    """The stages a run trains (default: the recipe's ``train.stages``), checked against the known ones."""
    from captioning.train import STAGE_ORDER

    chosen: list[str] = list(stages) if stages else [str(s) for s in cfg.train.stages]
    unknown = [s for s in chosen if s not in STAGE_ORDER]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise PipelineError(f"stages {chosen}: each at most once, from {list(STAGE_ORDER)}")
    return chosen


def launch_overrides(overrides: Sequence[str] | None) -> list[str]:
    """The run's overrides for one stage's launch: ``train.stages`` is set per launch, so it goes."""
    return [o for o in normalize_overrides(overrides) if o.split("=", 1)[0] != "--train.stages"]


def run_output(cfg: Config, run_name: str) -> str:
    """``{storage.run_dir}/{recipe}/{run_name}``: the folder a pipeline run's stages share."""
    return storage.join(cfg.storage.run_dir, cfg.recipe, run_name)


def outcomes_summary(outcomes: Sequence[StageOutcome]) -> dict[str, dict[str, float]]:
    return {o.stage: dict(o.test_scores) for o in outcomes}


def new_data_overrides(
    cfg: Config, karpathy_json: str, image_dir: str | None, overrides: Sequence[str] | None
) -> list[str]:
    """The run's overrides plus a ``local`` dataset at ``karpathy_json`` with shards of its own
    (``{data.shard_dir}-new/{dataset id}``), so the original shards stay as they are."""
    if not os.path.isfile(karpathy_json):
        raise PipelineError(f"new data: no split file at {karpathy_json}")
    images = image_dir or os.path.dirname(os.path.abspath(karpathy_json))
    shard_dir = f"{cfg.data.shard_dir.rstrip('/')}-new/{dataset_id(karpathy_json)}"
    replaced = ("--data.dataset", "--data.shard_dir", "--data.local.")
    kept = [o for o in normalize_overrides(overrides) if not o.split("=", 1)[0].startswith(replaced)]
    return [
        *kept,
        "--data.dataset=local",
        f"--data.local.karpathy_json={os.path.abspath(karpathy_json)}",
        f"--data.local.image_dir={images}",
        f"--data.shard_dir={shard_dir}",
    ]


def read_outcome(output: str, stage: str) -> StageOutcome | None:
    """The stage's recorded outcome, or None when it has not finished under ``output``."""
    uri = storage.join(output, stage, OUTCOME_FILE)
    if not storage.exists(uri):
        return None
    data = storage.read_json(uri)
    return StageOutcome(**{**data, "launched": False})


def train_stage(
    recipe: str,
    stage: str,
    output: str,
    overrides: Sequence[str] = (),
    *,
    init_from: str | None = None,
    parent_run_id: str | None = None,
    nproc_per_node: int | None = None,
    timeout_s: float | None = None,
    on_line: Callable[[str], None] = print,
    env: Mapping[str, str] | None = None,
) -> StageOutcome:
    """Train ``stage`` under torchrun into ``output/stage``; return where its best model is.

    A stage already finished under ``output`` is returned as it is; one interrupted earlier resumes
    from its ``last.pt``. ``nproc_per_node`` defaults to the recipe's ``train.nproc_per_node``.
    Raises LaunchError (with the last lines of output) when training fails, LaunchTimeout when it
    runs past ``timeout_s``; its whole process tree is gone either way.
    """
    overrides = normalize_overrides(overrides)
    cfg = load_config(recipe, overrides)  # a bad override fails here, before any launch
    done = read_outcome(output, stage)
    if done is not None:
        on_line(f"stage {stage} already finished in {storage.join(output, stage)}; not launched again")
        return done
    resume = storage.exists(storage.join(output, stage, "last.pt")) or storage.exists(
        storage.join(output, stage, "summary.json")
    )
    cmd = train_command(
        recipe,
        stage,
        output,
        overrides,
        nproc_per_node=nproc_per_node or cfg.train.nproc_per_node,
        init_from=init_from,
        parent_run_id=parent_run_id,
        resume=resume,
    )
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("OMP_NUM_THREADS", "1")
    child_env.setdefault("TQDM_DISABLE", "1")  # progress bars are noise in orchestrator logs
    on_line(("resuming: " if resume else "") + " ".join(cmd[2:]))
    result = run_streaming(cmd, on_line=on_line, timeout_s=timeout_s, env=child_env)
    if result.returncode != 0:
        raise LaunchError(
            f"training stage {stage} failed (exit {result.returncode}); running it again with the same "
            f"output ({output}) resumes it. Last lines:",
            result.returncode,
            result.tail,
        )
    summary = storage.read_json(storage.join(output, "summary.json"))
    stage_summary = next((s for s in summary["stages"] if s["name"] == stage), None)
    if stage_summary is None:
        raise PipelineError(f"{output}/summary.json has no stage {stage} after a successful launch")
    outcome = StageOutcome(
        stage=stage,
        checkpoint=stage_summary["best_checkpoint"],
        test_scores=dict(stage_summary["test_scores"]),
        run_id=(summary.get("stage_runs") or {}).get(stage),
        output=output,
        duration_s=round(result.duration_s, 3),
    )
    storage.write_json(storage.join(output, stage, OUTCOME_FILE), outcome.to_json())
    return outcome


def final_metrics(outcomes: Sequence[StageOutcome], best: StageOutcome) -> dict[str, float]:
    """The parent run's closing metrics: ``<stage>/test_<metric>`` per stage, ``test_<metric>`` of the best."""
    metrics = {f"{o.stage}/test_{k}": float(v) for o in outcomes for k, v in o.test_scores.items()}
    metrics.update({f"test_{k}": float(v) for k, v in best.test_scores.items()})
    return metrics


def best_stage(outcomes: Sequence[StageOutcome], metric: str = DEFAULT_METRIC) -> StageOutcome:
    """The stage with the highest test ``metric`` (the later stage on a tie)."""
    if not outcomes:
        raise PipelineError("no stage ran: nothing to choose from")
    return max(reversed(outcomes), key=lambda o: o.test_scores.get(metric, float("-inf")))


# --------------------------------------------------------------------------------------------------
# MLflow: the parent run, registration, evaluation runs
# --------------------------------------------------------------------------------------------------


def tracking_uri_of(cfg: Config) -> str:
    """The MLflow server a pipeline reports to: ``tracking.tracking_uri``, else MLFLOW_TRACKING_URI."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise PipelineError(
            "the pipeline logs to MLflow: set MLFLOW_TRACKING_URI or --tracking.tracking_uri "
            "(`captioning stack up` starts a local server and prints the variable)"
        )
    return uri


def _client(tracking_uri: str | None) -> Any:
    from captioning.mlflow_tracker import connect

    return connect(tracking_uri)


def start_pipeline_run(
    cfg: Config,
    stages: Sequence[str],
    *,
    run_name: str,
    world_size: int,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Create the MLflow parent run of a pipeline and describe it (config, vocabulary, manifest, tags).

    The run stays RUNNING: each stage's launch reports under it (``--parent-run-id``) and
    ``end_pipeline_run`` ends it.
    """
    from captioning.mlflow_tracker import MlflowTracker
    from captioning.train import describe_run

    client = _client(tracking_uri or tracking_uri_of(cfg))
    tracker = MlflowTracker.start_run(
        client,
        cfg.tracking.experiment,
        run_name,
        tags=dict(tags or {}),
        terminate_on_close=False,
        system_metrics=False,
    )
    try:
        describe_run(tracker, cfg, stages, world_size)
    finally:
        tracker.close()
    assert tracker.run_id is not None
    return tracker.run_id


def end_pipeline_run(
    run_id: str,
    status: str = "FINISHED",
    *,
    metrics: Mapping[str, float] | None = None,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> None:
    """Log the pipeline's final figures on its parent run and end it with ``status``."""
    client = _client(tracking_uri)
    for metric, number in (metrics or {}).items():
        client.log_metric(run_id, metric, float(number))
    for tag, text in (tags or {}).items():
        client.set_tag(run_id, tag, str(text))
    client.set_terminated(run_id, status)


def end_run_after_error(run_id: str, exc: BaseException, *, tracking_uri: str | None = None) -> None:
    """End the parent run after the pipeline failed (FAILED) or was cancelled or interrupted (KILLED);
    a tracking server that cannot be reached then only gets a warning: the original error matters."""
    status = "FAILED" if isinstance(exc, Exception) else "KILLED"
    try:
        end_pipeline_run(
            run_id, status, tags={"error": f"{type(exc).__name__}: {exc}"[:500]}, tracking_uri=tracking_uri
        )
    except Exception as err:
        logger.warning("could not end MLflow run %s as %s: %s", run_id, status, err)


def register_outcome(
    outcome: StageOutcome,
    model_name: str,
    *,
    recipe: str,
    metric: str = DEFAULT_METRIC,
    champion_score: float | None = None,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Register the stage's best model as a new version of ``model_name`` and run the champion gate.

    ``champion_score``: the champion re-scored on the same test data (retraining on new data).
    Returns the gate's decision as a dict (``captioning.registry.Promotion``).
    """
    from captioning.registry import register_checkpoint

    if outcome.run_id is None:
        raise PipelineError(f"stage {outcome.stage} has no MLflow run: cannot register its model")
    if metric not in outcome.test_scores:
        raise PipelineError(f"stage {outcome.stage} has no test {metric}: {sorted(outcome.test_scores)}")
    promotion = register_checkpoint(
        _client(tracking_uri),
        model_name,
        outcome.run_id,
        outcome.checkpoint,
        outcome.test_scores[metric],
        tags={"stage": outcome.stage, "recipe": recipe, **(tags or {})},
        metric=f"test_{metric}",
        champion_score=champion_score,
    )
    return {**dataclasses.asdict(promotion), "promoted": promotion.promoted}


def checkpoint_from_model(model_uri: str, *, tracking_uri: str | None = None, dst: str | None = None) -> str:
    """A registered or logged pyfunc model (``models:/name@champion``, ``runs:/id/model``) -> the local
    path of the checkpoint it packs."""
    import mlflow.artifacts

    from captioning.serving import CHECKPOINT_ARTIFACT

    _client(tracking_uri)  # fail fast with a clear message when the server is down
    folder = dst or tempfile.mkdtemp(prefix="captioning-model-")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=model_uri, dst_path=folder, tracking_uri=tracking_uri
    )
    candidates = sorted(glob.glob(os.path.join(local, "artifacts", "**", "*"), recursive=True))
    files = [c for c in candidates if os.path.isfile(c)]
    if not files:
        raise PipelineError(f"{model_uri} holds no {CHECKPOINT_ARTIFACT} artifact (not a captioning model?)")
    return files[0]


def champion_checkpoint(
    model_name: str, *, tracking_uri: str | None = None, dst: str | None = None
) -> tuple[str, str]:
    """(version, local checkpoint path) of ``model_name@champion``; PipelineError when there is none."""
    from captioning.registry import CHAMPION, champion

    found = champion(_client(tracking_uri), model_name)
    if found is None:
        raise PipelineError(
            f"registered model {model_name!r} has no {CHAMPION}: train one first (train-sat flow)"
        )
    version, _ = found
    return version, checkpoint_from_model(
        f"models:/{model_name}@{CHAMPION}", tracking_uri=tracking_uri, dst=dst
    )


def vocab_of_checkpoint(uri: str) -> Vocab:
    """The vocabulary a checkpoint was trained with (new data is encoded with it to fine-tune)."""
    from captioning.model.checkpoint import load_checkpoint

    return Vocab.from_json(load_checkpoint(uri)["vocab"])


def evaluate_source(
    checkpoint: str,
    cfg: Config,
    *,
    split: str = "test",
    results_uri: str | None = None,
) -> dict[str, Any]:
    """Score a checkpoint on ``split`` of ``cfg.data.shard_dir`` with the recipe's eval settings."""
    from captioning.evaluation.evaluate import evaluate_checkpoint

    ev = cfg.eval
    result = evaluate_checkpoint(
        checkpoint,
        cfg.data.shard_dir,
        split,
        beam_size=ev.beam_size,
        max_len=ev.max_len,
        length_normalization=ev.length_normalization,
        batch_size=cfg.data.loader.batch_size,
        num_workers=cfg.data.loader.num_workers,
        spice=ev.spice,
        timeout_s=ev.java_timeout_s,
        results_uri=results_uri,
    )
    return {"scores": dict(result.scores), "num_images": len(result.captions)}


def log_evaluation(
    scores: Mapping[str, float],
    *,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    results_file: str | None = None,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """An MLflow run holding an evaluation's scores (and its captions file); its run id."""
    from captioning.mlflow_tracker import MlflowTracker

    tracker = MlflowTracker.start_run(
        _client(tracking_uri),
        experiment,
        run_name,
        parent_run_id=parent_run_id,
        tags={"kind": "evaluation", **tags},
        system_metrics=False,
    )
    tracker.log_metrics(dict(scores), step=0)
    if results_file and os.path.exists(results_file):
        tracker.log_artifact(results_file)
    tracker.close()
    assert tracker.run_id is not None
    return tracker.run_id


def scores_table(rows: Mapping[str, Mapping[str, float]], metrics: Sequence[str] | None = None) -> str:
    """A Markdown table: one row per name (stage, model), one column per metric."""
    from captioning.evaluation.metrics import METRICS

    cols = list(metrics or METRICS)
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, scores in rows.items():
        cells = [f"{scores[m]:.4f}" if m in scores else "-" for m in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
