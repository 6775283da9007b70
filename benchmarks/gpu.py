"""Every stage's speed for the ``coco`` recipe's model on one GPU: one prepared command for a bare machine.

What it measures, each with the ``train.gpu`` switches off and on (``training.speed``; ``compile``
apart, on stage 2 only, since compiling costs a minute or more per model):

- stage 1 (cross-entropy, frozen encoder, batch 80), stage 2 (encoder fine-tuned from block 2,
  batch 32), stage 3 (SCST, 5 samples per image, batch 32, CIDEr-D rewards on the CPU included):
  the project's own step (``training.steps.build_step``, bf16 autocast on CUDA) on batches already on
  the device: images/s, step time, peak memory, model FLOPs per image (``FlopCounterMode``, forward
  and backward) and the model FLOP utilisation against the device's dense bf16 peak;
- beam-5 evaluation (``beam_search`` as ``evaluate`` runs it): images/s;
- the loader alone (``data.loader.build_loader`` over shards this script writes: 256 px photo-like
  JPEGs, 5 captions each; uint8 hand-over, pinned, normalised on the device): images/s, against
  what stage 1, the fastest, consumes;
- the paper estimate: measured FLOPs per image x COCO's 113,287 training images per epoch
  (``--flops`` counts them alone, on any machine, without timing anything).

Everything lands in a JSON report (``--report``; under ``$OUT`` when that is set). The last line is
``RESULT xe_img_s=.. finetune_img_s=.. scst_img_s=.. beam_img_s=.. mfu_finetune=..`` (switches on).
About 5 minutes on an H100. ``--tiny`` runs the same code with the demo's small model on the CPU in
under a minute (tests/test_gpu_benchmark.py).

The machine it is for has Python 3.12 with torch (CUDA), torchvision, Pillow, NumPy, onnx and
onnxruntime, no package index and no internet. Besides those it needs three small wheels, carried
along and put on ``sys.path`` as they are (``--wheels DIR``, default ``.gpu-wheels``; a zipped
wheel imports without installing; PyYAML's C part does not load from a zip and it falls back to its
pure-Python code):

    webdataset==1.0.2  braceexpand==0.1.7  PyYAML==6.0.4

Fetch them here with ``pip download --no-deps --only-binary=:all: --python-version 3.12
--platform manylinux_2_17_x86_64 -d .gpu-wheels webdataset==1.0.2 braceexpand==0.1.7 PyYAML==6.0.4``.
Run::

    PYTHONPATH=. python3 benchmarks/gpu.py                     # the GPU machine
    PYTHONPATH=. .venv/bin/python benchmarks/gpu.py --tiny     # here, on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _add_wheels(argv: list[str]) -> None:
    """Put ``--wheels DIR``'s ``*.whl`` on sys.path before anything imports them."""
    folder = Path(argv[argv.index("--wheels") + 1] if "--wheels" in argv else ".gpu-wheels")
    for wheel in sorted(folder.glob("*.whl")):
        sys.path.append(str(wheel))


_add_wheels(sys.argv)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from loader import write_benchmark_shards  # noqa: E402  (benchmarks/loader.py: this folder)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from captioning.config import GpuConfig, LoaderConfig, load_config  # noqa: E402
from captioning.data.batch import Batch  # noqa: E402
from captioning.data.loader import build_loader  # noqa: E402
from captioning.data.vocab import END_ID, PAD_ID, START_ID  # noqa: E402
from captioning.model import build_captioner  # noqa: E402
from captioning.model.search import beam_search  # noqa: E402
from captioning.training.dist import DistInfo  # noqa: E402
from captioning.training.scst import CiderReward  # noqa: E402
from captioning.training.speed import apply_speed, resolve_speed  # noqa: E402
from captioning.training.stage import ScstSettings, build_stage_setup  # noqa: E402
from captioning.training.steps import build_step  # noqa: E402

