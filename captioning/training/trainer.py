"""The training loop: one stage (cross-entropy or self-critical) from start or checkpoint to its best model.

    result = fit_stage(StageSetup(...), model, vocab, dist, tracker)     # what train.py calls per stage

Plain functions that take their collaborators (STYLE habit 5): ``train_one_epoch`` runs batches
through a step function (``XeStep`` or ``ScstStep``), ``validate`` decodes the validation split
with beam search and scores it with pycocoevalcap, ``fit_stage`` wires epochs, validation, the
learning-rate schedule, early stopping, checkpoints and the final test evaluation.

Files of a stage under ``stage_dir`` (a local folder or s3://): ``last.pt`` (everything needed to
resume: model, optimiser, schedule, scaler, every rank's RNG states, epoch and batch position,
best score; rewritten every ``checkpoint_every_steps`` and at each epoch end), ``best.pt`` (the
model of the best validation epoch), ``val/epoch-NNN.json`` (each validation's scores and
captions), ``test-captions.json`` (COCO results format) and ``summary.json`` (written last: the
stage is done).

Resuming replays the interrupted epoch's batches up to the saved position without training on
them: batches depend only on (seed, epoch), so the rest of the run sees exactly the batches, RNG
states and weights the uninterrupted run saw.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from captioning import storage
from captioning.data.loader import Batch, CaptionLoader
from captioning.data.vocab import Vocab
from captioning.evaluation.evaluate import EvalResult, evaluate
from captioning.model.captioner import Captioner
from captioning.model.checkpoint import load_checkpoint, save_checkpoint
from captioning.tracking import Tracker
from captioning.training.dist import DistInfo, all_gather_object, all_reduce_sum, barrier
from captioning.training.objective import CaptionObjective, XeForward
from captioning.training.optim import LrSchedule, build_optimizer, group_lrs
from captioning.training.scst import CiderReward, ScstForward, greedy_baseline, mean_of_others, scst_loss
from captioning.training.state import TrainState, capture_rng, restore_rng

logger = logging.getLogger(__name__)

StageKind = Literal["xe", "scst"]


class StageReporter(Protocol):
    """Rank 0's hooks for what a stage shows besides metrics (attention overlays, samples, plots)."""

    def validated(self, setup: StageSetup, state: TrainState, result: EvalResult) -> None: ...

    def tested(self, setup: StageSetup, state: TrainState, result: EvalResult) -> None: ...


# --------------------------------------------------------------------------------------------------
# What a stage needs (plain values, resolved from the config by captioning.train)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """How validation and test decoding and scoring run."""

    split: str = "val"
    test_split: str = "test"
    beam_size: int = 3
    max_len: int = 20
    length_normalization: bool = False
    monitor: str = "CIDEr"
    spice: bool = False
    timeout_s: float = 600.0


@dataclass(frozen=True)
class StageSetup:
    """One stage's settings. ``kind`` xe: stages 1-2; scst: stage 3."""

    name: str
    kind: StageKind
    stage_dir: str
    epochs: int
    lr_decoder: float
    lr_encoder: float
    train_encoder: bool
    fine_tune_from_block: int = 2
    grad_clip: float | None = 5.0
    early_stop_patience: int = 20
    lr_schedule: Literal["plateau", "cosine", "constant"] = "plateau"
    decay_factor: float = 0.8
    decay_patience: int = 8
    alpha_c: float = 1.0  # xe
    scheduled_sampling: float = 0.0  # xe: final probability, reached linearly over the epochs
    num_samples: int = 5  # scst
    baseline: Literal["mean", "greedy"] = "mean"  # scst
    temperature: float = 1.0  # scst
    max_len: int = 16  # scst: longest sample
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    checkpoint_every_steps: int = 0
    log_every_steps: int = 50
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # the resolved Config, stored in checkpoints

    @property
    def last_uri(self) -> str:
        return storage.join(self.stage_dir, "last.pt")

    @property
    def best_uri(self) -> str:
        return storage.join(self.stage_dir, "best.pt")

    @property
    def summary_uri(self) -> str:
        return storage.join(self.stage_dir, "summary.json")


