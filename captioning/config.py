"""The one configuration tree: typed, frozen dataclasses, recipes, dotted overrides, JSON round trip.

Every knob of the pipeline lives here, once, with a one-line doc (``setting(default, doc)``).
Components read only their own section (``build_*`` functions take ``cfg.model``, ``cfg.data.shards``,
...); leaves take plain numbers. A *recipe* (``configs/NAME.toml``) overrides defaults only; dotted
command-line overrides (``--train.xe.lr_decoder=4e-4``) are applied on top::

    cfg = load_config("demo", ["--train.xe.epochs=2", "--model.encoder", "resnet18"])
    cfg.to_json()                        # the resolved config, round-trips through Config.from_json
    print(describe_config())             # every key, its type, default and doc

Unknown keys and values of the wrong type raise ``ConfigError`` with the valid keys (or choices)
listed; options that do nothing under the current settings produce warnings (``config_warnings``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

# The repository's recipe folder; CAPTIONING_CONFIG_DIR points elsewhere (e.g. an installed wheel).
CONFIG_DIR_ENV = "CAPTIONING_CONFIG_DIR"
_REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A recipe or override that does not fit the configuration tree."""


def setting(default: Any, doc: str, *, min: float | None = None, max: float | None = None) -> Any:
    """A config field with its one-line doc and optional numeric bounds (inclusive)."""
    meta = {"doc": doc, "min": min, "max": max}
    if isinstance(default, list | dict | set):
        raise TypeError("mutable defaults are not allowed in a frozen config; use a tuple")
    return field(default=default, metadata=meta)


def section(cls: type[T], doc: str, **overrides: Any) -> Any:
    """A nested config section; ``overrides`` change that section's defaults for this position."""
    return field(default_factory=lambda: cls(**overrides), metadata={"doc": doc})


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

Dataset = Literal["synthetic", "coco", "flickr8k", "flickr30k", "local"]
Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class SyntheticConfig:
    """The learnable synthetic dataset (coloured shapes) that powers the demo and the tests."""

    num_train: int = setting(2000, "Training images to generate.", min=1)
    num_val: int = setting(200, "Validation images to generate.", min=1)
    num_test: int = setting(200, "Test images to generate.", min=1)
    num_restval: int = setting(0, "Images given the split 'restval' (as in COCO's Karpathy file).", min=0)
    image_size: int = setting(64, "Side of the generated square images, in pixels.", min=16)
    captions_per_image: int = setting(5, "Reference captions written per image.", min=1)
    style: Literal["coco", "flickr8k", "flickr30k"] = setting(
        "coco", "Which real download layout (file names, JSON fields, archives) to imitate."
    )
    seed: int = setting(0, "Generator seed: the same seed gives byte-identical files.")


@dataclass(frozen=True)
class LocalDataConfig:
    """A dataset already on disk: a Karpathy-format split file and its images (new data as a folder)."""

    karpathy_json: str | None = setting(
        None, "Karpathy-format split file of a dataset already on disk (dataset=local)."
    )
    image_dir: str | None = setting(
        None, "Folder the JSON's image paths are relative to; none = the JSON's folder."
    )


@dataclass(frozen=True)
class DownloadConfig:
    """Where raw datasets come from and how they are fetched."""

    base_url: str | None = setting(
        None, "Replaces the scheme+host+path prefix of every dataset URL (mirrors, loopback tests)."
    )
    flickr30k_archive: str | None = setting(
        None, "Local path of flickr30k-images.tar.gz (Flickr30k needs a manual request)."
    )
    num_retries: int = setting(5, "Attempts per file before a download fails.", min=1)
    timeout_s: float = setting(60.0, "Socket timeout per request, in seconds.", min=0.1)
    verify_checksums: bool = setting(True, "Check sizes and checksums where they are known.")


