"""One training stage: what it is told (``StageSetup``), what it leaves behind (``StageResult``, its
files) and the one rule that decides whether it trains, resumes or is already done.

    setup = build_stage_setup(cfg, "finetune", "runs/demo/r1")      # reads cfg.train, nothing else
    stage_status("runs/demo/r1", "finetune")                         # "new" | "interrupted" | "finished"
    read_stage_result("runs/demo/r1", "finetune")                    # StageResult, or None

Files of a stage under ``OUTPUT/STAGE/`` (a local folder or s3://), written by rank 0:

- ``last.pt``: everything needed to resume (model, optimiser, schedule, scaler, every rank's RNG
  states, epoch and batch position, best score), rewritten every ``train.checkpoint_every_steps``,
  every ``train.checkpoint_every_minutes``
  and at each epoch end;
- ``best.pt``: the model of the best validation epoch; ``val/epoch-NNN.json``: each validation's
  scores and captions; ``test-captions.json``: the test split in COCO results format;
- ``result.json``: the ``StageResult``, written last. It is the stage's only completion marker.

The rule (``stage_status``), applied by the stage's own process (``captioning.train``) and by the
launcher that decides whether to start one (``captioning.stages``): ``result.json`` present ->
finished (its result stands, nothing runs); else ``last.pt`` present -> interrupted (training
resumes from it, exactly); else new. Either way only under the same settings: a stage that finished
(``finished_result``) or was interrupted (``check_same_settings`` against ``last.pt``) with other
settings is refused with the differences named, never silently reused or continued. Where a run
reports (``tracking.*``) and which other stages it runs (``train.stages``) may differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from captioning import storage
from captioning.config import STAGES, Config, GpuConfig, valid_keys
from captioning.config.typed import get_dotted

RESULT_FILE = "result.json"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"

StageStatus = Literal["new", "interrupted", "finished"]


@dataclass(frozen=True)
class XeSettings:
    """Stages 1-2: the cross-entropy objective's settings."""

    alpha_c: float  # weight of the doubly stochastic attention term
    scheduled_sampling: float  # final probability, reached linearly over the epochs


@dataclass(frozen=True)
class ScstSettings:
    """Stage 3: the self-critical objective's settings."""

    num_samples: int
    baseline: Literal["mean", "greedy"]
    temperature: float
    max_len: int  # longest sample


@dataclass(frozen=True)
class StageSetup:
    """One stage's settings as plain values (``build_stage_setup`` resolves them from the config)."""

    name: str
    stage_dir: str
    epochs: int
    batch_size: int  # images per batch per rank
    lr_decoder: float
    lr_encoder: float
    train_encoder: bool
    fine_tune_from_block: int
    grad_clip: float | None
    early_stop_patience: int
    lr_schedule: Literal["plateau", "cosine", "constant"]
    decay_factor: float
    decay_patience: int
    precision: Literal["fp32", "bf16", "fp16"]
    checkpoint_every_steps: int
    checkpoint_every_s: float
    log_every_steps: int
    seed: int
    objective: XeSettings | ScstSettings
    config: dict[str, Any]  # the resolved Config, stored in checkpoints
    captions_per_image: int = 5  # per row of a step: seq_per_img (cross-entropy) or num_samples (SCST)
    lr_reference_captions: int = 80  # captions per step (all ranks) the rates are set for
    lr_scaling: Literal["sqrt", "linear", "none"] = "none"
    lr_warmup_epochs: float = 0.0
    gpu: GpuConfig = dataclasses.field(default_factory=GpuConfig)  # the switches, resolved per device

    @property
    def kind(self) -> Literal["xe", "scst"]:
        return "scst" if isinstance(self.objective, ScstSettings) else "xe"

    @property
    def last_uri(self) -> str:
        return storage.join(self.stage_dir, LAST_CHECKPOINT)

    @property
    def best_uri(self) -> str:
        return storage.join(self.stage_dir, BEST_CHECKPOINT)

    @property
    def result_uri(self) -> str:
        return storage.join(self.stage_dir, RESULT_FILE)

    def params(self) -> dict[str, Any]:
        """The settings as flat ``stage.*`` parameters for a tracker (the config itself excluded)."""
        plain = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("config", "objective", "gpu")}
        plain.update({f"gpu.{k}": v for k, v in dataclasses.asdict(self.gpu).items()})
        plain.update(dataclasses.asdict(self.objective))
        return {f"stage.{k}": v for k, v in plain.items()}