@dataclass
class StageResult:
    """What a finished stage reports (also ``summary.json``)."""

    name: str
    best_checkpoint: str
    last_checkpoint: str
    monitor: str
    best_score: float | None
    best_epoch: int | None
    epochs: int
    steps: int
    stopped_early: bool
    test_scores: dict[str, float]
    history: list[dict[str, float]]
    duration_s: float

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16/fp16 autocast on CUDA; CPU always runs fp32."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@dataclass
class Optimization:
    """Optimiser, schedule and gradient scaler of a stage, and how a step updates the weights."""

    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    scaler: torch.amp.GradScaler
    grad_clip: float | None
    params: list[nn.Parameter]

    def update(self, loss: torch.Tensor) -> float:
        """backward, clip gradient values (seed 004), step; returns the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = (
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            if grads
            else 0.0
        )
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_value_(self.params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step_batch()
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


StepMetrics = dict[str, float]  # sums over the step's rows, pooled over ranks and steps by the logger


class XeStep:
    """One cross-entropy step: encode once per image, teacher-force its S captions, update."""

    def __init__(
        self,
        forward: nn.Module,
        objective: CaptionObjective,
        opt: Optimization,
        precision: str,
        device: torch.device,
    ) -> None:
        self.forward, self.objective, self.opt = forward, objective, opt
        self.precision, self.device = precision, device
        self.scheduled_sampling = 0.0
        self.generator: torch.Generator | None = None

    def __call__(self, batch: Batch) -> StepMetrics:
        with autocast(self.device, self.precision):
            out = self.forward(
                batch.images, batch.captions, batch.lengths, self.scheduled_sampling, self.generator
            )
            parts = self.objective(out, batch.captions, batch.lengths, batch.is_pad)
        grad_norm = self.opt.update(parts.loss)
        return {
            "loss": float(parts.loss.detach()),
            "ce_sum": parts.ce_sum,
            "tokens": float(parts.num_tokens),
            "attention": parts.attention,
            "grad_norm": grad_norm,
            "images": float(batch.num_real),
        }


class ScstStep:
    """One self-critical step: K samples per image, CIDEr-D rewards, baseline, policy gradient."""

    def __init__(
        self,
        forward: nn.Module,
        model: Captioner,
        reward: CiderReward,
        opt: Optimization,
        *,
        num_samples: int,
        baseline: str,
        temperature: float,
        max_len: int,
        precision: str,
        device: torch.device,
        generator: torch.Generator,
    ) -> None:
        if baseline == "mean" and num_samples < 2:
            raise ValueError("train.scst.baseline='mean' needs train.scst.num_samples >= 2")
        self.forward, self.model, self.reward, self.opt = forward, model, reward, opt
        self.num_samples, self.baseline, self.temperature, self.max_len = (
            num_samples,
            baseline,
            temperature,
            max_len,
        )
        self.precision, self.device, self.generator = precision, device, generator

    def __call__(self, batch: Batch) -> StepMetrics:
        with autocast(self.device, self.precision):
            gen, features = self.forward(
                batch.images, self.num_samples, self.max_len, self.temperature, self.generator
            )
        rewards = self.reward(gen.tokens, gen.lengths, batch.image_ids)  # (B, K)
        if self.baseline == "mean":
            baseline = mean_of_others(rewards)  # (B, K)
        else:
            baseline = greedy_baseline(
                self.model, features, self.reward, batch.image_ids, self.max_len
            )  # (B, 1)
            baseline = baseline.expand_as(rewards)
        assert gen.token_logprobs is not None
        loss = scst_loss(gen.token_logprobs.float(), gen.mask, rewards - baseline, batch.is_pad)
        grad_norm = self.opt.update(loss)
        real = (~batch.is_pad).float().view(-1, 1)  # (B, 1)
        return {
            "loss": float(loss.detach()),
            "reward_sum": float((rewards * real).sum()),
            "baseline_sum": float((baseline * real).sum()),
            "samples": float(real.sum() * rewards.shape[1]),
            "sample_len_sum": float((gen.lengths.float() * real).sum()),
            "grad_norm": grad_norm,
            "images": float(batch.num_real),
        }


# --------------------------------------------------------------------------------------------------
# Epochs, validation, checkpoints
# --------------------------------------------------------------------------------------------------


class MetricWindow:
    """Step metrics summed over a logging window, pooled over ranks when logged."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, metrics: StepMetrics) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def pooled(self, dist: DistInfo) -> dict[str, float]:
        """Means over the window's steps and ranks (collective: every rank calls it at the same step)."""
        keys = sorted(self.sums)
        *pooled, steps = all_reduce_sum(dist, [self.sums[k] for k in keys] + [float(self.steps)])
        totals = dict(zip(keys, pooled, strict=True))
        steps = max(steps, 1.0)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"loss": totals["loss"] / steps, "grad_norm": totals["grad_norm"] / steps}
        if "tokens" in totals:
            out["ce"] = totals["ce_sum"] / max(totals["tokens"], 1.0)
            out["attention"] = totals["attention"] / steps
        if "samples" in totals:
            out["reward"] = totals["reward_sum"] / max(totals["samples"], 1.0)
            out["baseline"] = totals["baseline_sum"] / max(totals["samples"], 1.0)
            out["sample_len"] = totals["sample_len_sum"] / max(totals["samples"], 1.0)
        out["images_per_s"] = totals["images"] / elapsed  # all ranks together
        return out


