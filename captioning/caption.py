"""Caption image files with a trained checkpoint: preprocess as in training, beam search, decode.

Usage::

    results = caption_images(["dog.jpg", "cat.png"], "runs/demo/best.pt", beam_size=5,
                             visualize_dir="overlays")
    results[0]  # {"path": "dog.jpg", "caption": "a dog runs", "tokens": ["a", "dog", "runs"],
                #  "score": -4.1, "length": 4, "ended": True, "visualization": "overlays/dog.png"}

or ``captioning caption IMAGE_OR_DIR... --checkpoint PATH`` (``captioning/cli.py``).

An image goes through exactly what the model saw in training and evaluation: the shard writer's
``prepare_image`` with the checkpoint's ``data.shards`` settings (decode, EXIF orientation, RGB,
resize mode, JPEG encode at the stored quality), then the eval loader's decode and resize, then
ImageNet normalisation (``normalize_images``). A file that cannot be read or decoded gets an
``{"path", "error"}`` entry; the other images are still captioned. ``score`` is the caption's
summed log-prob and ``length`` its token count with <end>; ``ended`` is False for a partial
caption that reached ``max_len`` without <end>.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from captioning.data.images import ImageSettings, ImageSkipped, prepare_image
from captioning.data.loader import normalize_images, resize_square, stack_planes
from captioning.data.vocab import Vocab
from captioning.model.checkpoint import captioner_from_checkpoint
from captioning.model.search import BeamResult, beam_search
from captioning.model.visualize import attention_overlay


def image_settings(config: Mapping[str, Any]) -> ImageSettings:
    """The shard writer's settings from a checkpoint's resolved config (``Config.to_dict()``)."""
    try:
        shards = config["data"]["shards"]
        return ImageSettings(
            size=int(shards["image_size"]),
            resize_mode=str(shards["resize_mode"]),
            jpeg_quality=int(shards["jpeg_quality"]),
            max_image_pixels=int(shards["max_image_pixels"]),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"the checkpoint's config has no usable data.shards section ({e!r})") from None


def load_image(data: bytes, settings: ImageSettings) -> Image.Image:
    """Encoded image bytes -> the RGB image the eval loader would deliver (size x size).

    Shard writer (``prepare_image``: resize and JPEG at the stored quality), then the loader's
    ``stage_decode`` (JPEG draft, RGB) and eval ``resize_square``. Raises ImageSkipped.
    """
    stored = prepare_image(data, settings).jpeg
    opened = Image.open(io.BytesIO(stored))
    opened.draft("RGB", (settings.size, settings.size))
    opened.load()
    image = opened if opened.mode == "RGB" else opened.convert("RGB")
    return resize_square(image, settings.size)


def _read(path: str, settings: ImageSettings) -> Image.Image | str:
    """The preprocessed image, or the reason it cannot be captioned."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    try:
        return load_image(data, settings)
    except ImageSkipped as e:
        return f"cannot decode: {e}"


def _overlay_path(directory: Path, path: str, used: set[str]) -> Path:
    """``<stem>.png`` in ``directory``; ``<stem>-2.png``... when two inputs share a stem."""
    stem = Path(path).stem or "image"
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return directory / f"{name}.png"


def _entries(
    result: BeamResult,
    paths: Sequence[str],
    images: Sequence[Image.Image],
    vocab: Vocab,
    visualize_dir: Path | None,
    used_names: set[str],
) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for row, (path, image) in enumerate(zip(paths, images, strict=True)):
        n = int(result.lengths[row])
        ids = result.tokens[row, :n].tolist()
        words = vocab.decode(ids)
        entry: dict[str, Any] = {
            "path": path,
            "caption": " ".join(words),
            "tokens": words,
            "score": float(result.scores[row]),
            "length": n,
            "ended": bool(result.ended[row]),
        }
        if visualize_dir is not None:
            entry["visualization"] = None  # models without attention have nothing to show
            if result.alphas is not None and n > 0:
                alphas = result.alphas[row, :n].float().cpu().numpy()  # (n, P)
                grid = math.isqrt(alphas.shape[1])
                if grid * grid == alphas.shape[1]:
                    sheet = attention_overlay(image, [vocab.word_of(i) for i in ids], alphas, grid)
                    out = _overlay_path(visualize_dir, path, used_names)
                    sheet.save(out, format="PNG")
                    entry["visualization"] = str(out)
        entries.append(entry)
    return entries


@torch.no_grad()
def caption_images(
    paths: Sequence[str | os.PathLike[str]],
    checkpoint: str | os.PathLike[str],
    *,
    beam_size: int = 5,
    max_len: int = 20,
    length_normalization: bool = False,
    batch_size: int = 16,
    visualize_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
) -> list[dict[str, Any]]:
    """One dict per path, in order: a caption entry (see the module doc) or ``{"path", "error"}``.

    ``device``: where the model runs (default: CUDA when available, else the CPU). With
    ``visualize_dir``, each caption's attention overlay is written there as ``<stem>.png`` and
    its path recorded under ``"visualization"``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, vocab, ckpt = captioner_from_checkpoint(os.fspath(checkpoint))
    model.eval().to(target)
    settings = image_settings(ckpt.get("config") or {})
    out_dir = Path(visualize_dir) if visualize_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    names = [os.fspath(p) for p in paths]
    results: list[dict[str, Any] | None] = [None] * len(names)
    used_names: set[str] = set()
    pending: list[tuple[int, Image.Image]] = []  # (position in paths, preprocessed image)

    def flush() -> None:
        if not pending:
            return
        images = [image for _, image in pending]
        batch = normalize_images(stack_planes(images)).to(target)  # (b, 3, H, W)
        features = model.encode(batch)  # (b, P, E)
        result = beam_search(
            model,
            features,
            beam_size=beam_size,
            max_len=max_len,
            length_normalization=length_normalization,
        )
        positions = [i for i, _ in pending]
        entries = _entries(result, [names[i] for i in positions], images, vocab, out_dir, used_names)
        for i, entry in zip(positions, entries, strict=True):
            results[i] = entry
        pending.clear()

    for i, name in enumerate(names):
        image = _read(name, settings)
        if isinstance(image, str):
            results[i] = {"path": name, "error": image}
            continue
        pending.append((i, image))
        if len(pending) == batch_size:
            flush()
    flush()
    return [entry for entry in results if entry is not None]
