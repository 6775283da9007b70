"""Caption videos and cameras: frames sampled at ``fps``, captioned in batches, subtitles that hold still.

    predictor = Predictor.load("runs/demo/best.pt")                 # or an ONNX folder, engine="onnxruntime"
    summary = caption_video(video_frames("talk.mp4", fps=2), predictor,
                            vtt="talk.vtt", jsonl="talk.jsonl", annotated="talk.annotated.mp4")
    summary  # {"frames": 120, "cues": 4, "duration": 60.0, "outputs": {...}}

    caption_video(camera_frames(0, fps=2), predictor, batch_size=1, on_caption=print_line)  # seed 000's -v 0

Frames come from ``video_frames`` (a file or URL, decoded by PyAV with its presentation times) or
``camera_frames`` (OpenCV's capture: PyAV's wheel has no camera devices); both yield ``Frame(time,
image)``, so a test can pass any iterable of frames in their place. A frame is kept when it reaches
the next tick of a 1/fps grid (times drift with neither the frame rate nor dropped frames), goes
through the image path's preprocessing (``Predictor.load_frame``: what the model saw in training)
and is captioned with the same batched beam search as images, ``batch_size`` frames at a time.

Subtitles must not flicker when a caption changes for one frame: ``CaptionHold`` shows a caption
until a different one has been the frames' caption ``stable_frames`` sampled frames in a row; the
new cue then starts at the first of those frames (the scene change), the old one ends there. A
caption seen fewer times in a row never shows. Outputs: WebVTT cues (``vtt``), one JSON line per
sampled frame (``jsonl``: time, caption, score, tokens and the cue it belongs to, -1 for none),
and an annotated video (``annotated``: the sampled frames at ``fps`` with the caption being shown,
as a live viewer sees it, and with ``heatmap`` the caption's mean attention over the frame).

A file that cannot be opened, holds no video, fails to decode part-way or ends well before its
declared duration raises ``VideoError`` naming it and what was wrong; the outputs are then not
written (each is written to a temporary name and renamed at the end). A camera run ends when the
frames end or on Ctrl-C (KeyboardInterrupt, with ``interruptible``), and its outputs are written
either way; Ctrl-C during a video file's run stops it and writes nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from captioning import storage
from captioning.inference import Caption, Predictor

DEFAULT_FPS = 1.0
DEFAULT_STABLE_FRAMES = 2
VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts"})


class VideoError(ValueError):
    """A video or camera that cannot be captioned; ``reason``: unreadable, no_video, corrupt, truncated
    or camera."""

    def __init__(self, message: str, reason: str = "unreadable") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Frame:
    time: float  # seconds from the start of the video (or of the camera run)
    image: Image.Image  # RGB, the source's own size
    source_end: float | None = None  # where the video ends (its declared duration), when known


@dataclass(frozen=True)
class Cue:
    start: float  # seconds
    end: float
    text: str
    score: float  # summed log-prob of the caption on the cue's first frame


# --------------------------------------------------------------------------------------------------
# Frame sources


def _ticks(fps: float) -> Callable[[float], bool]:
    """A keep(t) test: True for the first frame at or after each tick k / fps (k = 0, 1, ...)."""
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    next_tick = [0.0]

    def keep(t: float) -> bool:
        if t + 1e-6 < next_tick[0]:
            return False
        next_tick[0] = (math.floor(t * fps + 1e-6) + 1) / fps
        return True

    return keep


def video_frames(source: str | os.PathLike[str], fps: float = DEFAULT_FPS) -> Iterator[Frame]:
    """Decode ``source`` (a file or a URL FFmpeg opens) and yield its frames at ``fps``; see the module doc."""
    import av

    name = os.fspath(source)
    keep = _ticks(fps)
    try:
        container = av.open(name)
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"{name}: cannot open as a video: {getattr(e, 'strerror', None) or e}") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"{name}: no video stream", "no_video")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads: decoding is most of a video's cost
        declared = _duration(container, stream)
        offset = (
            float(stream.start_time * stream.time_base) if stream.start_time and stream.time_base else 0.0
        )
        last, decoded = 0.0, 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None or frame.time is None:
                    continue
                t = float(frame.time) - offset  # seconds from the first frame
                decoded += 1
                last = max(last, t)
                if keep(t):
                    yield Frame(t, frame.to_image(), declared)
        except av.FFmpegError as e:
            reason = getattr(e, "strerror", None) or e
            raise VideoError(
                f"{name}: corrupt or truncated after {last:.2f} s: {reason}", "corrupt"
            ) from None
        if decoded == 0:
            raise VideoError(f"{name}: no decodable video frames", "corrupt")
        rate = float(stream.average_rate or 25)
        if declared is not None and last + max(2.0 / rate, 0.5) < declared:
            raise VideoError(
                f"{name}: truncated: frames end at {last:.2f} s of the {declared:.2f} s the file declares",
                "truncated",
            )


def _duration(container: Any, stream: Any) -> float | None:
    """The video stream's declared duration in seconds (the container's when the stream has none)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000  # av.time_base: microseconds
    return None


