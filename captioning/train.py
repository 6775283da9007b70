"""Train Show-Attend-Tell through its stages: ``torchrun -m captioning.train --config RECIPE [overrides]``.

    torchrun --nproc-per-node 2 -m captioning.train --config demo               # xe -> finetune -> scst
    python -m captioning.train --config demo --train.stages=xe --train.xe.epochs=1   # world size 1
    torchrun --nproc-per-node 2 -m captioning.train --config demo --resume      # continue a killed run
    python -m captioning.train --config coco --train.stages=scst --init-from runs/coco/finetune/best.pt

The shards must exist (``captioning shards --recipe RECIPE``). Every stage starts from the previous
stage's best model (``--init-from`` for the first one; otherwise from scratch), trains with DDP
(gloo on CPU, nccl on GPU), validates each epoch by beam search scored with pycocoevalcap, and
ends with a test-split evaluation. Only rank 0 writes files and reports to the tracker.

Tracking (rank 0 only): MLflow when ``tracking.tracking_uri`` or ``MLFLOW_TRACKING_URI`` is set (a
parent run, or ``--parent-run-id``; a child per stage and per test evaluation; each stage's model
registered with the champion gate unless ``--no-register``), else ``OUTPUT/metrics.jsonl``.

Output (``--output``, default ``{storage.run_dir}/{recipe}``; local or s3://): ``config.json``,
one folder per stage (see ``captioning.training.trainer``), ``metrics.jsonl`` with
``--tracker jsonl``, and ``summary.json`` (written last). ``--resume`` skips finished stages and
continues an interrupted one from its ``last.pt``; without it an output that already holds a run
is an error rather than silently overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from captioning import storage
from captioning.cli import split_overrides
from captioning.config import Config, ConfigError, config_warnings, load_config
from captioning.data.loader import CaptionLoader, build_loader
from captioning.data.shards import MANIFEST_FILE, VOCAB_FILE, read_references
from captioning.data.vocab import Vocab
from captioning.evaluation.evaluate import EvalResult
from captioning.model.captioner import Captioner
from captioning.model.checkpoint import captioner_from_checkpoint, load_checkpoint
from captioning.model.factory import build_captioner, build_embeddings
from captioning.tracking import JsonlTracker, NullTracker, Tracker
from captioning.training.dist import (
    DistInfo,
    barrier,
    broadcast_object,
    destroy_process_group,
    die_with_launcher,
    init_process_group,
)
from captioning.training.reporting import fixed_images, plot_history, write_attention_sheets, write_samples
from captioning.training.scst import CiderReward
from captioning.training.state import TrainState
from captioning.training.trainer import EvalSettings, StageResult, StageSetup, fit_stage

logger = logging.getLogger("captioning.train")

NUM_ATTENTION_IMAGES = 4  # validation images whose attention is drawn at every evaluation
NUM_SAMPLE_CAPTIONS = 25  # test images in the sample-captions table

STAGE_ORDER = ("xe", "finetune", "scst")


class TrainError(RuntimeError):
    """A run that cannot start: missing shards, an output holding another run, a bad checkpoint."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun -m captioning.train",
        description="Train the captioner's stages with DDP. Dotted overrides (--train.xe.epochs=2) follow.",
    )
    p.add_argument(
        "--config", default="demo", help="recipe name (configs/NAME.toml) or path to a TOML recipe"
    )
    p.add_argument("--output", help="run folder or s3:// prefix (default: {storage.run_dir}/{recipe})")
    p.add_argument("--resume", action="store_true", help="continue the run in --output")
    p.add_argument("--init-from", help="checkpoint whose weights the first stage starts from")
    p.add_argument(
        "--tracker",
        choices=("auto", "mlflow", "jsonl", "none"),
        default="auto",
        help="where rank 0 reports: auto = mlflow when tracking.tracking_uri or MLFLOW_TRACKING_URI is set, "
        "else OUTPUT/metrics.jsonl",
    )
    p.add_argument("--parent-run-id", help="MLflow run to report under (the orchestrator's pipeline run)")
    p.add_argument(
        "--no-register",
        action="store_true",
        help="MLflow: do not register each stage's model or move aliases",
    )
    return p