@dataclass(frozen=True)
class ShardConfig:
    """WebDataset shard writing: one sample per image, resized, with all its references."""

    image_size: int = setting(256, "Side of the stored square images, in pixels (seed 004: 256).", min=8)
    resize_mode: Literal["squash", "center-crop", "pad"] = setting(
        "squash", "squash (seed 004's 256x256), or keep aspect ratio by center-crop or pad."
    )
    jpeg_quality: int = setting(90, "JPEG quality of stored images.", min=1, max=100)
    samples_per_shard: int = setting(1000, "Images per tar shard.", min=1)
    num_procs: int = setting(0, "Processes building shards; 0 means all cores.", min=0)
    max_image_pixels: int = setting(
        178_956_970, "Images with more pixels are skipped as decompression bombs.", min=1
    )
    executor: Literal["process", "dask"] = setting(
        "process", "process: a local process pool; dask: a Dask cluster (same per-shard code path)."
    )
    dask_address: str | None = setting(
        None, "Dask scheduler address (tcp://host:8786); none starts a local cluster when executor=dask."
    )


@dataclass(frozen=True)
class LoaderConfig:
    """The streaming WebDataset loader used by training and evaluation."""

    batch_size: int = setting(32, "Images per batch per rank (each with seq_per_img captions).", min=1)
    num_workers: int = setting(2, "DataLoader worker processes per rank.", min=0)
    shuffle_buffer: int = setting(1000, "Samples in the shuffle buffer (0 disables sample shuffle).", min=0)
    caption_mode: Literal["random", "all"] = setting(
        "random",
        "random: seq_per_img references per image, drawn anew each epoch; all: every reference is a sample.",
    )
    seq_per_img: int = setting(
        5, "References per image in a batch: the encoder runs once per image (seed 000).", min=1
    )
    augment: bool = setting(False, "Light train-time augmentation (flip-free crop and colour jitter).")


