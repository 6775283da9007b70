"""The settings of the whole pipeline: one tree of typed, frozen dataclasses, each field with its
default, one-line doc and bounds. Defaults live here and nowhere else.

Components read only their own section (``build_*`` functions take ``cfg.model``, ``cfg.data.shards``,
...); leaves take plain numbers. The defaults are COCO's as seed 004 trains it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from captioning.config.typed import (
    ConfigError,
    build,
    check_key,
    get_dotted,
    section,
    set_dotted,
    setting,
    to_plain,
)

STAGES = ("xe", "finetune", "scst")  # the training stages, in the order a run takes them
Stage = Literal["xe", "finetune", "scst"]

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
        None,
        "Flickr30k's image archive: a local .tar.gz/.zip or a URL; none: base_url's flickr30k-images.tar.gz.",
    )
    num_retries: int = setting(5, "Attempts per file before a download fails.", min=1)
    timeout_s: float = setting(60.0, "Socket timeout per request, in seconds.", min=0.1)
    verify_checksums: bool = setting(
        True, "Check published sizes/checksums; false still checks completeness and that archives open."
    )
    checksums: tuple[str, ...] = setting(
        (), "A mirror's own checksums, NAME=md5:HEX or NAME=sha256:HEX; replace the published ones."
    )
    checksums_file: str | None = setting(
        None, "A mirror's sums file (md5sum/sha256sum output, or BSD tags); checksums entries win."
    )


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
    extra_shard_dirs: tuple[str, ...] = setting(
        (), "More shard builds whose train split training also reads (same vocabulary; val/test: shard_dir)."
    )
    retrain_on: Literal["all", "new"] = setting(
        "all", "Retraining on landed data trains on all (existing train shards + the new ones) or new alone."
    )
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
    lr_reference_captions: int = setting(
        80,
        "Captions per optimizer step (all ranks) the learning rates are for: seed 004's batch of 80 in "
        "stage 1, 32 in stage 2; train.lr_scaling adapts them to the run's captions per step.",
        min=1,
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
    lr_reference_captions: int = setting(
        50,
        "Sampled captions per optimizer step (all ranks) the learning rates are for (ruotianluo's SCST: "
        "10 images x 5 samples); train.lr_scaling adapts them to the run's.",
        min=1,
    )
    num_samples: int = setting(5, "Captions sampled per image.", min=1)
    baseline: Literal["mean", "greedy"] = setting(
        "mean", "mean: average reward of the image's other samples (new self-critical); greedy: SCST."
    )
    temperature: float = setting(1.0, "Sampling temperature.", min=1e-6)
    max_len: int = setting(16, "Longest sampled caption, in tokens.", min=1)
    grad_clip: float | None = setting(5.0, "Clip gradient values at +-this; none disables.", min=0.0)
    early_stop_patience: int = setting(5, "Epochs without improvement before stopping.", min=1)


Switch = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class GpuConfig:
    """How a stage uses its device. None changes results beyond float tolerance (tests/test_speed.py);
    ``auto`` turns a switch on where it pays (CUDA) and off on the CPU."""

    channels_last: Switch = setting(
        "auto", "Encoder weights and images in NHWC, the layout tensor cores' convolutions want."
    )
    fused_adam: Switch = setting("auto", "Adam's update of all parameters in one fused kernel.")
    compile: Switch = setting(
        "off",
        "torch.compile the encoder and the decoder's step (auto: on CUDA). Off by default: compiling "
        "takes minutes per stage start; benchmarks/gpu.py measures what it gains.",
    )
    cudnn_benchmark: Switch = setting(
        "auto", "Let cuDNN time its convolution algorithms for the batch's shapes (CUDA only)."
    )
    ddp_bucket_view: Switch = setting(
        "auto", "DDP gradients as views into its communication buckets (no copy, less memory)."
    )


@dataclass(frozen=True)
class TrainConfig:
    """The training stages and what they share."""

    stages: tuple[Stage, ...] = setting(("xe", "finetune", "scst"), "Stages to run, in order.")
    precision: Literal["fp32", "bf16", "fp16"] = setting(
        "bf16", "Mixed precision on GPU: bf16, or fp16 with a gradient scaler (CPU always runs fp32)."
    )
    nproc_per_node: int = setting(1, "torchrun processes per node (GPUs per node on GPU).", min=1)
    max_restarts: int = setting(
        0,
        "torchrun's elastic restarts of a stage's worker group (every node's) after a worker or a node "
        "dies; each restart resumes from the last checkpoint. 0: the first failure ends the stage.",
        min=0,
    )
    checkpoint_every_steps: int = setting(
        1000, "Steps between periodic checkpoints (0: epoch ends only).", min=0
    )
    checkpoint_every_minutes: float = setting(
        5.0,
        "Minutes between periodic checkpoints, besides the steps and every epoch end (0: off); checked "
        "at each logging step, so a crash loses at most this long plus log_every_steps steps.",
        min=0,
    )
    log_every_steps: int = setting(50, "Steps between logged training metrics.", min=1)
    lr_scaling: Literal["linear", "sqrt", "none"] = setting(
        "linear",
        "Learning rate for C captions per step, R the stage's lr_reference_captions: lr x C/R (linear; "
        "it held the demo's learning curve from 2 processes to 1), lr x (C/R)^0.5 (sqrt), or as set (none).",
    )
    lr_warmup_epochs: float = setting(
        1.0,
        "When the rule raises a rate, it climbs linearly from the configured one over this many "
        "epochs of the stage (Goyal et al.'s gradual warmup); 0: from the first step.",
        min=0.0,
    )
    gpu: GpuConfig = section(GpuConfig, "GPU habits: each a switch that changes speed, not results.")
    xe: XeStageConfig = section(XeStageConfig, "Stage 1: cross-entropy, frozen encoder.")
    finetune: XeStageConfig = section(
        XeStageConfig,
        "Stage 2: cross-entropy with encoder fine-tuning.",
        fine_tune_encoder=True,
        epochs=10,
        lr_reference_captions=32,
    )
    scst: ScstConfig = section(ScstConfig, "Stage 3: self-critical sequence training.")


# --------------------------------------------------------------------------------------------------
# Evaluation, tracking, storage
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    """Decoding a split and scoring it with pycocoevalcap."""

    split: Split = setting("val", "Split scored during training for early stopping and model choice.")
    test_split: Split = setting("test", "Split scored once a stage ends: the stage's reported test scores.")
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
    promotion_tolerance: float = setting(
        0.01, "CIDEr-D a retrained model may lose on the original holdout and still be promoted.", min=0.0
    )
    system_metrics: bool = setting(True, "Log CPU/memory (and GPU) metrics from rank 0.")
    connect_timeout_s: float = setting(
        10.0,
        "Seconds a run waits for the tracking server to answer before it fails (none started yet).",
        min=0.5,
    )


@dataclass(frozen=True)
class StorageConfig:
    """Where run outputs (checkpoints, artifacts) live: local paths or s3://bucket/prefix.

    S3 endpoints and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL_S3``,
    ``AWS_ACCESS_KEY_ID``, ...), which every process of a run (torchrun workers, pool workers) inherits.
    """

    run_dir: str = setting("runs", "Checkpoints and evaluation outputs: local path or s3://bucket/prefix.")


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
        return to_plain(self)

    def to_json(self, indent: int | None = 2) -> str:
        """The resolved config as JSON with sorted keys (stable text for hashing and diffs)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Rebuild a config from ``to_dict`` output (all keys optional; unknown keys fail)."""
        return build(cls, data, "", Config)

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
        chosen = {s: get_dotted(plain, s) for s in sections} if sections else plain
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with dotted keys set to already-typed values, e.g. ``{"train.xe.epochs": 3}``."""
        plain = self.to_dict()
        for key, value in overrides.items():
            check_key(Config, key)
            set_dotted(plain, key, to_plain(value))
        return Config.from_dict(plain)
