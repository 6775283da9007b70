"""Caption a folder or an s3:// prefix of images and videos, batch by batch, resumably.

    files, others = list_media("s3://bucket/holiday/")        # media files (sorted) and the rest
    batches = plan_batches(files, batch_size=32)
    summary = caption_batch(batches[0], predictor, source="s3://bucket/holiday/",
                            output="s3://bucket/holiday/")     # or any other folder / prefix
    summary  # {"batch": "batch-00000-1a2b3c4d5e", "done_before": False, "files": 32, "captioned": 31,
             #  "images": 29, "videos": 2, "errors": {"corrupt": 1}}

What the ``caption-media`` flow (``flows/caption_media.py``) maps over; usable on its own. Files are
the ``IMAGE_EXTENSIONS`` and ``VIDEO_EXTENSIONS`` under the source (recursively, in name order);
other files are counted, not read. A batch is named after its position and a digest of its files,
so a changed listing makes new batches rather than reusing an old batch's results.

Outputs, under ``output`` (default in the flow: the source itself, i.e. beside the inputs):

- ``captions/<batch>.jsonl``: one line per file, in order: an image's caption entry
  (``captioning.inference.caption_entry``: caption, tokens, score, length, ended), a video's
  ``{"path", "kind": "video", "vtt", "frames", "cues": [{"start", "end", "caption", "score"}]}``, or
  ``{"path", "kind", "error", "reason"}`` for a file that could not be captioned (reason: the
  image skip reason, e.g. ``corrupt``, or the video's: ``unreadable``, ``corrupt``, ``truncated``...).
- ``<relative path>.vtt`` per video (``clips/a.mp4`` -> ``clips/a.vtt``), written before the batch file.

The batch file is written last and atomically, so it exists only for a finished batch: a re-run
finds it and does no work (``done_before``; its counts are read back from it). A bad file is never
fatal to its batch: it gets its error line and is counted under its reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from captioning import storage
from captioning.data.images import ImageSkipped
from captioning.inference import IMAGE_EXTENSIONS, Predictor, caption_entry
from captioning.video import VIDEO_EXTENSIONS, VideoError, caption_video, video_frames

MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
CAPTIONS_DIR = "captions"


@dataclass(frozen=True)
class MediaBatch:
    index: int
    files: tuple[str, ...]  # full paths or s3:// URIs

    @property
    def name(self) -> str:
        digest = hashlib.sha1("\n".join(self.files).encode()).hexdigest()[:10]
        return f"batch-{self.index:05d}-{digest}"


def kind_of(path: str) -> str | None:
    """ "image", "video" or None (not a medium we caption), by extension."""
    suffix = PurePosixPath(path).suffix.lower()
    return "image" if suffix in IMAGE_EXTENSIONS else "video" if suffix in VIDEO_EXTENSIONS else None


def list_media(source: str) -> tuple[list[str], list[str]]:
    """(media files, other files) under the folder or prefix ``source``, sorted; results written
    under ``source`` by an earlier run (``captions/``, ``.vtt``) are neither. A missing folder, or one
    or a prefix with no files at all, raises FileNotFoundError."""
    if not storage.is_s3(source) and not Path(source).is_dir():
        raise FileNotFoundError(f"{source}: no such folder")
    media: list[str] = []
    others: list[str] = []
    results = storage.join(source, CAPTIONS_DIR) + "/"
    for path in storage.list_files(source):
        if path.startswith(results) or path.endswith(".vtt"):
            continue
        (media if kind_of(path) else others).append(path)
    if not media and not others:  # most often a mistyped prefix: say so rather than caption nothing
        raise FileNotFoundError(f"{source}: no files there")
    return media, others


def plan_batches(files: Sequence[str], batch_size: int) -> list[MediaBatch]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [
        MediaBatch(n, tuple(files[start : start + batch_size]))
        for n, start in enumerate(range(0, len(files), batch_size))
    ]


def relative(source: str, path: str) -> str:
    """``path`` relative to the folder or prefix ``source``."""
    prefix = source.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise ValueError(f"{path} is not under {source}")
    return path[len(prefix) :]


def batch_uri(output: str, batch: MediaBatch) -> str:
    return storage.join(output, CAPTIONS_DIR, f"{batch.name}.jsonl")


def summarise(batch: MediaBatch, lines: Sequence[dict[str, Any]], done_before: bool) -> dict[str, Any]:
    errors = Counter(line["reason"] for line in lines if "error" in line)
    kinds = Counter(line["kind"] for line in lines if "error" not in line)
    return {
        "batch": batch.name,
        "done_before": done_before,
        "files": len(lines),
        "captioned": len(lines) - sum(errors.values()),
        "images": kinds["image"],
        "videos": kinds["video"],
        "errors": dict(sorted(errors.items())),
    }


def caption_batch(
    batch: MediaBatch,
    predictor: Predictor,
    *,
    source: str,
    output: str,
    fps: float = 1.0,
    stable_frames: int = 2,
    **decoding: Any,
) -> dict[str, Any]:
    """Caption every file of ``batch`` and write the batch's outputs; see the module doc. ``decoding``:
    ``beam_size``, ``max_len``, ``length_normalization`` (None or absent: the model's own)."""
    target = batch_uri(output, batch)
    if storage.exists(target):
        written = [json.loads(line) for line in storage.read_text(target).splitlines() if line.strip()]
        return summarise(batch, written, done_before=True)
    decoding = {k: v for k, v in decoding.items() if v is not None}
    lines: list[dict[str, Any]] = []
    images: list[tuple[int, Any]] = []  # (line index, model input) for one batched search
    with tempfile.TemporaryDirectory(prefix="caption-media-") as tmp:
        for path in batch.files:
            kind = kind_of(path) or "image"
            try:
                if kind == "image":
                    images.append((len(lines), predictor.load_image(storage.read_bytes(path))))
                    lines.append({"path": path, "kind": "image"})
                else:
                    lines.append(
                        _caption_one_video(path, predictor, tmp, source, output, fps, stable_frames, decoding)
                    )
            except ImageSkipped as e:
                lines.append({"path": path, "kind": kind, "error": f"cannot decode: {e}", "reason": e.reason})
            except VideoError as e:
                lines.append({"path": path, "kind": kind, "error": str(e), "reason": e.reason})
            except OSError as e:  # vanished or unreadable between listing and reading
                lines.append(
                    {"path": path, "kind": kind, "error": f"cannot read: {e}", "reason": "unreadable"}
                )
        captions = predictor.caption([image for _, image in images], **decoding)
        for (index, image), caption in zip(images, captions, strict=True):
            entry = caption_entry(lines[index]["path"], image, caption, predictor.vocab, None, set())
            lines[index] = {"path": entry.pop("path"), "kind": "image", **entry}
    storage.write_text(target, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return summarise(batch, lines, done_before=False)


def _caption_one_video(
    path: str,
    predictor: Predictor,
    tmp: str,
    source: str,
    output: str,
    fps: float,
    stable_frames: int,
    decoding: dict[str, Any],
) -> dict[str, Any]:
    """Caption one video (downloaded first when on s3), write its .vtt under ``output``; its line."""
    local = path
    if storage.is_s3(path):
        local = os.path.join(tmp, "video" + PurePosixPath(path).suffix)
        storage.download_file(path, local)
    vtt = storage.join(output, str(PurePosixPath(relative(source, path)).with_suffix(".vtt")))
    try:
        summary = caption_video(
            video_frames(local, fps), predictor, vtt=vtt, fps=fps, stable_frames=stable_frames, **decoding
        )
    except VideoError as e:
        raise VideoError(str(e).replace(local, path), e.reason) from None  # name the file, not its download
    return {
        "path": path,
        "kind": "video",
        "vtt": vtt,
        "frames": summary["frames"],
        "cues": summary["timeline"],
    }