@dataclass(frozen=True)
class DataConfig:
    """Raw data, vocabulary and shards."""

    dataset: Dataset = setting(
        "coco", "Which dataset: coco, flickr8k, flickr30k, synthetic, or local (a Karpathy-format folder)."
    )
    raw_dir: str = setting("data/raw", "Where downloads and extracted files go (local path).")
    shard_dir: str = setting("data/shards", "Where shards go: a local path or s3://bucket/prefix.")
    restval_split: Literal["train", "val", "test"] | None = setting(
        "train", "Split that COCO's 'restval' images join; none leaves them out (counted)."
    )
    min_word_freq: int = setting(5, "Train-split words seen fewer times become <unk> (seed 004: 5).", min=1)
    max_caption_len: int = setting(50, "Longest caption in tokens, without <start>/<end>.", min=1)
    overlong_captions: Literal["drop", "truncate"] = setting(
        "drop", "What happens to training captions longer than max_caption_len (counted either way)."
    )
    download: DownloadConfig = section(DownloadConfig, "Fetching raw datasets.")
    synthetic: SyntheticConfig = section(SyntheticConfig, "The synthetic dataset (dataset=synthetic).")
    local: LocalDataConfig = section(LocalDataConfig, "A Karpathy-format dataset on disk (dataset=local).")
    shards: ShardConfig = section(ShardConfig, "Writing WebDataset shards.")
    loader: LoaderConfig = section(LoaderConfig, "Streaming shards to training and evaluation.")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The captioner: encoder CNN and decoder."""

    arch: Literal["show_attend_tell", "show_tell", "fc"] = setting(
        "show_attend_tell", "Decoder family: Show-Attend-Tell (seed 004), Show-Tell or FC (seed 000)."
    )
    encoder: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = setting(
        "resnet101", "torchvision ResNet used as the encoder, without pool and classifier."
    )
    encoder_weights: str | None = setting(
        "imagenet", "imagenet (torchvision's weights enum), a local weights file, or none (random)."
    )
    encoded_image_size: int = setting(14, "Side of the adaptive-pooled feature grid (P = side^2).", min=1)
    emb_dim: int = setting(512, "Word embedding size.", min=1)
    attention_dim: int = setting(512, "Size of the additive attention's hidden layer.", min=1)
    decoder_dim: int = setting(512, "LSTM hidden size.", min=1)
    dropout: float = setting(0.5, "Dropout before the output layer.", min=0.0, max=1.0)
    embeddings_path: str | None = setting(None, "Pretrained word embeddings (GloVe text format).")
    fine_tune_embeddings: bool = setting(True, "Train loaded pretrained embeddings (ignored without them).")


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class XeStageConfig:
    """A cross-entropy stage: stage 1 (frozen encoder) or stage 2 (encoder fine-tuning)."""

    epochs: int = setting(20, "Maximum epochs of this stage.", min=0)
    batch_size: int | None = setting(
        None, "Images per batch per rank; none uses data.loader.batch_size.", min=1
    )
    lr_decoder: float = setting(4e-4, "Adam learning rate of the decoder (seed 004: 4e-4).", min=0.0)
    lr_encoder: float = setting(
        1e-4, "Adam learning rate of the encoder when fine-tuned (seed 004: 1e-4).", min=0.0
    )
    fine_tune_encoder: bool = setting(False, "Train the encoder in this stage.")
    fine_tune_from_block: int = setting(
        2, "First ResNet block (1-4) trained when fine-tuning (seed 004: 2).", min=1, max=4
    )
    grad_clip: float | None = setting(
        5.0, "Clip gradient values at +-this; none disables (seed 004: 5).", min=0.0
    )
    alpha_c: float = setting(1.0, "Weight of the doubly stochastic attention term (seed 004: 1).", min=0.0)
    lr_schedule: Literal["plateau", "cosine", "constant"] = setting(
        "plateau", "plateau: x decay_factor after decay_patience epochs without gain (seed 004); or cosine."
    )
    decay_factor: float = setting(0.8, "Learning-rate factor on plateau (seed 004: 0.8).", min=0.0, max=1.0)
    decay_patience: int = setting(8, "Epochs without improvement before decaying (seed 004: 8).", min=1)
    early_stop_patience: int = setting(
        20, "Epochs without improvement before stopping (seed 004: 20).", min=1
    )
    scheduled_sampling: float = setting(
        0.0, "Final probability of feeding the model's own word instead of the reference.", min=0.0, max=1.0
    )


@dataclass(frozen=True)
class ScstConfig:
    """Stage 3: self-critical sequence training on a CIDEr-D reward."""

    epochs: int = setting(10, "Maximum epochs of self-critical training.", min=0)
    batch_size: int | None = setting(
        None, "Images per batch per rank; none uses data.loader.batch_size.", min=1
    )
    lr: float = setting(2e-5, "Adam learning rate (lower than cross-entropy's).", min=0.0)
    lr_encoder: float = setting(0.0, "Encoder learning rate; 0 keeps the encoder frozen.", min=0.0)
    num_samples: int = setting(5, "Captions sampled per image.", min=1)
    baseline: Literal["mean", "greedy"] = setting(
        "mean", "mean: average reward of the image's other samples (new self-critical); greedy: SCST."
    )
    temperature: float = setting(1.0, "Sampling temperature.", min=1e-6)
    max_len: int = setting(16, "Longest sampled caption, in tokens.", min=1)
    grad_clip: float | None = setting(5.0, "Clip gradient values at +-this; none disables.", min=0.0)
    early_stop_patience: int = setting(5, "Epochs without improvement before stopping.", min=1)


@dataclass(frozen=True)
class TrainConfig:
    """The training stages and what they share."""

    stages: tuple[Literal["xe", "finetune", "scst"], ...] = setting(
        ("xe", "finetune", "scst"), "Stages to run, in order."
    )
    precision: Literal["fp32", "bf16", "fp16"] = setting(
        "bf16", "Mixed precision on GPU: bf16, or fp16 with a gradient scaler (CPU always runs fp32)."
    )
    nproc_per_node: int = setting(1, "torchrun processes per node (GPUs per node on GPU).", min=1)
    checkpoint_every_steps: int = setting(
        1000, "Steps between periodic checkpoints (0: epoch ends only).", min=0
    )
    log_every_steps: int = setting(50, "Steps between logged training metrics.", min=1)
    xe: XeStageConfig = section(XeStageConfig, "Stage 1: cross-entropy, frozen encoder.")
    finetune: XeStageConfig = section(
        XeStageConfig, "Stage 2: cross-entropy with encoder fine-tuning.", fine_tune_encoder=True, epochs=10
    )
    scst: ScstConfig = section(ScstConfig, "Stage 3: self-critical sequence training.")


# --------------------------------------------------------------------------------------------------
# Evaluation, tracking, storage
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    """Decoding a split and scoring it with pycocoevalcap."""

    split: Split = setting("val", "Split scored during training for early stopping and model choice.")
    beam_size: int = setting(3, "Beam width for evaluation decoding.", min=1)
    max_len: int = setting(20, "Longest decoded caption, in tokens.", min=1)
    length_normalization: bool = setting(False, "Rank finished beams by mean instead of summed log-prob.")
    monitor: Literal["CIDEr", "BLEU-4", "METEOR", "ROUGE-L"] = setting(
        "CIDEr", "Score used for early stopping, best checkpoint and promotion."
    )
    spice: bool = setting(False, "Also compute SPICE (needs a Stanford CoreNLP download).")
    java_timeout_s: float = setting(600.0, "Longest a Java scorer may run before it is an error.", min=1.0)


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking and model registry."""

    tracking_uri: str | None = setting(
        None, "MLflow tracking URI; none uses MLFLOW_TRACKING_URI or the local stack's server."
    )
    experiment: str = setting("show-attend-tell", "MLflow experiment name.")
    registered_model: str = setting("show-attend-tell", "Registered model name for promotion.")
    system_metrics: bool = setting(True, "Log CPU/memory (and GPU) metrics from rank 0.")