def stage_seed(cfg: Config, name: str) -> int:
    """Each stage its own seed, derived from the run's: the same stage always sees the same data order."""
    return cfg.seed + 10 * STAGES.index(name)


def build_stage_setup(cfg: Config, name: str, output: str) -> StageSetup:
    """Stage ``name``'s settings from ``cfg.train`` (SCST: a constant learning rate, the encoder
    trained only when ``train.scst.lr_encoder`` > 0, from the fine-tuning stage's first block)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; valid: {list(STAGES)}")
    t = cfg.train
    common: dict[str, Any] = dict(
        name=name,
        stage_dir=storage.join(output, name),
        precision=t.precision,
        checkpoint_every_steps=t.checkpoint_every_steps,
        checkpoint_every_s=60.0 * t.checkpoint_every_minutes,
        log_every_steps=t.log_every_steps,
        seed=stage_seed(cfg, name),
        config=cfg.to_dict(),
        lr_scaling=t.lr_scaling,
        lr_warmup_epochs=t.lr_warmup_epochs,
        gpu=t.gpu,
    )
    if name == "scst":
        s = t.scst
        return StageSetup(
            epochs=s.epochs,
            batch_size=s.batch_size or cfg.data.loader.batch_size,
            lr_decoder=s.lr,
            lr_encoder=s.lr_encoder,
            train_encoder=s.lr_encoder > 0,
            fine_tune_from_block=t.finetune.fine_tune_from_block,
            grad_clip=s.grad_clip,
            early_stop_patience=s.early_stop_patience,
            lr_schedule="constant",
            decay_factor=1.0,  # a constant schedule never decays
            decay_patience=1,
            objective=ScstSettings(
                num_samples=s.num_samples, baseline=s.baseline, temperature=s.temperature, max_len=s.max_len
            ),
            captions_per_image=s.num_samples,
            lr_reference_captions=s.lr_reference_captions,
            **common,
        )
    x = t.finetune if name == "finetune" else t.xe
    return StageSetup(
        epochs=x.epochs,
        batch_size=x.batch_size or cfg.data.loader.batch_size,
        lr_decoder=x.lr_decoder,
        lr_encoder=x.lr_encoder,
        train_encoder=x.fine_tune_encoder,
        fine_tune_from_block=x.fine_tune_from_block,
        grad_clip=x.grad_clip,
        early_stop_patience=x.early_stop_patience,
        lr_schedule=x.lr_schedule,
        decay_factor=x.decay_factor,
        decay_patience=x.decay_patience,
        objective=XeSettings(alpha_c=x.alpha_c, scheduled_sampling=x.scheduled_sampling),
        captions_per_image=cfg.data.loader.seq_per_img,
        lr_reference_captions=x.lr_reference_captions,
        **common,
    )


@dataclass(frozen=True)
class StageResult:
    """What a finished stage reports; ``result.json`` holds it. ``checkpoint`` is its best model."""

    stage: str
    checkpoint: str  # best.pt (local path or s3:// URI)
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
    world_size: int
    run_id: str | None  # the stage's MLflow run (None without MLflow)
    settings: str  # settings_fingerprint of the config it was trained with

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> StageResult:
        """Rebuild from ``to_json`` output; ValueError when a field is missing."""
        if not isinstance(data, dict):
            raise ValueError(f"a stage result must be a JSON object, got {type(data).__name__}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data]
        if missing:
            raise ValueError(f"stage result is missing fields {missing}")
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


def result_uri(output: str, stage: str) -> str:
    return storage.join(output, stage, RESULT_FILE)


def stage_status(output: str, stage: str) -> StageStatus:
    """The one resume rule: finished (result.json), interrupted (last.pt) or new."""
    if storage.exists(result_uri(output, stage)):
        return "finished"
    if storage.exists(storage.join(output, stage, LAST_CHECKPOINT)):
        return "interrupted"
    return "new"


def read_stage_result(output: str, stage: str) -> StageResult | None:
    """The finished stage's result, or None when it has not finished under ``output``."""
    uri = result_uri(output, stage)
    if not storage.exists(uri):
        return None
    try:
        return StageResult.from_json(storage.read_json(uri))
    except ValueError as exc:
        raise ValueError(f"{uri}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# The same settings, or a refusal
# --------------------------------------------------------------------------------------------------


def _is_free(key: str) -> bool:
    """Settings a stage may be run again with changed: where it reports, which other stages run, how
    a retrain chose its data (its effect is recorded in ``data.extra_shard_dirs``), how often the
    clock asks for a checkpoint (resuming is exact wherever it was written), how many elastic
    restarts a launch allows, and the GPU switches (speed, not results: ``training.speed``)."""
    return key.startswith(("tracking.", "train.gpu.")) or key in (
        "train.stages",
        "data.retrain_on",
        "train.checkpoint_every_minutes",
        "train.max_restarts",
    )


def _lookup(config: Mapping[str, Any], key: str) -> Any:
    """The setting's value in a resolved config; its default where the config predates the setting
    (a stage recorded before a new setting was added is not "trained with other settings")."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return get_dotted(Config().to_dict(), key)
        node = node[part]
    return node


def settings_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 of every setting of a resolved config (``Config.to_dict()``) that shapes a stage."""
    kept = {key: _lookup(config, key) for key in valid_keys() if not _is_free(key)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def changed_settings(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: recorded -> current`` for every setting that shapes a stage and differs."""
    changes = []
    for key in valid_keys():
        old, new = _lookup(recorded, key), _lookup(current, key)
        if not _is_free(key) and old != new:
            changes.append(f"{key}: {old!r} -> {new!r}")
    return changes


class SettingsChanged(ValueError):
    """A stage folder holds a stage trained with other settings than the ones asked for now."""


def check_same_settings(recorded: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """SettingsChanged naming the differences when ``where`` was trained with other settings."""
    changes = changed_settings(recorded, current)
    if changes:
        more = f" and {len(changes) - 5} more" if len(changes) > 5 else ""
        raise SettingsChanged(
            f"{where} was trained with other settings ({'; '.join(changes[:5])}{more}): run it with the "
            "settings it was trained with, or give the new run an output folder of its own"
        )


def finished_result(output: str, stage: str, config: Mapping[str, Any]) -> StageResult | None:
    """The stage's result when it finished under ``output`` with these settings (``config``: the
    resolved config, ``Config.to_dict()``); None when it has not finished; SettingsChanged when it
    finished with other settings (the differences read from its best.pt)."""
    result = read_stage_result(output, stage)
    if result is None or result.settings == settings_fingerprint(config):
        return result
    from captioning.model.checkpoint import load_checkpoint  # torch: only on this error path

    where = storage.join(output, stage)
    try:
        recorded = load_checkpoint(result.checkpoint).get("config") or {}
    except (OSError, ValueError) as exc:  # the differences cannot be named, the refusal stands
        raise SettingsChanged(
            f"{where} was trained with other settings (its best.pt, which records them, cannot be read: "
            f"{exc}): give the new run an output folder of its own"
        ) from None
    check_same_settings(recorded, config, where)
    return result  # the fingerprints differ only by settings added since it was recorded