def camera_frames(
    index: int | str, fps: float = DEFAULT_FPS, *, clock: Callable[[], float] = time.monotonic
) -> Iterator[Frame]:
    """Frames of camera ``index`` (OpenCV's device number, or a device path / stream URL) at ``fps``,
    timed from the first frame; ends when the camera stops delivering."""
    import cv2

    capture = cv2.VideoCapture(index)
    if not capture.isOpened():
        capture.release()
        raise VideoError(f"camera {index}: cannot be opened (no such device, or it is busy)", "camera")
    keep = _ticks(fps)
    start: float | None = None
    try:
        while True:
            ok, bgr = capture.read()
            if not ok:
                if start is None:
                    raise VideoError(f"camera {index}: opened but delivers no frames", "camera")
                return
            now = clock()
            start = now if start is None else start
            if keep(now - start):
                yield Frame(now - start, Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    finally:
        capture.release()


# --------------------------------------------------------------------------------------------------
# Captions and cues


def caption_frames(
    frames: Iterable[Frame], predictor: Predictor, *, batch_size: int = 8, **decoding: Any
) -> Iterator[tuple[Frame, Caption]]:
    """Each frame with its caption, in order, ``batch_size`` frames per beam search."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: list[tuple[Frame, Image.Image]] = []

    def flush() -> Iterator[tuple[Frame, Caption]]:
        captions = predictor.caption([image for _, image in pending], batch_size=batch_size, **decoding)
        yield from zip((frame for frame, _ in pending), captions, strict=True)
        pending.clear()

    for frame in frames:
        pending.append((frame, predictor.load_frame(frame.image)))
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()


class CaptionHold:
    """Which caption is on screen: a new caption shows once it is the frames' caption ``stable_frames``
    times in a row, from the first of those frames (see the module doc)."""

    def __init__(self, stable_frames: int = DEFAULT_STABLE_FRAMES) -> None:
        if stable_frames < 1:
            raise ValueError(f"stable_frames must be >= 1, got {stable_frames}")
        self.stable_frames = stable_frames
        self.cues: list[Cue] = []  # ended cues
        self.shown: Cue | None = None  # on screen now (its end is not known yet)
        self._candidate: tuple[str, float, float, int] | None = None  # text, first time, score, count

    def push(self, t: float, text: str, score: float) -> None:
        if self.shown is not None and text == self.shown.text:
            self._candidate = None
            return
        if self._candidate is not None and self._candidate[0] == text:
            _, first, first_score, count = self._candidate
            self._candidate = (text, first, first_score, count + 1)
        else:
            self._candidate = (text, t, score, 1)
        text, first, first_score, count = self._candidate
        if count >= self.stable_frames:
            if self.shown is not None:
                self.cues.append(Cue(self.shown.start, first, self.shown.text, self.shown.score))
            self.shown = Cue(first, math.inf, text, first_score)
            self._candidate = None

    @property
    def index(self) -> int:
        """The number of the cue on screen (-1: none)."""
        return len(self.cues) if self.shown is not None else -1

    def finish(self, end: float) -> list[Cue]:
        """Every cue, the one on screen ended at ``end``."""
        if self.shown is not None:
            self.cues.append(
                Cue(self.shown.start, max(end, self.shown.start), self.shown.text, self.shown.score)
            )
            self.shown = None
        return self.cues


def _timestamp(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def format_vtt(cues: Iterable[Cue]) -> str:
    """WebVTT text: a header, then one numbered cue per caption."""
    blocks = ["WEBVTT\n"]
    for n, cue in enumerate(cues, 1):
        text = cue.text.replace("-->", "->") or "…"  # a cue's payload may not contain -->, nor be empty
        blocks.append(f"{n}\n{_timestamp(cue.start)} --> {_timestamp(cue.end)}\n{text}\n")
    return "\n".join(blocks)


# --------------------------------------------------------------------------------------------------
# Drawing and writing


HEAT_OPACITY = 0.4  # the attention colours' share of a pixel on annotated frames; the frame keeps its colours


def annotate(image: Image.Image, text: str | None, alphas: np.ndarray | None = None) -> Image.Image:
    """The frame with ``text`` on a dark band at the bottom (wrapped to the frame's width); with
    ``alphas`` (n, P) the caption's mean attention coloured over the frame (``visualize``'s colour map,
    the grid stretched to the whole frame, as squash resizing sees it)."""
    from captioning.model.visualize import attention_map, colour_table, label_font

    frame = image.convert("RGB")
    if alphas is not None and len(alphas):
        grid = math.isqrt(alphas.shape[1])
        if grid * grid == alphas.shape[1]:
            weight = attention_map(alphas.mean(axis=0), grid, frame.size)  # (H, W) in [0, 1]
            heat = colour_table()[np.rint(weight * 255.0).astype(np.int64)]  # (H, W, 3)
            pixels = (1 - HEAT_OPACITY) * np.asarray(frame, dtype=np.float32) + HEAT_OPACITY * heat
            frame = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if text:
        width, height = frame.size
        size = max(12, height // 22)
        font = label_font(size)
        draw = ImageDraw.Draw(frame)
        lines: list[str] = []
        for word in text.split():
            if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width - size:
                lines[-1] = f"{lines[-1]} {word}"
            else:
                lines.append(word)
        step = round(size * 1.25)
        band = Image.new("RGBA", (width, step * len(lines) + size // 2), (0, 0, 0, 160))
        frame = frame.convert("RGBA")
        frame.alpha_composite(band, (0, height - band.height))
        draw = ImageDraw.Draw(frame)
        for n, line in enumerate(lines):
            draw.text(
                (size // 2, height - band.height + size // 4 + n * step),
                line,
                fill=(255, 255, 255),
                font=font,
            )
        frame = frame.convert("RGB")
    return frame


class VideoWriter:
    """An H.264 (MPEG-4 Part 2 where the FFmpeg build lacks libx264) video at ``fps``, frames written
    one by one to ``path`` + ``.part`` and renamed by ``close(keep=True)`` (annotated videos; the
    tests' and benchmarks' synthetic videos). Odd frame sides are cropped by one pixel (yuv420p)."""

    def __init__(self, path: str | os.PathLike[str], fps: float) -> None:
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.fps = fps
        self._container: Any = None
        self._stream: Any = None

    def write(self, image: Image.Image) -> None:
        import av

        if self._container is None:
            from fractions import Fraction

            self._container = av.open(os.fspath(self.part), mode="w", format=_muxer(self.path))
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            self._stream = self._container.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1000))
            self._stream.width = image.width - image.width % 2  # yuv420p needs even sides
            self._stream.height = image.height - image.height % 2
            self._stream.pix_fmt = "yuv420p"
        size = (self._stream.width, self._stream.height)
        frame = av.VideoFrame.from_image(image if image.size == size else image.crop((0, 0, *size)))
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self, keep: bool) -> None:
        if self._container is not None:
            if keep:
                for packet in self._stream.encode():
                    self._container.mux(packet)
            self._container.close()
            self._container = None
        if keep and self.part.exists():
            os.replace(self.part, self.path)
        else:
            self.part.unlink(missing_ok=True)


def _muxer(path: Path) -> str:
    return {".mkv": "matroska", ".webm": "webm", ".mov": "mov", ".avi": "avi"}.get(path.suffix.lower(), "mp4")


def caption_video(
    frames: Iterable[Frame],
    predictor: Predictor,
    *,
    vtt: str | os.PathLike[str] | None = None,  # a local path or an s3:// URI (``captioning.storage``)
    jsonl: str | os.PathLike[str] | None = None,
    annotated: str | os.PathLike[str] | None = None,
    heatmap: bool = False,
    draw: bool = False,
    fps: float = DEFAULT_FPS,
    stable_frames: int = DEFAULT_STABLE_FRAMES,
    batch_size: int = 8,
    on_caption: Callable[[dict[str, Any], Image.Image | None], None] | None = None,
    interruptible: bool = False,
    **decoding: Any,
) -> dict[str, Any]:
    """Caption ``frames`` and write the outputs asked for; see the module doc.

    ``on_caption(line, annotated_frame)`` sees each sampled frame's JSON line as it is captioned (the
    annotated frame when ``annotated``, ``heatmap`` or ``draw`` asks for drawing, else None): a camera
    run prints or shows it. ``interruptible`` (a camera run): Ctrl-C ends the run and the outputs are
    written; otherwise KeyboardInterrupt propagates and nothing is written. ``fps`` is the annotated
    video's rate (the sampling rate of ``frames``).
    Returns ``{"frames", "cues", "duration", "outputs", "timeline"}`` (timeline: the cues as
    ``{"start", "end", "caption", "score"}``).
    """
    hold = CaptionHold(stable_frames)
    lines: list[dict[str, Any]] = []
    times: list[float] = []  # the lines' exact times (theirs are rounded to the millisecond)
    writer = VideoWriter(annotated, fps) if annotated is not None else None
    end, ok = 0.0, False
    try:
        try:
            for frame, caption in caption_frames(frames, predictor, batch_size=batch_size, **decoding):
                hold.push(frame.time, caption.text, caption.score)
                line = {
                    "time": round(frame.time, 3),
                    "caption": caption.text,
                    "score": caption.score,
                    "tokens": caption.words,
                    "cue": hold.index,
                }
                lines.append(line)
                times.append(frame.time)
                end = frame.time + 1.0 / fps  # a sampled frame stands for the time up to the next one
                if frame.source_end is not None:
                    end = max(frame.time, min(end, frame.source_end))
                drawn = None
                if writer is not None or heatmap or draw:
                    alphas = (
                        caption.alphas.float().numpy() if heatmap and caption.alphas is not None else None
                    )
                    drawn = annotate(frame.image, hold.shown.text if hold.shown else None, alphas)
                    if writer is not None:
                        writer.write(drawn)
                if on_caption is not None:
                    on_caption(line, drawn)
        except KeyboardInterrupt:
            if not interruptible:
                raise
            # a camera run ends on Ctrl-C; its outputs are still written
        ok = True
    finally:
        if writer is not None:
            writer.close(keep=ok)
        close = getattr(frames, "close", None)
        if close is not None:
            close()  # a generator's own finally: the camera is released, the file closed
    cues = hold.finish(end)
    # A cue's number is fixed when it starts; lines seen before their caption became stable belong to it too.
    for line, t in zip(lines, times, strict=True):
        line["cue"] = next((n for n, cue in enumerate(cues) if cue.start <= t < cue.end), -1)
    outputs: dict[str, str] = {}
    if vtt is not None:
        storage.write_text(os.fspath(vtt), format_vtt(cues))  # atomic: a tmp file, then renamed
        outputs["vtt"] = os.fspath(vtt)
    if jsonl is not None:
        storage.write_text(
            os.fspath(jsonl), "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        )
        outputs["jsonl"] = os.fspath(jsonl)
    if writer is not None and lines:
        outputs["annotated"] = os.fspath(annotated)  # type: ignore[arg-type]
    timeline = [
        {"start": round(c.start, 3), "end": round(c.end, 3), "caption": c.text, "score": c.score}
        for c in cues
    ]
    return {
        "frames": len(lines),
        "cues": len(cues),
        "duration": round(end, 3),
        "outputs": outputs,
        "timeline": timeline,
    }