@dataclass(frozen=True)
class StorageConfig:
    """Where run outputs (checkpoints, artifacts) live: local paths or s3://bucket/prefix."""

    run_dir: str = setting("runs", "Checkpoints and evaluation outputs: local path or s3://bucket/prefix.")
    s3_endpoint_url: str | None = setting(
        None, "Endpoint of an S3-compatible server; none uses AWS_ENDPOINT_URL_S3 or AWS."
    )
    multipart_chunk_mb: int = setting(64, "Multipart upload part size, in MiB.", min=5)


# --------------------------------------------------------------------------------------------------
# The root
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a pipeline run."""

    recipe: str = setting("default", "Name of the recipe this config came from.")
    seed: int = setting(42, "Seed for every random number generator of a run.")
    data: DataConfig = section(DataConfig, "Raw data, vocabulary and shards.")
    model: ModelConfig = section(ModelConfig, "The captioner.")
    train: TrainConfig = section(TrainConfig, "Training stages.")
    eval: EvalConfig = section(EvalConfig, "Evaluation.")
    tracking: TrackingConfig = section(TrackingConfig, "MLflow.")
    storage: StorageConfig = section(StorageConfig, "Run outputs.")

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (tuples become lists), JSON-ready."""
        return _to_plain(self)

    def to_json(self, indent: int | None = 2) -> str:
        """The resolved config as JSON with sorted keys (stable text for hashing and diffs)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Rebuild a config from ``to_dict`` output (all keys optional; unknown keys fail)."""
        return _build(cls, data, prefix="")

    @classmethod
    def from_json(cls, text: str) -> Config:
        """Rebuild a config from ``to_json`` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config JSON is invalid: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(data)

    def fingerprint(self, *sections: str) -> str:
        """Short sha256 of the given dotted sections (all of the config when none), for cache keys."""
        plain = self.to_dict()
        chosen = {s: _get_dotted(plain, s) for s in sections} if sections else plain
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with dotted keys set to already-typed values, e.g. ``{"train.xe.epochs": 3}``."""
        plain = self.to_dict()
        for key, value in overrides.items():
            _check_key(key)
            _set_dotted(plain, key, _to_plain(value))
        return Config.from_dict(plain)


# --------------------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldInfo:
    """One leaf of the config tree."""

    key: str
    type: Any
    default: Any
    doc: str
    min: float | None
    max: float | None

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


def iter_fields(cls: type = Config, prefix: str = "", default: Any = None) -> Iterator[FieldInfo]:
    """Every leaf of the tree, depth first, with its dotted key and the default at that position."""
    instance = default if default is not None else cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(typing.cast(type, tp), key + ".", value)
        else:
            yield FieldInfo(
                key, tp, value, f.metadata.get("doc", ""), f.metadata.get("min"), f.metadata.get("max")
            )


def valid_keys() -> list[str]:
    """Every dotted leaf key."""
    return [f.key for f in iter_fields()]


def _section_keys() -> set[str]:
    keys: set[str] = set()
    for k in valid_keys():
        parts = k.split(".")
        keys.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return keys


