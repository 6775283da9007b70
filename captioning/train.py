"""Train ONE stage: ``torchrun -m captioning.train --stage NAME --config RECIPE [overrides]``.

    torchrun --nproc-per-node 2 -m captioning.train --stage xe --config demo --output runs/demo/r1
    python -m captioning.train --stage xe --config demo --train.xe.epochs=1          # world size 1
    torchrun --nproc-per-node 2 -m captioning.train --stage finetune --config demo --output runs/demo/r1 \\
        --init-from runs/demo/r1/xe/best.pt

Every rank runs ``main(argv)``, which returns the stage's ``StageResult`` (the same on every rank).
The shards must exist (``captioning shards --recipe RECIPE``). The stage folder ``OUTPUT/STAGE``
decides what happens (``captioning.training.stage``): a finished stage (``result.json``) returns its
recorded result without training; an interrupted one (``last.pt``) resumes exactly; otherwise the
model starts from ``--init-from`` (or from scratch), trains with DDP (gloo on CPU, nccl on GPU),
validates each epoch by beam search scored with pycocoevalcap, and ends with a test-split evaluation.
Only rank 0 writes files and reports to the tracker.

The sequence of stages, the parent tracking run and model registration belong to the caller
(``captioning.stages``: ``captioning train``, ``captioning demo``, the train-sat flow).

Tracking (rank 0; ``--tracker auto``): MLflow when ``tracking.tracking_uri`` or MLFLOW_TRACKING_URI is
set, the stage being a child run of ``--parent-run-id`` (or a run of its own, described with the
config, without one) with a child per test evaluation; otherwise ``OUTPUT/metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

import torch

from captioning import storage
from captioning.config import STAGES, Config, ConfigError, config_warnings, load_config, split_overrides
from captioning.data.format import MANIFEST_FILE, VOCAB_FILE, read_references
from captioning.data.loader import CaptionLoader, build_loader
from captioning.data.vocab import Vocab
from captioning.model.captioner import Captioner
from captioning.model.checkpoint import captioner_from_checkpoint
from captioning.model.factory import build_captioner, build_embeddings
from captioning.tracking import TRACKERS, Tracker, TrackingUnavailable
from captioning.tracking.runs import error_status, open_stage_tracker
from captioning.training.dist import (
    DistInfo,
    barrier,
    broadcast_object,
    destroy_process_group,
    die_with_launcher,
    init_process_group,
)
from captioning.training.reporting import TrackerReporter
from captioning.training.scst import CiderReward
from captioning.training.stage import (
    SettingsChanged,
    StageResult,
    StageSetup,
    build_stage_setup,
    finished_result,
    stage_status,
)
from captioning.training.trainer import fit_stage

logger = logging.getLogger("captioning.train")


class Stopped(BaseException):
    """The stage process was asked to stop (SIGTERM: a cancel, a time limit, its launcher stopping it)."""


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds the stage like an interrupt, so its run ends KILLED with the reason (Python's
    default would end the process on the spot and leave the run RUNNING)."""

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(f"stopped by {signal.Signals(signum).name}")

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, stop)


class TrainError(RuntimeError):
    """A stage that cannot start: missing shards, an unreachable tracking server, a bad checkpoint."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun -m captioning.train",
        description="Train one stage of the captioner with DDP. Dotted overrides (--train.xe.epochs=2) follow.",
    )
    p.add_argument("--stage", required=True, choices=STAGES, help="the stage to train")
    p.add_argument(
        "--config", default="demo", help="recipe name (configs/NAME.toml) or path to a TOML recipe"
    )
    p.add_argument("--output", help="run folder or s3:// prefix (default: {storage.run_dir}/{recipe})")
    p.add_argument("--init-from", help="checkpoint whose weights the stage starts from")
    p.add_argument(
        "--tracker",
        choices=TRACKERS,
        default="auto",
        help="where rank 0 reports: auto = mlflow when tracking.tracking_uri or MLFLOW_TRACKING_URI is set, "
        "else OUTPUT/metrics.jsonl",
    )
    p.add_argument("--parent-run-id", help="MLflow run to report under (the pipeline's parent run)")
    p.add_argument(
        "--no-config-warnings",
        action="store_true",
        help="do not print the config's inert-option warnings (a pipeline printed them once for its stages)",
    )
    return p


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


def build_stage_loaders(cfg: Config, setup: StageSetup, dist: DistInfo) -> dict[str, CaptionLoader]:
    """The stage's training loader and the validation and test loaders (exactly-once evaluation)."""
    common: dict[str, Any] = dict(
        dist=dist,
        image_size=cfg.data.shards.image_size,
        seed=setup.seed,
        batch_size=setup.batch_size,
        device=dist.device,
    )
    train = dict(common, extra_dirs=cfg.data.extra_shard_dirs)  # + other builds' train splits (retraining)
    loaders = {"train": build_loader(cfg.data.loader, cfg.data.shard_dir, "train", train=True, **train)}
    for split in dict.fromkeys((cfg.eval.split, cfg.eval.test_split)):
        loaders[split] = build_loader(cfg.data.loader, cfg.data.shard_dir, split, train=False, **common)
    return loaders