COCO_TRAIN_IMAGES = 113_287  # Karpathy's train split with restval
COCO_VOCAB = 9_490  # seed 004's vocabulary at min_word_freq 5
# Dense bf16 peaks (TFLOP/s) by the device name's model; --peak-tflops for others.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
SWITCHES_OFF = GpuConfig(
    channels_last="off", fused_adam="off", compile="off", cudnn_benchmark="off", ddp_bucket_view="off"
)


@dataclasses.dataclass(frozen=True)
class Scale:
    """What a run measures: the recipe's model at its batches, or --tiny's."""

    recipe: str
    image_size: int
    vocab: int
    batches: dict[str, int]  # stage -> images per step
    steps: int  # timed steps per measurement (after warmup)
    warmup: int
    max_len: int  # caption length (teacher forcing), SCST samples and beams
    loader_images: int


FULL = Scale(
    "coco",
    256,
    COCO_VOCAB,
    {"xe": 80, "finetune": 32, "scst": 32, "beam": 80},
    steps=10,
    warmup=3,
    max_len=16,
    loader_images=2048,
)
TINY = Scale(
    "demo",
    64,
    60,
    {"xe": 8, "finetune": 8, "scst": 4, "beam": 8},
    steps=2,
    warmup=1,
    max_len=8,
    loader_images=64,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for model, tflops in PEAK_TFLOPS.items() if model in name), None)