def describe_config(cfg: Config | None = None) -> str:
    """A table of every key: type, value (the resolved one when ``cfg`` is given) and doc."""
    plain = (cfg or Config()).to_dict()
    lines = []
    for info in iter_fields():
        value = _get_dotted(plain, info.key)
        lines.append(f"{info.key} : {info.type_name} = {json.dumps(value)}\n    {info.doc}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Recipes and overrides
# --------------------------------------------------------------------------------------------------


def config_dir() -> Path:
    """The recipe folder: $CAPTIONING_CONFIG_DIR or the repository's configs/."""
    return Path(os.environ.get(CONFIG_DIR_ENV) or _REPO_CONFIG_DIR)


def list_recipes() -> list[str]:
    """Names of the recipes in the recipe folder."""
    return sorted(p.stem for p in config_dir().glob("*.toml"))


def recipe_path(recipe: str | os.PathLike[str]) -> Path:
    """Resolve a recipe name (``demo``) or a path to a .toml file."""
    path = Path(recipe)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return path
    candidate = config_dir() / f"{recipe}.toml"
    if not candidate.is_file():
        raise ConfigError(
            f"unknown recipe {str(recipe)!r}; available: {', '.join(list_recipes()) or '(none)'}"
        )
    return candidate


def load_recipe(recipe: str | os.PathLike[str]) -> Config:
    """Defaults overridden by one recipe file (TOML tables mirror the config tree)."""
    path = recipe_path(recipe)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    data.setdefault("recipe", path.stem)
    try:
        return Config.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def parse_overrides(argv: Sequence[str]) -> dict[str, str]:
    """``["--a.b=1", "--c.d", "2"]`` -> ``{"a.b": "1", "c.d": "2"}`` (values still text)."""
    out: dict[str, str] = {}
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an override like --train.xe.lr_decoder=4e-4, got {arg!r}")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override --{body} has no value (use --{body}=VALUE)")
            key, value = body, args[i + 1]
            i += 1
        _check_key(key)
        if key in out:
            raise ConfigError(f"override --{key} given twice")
        out[key] = value
        i += 1
    return out


def apply_overrides(cfg: Config, overrides: Mapping[str, str]) -> Config:
    """Set dotted keys from their text form, parsed by the field's type."""
    fields = {f.key: f for f in iter_fields()}
    typed: dict[str, Any] = {}
    for key, text in overrides.items():
        _check_key(key)
        typed[key] = _parse_text(text, fields[key].type, key)
    return cfg.replace(typed)