def stage_setup(cfg: Config, name: str, output: str) -> StageSetup:
    """A stage's plain settings from ``cfg.train``."""
    t = cfg.train
    common: dict[str, Any] = dict(
        name=name,
        stage_dir=storage.join(output, name),
        precision=t.precision,
        checkpoint_every_steps=t.checkpoint_every_steps,
        log_every_steps=t.log_every_steps,
        seed=cfg.seed + 10 * STAGE_ORDER.index(name),
        config=cfg.to_dict(),
    )
    if name == "scst":
        s = t.scst
        return StageSetup(
            kind="scst",
            epochs=s.epochs,
            lr_decoder=s.lr,
            lr_encoder=s.lr_encoder,
            train_encoder=s.lr_encoder > 0,
            fine_tune_from_block=t.finetune.fine_tune_from_block,
            grad_clip=s.grad_clip,
            early_stop_patience=s.early_stop_patience,
            lr_schedule="constant",
            num_samples=s.num_samples,
            baseline=s.baseline,
            temperature=s.temperature,
            max_len=s.max_len,
            **common,
        )
    x = getattr(t, name)
    return StageSetup(
        kind="xe",
        epochs=x.epochs,
        lr_decoder=x.lr_decoder,
        lr_encoder=x.lr_encoder,
        train_encoder=x.fine_tune_encoder,
        fine_tune_from_block=x.fine_tune_from_block,
        grad_clip=x.grad_clip,
        early_stop_patience=x.early_stop_patience,
        lr_schedule=x.lr_schedule,
        decay_factor=x.decay_factor,
        decay_patience=x.decay_patience,
        alpha_c=x.alpha_c,
        scheduled_sampling=x.scheduled_sampling,
        **common,
    )


def stage_batch_size(cfg: Config, name: str) -> int:
    section = cfg.train.scst if name == "scst" else getattr(cfg.train, name)
    return int(section.batch_size or cfg.data.loader.batch_size)


def build_stage_loaders(cfg: Config, name: str, dist: DistInfo, ev: EvalSettings) -> dict[str, CaptionLoader]:
    """The stage's training loader and the validation and test loaders (exactly-once evaluation)."""
    lc = cfg.data.loader
    common: dict[str, Any] = dict(
        batch_size=stage_batch_size(cfg, name),
        num_workers=lc.num_workers,
        dist=dist,
        image_size=cfg.data.shards.image_size,
        seed=cfg.seed + 10 * STAGE_ORDER.index(name),
        device=dist.device,
    )
    loaders = {
        "train": build_loader(
            cfg.data.shard_dir,
            "train",
            train=True,
            shuffle_buffer=lc.shuffle_buffer,
            caption_mode=lc.caption_mode,
            seq_per_img=lc.seq_per_img,
            augment=lc.augment,
            **common,
        )
    }
    for split in dict.fromkeys((ev.split, ev.test_split)):
        loaders[split] = build_loader(
            cfg.data.shard_dir, split, train=False, seq_per_img=lc.seq_per_img, **common
        )
    return loaders


def load_vocab(shard_dir: str) -> Vocab:
    if not storage.exists(storage.join(shard_dir, MANIFEST_FILE)):
        raise TrainError(
            f"no finished shard build in {shard_dir} ({MANIFEST_FILE} missing): "
            "build it first with `captioning shards --recipe RECIPE` (or the prepare-data flow)"
        )
    return Vocab.from_json(storage.read_json(storage.join(shard_dir, VOCAB_FILE)))


def build_model(cfg: Config, vocab: Vocab, dist: DistInfo, init_from: str | None) -> Captioner:
    """The model every rank starts from: identical weights (same seed, or the same checkpoint)."""
    if init_from:
        model, ckpt_vocab, _ = captioner_from_checkpoint(init_from)
        if ckpt_vocab.words != vocab.words:
            raise TrainError(f"{init_from} was trained with another vocabulary than the shards' {VOCAB_FILE}")
        return model
    torch.manual_seed(cfg.seed)
    # ImageNet weights: the first process of each node downloads them; the others then read the cache.
    if dist.local_rank != 0:
        barrier(dist)
    model = build_captioner(cfg.model, len(vocab), embeddings=build_embeddings(cfg.model, vocab.words))
    if dist.local_rank == 0:
        barrier(dist)
    return model


