"""The training loop: one stage (cross-entropy or self-critical) from start or checkpoint to its best model.

    result = fit_stage(setup, model, vocab, loaders, dist, tracker, cfg.eval)   # what train.py calls

Plain functions that take their collaborators (STYLE habit 5): ``train_one_epoch`` runs batches
through a step function (``captioning.training.steps``), ``evaluate`` decodes the validation split
with beam search and scores it with pycocoevalcap, ``fit_stage`` wires epochs, validation, the
learning-rate schedule, early stopping, checkpoints and the final test evaluation. The stage's files
and its completion marker are described in ``captioning.training.stage``.

Resuming replays the interrupted epoch's batches up to the saved position without training on
them: batches depend only on (seed, epoch), so the rest of the run sees exactly the batches, RNG
states and weights the uninterrupted run saw.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from captioning import storage
from captioning.config import EvalConfig
from captioning.data.batch import Batch
from captioning.data.loader import CaptionLoader
from captioning.data.vocab import Vocab
from captioning.evaluation.evaluate import EvalResult, evaluate
from captioning.model.captioner import Captioner
from captioning.model.checkpoint import load_checkpoint, save_checkpoint
from captioning.progress import LINE_EVERY_S
from captioning.tracking import Tracker
from captioning.training.dist import DistInfo, all_gather_object, barrier
from captioning.training.optim import group_lrs
from captioning.training.scst import CiderReward
from captioning.training.speed import resolve_speed
from captioning.training.stage import (
    StageResult,
    StageSetup,
    XeSettings,
    check_same_settings,
    settings_fingerprint,
)
from captioning.training.stage_log import batch_line, done_line, epoch_line, stage_eta, start_line
from captioning.training.state import TrainState, capture_rng, restore_rng
from captioning.training.steps import Optimization, StepMetrics, XeStep, build_step, stage_lr_plan
from captioning.training.windows import CheckpointClock, MetricWindow

logger = logging.getLogger(__name__)
CLOCK: Callable[[], float] = time.monotonic  # the periodic checkpoints' clock (a test steps its own)


class StageReporter(Protocol):
    """Rank 0's hooks for what a stage shows besides metrics (attention overlays, samples, plots)."""

    def validated(self, setup: StageSetup, state: TrainState, result: EvalResult) -> None: ...

    def tested(self, setup: StageSetup, state: TrainState, result: EvalResult) -> None: ...


# --------------------------------------------------------------------------------------------------
# Epochs, validation, checkpoints
# --------------------------------------------------------------------------------------------------