def random_batch(images: int, scale: Scale, device: torch.device, seed: int) -> Batch:
    """A batch as the loader delivers it (normalised images, 5 captions each), already on ``device``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, scale.max_len + 1, (images, 5), generator=g)  # (B, 5) <start>..<end>
    captions = torch.randint(4, scale.vocab, (images, 5, scale.max_len), generator=g)
    steps = torch.arange(scale.max_len)
    captions[:, :, 0] = START_ID
    captions[steps == (lengths - 1).unsqueeze(-1)] = END_ID
    captions[steps >= lengths.unsqueeze(-1)] = PAD_ID
    pixels = torch.randint(
        0, 256, (images, 3, scale.image_size, scale.image_size), dtype=torch.uint8, generator=g
    )
    batch = Batch(pixels, captions, lengths, torch.arange(images), torch.zeros(images, dtype=torch.bool))
    return batch.to(device).normalized()


def reward_corpus(scale: Scale, images: int) -> dict[int, list[list[int]]]:
    rng = np.random.default_rng(0)
    return {i: [rng.integers(4, scale.vocab, 10).tolist() for _ in range(5)] for i in range(images)}


def timed(run: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds per call, peak memory in GiB) of ``run`` after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def counted_flops(run: Callable[[], Any]) -> float:
    """Model FLOPs of one call (matmuls and convolutions, forward and backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return float(counter.get_total_flops())


def stage_call(
    stage: str, scale: Scale, gpu: GpuConfig, device: torch.device, images: int
) -> Callable[[], None]:
    """One step of ``stage`` (or a beam search) on a fresh model with these switches, as a call."""
    cfg = load_config(scale.recipe, ["--model.encoder_weights=none"])  # random weights: the same speed
    torch.manual_seed(0)
    model = build_captioner(cfg.model, scale.vocab).to(device)
    batch = random_batch(images, scale, device, seed=1)
    if stage == "beam":
        apply_speed(model, resolve_speed(gpu, device))
        model.eval()

        def run() -> None:
            with torch.no_grad():
                beam_search(model, model.encode(batch.images), beam_size=5, max_len=scale.max_len)

    else:
        setup = build_stage_setup(cfg, stage, "unused")
        setup = dataclasses.replace(setup, batch_size=images, gpu=gpu, precision="bf16")
        if isinstance(setup.objective, ScstSettings):
            setup = dataclasses.replace(
                setup, objective=dataclasses.replace(setup.objective, max_len=scale.max_len)
            )
        model.encoder.set_fine_tuning(setup.train_encoder, setup.fine_tune_from_block)
        model.train()
        reward = CiderReward(reward_corpus(scale, images)) if stage == "scst" else None
        generator = torch.Generator(device=device).manual_seed(0)
        _, step = build_step(setup, model, DistInfo(), generator, reward, steps_per_epoch=1000)

        def run() -> None:
            step(batch)

    return run


def measure_stage(
    stage: str, scale: Scale, gpu: GpuConfig, device: torch.device, peak: float | None
) -> dict[str, Any]:
    """One training stage (or ``beam``) with one set of switches: speed, memory, FLOPs, MFU."""
    images = scale.batches[stage]
    run = stage_call(stage, scale, gpu, device, images)
    compile_start = time.perf_counter()
    run()  # the first call: compilation (when on), cuDNN's search, allocator warm-up
    sync(device)
    first_s = time.perf_counter() - compile_start
    seconds, memory = timed(run, device, scale.steps, scale.warmup)
    flops = counted_flops(run)
    mfu = flops / seconds / (peak * 1e12) if peak else float("nan")
    return {
        "images_per_s": images / seconds,
        "step_ms": 1000 * seconds,
        "first_call_s": first_s,
        "peak_memory_gib": memory,
        "gflops_per_image": flops / images / 1e9,
        "mfu": mfu,
        "batch": images,
    }


def measure_loader(scale: Scale, device: torch.device, workers: int) -> dict[str, Any]:
    """One epoch of the project's loader over shards written here (uint8 hand-over, device-side float work)."""
    root = Path(tempfile.mkdtemp(prefix="gpu-bench-shards-"))
    try:
        write_benchmark_shards(root, scale.loader_images, per_shard=max(8, scale.loader_images // 16))
        loader = build_loader(
            LoaderConfig(num_workers=workers),
            str(root),
            "train",
            train=True,
            dist=DistInfo(),
            image_size=256,
            seed=0,
            batch_size=scale.batches["xe"],
            device=device,
        )
        count, start = 0, time.perf_counter()
        for batch in loader:
            count += batch.num_real
        sync(device)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"images_per_s": count / seconds, "workers": workers, "images": count}


def count_coco_flops() -> dict[str, Any]:
    """The paper estimate from the model itself: each stage's FLOPs per image (2 images on the CPU)
    and per COCO epoch, and what that takes at 40% of an H100's dense bf16 peak."""
    flops = {}
    for stage in ("xe", "finetune", "scst"):
        per_image = counted_flops(stage_call(stage, FULL, SWITCHES_OFF, torch.device("cpu"), 2)) / 2
        flops[stage] = per_image
        epoch = per_image * COCO_TRAIN_IMAGES
        at_40 = epoch / (0.4 * PEAK_TFLOPS["H100"] * 1e12)
        print(
            f"{stage:9s}: {per_image / 1e9:6.1f} GFLOP per image, {epoch / 1e15:5.2f} PFLOP per COCO epoch, "
            f"{at_40:5.1f} s at 40% of an H100's {PEAK_TFLOPS['H100']:.0f} TFLOP/s",
            flush=True,
        )
    print(
        f"RESULT xe_epoch_pflop={flops['xe'] * COCO_TRAIN_IMAGES / 1e15:.2f} "
        f"finetune_epoch_pflop={flops['finetune'] * COCO_TRAIN_IMAGES / 1e15:.2f} "
        f"scst_epoch_pflop={flops['scst'] * COCO_TRAIN_IMAGES / 1e15:.2f}"
    )
    return {"gflops_per_image": {k: v / 1e9 for k, v in flops.items()}}


def finite(value: Any) -> Any:
    """The report with NaN (not measured: no peak known, no GPU memory on a CPU) as null."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def switch_sets(device: torch.device, with_compile: bool) -> Iterator[tuple[str, GpuConfig]]:
    yield "off", SWITCHES_OFF
    yield "on", GpuConfig()  # the defaults: auto (on for CUDA), compile off
    if with_compile:
        yield "on+compile", GpuConfig(compile="on")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="the demo's small model on the CPU, < 1 minute")
    parser.add_argument("--report", default=None, help="JSON report (default: $OUT/gpu-report.json or ./)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of this device")
    parser.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also stage 2 with torch.compile (default: on CUDA)")  # fmt: skip
    parser.add_argument("--wheels", default=".gpu-wheels", help="folder of the wheels listed above")
    parser.add_argument(
        "--flops", action="store_true", help="only count the coco model's FLOPs per image (no GPU needed)"
    )
    args = parser.parse_args(argv)
    if args.flops:
        return count_coco_flops()
    scale = TINY if args.tiny else FULL
    device = DistInfo().device
    with_compile = args.compile if args.compile is not None else device.type == "cuda"
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(
        f"device: {name}; torch {torch.__version__}; peak bf16 {peak or 'unknown'} TFLOP/s; recipe {scale.recipe}"
    )
    report: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "recipe": scale.recipe,
        "stages": {},
    }
    torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32
    errors: dict[str, str] = {}  # a failed measurement is reported and the others still run
    for stage in ("xe", "finetune", "scst", "beam"):
        for label, gpu in switch_sets(device, with_compile and stage == "finetune"):
            try:
                row = measure_stage(stage, scale, gpu, device, peak)
            except Exception as exc:  # a one-off GPU session must not lose the other figures
                errors[f"{stage} {label}"] = f"{type(exc).__name__}: {exc}"
                print(f"{stage:9s} switches {label:10s}: FAILED {errors[f'{stage} {label}']}", flush=True)
                continue
            report["stages"].setdefault(stage, {})[label] = row
            print(
                f"{stage:9s} switches {label:10s}: {row['images_per_s']:8.1f} images/s, step "
                f"{row['step_ms']:7.1f} ms (batch {row['batch']}), first call {row['first_call_s']:5.1f} s, "
                f"peak {row['peak_memory_gib']:5.1f} GiB, {row['gflops_per_image']:6.1f} GFLOP/image, "
                f"MFU {row['mfu']:.3f}",
                flush=True,
            )
    nan = {"images_per_s": float("nan"), "gflops_per_image": float("nan"), "mfu": float("nan")}
    on = {
        stage: report["stages"].get(stage, {}).get("on", nan) for stage in ("xe", "finetune", "scst", "beam")
    }
    try:
        loader = measure_loader(scale, device, args.workers)
        needed = on["xe"]["images_per_s"]
        report["loader"] = loader | {
            "stage1_images_per_s": needed,
            "keeps_up": loader["images_per_s"] >= needed,
        }
        print(
            f"loader: {loader['images_per_s']:.1f} images/s with {loader['workers']} workers; stage 1 consumes "
            f"{needed:.1f}: {'keeps up' if loader['images_per_s'] >= needed else 'does NOT keep up'}"
        )
    except Exception as exc:
        errors["loader"] = f"{type(exc).__name__}: {exc}"
        print(f"loader: FAILED {errors['loader']}", flush=True)
    epoch = {s: on[s]["gflops_per_image"] * COCO_TRAIN_IMAGES / 1e6 for s in ("xe", "finetune")}  # PFLOP
    report["epoch_pflop"] = epoch
    report["epoch_minutes"] = {
        s: COCO_TRAIN_IMAGES / on[s]["images_per_s"] / 60 for s in ("xe", "finetune", "scst")
    }
    report["errors"] = errors
    print(
        f"one COCO epoch on paper: {epoch['xe']:.2f} PFLOP decoder-only, {epoch['finetune']:.2f} PFLOP fine-tuned; "
        "at the measured rates: " + ", ".join(f"{s} {m:.1f} min" for s, m in report["epoch_minutes"].items())
    )
    out = Path(args.report or Path(os.environ.get("OUT", ".")) / "gpu-report.json")
    out.write_text(json.dumps(finite(report), indent=2, allow_nan=False))
    print(
        f"report: {out}" + (f"; {len(errors)} measurement(s) failed: {', '.join(errors)}" if errors else "")
    )
    mfu = on["finetune"]["mfu"]
    print(
        f"RESULT xe_img_s={on['xe']['images_per_s']:.1f} finetune_img_s={on['finetune']['images_per_s']:.1f} "
        f"scst_img_s={on['scst']['images_per_s']:.1f} beam_img_s={on['beam']['images_per_s']:.1f} "
        f"mfu_finetune={'nan' if math.isnan(mfu) else f'{mfu:.3f}'}"
    )
    if errors:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