def git_commit() -> str:
    """The source tree's commit (with ``-dirty`` when it has local changes), or ``unknown``."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def describe_run(tracker: Tracker, cfg: Config, stages: Sequence[str], world_size: int) -> None:
    """The run's tags (recipe, stages, commit, dataset manifest hash), the flattened config as
    parameters, and the config, vocabulary and dataset manifest as artifacts (rank 0, or the
    orchestrator that owns the parent run)."""
    manifest = storage.read_bytes(storage.join(cfg.data.shard_dir, MANIFEST_FILE))
    tracker.set_tags(
        {
            "recipe": cfg.recipe,
            "stages": ",".join(stages),
            "world_size": str(world_size),
            "git_commit": git_commit(),
            "dataset_manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "dataset": cfg.data.dataset,
        }
    )
    tracker.log_params(flatten_config(cfg.to_dict()))
    folder = tempfile.mkdtemp(prefix="captioning-run-")
    for name, data in (
        ("config.json", json.dumps(cfg.to_dict(), indent=1).encode()),
        (VOCAB_FILE, storage.read_bytes(storage.join(cfg.data.shard_dir, VOCAB_FILE))),
        (MANIFEST_FILE, manifest),
    ):
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(data)
        tracker.log_artifact(path, "run")


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"xe": {"epochs": 2}}} -> {"train.xe.epochs": 2}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class TrackerReporter:
    """Rank 0: after each validation, attention overlays of fixed images; after the test evaluation,
    a child run with the test scores, sample captions, curves, the captions file and checkpoints."""

    def __init__(
        self,
        tracker: Tracker,
        model: Captioner,
        vocab: Vocab,
        loaders: dict[str, CaptionLoader],
        ev: EvalSettings,
    ) -> None:
        self.tracker, self.model, self.vocab, self.loaders, self.ev = tracker, model, vocab, loaders, ev
        self.fixed: tuple[torch.Tensor, list[int]] | None = None
        self.scratch = tempfile.mkdtemp(prefix="captioning-report-")

    def validated(self, setup: StageSetup, state: TrainState, result: EvalResult) -> None:
        if self.fixed is None:
            self.fixed = fixed_images(self.loaders[self.ev.split], NUM_ATTENTION_IMAGES)
        images, ids = self.fixed
        folder = os.path.join(self.scratch, setup.name, "attention", f"epoch-{state.epoch + 1:03d}")
        paths = write_attention_sheets(
            self.model, images, ids, self.vocab, folder, beam_size=self.ev.beam_size, max_len=self.ev.max_len
        )
        if paths:
            self.tracker.log_artifact(folder, "attention")
        self._log_if_local(storage.join(setup.stage_dir, "val", f"epoch-{state.epoch + 1:03d}.json"), "val")

    def tested(self, setup: StageSetup, state: TrainState, result: EvalResult) -> None:
        folder = os.path.join(self.scratch, setup.name, "report")
        samples_html, samples_json = write_samples(
            os.path.join(folder, "samples.html"), result.captions, result.references, NUM_SAMPLE_CAPTIONS
        )
        curves = plot_history(
            os.path.join(folder, "curves.png"),
            state.history,
            ["train/loss", "train/reward", f"val/{self.ev.monitor}", "val/BLEU-4"],
        )
        evaluation = self.tracker.child(f"{setup.name}-test")
        evaluation.set_tags({"stage": setup.name, "split": self.ev.test_split, "kind": "evaluation"})
        evaluation.log_metrics(dict(result.scores), step=state.step)
        for path in (samples_html, samples_json):
            evaluation.log_artifact(str(path))
        self._log_if_local(storage.join(setup.stage_dir, "test-captions.json"), None, evaluation)
        evaluation.close()
        if curves is not None:
            self.tracker.log_artifact(str(curves), "plots")
        for name in ("best.pt", "last.pt"):
            self._log_if_local(storage.join(setup.stage_dir, name), "checkpoints")

    def _log_if_local(self, uri: str, artifact_path: str | None, tracker: Tracker | None = None) -> None:
        """Local files become artifacts; s3:// ones are already durable and are named in the summary."""
        if not storage.is_s3(uri) and os.path.exists(uri):
            (tracker or self.tracker).log_artifact(uri, artifact_path)


def check_output(output: str, stages: Sequence[str], resume: bool) -> None:
    """Refuse to overwrite a run unless resuming it."""
    if resume:
        return
    existing = [
        s
        for s in stages
        if storage.exists(storage.join(output, s, "last.pt"))
        or storage.exists(storage.join(output, s, "summary.json"))
    ]
    if existing:
        raise TrainError(
            f"{output} already holds stages {existing}: pass --resume to continue that run, "
            "or --output (or --storage.run_dir) for a new one"
        )