def train_one_epoch(
    step_fn: Callable[[Batch], StepMetrics],
    loader: CaptionLoader,
    state: TrainState,
    dist: DistInfo,
    tracker: Tracker,
    *,
    log_every_steps: int,
    checkpoint_every_steps: int = 0,
    save_checkpoint: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Train on the epoch ``state.epoch``, resuming after ``state.batch_in_epoch`` batches.

    ``save_checkpoint`` runs every ``checkpoint_every_steps`` inside the epoch (its end is the
    caller's, after validation). Metrics are pooled and logged every ``log_every_steps``, at the
    epoch's end and at every such checkpoint (so that no half-filled window is lost to a resume). Returns the epoch's
    step-weighted means of the logged windows (kept in ``state.epoch_windows``, so a resumed epoch
    reports what an uninterrupted one would).
    """
    loader.set_epoch(state.epoch)
    skip = state.batch_in_epoch
    if skip == 0:
        state.epoch_windows = []
    window = MetricWindow()
    batches: Iterator[Batch] = iter(loader)
    for index, batch in enumerate(batches):
        if index < skip:
            continue  # replayed to reach the saved position; batches depend only on (seed, epoch)
        metrics = step_fn(batch)
        window.add(metrics)
        state.step += 1
        state.batch_in_epoch = index + 1
        epoch_end = state.batch_in_epoch == len(loader)
        checkpoint_due = (
            checkpoint_every_steps > 0 and state.step % checkpoint_every_steps == 0 and not epoch_end
        )
        if state.step % log_every_steps == 0 or epoch_end or checkpoint_due:
            pooled = window.pooled(dist)
            steps = float(window.steps)
            state.epoch_windows.append(
                {k: v for k, v in pooled.items() if k != "images_per_s"} | {"steps": steps}
            )
            if dist.is_main:
                tracker.log_metrics(
                    {f"train/{k}": v for k, v in pooled.items()} | {"epoch": state.epoch}, step=state.step
                )
            window = MetricWindow()
        if checkpoint_due:
            save_checkpoint()
    windows = state.epoch_windows
    total = sum(w["steps"] for w in windows) or 1.0
    keys = [k for k in (windows[0] if windows else {}) if k != "steps"]
    return {f"train/{k}": sum(w[k] * w["steps"] for w in windows) / total for k in keys}


def validate(
    model: Captioner,
    loader: CaptionLoader,
    vocab: Vocab,
    dist: DistInfo,
    ev: EvalSettings,
    results_uri: str | None,
) -> EvalResult:
    """Beam-search the split and score it (every rank gets the same result)."""
    return evaluate(
        model,
        loader,
        vocab,
        dist,
        beam_size=ev.beam_size,
        max_len=ev.max_len,
        length_normalization=ev.length_normalization,
        spice=ev.spice,
        timeout_s=ev.timeout_s,
        results_uri=results_uri,
    )


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
    ev: EvalSettings,
    *,
    resume: bool = False,
    reward: CiderReward | None = None,
    reporter: StageReporter | None = None,
) -> StageResult:
    """Train ``model`` (already on ``dist.device``, with the previous stage's weights) through one stage.

    ``loaders``: ``"train"``, ``ev.split`` and ``ev.test_split``. Returns after early stopping or
    the last epoch, with the best epoch's weights loaded into ``model`` and scored on the test split.
    """
    start = time.perf_counter()
    device = dist.device
    torch.manual_seed(setup.seed * 1000 + dist.rank)  # dropout differs per rank, reproducibly
    generator = torch.Generator(device=device)
    generator.manual_seed(setup.seed * 1000 + 500 + dist.rank)

    model.encoder.set_fine_tuning(setup.train_encoder, setup.fine_tune_from_block)
    model.train()
    train_loader = loaders["train"]
    optimizer = build_optimizer(
        model, lr_decoder=setup.lr_decoder, lr_encoder=setup.lr_encoder, train_encoder=setup.train_encoder
    )
    opt = Optimization(
        optimizer=optimizer,
        schedule=LrSchedule(
            optimizer,
            kind=setup.lr_schedule,
            total_steps=setup.epochs * len(train_loader),
            decay_factor=setup.decay_factor,
            decay_patience=setup.decay_patience,
        ),
        scaler=torch.amp.GradScaler(device.type, enabled=setup.precision == "fp16" and device.type == "cuda"),
        grad_clip=setup.grad_clip,
        params=[p for g in optimizer.param_groups for p in g["params"]],
    )
    state = TrainState(stage=setup.name)
    if resume and storage.exists(setup.last_uri):
        resume_stage(setup, model, opt, state, dist, generator)

    forward: nn.Module
    if setup.kind == "xe":
        forward = XeForward(model, train_encoder=setup.train_encoder)
    else:
        forward = ScstForward(model, train_encoder=setup.train_encoder)
    ddp: nn.Module = forward
    if dist.is_distributed:
        ddp = DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn: XeStep | ScstStep
    if setup.kind == "xe":
        step_fn = XeStep(ddp, CaptionObjective(setup.alpha_c), opt, setup.precision, device)
        step_fn.generator = generator
    else:
        if reward is None:
            raise ValueError("an SCST stage needs a CiderReward")
        step_fn = ScstStep(
            ddp,
            model,
            reward,
            opt,
            num_samples=setup.num_samples,
            baseline=setup.baseline,
            temperature=setup.temperature,
            max_len=setup.max_len,
            precision=setup.precision,
            device=device,
            generator=generator,
        )

    while state.epoch < setup.epochs and not state.stopped_early:
        if isinstance(step_fn, XeStep) and setup.scheduled_sampling > 0:
            step_fn.scheduled_sampling = setup.scheduled_sampling * state.epoch / max(1, setup.epochs - 1)
        model.train()
        epoch_means = train_one_epoch(
            step_fn,
            train_loader,
            state,
            dist,
            tracker,
            log_every_steps=setup.log_every_steps,
            checkpoint_every_steps=setup.checkpoint_every_steps,
            save_checkpoint=lambda: save_training_checkpoint(
                setup, model, vocab, opt, state, dist, generator
            ),
        )
        result = validate(
            model,
            loaders[ev.split],
            vocab,
            dist,
            ev,
            storage.join(setup.stage_dir, "val", f"epoch-{state.epoch + 1:03d}.json")
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
                    **{f"train/{k}": v for k, v in group_lrs(optimizer).items()},
                    "val/best": float(state.best_score or 0.0),
                    "epoch": state.epoch,
                },
                step=state.step,
            )
            logger.info(
                "stage %s epoch %d: val %s %.4f (best %.4f at epoch %s)%s",
                setup.name,
                state.epoch + 1,
                ev.monitor,
                score,
                state.best_score,
                (state.best_epoch or 0) + 1,
                "; learning rates decayed" if decayed else "",
            )
        state.epoch += 1
        state.batch_in_epoch = 0
        if state.epochs_since_improvement >= setup.early_stop_patience:
            state.stopped_early = True
        save_training_checkpoint(setup, model, vocab, opt, state, dist, generator)

    return finish_stage(setup, model, vocab, loaders, dist, tracker, ev, state, start, reporter)


def finish_stage(
    setup: StageSetup,
    model: Captioner,
    vocab: Vocab,
    loaders: dict[str, CaptionLoader],
    dist: DistInfo,
    tracker: Tracker,
    ev: EvalSettings,
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
    test = validate(
        model,
        loaders[ev.test_split],
        vocab,
        dist,
        ev,
        storage.join(setup.stage_dir, "test-captions.json") if dist.is_main else None,
    )
    result = StageResult(
        name=setup.name,
        best_checkpoint=setup.best_uri,
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
    )
    if dist.is_main:
        tracker.log_metrics({f"test/{k}": v for k, v in test.scores.items()}, step=state.step)
        if reporter is not None:
            reporter.tested(setup, state, test)
        storage.write_json(setup.summary_uri, result.to_json())  # last: the stage is done
    barrier(dist)
    if not all(math.isfinite(v) for v in test.scores.values()):
        logger.warning("stage %s: non-finite test scores %s", setup.name, test.scores)
    return result