def load_config(recipe: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the recipe (when given), then the dotted command-line overrides."""
    cfg = load_recipe(recipe) if recipe is not None else Config()
    return apply_overrides(cfg, parse_overrides(overrides))


def config_warnings(cfg: Config) -> list[str]:
    """Options that do nothing under the current settings (habit 3: they warn, they do not fail)."""
    warnings = []
    defaults = Config()
    for name in ("xe", "finetune"):
        stage: XeStageConfig = getattr(cfg.train, name)
        default_stage: XeStageConfig = getattr(defaults.train, name)
        if not stage.fine_tune_encoder:
            if stage.lr_encoder != default_stage.lr_encoder:
                warnings.append(f"train.{name}.lr_encoder is set but train.{name}.fine_tune_encoder is false")
            if stage.fine_tune_from_block != default_stage.fine_tune_from_block:
                warnings.append(
                    f"train.{name}.fine_tune_from_block is set but train.{name}.fine_tune_encoder is false"
                )
        if stage.lr_schedule != "plateau" and (
            stage.decay_factor != default_stage.decay_factor
            or stage.decay_patience != default_stage.decay_patience
        ):
            warnings.append(f"train.{name}.decay_factor/decay_patience only apply to lr_schedule='plateau'")
    if cfg.data.dataset != "synthetic" and cfg.data.synthetic != defaults.data.synthetic:
        warnings.append("data.synthetic.* is set but data.dataset is not 'synthetic'")
    if cfg.data.dataset != "local" and cfg.data.local != defaults.data.local:
        warnings.append("data.local.* is set but data.dataset is not 'local'")
    if cfg.data.dataset != "flickr30k" and cfg.data.download.flickr30k_archive is not None:
        warnings.append("data.download.flickr30k_archive is set but data.dataset is not 'flickr30k'")
    if (
        cfg.model.embeddings_path is None
        and cfg.model.fine_tune_embeddings != defaults.model.fine_tune_embeddings
    ):
        warnings.append("model.fine_tune_embeddings is set but model.embeddings_path is none")
    if (
        cfg.data.loader.caption_mode == "all"
        and cfg.data.loader.seq_per_img != defaults.data.loader.seq_per_img
    ):
        warnings.append("data.loader.seq_per_img is ignored when data.loader.caption_mode='all'")
    if "scst" not in cfg.train.stages and cfg.train.scst != defaults.train.scst:
        warnings.append("train.scst.* is set but 'scst' is not in train.stages")
    if cfg.model.arch != "show_attend_tell":
        for name in ("xe", "finetune"):
            if getattr(cfg.train, name).alpha_c != getattr(defaults.train, name).alpha_c:
                warnings.append(f"train.{name}.alpha_c only applies to model.arch='show_attend_tell'")
    return warnings


# --------------------------------------------------------------------------------------------------
# Internals: typed building and parsing
# --------------------------------------------------------------------------------------------------


def _check_key(key: str) -> None:
    keys = valid_keys()
    if key in keys:
        return
    if key in _section_keys():
        raise ConfigError(
            f"{key!r} is a section, not a value; its keys: {', '.join(k for k in keys if k.startswith(key + '.'))}"
        )
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(keys)}")


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'} must be a table/object, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        _check_key(prefix + unknown[0])  # raises with the valid keys and a suggestion
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in data.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            # A partial table overrides only its keys, on top of this position's defaults.
            merged = {**_to_plain(getattr(defaults, name)), **_require_mapping(value, key)}
            kwargs[name] = _build(typing.cast(type, tp), merged, key + ".")
        else:
            kwargs[name] = _coerce(value, tp, key)
            _check_bounds(kwargs[name], fields[name].metadata, key)
    return cls(**kwargs)


def _require_mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key!r} is a section; expected a table/object, got {value!r}")
    return value


def _check_bounds(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and value < lo:
        raise ConfigError(f"{key} = {value!r} is below its minimum {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key} = {value!r} is above its maximum {hi}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check an already-typed value (TOML/JSON) against a field type; ints widen to floats, lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        # TOML has no null: in optional fields the word "none" (or "null") means None, as on the CLI.
        if type(None) in args and (
            value is None or (isinstance(value, str) and value.lower() in _NONE_WORDS)
        ):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key} expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args or type(value) is not type(args[args.index(value)]):
            raise ConfigError(f"{key} must be one of {', '.join(repr(a) for a in args)}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} expects a list ({_type_name(tp)}), got {value!r}")
        item_tp = args[0]
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} expects a bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} expects an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} expects a float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")


_NONE_WORDS = {"none", "null"}
_TRUE_WORDS = {"true", "yes", "1", "on"}
_FALSE_WORDS = {"false", "no", "0", "off"}


def _parse_text(text: str, tp: Any, key: str) -> Any:
    """Parse a command-line value by the field's type, then check it as a typed value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in _NONE_WORDS and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse_text(text, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"--{key} expects {_type_name(tp)}, got {text!r}")
    if origin is Literal:
        choice = next((a for a in args if str(a) == text), None)
        if choice is None:
            raise ConfigError(f"--{key} must be one of {', '.join(str(a) for a in args)}; got {text!r}")
        return choice
    if origin is tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        return tuple(_parse_text(t, args[0], key) for t in items)
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE_WORDS:
            return True
        if low in _FALSE_WORDS:
            return False
        raise ConfigError(f"--{key} expects a bool (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--{key} expects an int, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--{key} expects a float, got {text!r}") from None
    if tp is str:
        return text
    raise TypeError(f"config field {key} has an unsupported type {tp!r}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("none" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return "{" + ", ".join(str(a) for a in args) + "}"
    if origin is tuple:
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _get_dotted(plain: Mapping[str, Any], key: str) -> Any:
    node: Any = plain
    for part in key.split("."):
        node = node[part]
    return node


def _set_dotted(plain: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = plain
    for part in parents:
        node = node[part]
    node[leaf] = value