def run(
    cfg: Config,
    *,
    output: str,
    dist: DistInfo,
    tracker: Tracker,
    resume: bool = False,
    init_from: str | None = None,
    registrar: Callable[[Tracker, StageResult], dict[str, Any] | None] | None = None,
    describe: bool = True,
) -> dict[str, Any]:
    """Every stage of ``cfg.train.stages`` in order; returns the run summary (also summary.json).

    ``describe=False`` leaves the tracker's run undescribed (no config params, tags or artifacts):
    an orchestrator that owns the run described it once for all its stage launches.
    """
    start = time.perf_counter()
    stages = list(cfg.train.stages)
    unknown = [s for s in stages if s not in STAGE_ORDER]
    if unknown:
        raise ConfigError(f"unknown stages {unknown}; valid: {list(STAGE_ORDER)}")
    vocab = load_vocab(cfg.data.shard_dir)
    check_output(output, stages, resume)
    barrier(dist)  # every rank checked before rank 0 writes anything
    ev = EvalSettings(
        split=cfg.eval.split,
        beam_size=cfg.eval.beam_size,
        max_len=cfg.eval.max_len,
        length_normalization=cfg.eval.length_normalization,
        monitor=cfg.eval.monitor,
        spice=cfg.eval.spice,
        timeout_s=cfg.eval.java_timeout_s,
    )
    model = build_model(cfg, vocab, dist, init_from).to(dist.device)
    if dist.is_main:
        storage.write_json(storage.join(output, "config.json"), cfg.to_dict())
        if describe:
            describe_run(tracker, cfg, stages, dist.world_size)
    results: list[StageResult] = []
    registrations: dict[str, Any] = {}
    stage_runs: dict[str, str | None] = {}
    for name in stages:
        setup = stage_setup(cfg, name, output)
        if resume and storage.exists(setup.summary_uri):
            done = StageResult.from_json(storage.read_json(setup.summary_uri))
            model.load_state_dict(load_checkpoint(done.best_checkpoint)["model"])
            logger.info("stage %s already finished in %s; using its best model", name, setup.stage_dir)
            results.append(done)
            continue
        stage_tracker = tracker.child(name) if dist.is_main else NullTracker()
        stage_runs[name] = getattr(stage_tracker, "run_id", None)
        reward = CiderReward(read_references(cfg.data.shard_dir, "train")) if name == "scst" else None
        if dist.is_main:
            stage_tracker.log_params(
                {f"stage.{k}": v for k, v in dataclasses.asdict(setup).items() if k != "config"}
            )
        loaders = build_stage_loaders(cfg, name, dist, ev)
        reporter = TrackerReporter(stage_tracker, model, vocab, loaders, ev) if dist.is_main else None
        try:
            result = fit_stage(
                setup,
                model,
                vocab,
                loaders,
                dist,
                stage_tracker,
                ev,
                resume=resume,
                reward=reward,
                reporter=reporter,
            )
        except BaseException:
            stage_tracker.close("FAILED")
            raise
        if registrar is not None and dist.is_main:
            registrations[name] = registrar(stage_tracker, result)
        stage_tracker.close()
        results.append(result)
    summary = {
        "recipe": cfg.recipe,
        "output": output,
        "world_size": dist.world_size,
        "stages": [r.to_json() for r in results],
        "final_checkpoint": results[-1].best_checkpoint if results else None,
        "test_scores": results[-1].test_scores if results else {},
        "registered": registrations,
        "tracking_run_id": getattr(tracker, "run_id", None),
        "stage_runs": stage_runs,  # stage -> its MLflow child run (stages finished earlier: absent)
        "duration_s": round(time.perf_counter() - start, 3),
    }
    if dist.is_main:
        storage.write_json(storage.join(output, "summary.json"), summary)
    return summary


