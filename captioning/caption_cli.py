"""`captioning caption` (images, a video, a camera; torch or onnxruntime) and `captioning export`.

    captioning caption photo.jpg photos/ --model runs/demo/best.pt          # `path: caption` / JSON lines
    captioning caption --video talk.mp4 --model models:/sat@champion --fps 2 --annotate
    captioning caption --camera 0 --model exported/ --engine onnxruntime    # seed 000's `-v 0`; Ctrl-C ends
    captioning export --format onnx exported/ --model runs/demo/best.pt

``captioning.cli`` registers these parsers (``add_parsers``) and dispatches to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from captioning.config import ConfigError

MODEL_HELP = (
    "checkpoint path, s3:// URI, runs:/ID/model, models:/NAME@ALIAS or models:/NAME/VERSION "
    "(models:/ and runs:/ read MLFLOW_TRACKING_URI); with --engine onnxruntime, a folder of "
    "`captioning export --format onnx`"
)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "caption",
        help="caption images, a video or a camera with a model (beam search)",
        description="Images: prints `path: caption` per image; JSON lines (one object per image) when a "
        "folder is given or with --json. Folders are read in name order, common image extensions only. "
        "--video / --camera: frames sampled at --fps, a caption shown once it is stable for "
        "--stable-frames frames; writes STEM.vtt and STEM.jsonl (and STEM.annotated.mp4 with --annotate). "
        "Decoding defaults to the model's own recorded eval settings.",
    )
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    p.add_argument("--checkpoint", "--model", dest="model", required=True, metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--engine", choices=["torch", "onnxruntime"], default="torch", help="default: torch")
    p.add_argument("--beam-size", type=int, help="beam width (default: the model's eval.beam_size)")
    p.add_argument(
        "--max-len", type=int, help="most tokens, <end> included (default: the model's eval.max_len)"
    )
    p.add_argument(
        "--length-normalization",
        action=argparse.BooleanOptionalAction,
        help="rank finished beams by log-prob per token (default: the model's eval.length_normalization)",
    )
    p.add_argument(
        "--batch-size", type=int, help="images (frames) per forward pass (default 16; video 8, camera 1)"
    )
    p.add_argument("--visualize", type=Path, metavar="DIR", help="write attention overlays DIR/<stem>.png")
    p.add_argument("--json", action="store_true", help="JSON lines even for single images")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    media = p.add_mutually_exclusive_group()
    media.add_argument("--video", metavar="PATH_OR_URL", help="caption a video file or stream")
    media.add_argument("--camera", metavar="INDEX", help="caption a camera (0: the first) until Ctrl-C")
    p.add_argument("--fps", type=float, default=1.0, help="frames captioned per second of video (default 1)")
    p.add_argument(
        "--stable-frames", type=int, default=2, help="frames in a row a new caption needs to show (default 2)"
    )
    p.add_argument("--out-dir", type=Path, help="where video outputs go (default: beside a video file, or .)")
    p.add_argument("--annotate", action="store_true", help="also write STEM.annotated.mp4, captions drawn")
    p.add_argument("--heatmap", action="store_true", help="draw the caption's attention on annotated frames")
    p.add_argument(
        "--window",
        action=argparse.BooleanOptionalAction,
        help="camera: a live window (default: when a display exists)",
    )

    p = sub.add_parser(
        "export",
        help="export a model for another runtime (ONNX: encoder, initial state, decoder step)",
        description="Writes OUT/encoder.onnx, init.onnx, step.onnx (dynamic batch), vocab.json and "
        "model.json (preprocessing and decoding settings), checks the graphs with onnx.checker and "
        "compares onnxruntime with torch on a check batch. Run them with "
        "`captioning caption --engine onnxruntime --model OUT`.",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="folder to write")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="default: onnx")
    p.add_argument("--checkpoint", "--model", dest="model", required=True, metavar="MODEL", help=MODEL_HELP)


@contextmanager
def _local_model(source: str, engine: str, command: str = "caption") -> Iterator[str | None]:
    """The model as a local path (downloads in a temporary folder), or None after printing why not."""
    if engine == "onnxruntime":
        yield source
        return
    from captioning.model_uri import RegistryError, resolve_model
    from captioning.tracking import TrackingUnavailable

    with tempfile.TemporaryDirectory(prefix="captioning-model-") as downloads:
        try:
            model = resolve_model(source, dst=downloads)
        except (RegistryError, TrackingUnavailable) as exc:
            print(f"captioning {command}: error: {exc}", file=sys.stderr)
            yield None
            return
        yield model.checkpoint


def _decoding(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "beam_size": args.beam_size,
        "max_len": args.max_len,
        "length_normalization": args.length_normalization,
    }


def cmd_caption(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    if overrides:
        raise ConfigError(
            f"caption takes its settings from the checkpoint, not overrides: {' '.join(overrides)}"
        )
    if args.video is not None or args.camera is not None:
        if args.inputs:
            raise ValueError("give images or --video/--camera, not both")
        return _caption_media(args)
    from captioning.inference import caption_images, caption_inputs

    paths, had_folder = caption_inputs(args.inputs)
    if not paths:
        print("captioning caption: no images found", file=sys.stderr)
        return 1
    with _local_model(args.model, args.engine) as model:
        if model is None:
            return 1
        results = caption_images(
            paths,
            model,
            **_decoding(args),
            batch_size=args.batch_size or 16,
            visualize_dir=args.visualize,
            device=args.device,
            progress=len(paths) > 1,  # on stderr: a bar on a terminal, plain lines otherwise
            engine=args.engine,
        )
    as_json = args.json or had_folder
    failed = 0
    for entry in results:
        failed += "error" in entry
        if as_json:
            print(json.dumps(entry, ensure_ascii=False))
        elif "error" in entry:
            print(f"{entry['path']}: error: {entry['error']}", file=sys.stderr)
        else:
            print(f"{entry['path']}: {entry['caption']}")
    return 1 if failed else 0


def _caption_media(args: argparse.Namespace) -> int:
    from captioning.inference import Predictor
    from captioning.video import camera_frames, caption_video, video_frames

    if args.camera is not None:
        index: int | str = int(args.camera) if args.camera.isdigit() else args.camera
        frames = camera_frames(index, args.fps)
        stem = f"camera{args.camera}" if isinstance(index, int) else Path(str(index)).stem or "camera"
        out_dir = args.out_dir or Path(".")
        batch = args.batch_size or 1  # live: every frame captioned as it comes
    else:
        frames = video_frames(args.video, args.fps)
        local = "://" not in args.video
        stem = Path(args.video.split("?")[0]).stem or "video"
        out_dir = args.out_dir or (Path(args.video).parent if local else Path("."))
        batch = args.batch_size or 8
    out_dir.mkdir(parents=True, exist_ok=True)
    window = _Window.open(args) if args.camera is not None else None
    shown = [None]

    def on_caption(line: dict[str, Any], drawn: Any) -> None:
        if window is not None and drawn is not None:
            window.show(drawn)
        if line["cue"] >= 0 and line["cue"] != shown[0]:  # a new caption is on screen
            shown[0] = line["cue"]
            print(f"[{line['time']:8.2f} s] {line['caption']}", flush=True)

    with _local_model(args.model, args.engine) as model:
        if model is None:
            return 1
        predictor = Predictor.load(model, args.engine, args.device)
        try:
            summary = caption_video(
                frames,
                predictor,
                vtt=out_dir / f"{stem}.vtt",
                jsonl=out_dir / f"{stem}.jsonl",
                annotated=out_dir / f"{stem}.annotated.mp4" if args.annotate else None,
                heatmap=args.heatmap,
                draw=window is not None,
                fps=args.fps,
                stable_frames=args.stable_frames,
                batch_size=batch,
                on_caption=on_caption,
                interruptible=args.camera is not None,
                **{k: v for k, v in _decoding(args).items() if v is not None},
            )
        finally:
            if window is not None:
                window.close()
    outputs = ", ".join(f"{kind} {path}" for kind, path in summary["outputs"].items())
    print(f"{summary['frames']} frames, {summary['cues']} cues over {summary['duration']:.1f} s: {outputs}")
    return 0


class _Window:
    """A live OpenCV window where the cv2 build has a GUI and a display exists (camera runs)."""

    def __init__(self, cv2: Any) -> None:
        self.cv2 = cv2

    @classmethod
    def open(cls, args: argparse.Namespace) -> _Window | None:
        wanted = args.window
        if wanted is None:
            wanted = sys.platform in ("darwin", "win32") or bool(
                os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
            )
        if not wanted:
            return None
        import cv2

        try:
            cv2.namedWindow("captioning")
        except cv2.error:
            print(
                "captioning caption: no window (this OpenCV build has no GUI: pip install opencv-python); "
                "printing captions",
                file=sys.stderr,
            )
            return None
        return cls(cv2)

    def show(self, image: Any) -> None:
        import numpy as np

        self.cv2.imshow("captioning", self.cv2.cvtColor(np.asarray(image), self.cv2.COLOR_RGB2BGR))
        if self.cv2.waitKey(1) & 0xFF in (ord("q"), 27):  # q or Esc ends the run like Ctrl-C
            raise KeyboardInterrupt

    def close(self) -> None:
        self.cv2.destroyAllWindows()


def cmd_export(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    if overrides:
        raise ConfigError(
            f"export takes its settings from the checkpoint, not overrides: {' '.join(overrides)}"
        )
    from captioning.model.onnx_export import export_onnx

    with _local_model(args.model, "torch", "export") as model:
        if model is None:
            return 1
        manifest = export_onnx(model, args.out)
    check = manifest["check"]
    print(
        f"exported {manifest['arch']} to {args.out}: encoder.onnx, init.onnx, step.onnx, vocab.json, model.json "
        f"(onnxruntime vs torch: max |diff| {check['max_abs_diff']:.2g} on {check['rows']} images)"
    )
    print(f"caption with it: captioning caption IMAGE --engine onnxruntime --model {args.out}")
    return 0


COMMANDS = {"caption": cmd_caption, "export": cmd_export}