def train_one_epoch(
    step_fn: Callable[[Batch], StepMetrics],
    loader: CaptionLoader,
    state: TrainState,
    dist: DistInfo,
    tracker: Tracker,
    *,
    log_every_steps: int,
    checkpoint_every_steps: int = 0,
    checkpoint_clock: CheckpointClock | None = None,
    save_checkpoint: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Train on the epoch ``state.epoch``, resuming after ``state.batch_in_epoch`` batches.

    ``save_checkpoint`` runs every ``checkpoint_every_steps`` inside the epoch and, checked at each
    logging step, whenever ``checkpoint_clock`` says one is due (the epoch's end is the caller's,
    after validation). Metrics are pooled and logged every ``log_every_steps``, at the
    epoch's end and at every such checkpoint (so that no half-filled window is lost to a resume). Returns the epoch's
    step-weighted means of the logged windows (kept in ``state.epoch_windows``, so a resumed epoch
    reports what an uninterrupted one would).
    """
    loader.set_epoch(state.epoch)
    skip = state.batch_in_epoch
    if skip == 0:
        state.epoch_windows = []
    window = MetricWindow()
    started = last_line = time.perf_counter()  # rank 0 logs a progress line at most every LINE_EVERY_S
    batches: Iterator[Batch] = iter(loader)
    for index, batch in enumerate(batches):
        if index < skip:
            continue  # replayed to reach the saved position; batches depend only on (seed, epoch)
        if index == skip:
            started = last_line = time.perf_counter()  # the rate counts trained batches, not replayed ones
        metrics = step_fn(batch)
        window.add(metrics)
        state.step += 1
        state.batch_in_epoch = index + 1
        epoch_end = state.batch_in_epoch == len(loader)
        log_due = state.step % log_every_steps == 0 or epoch_end
        checkpoint_due = not epoch_end and (
            (checkpoint_every_steps > 0 and state.step % checkpoint_every_steps == 0)
            or (log_due and checkpoint_clock is not None and checkpoint_clock.due(dist))
        )
        if log_due or checkpoint_due:
            pooled = window.pooled(dist)
            steps = float(window.steps)
            state.epoch_windows.append(
                {k: v for k, v in pooled.items() if k != "images_per_s"} | {"steps": steps}
            )
            if dist.is_main:
                tracker.log_metrics(
                    {f"train/{k}": v for k, v in pooled.items()} | {"epoch": state.epoch}, step=state.step
                )
                if not epoch_end and time.perf_counter() - last_line >= LINE_EVERY_S:
                    last_line = time.perf_counter()
                    left = (len(loader) - state.batch_in_epoch) / max(state.batch_in_epoch - skip, 1)
                    logger.info(
                        batch_line(
                            state.stage,
                            state.epoch + 1,
                            state.batch_in_epoch,
                            len(loader),
                            pooled["loss"],
                            pooled["images_per_s"],
                            left * (last_line - started),
                        )
                    )
            window = MetricWindow()
        if checkpoint_due:
            save_checkpoint()
    windows = state.epoch_windows
    total = sum(w["steps"] for w in windows) or 1.0
    keys = [k for k in (windows[0] if windows else {}) if k != "steps"]
    return {f"train/{k}": sum(w[k] * w["steps"] for w in windows) / total for k in keys}


def save_training_checkpoint(
    setup: StageSetup,
    model: Captioner,
    vocab: Vocab,
    opt: Optimization,
    state: TrainState,
    dist: DistInfo,
    generator: torch.Generator | None,
) -> None:
    """last.pt with everything needed to resume (collective: every rank hands in its RNG states)."""
    rng = all_gather_object(dist, capture_rng(generator))
    if dist.is_main:
        save_checkpoint(
            setup.last_uri,
            model=model,
            vocab=vocab,
            config=setup.config,
            step=state.step,
            extra={
                "stage": setup.name,
                "train_state": state.state_dict(),
                "optimization": opt.state_dict(),
                "rng": rng,
                "world_size": dist.world_size,
            },
        )
    barrier(dist)


def save_best(
    setup: StageSetup, model: Captioner, vocab: Vocab, state: TrainState, scores: dict[str, float]
) -> None:
    """best.pt: the model of the best validation epoch (rank 0 only)."""
    save_checkpoint(
        setup.best_uri,
        model=model,
        vocab=vocab,
        config=setup.config,
        step=state.step,
        extra={"stage": setup.name, "epoch": state.epoch, "val_scores": dict(scores)},
    )


def resume_stage(
    setup: StageSetup,
    model: Captioner,
    opt: Optimization,
    state: TrainState,
    dist: DistInfo,
    generator: torch.Generator | None,
) -> None:
    """Load last.pt into the model, optimisation, state and this rank's RNGs."""
    ckpt = load_checkpoint(setup.last_uri)
    check_same_settings(ckpt.get("config") or {}, setup.config, setup.stage_dir)
    if ckpt.get("stage") != setup.name:
        raise ValueError(f"{setup.last_uri} belongs to stage {ckpt.get('stage')!r}, not {setup.name!r}")
    if ckpt["world_size"] != dist.world_size:
        raise ValueError(
            f"{setup.last_uri} was written by {ckpt['world_size']} processes; resuming with "
            f"{dist.world_size} would change the data order. Resume with the same number of processes."
        )
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimization"])
    state.load_state_dict(ckpt["train_state"])
    restore_rng(ckpt["rng"][dist.rank], generator)
    logger.info(
        "resumed stage %s at epoch %d, batch %d, step %d",
        setup.name,
        state.epoch,
        state.batch_in_epoch,
        state.step,
    )


# --------------------------------------------------------------------------------------------------
# A stage
# --------------------------------------------------------------------------------------------------


def fit_stage(
    setup: StageSetup,
    model: Captioner,
    vocab: Vocab,
    loaders: dict[str, CaptionLoader],
    dist: DistInfo,
    tracker: Tracker,
    ev: EvalConfig,
    *,
    resume: bool = False,
    reward: CiderReward | None = None,
    reporter: StageReporter | None = None,
) -> StageResult:
    """Train ``model`` (already on ``dist.device``, with the previous stage's weights) through one stage.

    ``loaders``: ``"train"``, ``ev.split`` and ``ev.test_split``. ``resume``: continue from the
    stage's ``last.pt``. Returns after early stopping or the last epoch, with the best epoch's
    weights loaded into ``model`` and scored on the test split.
    """
    start = time.perf_counter()
    device = dist.device
    torch.manual_seed(setup.seed * 1000 + dist.rank)  # dropout differs per rank, reproducibly
    generator = torch.Generator(device=device)
    generator.manual_seed(setup.seed * 1000 + 500 + dist.rank)

    model.encoder.set_fine_tuning(setup.train_encoder, setup.fine_tune_from_block)
    model.train()
    train_loader = loaders["train"]
    opt, step_fn = build_step(setup, model, dist, generator, reward, len(train_loader))
    state = TrainState(stage=setup.name)
    if resume and storage.exists(setup.last_uri):
        resume_stage(setup, model, opt, state, dist, generator)
    sampling = setup.objective.scheduled_sampling if isinstance(setup.objective, XeSettings) else 0.0
    if dist.is_main:
        first = min(state.epoch + 1, setup.epochs)
        steps = len(train_loader)
        unit = "samples" if setup.kind == "scst" else "captions"
        line = start_line(
            setup.name,
            first,
            setup.epochs,
            steps,
            setup.batch_size,
            dist.world_size,
            captions_per_image=setup.captions_per_image,
            unit=unit,
            rates=stage_lr_plan(setup, dist.world_size, steps).describe(unit),
            switches=resolve_speed(setup.gpu, device).describe(),
        )
        logger.info(line)
    epoch_seconds: list[float] = []  # epochs run by this process (not before a resume): the ETA's basis
    clock = CheckpointClock(setup.checkpoint_every_s, CLOCK)

    def save_last() -> None:
        save_training_checkpoint(setup, model, vocab, opt, state, dist, generator)
        clock.reset()

    while state.epoch < setup.epochs and not state.stopped_early:
        epoch_start = time.perf_counter()
        if isinstance(step_fn, XeStep) and sampling > 0:
            step_fn.scheduled_sampling = sampling * state.epoch / max(1, setup.epochs - 1)
        model.train()
        epoch_means = train_one_epoch(
            step_fn,
            train_loader,
            state,
            dist,
            tracker,
            log_every_steps=setup.log_every_steps,
            checkpoint_every_steps=setup.checkpoint_every_steps,
            checkpoint_clock=clock,
            save_checkpoint=save_last,
        )
        eval_start = time.perf_counter()
        result = evaluate(
            model,
            loaders[ev.split],
            vocab,
            dist,
            ev,
            results_uri=storage.join(setup.stage_dir, "val", f"epoch-{state.epoch + 1:03d}.json")
            if dist.is_main
            else None,
        )
        score = result.scores[ev.monitor]
        improved = state.improved(score)
        decayed = opt.schedule.step_epoch(state.epochs_since_improvement)
        record = {
            "epoch": float(state.epoch),
            **epoch_means,
            **{f"val/{k}": v for k, v in result.scores.items()},
        }
        state.history.append(record)
        if dist.is_main:
            if improved:
                save_best(setup, model, vocab, state, result.scores)
            if reporter is not None:
                reporter.validated(setup, state, result)
            tracker.log_metrics(
                {
                    **{f"val/{k}": v for k, v in result.scores.items()},
                    **{f"train/{k}": v for k, v in group_lrs(opt.optimizer).items()},
                    "val/best": float(state.best_score or 0.0),
                    "epoch": state.epoch,
                },
                step=state.step,
            )
            now = time.perf_counter()
            epoch_seconds.append(now - epoch_start)
            stops = state.epochs_since_improvement >= setup.early_stop_patience
            left = 0 if stops else setup.epochs - state.epoch - 1
            line = epoch_line(
                setup.name,
                state.epoch + 1,
                setup.epochs,
                epoch_means,
                result.scores,
                monitor=ev.monitor,
                best=(float(state.best_score or 0.0), (state.best_epoch or 0) + 1),
                epoch_s=epoch_seconds[-1],
                eta_s=stage_eta(epoch_seconds, left, now - eval_start),
                decayed=decayed,
                stopped_after=setup.early_stop_patience if stops else None,
            )
            logger.info(line)
        state.epoch += 1
        state.batch_in_epoch = 0
        if state.epochs_since_improvement >= setup.early_stop_patience:
            state.stopped_early = True
        save_last()

    return finish_stage(setup, model, vocab, loaders, dist, tracker, ev, state, start, reporter)


def finish_stage(
    setup: StageSetup,
    model: Captioner,
    vocab: Vocab,
    loaders: dict[str, CaptionLoader],
    dist: DistInfo,
    tracker: Tracker,
    ev: EvalConfig,
    state: TrainState,
    start: float,
    reporter: StageReporter | None = None,
) -> StageResult:
    """Load the best weights (saving the current ones as best when no epoch ran), score the test split."""
    if state.best_score is None:
        if dist.is_main:
            save_best(setup, model, vocab, state, {})
    else:
        model.load_state_dict(load_checkpoint(setup.best_uri)["model"])
    barrier(dist)
    test = evaluate(
        model,
        loaders[ev.test_split],
        vocab,
        dist,
        ev,
        results_uri=storage.join(setup.stage_dir, "test-captions.json") if dist.is_main else None,
    )
    result = StageResult(
        stage=setup.name,
        checkpoint=setup.best_uri,
        last_checkpoint=setup.last_uri,
        monitor=ev.monitor,
        best_score=state.best_score,
        best_epoch=state.best_epoch,
        epochs=state.epoch,
        steps=state.step,
        stopped_early=state.stopped_early,
        test_scores=dict(test.scores),
        history=list(state.history),
        duration_s=round(time.perf_counter() - start, 3),
        world_size=dist.world_size,
        run_id=getattr(tracker, "run_id", None),  # rank 0's tracker; the others hold a NullTracker
        settings=settings_fingerprint(setup.config),
    )
    if dist.is_main:
        tracker.log_metrics({f"test/{k}": v for k, v in test.scores.items()}, step=state.step)
        if reporter is not None:
            reporter.tested(setup, state, test)
        storage.write_json(setup.result_uri, result.to_json())  # last: the stage is done
    barrier(dist)
    if dist.is_main:
        best = (float(state.best_score or 0.0), (state.best_epoch or 0) + 1)
        logger.info(done_line(setup.name, result.duration_s, state.epoch, ev.monitor, best, test.scores))
    if not all(math.isfinite(v) for v in test.scores.values()):
        logger.warning("stage %s: non-finite test scores %s", setup.name, test.scores)
    return result