class Registrar:
    """Rank 0, MLflow: each finished stage's best model as a pyfunc version of the registered model;
    the ``champion`` alias moves only when its test CIDEr-D beats the champion's (else ``challenger``)."""

    def __init__(self, client: Any, model_name: str, recipe: str) -> None:
        self.client, self.model_name, self.recipe = client, model_name, recipe

    def __call__(self, stage_tracker: Tracker, result: StageResult) -> dict[str, Any] | None:
        from captioning.registry import register_checkpoint

        run_id = getattr(stage_tracker, "run_id", None)
        score = result.test_scores.get("CIDEr")
        if run_id is None or score is None:
            logger.warning("stage %s: not registered (no MLflow run id or no test CIDEr)", result.name)
            return None
        try:
            promotion = register_checkpoint(
                self.client,
                self.model_name,
                run_id,
                result.best_checkpoint,
                score,
                tags={"stage": result.name, "recipe": self.recipe},
            )
        except (
            Exception
        ) as exc:  # the server went away: training results stay on disk, registration can be redone
            logger.warning("stage %s: registration failed (%s: %s)", result.name, type(exc).__name__, exc)
            return {"error": f"{type(exc).__name__}: {exc}"}
        logger.info(
            "registered %s version %s (test CIDEr %.4f): %s",
            self.model_name,
            promotion.version,
            score,
            promotion.alias,
        )
        return dataclasses.asdict(promotion)


def open_tracker(
    args: argparse.Namespace, cfg: Config, output: str, dist: DistInfo
) -> tuple[Tracker, Registrar | None]:
    """Rank 0's tracker (and, with MLflow, the registrar); every other rank gets a NullTracker.

    An unreachable MLflow server is a TrainError here, before any training starts.
    """
    if not dist.is_main:
        return NullTracker(), None
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    kind = args.tracker
    if kind == "auto":
        kind = "mlflow" if uri else "jsonl"
    if kind == "none":
        return NullTracker(), None
    local = not storage.is_s3(output)
    if kind == "jsonl":
        if not local:
            logger.warning(
                "--tracker jsonl needs a local --output; %s is not: metrics are not recorded", output
            )
            return NullTracker(), None
        return JsonlTracker(os.path.join(output, "metrics.jsonl"), run_name="run"), None
    from captioning.mlflow_tracker import MlflowTracker, TrackingUnavailable, connect

    try:
        client = connect(uri)
    except TrackingUnavailable as exc:
        raise TrainError(str(exc)) from None
    settings: dict[str, Any] = dict(
        fallback_dir=output if local else tempfile.mkdtemp(prefix="mlflow-fallback-"),
        system_metrics=cfg.tracking.system_metrics,
    )
    if args.parent_run_id:  # the orchestrator owns that run: it describes it and ends it
        tracker = MlflowTracker.attach(client, args.parent_run_id, terminate_on_close=False, **settings)
    else:
        run_name = f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
        tracker = MlflowTracker.start_run(client, cfg.tracking.experiment, run_name, **settings)
    logger.info("MLflow: run %s at %s", tracker.run_id, client.tracking_uri)
    registrar = None if args.no_register else Registrar(client, cfg.tracking.registered_model, cfg.recipe)
    return tracker, registrar


def main(argv: Sequence[str] | None = None, *, tracker: Tracker | None = None) -> dict[str, Any]:
    """Entry point (every rank runs it); returns the run summary on every rank."""
    own, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    dist = DistInfo.from_env()
    die_with_launcher()  # no orphaned workers when torchrun is killed
    logging.basicConfig(
        level=logging.INFO if dist.is_main else logging.WARNING,
        format=f"%(asctime)s [rank {dist.rank}] %(name)s: %(message)s",
    )
    cfg = load_config(args.config, overrides)
    if dist.is_main and not args.parent_run_id:  # an orchestrator warned once for all its launches
        for warning in config_warnings(cfg):
            logger.warning("config: %s", warning)
    output = args.output or storage.join(cfg.storage.run_dir, cfg.recipe)
    registrar = None
    if tracker is None:
        tracker, registrar = open_tracker(args, cfg, output, dist)  # before the process group: fail fast
    init_process_group(dist)
    try:
        summary = run(
            cfg,
            output=output,
            dist=dist,
            tracker=tracker,
            resume=args.resume,
            init_from=args.init_from,
            registrar=registrar,
            describe=not args.parent_run_id,
        )
        tracker.close()
        return dict(broadcast_object(dist, summary))
    except BaseException:
        if tracker is not None:
            tracker.close("FAILED")
        raise
    finally:
        destroy_process_group(dist)


if __name__ == "__main__":
    try:
        main()
    except (TrainError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
