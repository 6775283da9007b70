"""The stage sequence xe -> finetune -> scst, one torchrun launch per stage: what ``captioning train``,
``captioning demo`` and the train-sat flow all run.

    result = launch_stage("demo", "xe", "runs/demo/r1", parent_run_id=run_id, on_line=print)
    results = run_stages(["xe", "finetune"], lambda stage, init: launch_stage("demo", stage, out, init_from=init))
    best = best_stage(results)                         # the highest test CIDEr; the later stage on a tie
    summary = train_pipeline("demo", output="runs/demo/r1")   # parent run, the stages, registration

Each stage runs as ``torchrun -m captioning.train --stage NAME`` in a child process tree
(``captioning.launch``) that ends with its caller. The stage folder decides (one rule,
``captioning.training.stage.stage_status``): a stage whose ``result.json`` exists is not launched
again and its recorded result is returned; an interrupted one resumes from its ``last.pt``. So running
a pipeline again with the same output continues where it stopped. Every stage starts from the
previous stage's best model (``run_stages``); the first from ``init_from`` or from scratch.

``train_pipeline`` is the sequence for a terminal: it opens the parent tracking run, runs the stages
as a plain loop over ``launch_stage``, registers the best stage's model once (champion gate) and
ends the parent run. The train-sat flow wires the same functions as Prefect tasks.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from captioning import storage
from captioning.config import Config, load_config, normalize_overrides, resolve_stages, without_keys
from captioning.launch import LaunchError, LaunchTimeout, run_streaming, torchrun_command
from captioning.progress import QUIET_ENV
from captioning.training.stage import (
    SettingsChanged,
    StageResult,
    finished_result,
    read_stage_result,
    stage_status,
)

logger = logging.getLogger(__name__)

DEFAULT_METRIC = "CIDEr"  # what picks the best stage, as the registry's champion gate compares

Launch = Callable[[str, str | None], StageResult]  # (stage, init_from) -> its result


@dataclass(frozen=True)
class Rendezvous:
    """Where the ``nnodes`` node agents of one multi-node stage launch meet: the c10d store at
    ``endpoint`` (host:port, hosted by the orchestrator, not by a node: ``host_rendezvous_store``),
    under ``run_id`` (the same on every node, a new one per launch). ``local_addr``: the address each
    node is reached at (127.0.0.1 for loopback "nodes"; None: the node's host name)."""

    endpoint: str
    run_id: str
    nnodes: int
    local_addr: str | None = None


class StageError(RuntimeError):
    """A stage sequence that cannot go on: an output holding another run, a stage that left no result."""


def stage_args(
    recipe: str,
    stage: str,
    output: str,
    overrides: Sequence[str] = (),
    *,
    init_from: str | None = None,
    parent_run_id: str | None = None,
    tracker: str = "auto",
) -> list[str]:
    """The arguments of ``captioning.train`` (``main(argv)``) for one stage of a pipeline (which warns
    about inert options once, itself)."""
    args = [
        "--stage",
        stage,
        "--config",
        recipe,
        "--output",
        output,
        "--tracker",
        tracker,
        "--no-config-warnings",
    ]
    if init_from:
        args += ["--init-from", init_from]
    if parent_run_id:
        args += ["--parent-run-id", parent_run_id]
    return [*args, *normalize_overrides(overrides)]


def stage_command(
    recipe: str,
    stage: str,
    output: str,
    overrides: Sequence[str] = (),
    *,
    nproc_per_node: int,
    init_from: str | None = None,
    parent_run_id: str | None = None,
    tracker: str = "auto",
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
    rendezvous: Rendezvous | None = None,
) -> list[str]:
    """The ``torchrun -m captioning.train`` command line for one stage: one node, several joined by a
    c10d rendezvous at ``rdzv_endpoint`` that node 0's agent hosts (a hand-started cluster), or one
    node of an orchestrated ``rendezvous`` (the train-node flow)."""
    args = stage_args(
        recipe, stage, output, overrides, init_from=init_from, parent_run_id=parent_run_id, tracker=tracker
    )
    module = ["-m", "captioning.train", *args]
    if rendezvous is not None:
        return torchrun_command(
            module,
            nproc_per_node=nproc_per_node,
            nnodes=rendezvous.nnodes,
            rdzv_endpoint=rendezvous.endpoint,
            rdzv_id=rendezvous.run_id,
            max_restarts=max_restarts,
            rdzv_hosted_elsewhere=True,
            local_addr=rendezvous.local_addr,
        )
    return torchrun_command(
        module,
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        rdzv_endpoint=rdzv_endpoint,
        rdzv_id=f"{os.path.basename(output.rstrip('/'))}-{stage}" if rdzv_endpoint else None,
        max_restarts=max_restarts,
    )


def launch_stage(
    recipe: str,
    stage: str,
    output: str,
    overrides: Sequence[str] = (),
    *,
    init_from: str | None = None,
    parent_run_id: str | None = None,
    tracker: str = "auto",
    nproc_per_node: int | None = None,
    timeout_s: float | None = None,
    on_line: Callable[[str], None] = print,
    env: Mapping[str, str] | None = None,
    rendezvous: Rendezvous | None = None,
) -> StageResult:
    """Train ``stage`` under torchrun into ``output/stage``; return its result (best checkpoint, test scores).

    A stage already finished under ``output`` is returned as it is, without a launch; one interrupted
    earlier resumes. ``nproc_per_node`` defaults to the recipe's ``train.nproc_per_node``; elastic
    restarts are the recipe's ``train.max_restarts``. Raises LaunchError (with the last lines of
    output) when training fails, LaunchTimeout when it runs past ``timeout_s``; its whole process
    tree is gone either way. With ``rendezvous`` this is one node of a multi-node launch (the
    train-node flow): whoever orchestrates the nodes ends the stage's leftover runs, not each node.
    """
    cfg = load_config(recipe, normalize_overrides(overrides))  # a bad override fails here, before a launch
    status = stage_status(output, stage)
    if status == "finished":
        return finished_stage(cfg, output, stage, on_line)
    cmd = stage_command(
        recipe,
        stage,
        output,
        overrides,
        nproc_per_node=nproc_per_node or cfg.train.nproc_per_node,
        init_from=init_from,
        parent_run_id=parent_run_id,
        tracker=tracker,
        max_restarts=cfg.train.max_restarts,
        rendezvous=rendezvous,
    )
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("OMP_NUM_THREADS", "1")
    for name, value in QUIET_ENV.items():  # no progress bars or MLflow emoji links in the streamed output
        child_env.setdefault(name, value)
    if rendezvous is not None:
        # torch's c10d rendezvous caches rank 0's worker-store address from the first round, so an agent
        # that joins a later round (a replacement node) waits forever for MASTER_ADDR; without sharing
        # the rendezvous store with the workers, rank 0 publishes it every round.
        child_env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # One node of several does not end runs: its peers' are live (the orchestrator ends leftovers).
    leftovers = StageRuns(cfg, tracker, parent_run_id if rendezvous is None else None, stage, output)
    leftovers.end("left RUNNING by an earlier attempt whose process ended without closing it")
    on_line(("resuming: " if status == "interrupted" else "") + "torchrun " + " ".join(cmd[3:]))
    try:
        launched = run_streaming(cmd, on_line=on_line, timeout_s=timeout_s, env=child_env)
        if launched.returncode != 0:
            raise LaunchError(
                f"training stage {stage} failed (exit {launched.returncode}); running it again with the "
                f"same output ({output}) resumes it. Last lines:",
                launched.returncode,
                launched.tail,
            )
    except BaseException as exc:  # failed, timed out, cancelled: the stage's runs end with the reason
        failed = type(exc) is LaunchError
        leftovers.end(stop_reason(stage, exc), status="FAILED" if failed else "KILLED", stopped=not failed)
        raise
    result = read_stage_result(output, stage)
    if result is None:
        raise StageError(f"stage {stage} exited 0 but left no result in {storage.join(output, stage)}")
    return result


def finished_stage(cfg: Config, output: str, stage: str, on_line: Callable[[str], None]) -> StageResult:
    """The recorded result of a stage finished under ``output`` with ``cfg``'s settings (else StageError)."""
    try:
        found = finished_result(output, stage, cfg.to_dict())
    except SettingsChanged as exc:
        raise StageError(str(exc)) from None
    assert found is not None
    on_line(f"stage {stage} already finished in {storage.join(output, stage)}; not launched again")
    return found


CLOCK_MARGIN_S = 5.0  # StageRuns: how far another node's clock may run behind this one's


def stop_reason(stage: str, exc: BaseException) -> str:
    if isinstance(exc, LaunchTimeout):
        return f"stage {stage} ran past its time limit and was stopped"
    if isinstance(exc, LaunchError):
        return f"stage {stage} failed (exit {exc.returncode})"
    return f"stage {stage} was stopped ({type(exc).__name__}: {exc})"[:300]


class StageRuns:
    """The MLflow runs of one stage under a parent run, for ending those a stage process left RUNNING."""

    def __init__(self, cfg: Config, tracker: str, parent_run_id: str | None, stage: str, output: str) -> None:
        from captioning.tracking.runs import configured_uri, tracker_kind

        self.cfg, self.parent_run_id, self.stage, self.output = cfg, parent_run_id, stage, output
        self.uri = configured_uri(cfg) if parent_run_id and tracker_kind(tracker, cfg) == "mlflow" else None
        # Runs of this launch start after this moment (less a margin for another node's clock).
        self.launched_ms = int((time.time() - CLOCK_MARGIN_S) * 1000)

    def end(self, reason: str, status: str = "KILLED", *, stopped: bool = False) -> None:
        """End the stage's runs left RUNNING; ``stopped`` (the launch was stopped from outside): this
        launch's runs that ended FAILED while it stopped end KILLED too (``end_leftover_runs``).
        Never raises: the stage's own outcome matters more than this bookkeeping."""
        if self.uri is None or self.parent_run_id is None:
            return
        try:
            from captioning.tracking.client import connect
            from captioning.tracking.lineage import end_leftover_runs

            client = connect(self.uri, timeout_s=self.cfg.tracking.connect_timeout_s)
            end_leftover_runs(
                client,
                self.parent_run_id,
                reason,
                status=status,
                stage=self.stage,
                output=self.output,
                failed_since_ms=self.launched_ms if stopped else None,
            )
        except Exception as exc:
            logger.warning("could not end the MLflow runs of stage %s left RUNNING: %s", self.stage, exc)


def run_stages(stages: Sequence[str], launch: Launch, init_from: str | None = None) -> list[StageResult]:
    """Each stage in order, started from the previous stage's best model (the first from ``init_from``)."""
    results: list[StageResult] = []
    for stage in stages:
        result = launch(stage, init_from)
        results.append(result)
        init_from = result.checkpoint
    return results


def best_stage(results: Sequence[StageResult], metric: str = DEFAULT_METRIC) -> StageResult:
    """The stage with the highest test ``metric`` (the later stage on a tie)."""
    if not results:
        raise StageError("no stage ran: nothing to choose from")
    return max(reversed(results), key=lambda r: r.test_scores.get(metric, float("-inf")))


def final_metrics(results: Sequence[StageResult], best: StageResult) -> dict[str, float]:
    """The parent run's closing metrics: ``<stage>/test_<metric>`` per stage, ``test_<metric>`` of the best."""
    metrics = {f"{r.stage}/test_{k}": float(v) for r in results for k, v in r.test_scores.items()}
    metrics.update({f"test_{k}": float(v) for k, v in best.test_scores.items()})
    return metrics


def run_output(cfg: Config, run_name: str) -> str:
    """``{storage.run_dir}/{recipe}/{run_name}``: the folder a pipeline run's stages share."""
    return storage.join(cfg.storage.run_dir, cfg.recipe, run_name)


def check_new_output(output: str, stages: Sequence[str]) -> None:
    """Refuse an output that already holds some of ``stages`` (the caller did not ask to resume)."""
    taken = [s for s in stages if stage_status(output, s) != "new"]
    if taken:
        raise StageError(
            f"{output} already holds stages {taken}: pass --resume to continue that run, "
            "or --output (or --storage.run_dir) for a new one"
        )


def train_pipeline(
    recipe: str,
    overrides: Sequence[str] = (),
    *,
    output: str,
    stages: Sequence[str] | None = None,
    init_from: str | None = None,
    tracker: str = "auto",
    register: bool = True,
    resume: bool = False,
    nproc_per_node: int | None = None,
    on_line: Callable[[str], None] = print,
    launch: Callable[..., StageResult] = launch_stage,
) -> dict[str, Any]:
    """The stages of ``recipe`` into ``output`` under one parent run, then the best one registered.

    ``tracker``: auto (MLflow when a tracking URI is configured, else ``OUTPUT/metrics.jsonl``),
    mlflow, jsonl or none. ``register``: with MLflow, register the best stage's model as a new
    version and run the champion gate (a failed registration is reported, training results stay).
    ``launch``: how a stage runs (``launch_stage``'s signature; tests run stages in-process).
    Returns the run's summary: every stage's result, the best stage, the registration.
    """
    from captioning.evaluation.holdouts import load_holdout, version_tags
    from captioning.registry import register_stage
    from captioning.tracking.runs import PipelineRun, configured_uri

    overrides = normalize_overrides(overrides)
    cfg = load_config(recipe, overrides)
    chosen = resolve_stages(stages, cfg)
    if not resume:
        check_new_output(output, chosen)
    per_stage = without_keys(overrides, "train.stages")  # each launch trains its own stage
    nproc = nproc_per_node or cfg.train.nproc_per_node
    if init_from:  # any model source (models:/NAME@champion ...): resolved to a checkpoint once, here
        from captioning.model_uri import resolve_model

        init_from = resolve_model(init_from, tracking_uri=configured_uri(cfg)).checkpoint
    run = PipelineRun.open(
        tracker,
        cfg,
        chosen,
        output=output,
        run_name=f"{cfg.recipe}-{os.path.basename(output.rstrip('/'))}",
        world_size=nproc,
        tags={"output": output, "orchestrator": "cli"},
    )
    registered: dict[str, Any] | None = None
    try:
        results = run_stages(
            chosen,
            lambda stage, init: launch(
                recipe,
                stage,
                output,
                per_stage,
                init_from=init,
                parent_run_id=run.run_id,
                tracker=run.kind,
                nproc_per_node=nproc,
                on_line=on_line,
            ),
            init_from,
        )
        best = best_stage(results)
        if register and run.kind == "mlflow":
            try:
                holdout = load_holdout(
                    cfg.data.shard_dir, label=cfg.data.dataset
                )  # what test_CIDEr was scored on
                registered = register_stage(
                    best,
                    cfg.tracking.registered_model,
                    recipe=cfg.recipe,
                    tags=version_tags(holdout),
                    tracking_uri=run.tracking_uri,
                )
            except Exception as exc:  # the models stay on disk; registration can be redone
                registered = {"error": f"{type(exc).__name__}: {exc}"}
                on_line(f"registration failed: {registered['error']}")
    except BaseException as exc:
        run.end_after_error(exc)
        raise
    run.end("FINISHED", final_metrics(results, best), tags={"best_stage": best.stage})
    return {
        "recipe": cfg.recipe,
        "output": output,
        "stages": [r.to_json() for r in results],
        "best_stage": best.stage,
        "checkpoint": best.checkpoint,
        "test_scores": dict(best.test_scores),
        "registered": registered,
        "tracking_run_id": run.run_id,
    }