def train_stage(
    cfg: Config,
    name: str,
    output: str,
    dist: DistInfo,
    tracker: Tracker,
    *,
    vocab: Vocab,
    resume: bool,
    init_from: str | None,
) -> StageResult:
    """Build the stage's model, data and reward, then ``fit_stage`` (collective: every rank calls it)."""
    setup = build_stage_setup(cfg, name, output)
    model = build_model(cfg, vocab, dist, init_from).to(dist.device)
    reward: CiderReward | None = None
    if setup.kind == "scst":  # every training image's references, of every build the stage reads
        reward = CiderReward(read_references(cfg.data.shard_dir, "train", extra=cfg.data.extra_shard_dirs))
        if dist.is_main:
            logger.info(
                "%s (one in each of this node's processes: %d)", reward.describe(), dist.local_world_size
            )
    if dist.is_main:
        tracker.log_params(setup.params())
    loaders = build_stage_loaders(cfg, setup, dist)
    reporter = TrackerReporter(tracker, model, vocab, loaders, cfg.eval) if dist.is_main else None
    return fit_stage(
        setup, model, vocab, loaders, dist, tracker, cfg.eval, resume=resume, reward=reward, reporter=reporter
    )


def main(argv: Sequence[str] | None = None, *, tracker: Tracker | None = None) -> StageResult:
    """Entry point (every rank runs it); returns the stage's result on every rank."""
    own, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    dist = DistInfo.from_env()
    die_with_launcher()  # no orphaned workers when torchrun is killed
    logging.basicConfig(
        level=logging.INFO if dist.is_main else logging.WARNING,
        format=f"%(asctime)s [rank {dist.rank}] %(name)s: %(message)s",
    )
    cfg = load_config(args.config, overrides)
    if dist.is_main and not args.no_config_warnings:
        for warning in config_warnings(cfg):
            logger.warning("config: %s", warning)
    output = args.output or storage.join(cfg.storage.run_dir, cfg.recipe)
    status = stage_status(output, args.stage)
    if status == "finished":
        try:
            done = finished_result(output, args.stage, cfg.to_dict())
        except SettingsChanged as exc:
            raise TrainError(str(exc)) from None
        assert done is not None
        logger.info("stage %s already finished in %s; nothing to train", args.stage, output)
        return done
    vocab = load_vocab(cfg.data.shard_dir)
    if tracker is None:  # before the process group: an unreachable server fails fast
        try:
            tracker = open_stage_tracker(
                args.tracker,
                cfg,
                output,
                args.stage,
                parent_run_id=args.parent_run_id,
                world_size=dist.world_size,
                is_main=dist.is_main,
            )
        except TrackingUnavailable as exc:
            raise TrainError(str(exc)) from None
    init_process_group(dist)
    try:
        result = train_stage(
            cfg,
            args.stage,
            output,
            dist,
            tracker,
            vocab=vocab,
            resume=status == "interrupted",
            init_from=args.init_from,
        )
        tracker.close()
        return StageResult(**broadcast_object(dist, result.to_json()))  # rank 0's (it knows the run id)
    except BaseException as exc:  # the run ends with the reason: FAILED for an error, KILLED when stopped
        tracker.set_tags({"error": f"{type(exc).__name__}: {exc}"[:500]})
        tracker.close(error_status(exc))
        raise
    finally:
        destroy_process_group(dist)


if __name__ == "__main__":
    _stop_on_sigterm()  # the process's own, not a caller's that runs main() in-process
    try:
        main()
    except (TrainError, ConfigError, storage.StorageFull) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Stopped as exc:
        print(f"stage {exc}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
