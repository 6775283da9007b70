"""The README's video example: a video of synthetic scenes, captioned, annotated, one frame kept as a PNG.

    .venv/bin/python infra/example_video.py --model demo-data/runs/demo/NAME/scst/best.pt
    .venv/bin/python infra/example_video.py --model models:/show-attend-tell@champion --out /tmp/example

Writes into --out (default ``demo-data/example``): ``scenes.mp4`` (640x480 H.264, a new synthetic
scene every --scene-seconds, the shapes drifting), then runs ``captioning caption --video scenes.mp4
--annotate --heatmap`` (``scenes.vtt``, ``scenes.jsonl``, ``scenes.annotated.mp4``), and saves frame
--frame of the annotated video as ``annotated-frame.png``. Prints the cues and the files. A model trained
by ``make demo`` gives true captions of the scenes; any model runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from captioning.cli import main as captioning
from captioning.data.scenes import scene_pictures
from captioning.video import VideoWriter, video_frames


def write_scenes(path: Path, scenes: int, seconds: float, fps: int, seed: int) -> None:
    writer = VideoWriter(path, fps)
    per_scene = round(seconds * fps)
    for picture, _ in scene_pictures(scenes, size=256, seed=seed):
        big = picture.resize((720, 540), Image.Resampling.BICUBIC)
        for n in range(per_scene):
            shift = round(n * 40 / per_scene)  # a slow pan, so frames differ as a camera's would
            writer.write(big.crop((shift, shift, shift + 640, shift + 480)))
    writer.close(keep=True)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="any model source `captioning caption` takes")
    parser.add_argument("--out", type=Path, default=Path("demo-data/example"))
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--scene-seconds", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--frame", type=float, default=4.0, help="seconds into the video of the PNG frame")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    video = args.out / "scenes.mp4"
    write_scenes(video, args.scenes, args.scene_seconds, 25, args.seed)
    code = captioning(
        ["caption", "--video", str(video), "--model", args.model, "--fps", "2", "--annotate", "--heatmap"]
    )
    if code != 0:
        return code
    frame = next(f for f in video_frames(args.out / "scenes.annotated.mp4", fps=2) if f.time >= args.frame)
    frame.image.save(args.out / "annotated-frame.png")
    print(f"frame at {frame.time:.1f} s: {args.out / 'annotated-frame.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
