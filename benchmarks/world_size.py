"""Does the learning-rate rule hold the learning curve when the world size changes? The ``demo`` recipe's
stage 1 at 2 processes (its rates were tuned there: 2 x 16 images x 5 captions = 160 captions per step)
against 1 process at the same per-rank batch (80 captions per step, twice the steps per epoch), with
``train.lr_scaling`` linear (rates x 80/160, the default), sqrt (x sqrt(80/160)) and none (as set).

Each run is ``captioning.stages.train_pipeline`` (torchrun, gloo) from scratch with the same seed;
per epoch it records the training loss and the validation CIDEr-D. Printed: each run's curve, and
each 1-process run's mean |difference| to the 2-process curve (loss, and CIDEr). Last line::

    RESULT loss_gap_linear=A loss_gap_none=B loss_gap_sqrt=C cider_gap_linear=D cider_gap_none=E cider_gap_sqrt=F

Run (about 3 minutes per run on 2 cores)::

    .venv/bin/python benchmarks/world_size.py                      # 4 epochs of stage 1
    .venv/bin/python benchmarks/world_size.py --epochs 6 --output /tmp/world
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from captioning.config import load_config
from captioning.data.prepare import prepare_data
from captioning.stages import train_pipeline


def show(line: str, label: str) -> None:
    """Only each stage's first line (its steps, captions per step and rates) and its end."""
    if "starts:" in line or " done in " in line:
        print(f"  {label} {line}", flush=True)


def curve(output: Path, nproc: int, scaling: str, epochs: int) -> list[dict[str, float]]:
    overrides = [
        f"--train.xe.epochs={epochs}",
        f"--train.lr_scaling={scaling}",
        "--train.xe.early_stop_patience=99",
    ]
    shutil.rmtree(output, ignore_errors=True)
    summary = train_pipeline(
        "demo",
        overrides,
        output=str(output),
        stages=["xe"],
        tracker="jsonl",
        register=False,
        nproc_per_node=nproc,
        on_line=lambda line: show(line, f"[{nproc} x {scaling}]"),
    )
    return list(summary["stages"][0]["history"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-data/bench-world-size")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    prepare_data(load_config("demo"), progress=False)
    root = Path(args.output)
    runs = {"2 processes": curve(root / "world2", 2, "linear", args.epochs)}  # x1: any rule
    for scaling in ("linear", "sqrt", "none"):
        runs[f"1 process, {scaling}"] = curve(root / f"world1-{scaling}", 1, scaling, args.epochs)
    print(f"\n{'':22s}" + "".join(f"   epoch {e + 1}: loss  CIDEr" for e in range(args.epochs)))
    for name, history in runs.items():
        cells = "".join(f"{h['train/loss']:15.4f} {h['val/CIDEr']:6.3f}" for h in history)
        print(f"{name:22s}{cells}")
    reference = runs["2 processes"]
    gaps = {}
    for scaling in ("linear", "sqrt", "none"):
        history = runs[f"1 process, {scaling}"]
        for key, short in (("train/loss", "loss"), ("val/CIDEr", "cider")):
            diffs = [abs(a[key] - b[key]) for a, b in zip(history, reference, strict=True)]
            gaps[f"{short}_gap_{scaling}"] = sum(diffs) / len(diffs)
    print("mean |difference| to the 2-process curve: " + ", ".join(f"{k} {v:.4f}" for k, v in gaps.items()))
    print(
        "RESULT "
        + " ".join(f"{k}={gaps[k]:.4f}" for k in sorted(gaps, key=lambda k: (k.split("_")[0] != "loss", k)))
    )


if __name__ == "__main__":
    main()
