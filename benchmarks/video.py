"""Frames captioned per second for a 640x480 video at beam 3, decoding included, beside bare decoding.

The video (made first, not timed): --seconds of 640x480 H.264 at --video-fps, synthetic scenes
(``demo_model.scene_images`` rendered at 480 px and placed on a moving 640x480 canvas), a new scene
every 2 s. Timed, in alternation for --repeats repetitions:

- bare: PyAV decoding every frame and converting it to an RGB image (``captioning.video.video_frames``
  at the video's own rate: the floor any captioner pays);
- captioned: ``captioning.video.caption_video`` over the same frames at --sample-fps (default: every
  frame), the checkpoint's preprocessing, --batch-size frames per beam search (beam 3), the hold and
  the WebVTT / JSON lines outputs.

The model is --checkpoint or the demo recipe's (``demo_model.demo_checkpoint``, random weights; the
same compute as a trained one). Last line: ``RESULT video_fps=N bare_fps=M`` (frames captioned per
second and frames decoded per second, medians); the line before it gives the real-time factor. Run::

    .venv/bin/python benchmarks/video.py                         # 20 s at 25 fps, every frame captioned
    .venv/bin/python benchmarks/video.py --sample-fps 2 --engine onnxruntime
"""

from __future__ import annotations

import sys

# This folder holds onnx.py, which would shadow the onnx package the exporter imports: it goes last.
sys.path.append(sys.path.pop(0))

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from demo_model import demo_checkpoint, scene_images
from PIL import Image

from captioning.inference import Predictor
from captioning.model.onnx_export import export_onnx
from captioning.video import VideoWriter, caption_video, video_frames


def write_video(path: Path, seconds: float, fps: int, scenes: list[bytes]) -> int:
    """A 640x480 H.264 video of the scenes, each for 2 s, drifting right; returns the frame count."""
    writer = VideoWriter(path, fps)
    total = round(seconds * fps)
    for n in range(total):
        scene = (
            Image.open(io.BytesIO(scenes[(n // (2 * fps)) % len(scenes)])).convert("RGB").resize((480, 480))
        )
        canvas = Image.new("RGB", (640, 480), (90, 90, 90))
        canvas.paste(scene, ((n * 2) % 160, 0))
        writer.write(canvas)
    writer.close(keep=True)
    return total


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a checkpoint file (default: the demo model, random weights)")
    parser.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--video-fps", type=int, default=25)
    parser.add_argument("--sample-fps", type=float, help="frames captioned per second (default: all)")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sample_fps = args.sample_fps or float(args.video_fps)

    with tempfile.TemporaryDirectory(prefix="bench-video-") as tmp:
        folder = Path(tmp)
        scenes, words = scene_images(max(1, round(args.seconds / 2)), size=240, seed=2)
        frames = write_video(folder / "video.mp4", args.seconds, args.video_fps, scenes)
        checkpoint = args.checkpoint or demo_checkpoint(folder / "demo.pt", words)
        if args.engine == "onnxruntime":
            export_onnx(checkpoint, folder / "onnx")
            predictor = Predictor.from_onnx(folder / "onnx", threads=args.threads)
        else:
            predictor = Predictor.from_checkpoint(checkpoint, "cpu")
        print(
            f"video: {frames} frames 640x480 H.264 ({args.seconds:g} s at {args.video_fps} fps); captioning "
            f"{sample_fps:g} frames/s of video with {args.engine}, beam {args.beam_size}, batch {args.batch_size}, "
            f"{args.threads} threads, model {args.checkpoint or 'demo recipe (random weights)'}; "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        bare, captioned, realtime = [], [], []
        cues = 0
        for rep in range(args.repeats):
            begin = time.perf_counter()
            decoded = sum(1 for _ in video_frames(folder / "video.mp4", fps=args.video_fps))
            bare.append(decoded / (time.perf_counter() - begin))
            begin = time.perf_counter()
            summary = caption_video(
                video_frames(folder / "video.mp4", fps=sample_fps),
                predictor,
                vtt=folder / "video.vtt",
                jsonl=folder / "video.jsonl",
                fps=sample_fps,
                batch_size=args.batch_size,
                beam_size=args.beam_size,
            )
            seconds = time.perf_counter() - begin
            captioned.append(summary["frames"] / seconds)
            realtime.append(args.seconds / seconds)
            cues = summary["cues"]
            print(
                f"  repetition {rep + 1}: bare decode {bare[-1]:.0f} frames/s; captioned {captioned[-1]:.1f} "
                f"frames/s ({summary['frames']} frames, {cues} cues)",
                flush=True,
            )
    fps, bare_fps = statistics.median(captioned), statistics.median(bare)
    print(
        f"captioned {fps:.1f} frames/s [{min(captioned):.1f}-{max(captioned):.1f}], bare decode {bare_fps:.0f} "
        f"frames/s [{min(bare):.0f}-{max(bare):.0f}]; {statistics.median(realtime):.1f}x real time at "
        f"{sample_fps:g} captions per second of video; load {os.getloadavg()[0]:.1f}"
    )
    print(f"RESULT video_fps={fps:.1f} bare_fps={bare_fps:.0f}")
    return fps


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
