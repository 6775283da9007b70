"""Caption images with a trained checkpoint: preprocess as in training, beam search, decode.

One ``Predictor`` does the work for both front ends, so their captions cannot drift apart:
``caption_images`` (what ``captioning caption IMAGE_OR_DIR... --checkpoint MODEL`` runs,
``captioning/cli.py``) and the MLflow pyfunc (``captioning/serving.py``). Both decode as the model
was scored in training unless told otherwise: beam size, maximum length and length normalisation
default to the checkpoint's recorded ``eval`` settings (``captioning.model.checkpoint.decoding_of``).

    results = caption_images(["dog.jpg", "cat.png"], "runs/demo/best.pt", beam_size=5,
                             visualize_dir="overlays")   # beam_size=None: the model's own
    results[0]  # {"path": "dog.jpg", "caption": "a dog runs", "tokens": ["a", "dog", "runs"],
                #  "score": -4.1, "length": 4, "ended": True, "visualization": "overlays/dog.png"}

    predictor = Predictor.from_checkpoint("runs/demo/best.pt", device="cpu")
    image = predictor.load_image(jpeg_bytes)                         # raises ImageSkipped
    [caption] = predictor.caption([image])                  # caption.text: "a dog runs"
    predictor.decoding                                       # {"beam_size": 3, "max_len": 16, ...}

An image goes through exactly what the model saw in training and evaluation: the shard writer's
``prepare_image`` with the checkpoint's ``data.shards`` settings (decode, EXIF orientation, RGB,
resize mode, JPEG encode at the stored quality), then the eval loader's decode and resize, then
ImageNet normalisation (``normalize_images``). In ``caption_images`` a file that cannot be read or
decoded gets an ``{"path", "error"}`` entry; the other images are still captioned. ``score`` is the
caption's summed log-prob and ``length`` its token count with <end>; ``ended`` is False for a
partial caption that reached ``max_len`` without <end>. Captions do not depend on how images are
batched.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from PIL import Image

from captioning.data.batch import normalize_images, resize_square, stack_planes
from captioning.data.images import ImageSettings, ImageSkipped, prepare_image, prepare_loaded
from captioning.data.vocab import Vocab
from captioning.model.checkpoint import captioner_from_checkpoint, decoding_of
from captioning.model.search import StepModel, beam_search
from captioning.model.visualize import attention_overlay
from captioning.progress import show_progress


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
    return _as_loaded(prepare_image(data, settings).jpeg, settings)


def load_frame(image: Image.Image, settings: ImageSettings) -> Image.Image:
    """A decoded picture (a video frame, RGB) -> the model's input, as ``load_image`` would give for
    the same picture stored losslessly: the shard writer's resize and JPEG, then the loader's decode."""
    return _as_loaded(prepare_loaded(image, settings).jpeg, settings)


def _as_loaded(stored: bytes, settings: ImageSettings) -> Image.Image:
    """A shard's stored JPEG -> what the eval loader delivers (``stage_decode``, ``resize_square``)."""
    opened = Image.open(io.BytesIO(stored))
    opened.draft("RGB", (settings.size, settings.size))
    opened.load()
    image = opened if opened.mode == "RGB" else opened.convert("RGB")
    return resize_square(image, settings.size)


@dataclass(frozen=True)
class Caption:
    """One image's beam-search result."""

    ids: list[int]  # the emitted token ids, <end> included when the caption ended
    words: list[str]  # the decoded words (no special tokens)
    score: float  # summed log-prob
    ended: bool  # False: cut at max_len without <end>
    alphas: torch.Tensor | None  # (len(ids), P) attention per emitted token; None without attention

    @property
    def text(self) -> str:
        return " ".join(self.words)


Engine = Literal["torch", "onnxruntime"]
ENGINES: tuple[str, ...] = ("torch", "onnxruntime")


class CaptionEngine(StepModel, Protocol):
    """What a Predictor runs: ``Captioner`` (torch) or ``OnnxCaptioner`` (onnxruntime)."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, P, E) features."""
        ...


class Predictor:
    """A captioner ready for inference: model (eval mode, on ``device``; a torch ``Captioner`` or an
    ``OnnxCaptioner``), vocabulary, the image settings it was trained with and its default ``decoding``
    (``beam_size``, ``max_len``, ``length_normalization``: the checkpoint's recorded ``eval`` settings)."""

    def __init__(
        self,
        model: CaptionEngine,
        vocab: Vocab,
        settings: ImageSettings,
        device: torch.device,
        decoding: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.vocab = vocab
        self.settings = settings
        self.device = device
        self.decoding = decoding_of({}) | dict(decoding or {})

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike[str], device: str | torch.device | None = None
    ) -> Predictor:
        """Rebuild the captioner from a local checkpoint file; ``device`` defaults to CUDA when
        available, else the CPU."""
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, vocab, ckpt = captioner_from_checkpoint(os.fspath(checkpoint))
        model.eval().to(target)
        return cls(model, vocab, image_settings(ckpt.get("config") or {}), target, decoding_of(ckpt))

    @classmethod
    def from_onnx(cls, folder: str | os.PathLike[str], threads: int | None = None) -> Predictor:
        """The captioner of an ONNX export folder (``captioning export --format onnx``) on onnxruntime."""
        from captioning.model.onnx_engine import OnnxCaptioner

        engine = OnnxCaptioner(folder, threads=threads)
        manifest = engine.manifest
        return cls(
            engine,
            engine.vocab(),
            image_settings(manifest["config"]),
            torch.device("cpu"),
            manifest["decoding"],
        )

    @classmethod
    def load(
        cls, model: str | os.PathLike[str], engine: Engine = "torch", device: str | torch.device | None = None
    ) -> Predictor:
        """A checkpoint file on torch (``device``) or an ONNX export folder on onnxruntime (CPU)."""
        if engine == "torch":
            return cls.from_checkpoint(model, device)
        if engine == "onnxruntime":
            if device is not None and torch.device(device).type != "cpu":
                raise ValueError(f"the onnxruntime engine runs on the CPU here, not {device}")
            return cls.from_onnx(model)
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")

    def load_image(self, data: bytes) -> Image.Image:
        """Encoded image bytes -> the model's input image (``load_image``); raises ImageSkipped."""
        return load_image(data, self.settings)

    def load_frame(self, image: Image.Image) -> Image.Image:
        """A decoded RGB picture (a video frame) -> the model's input image (``load_frame``)."""
        return load_frame(image, self.settings)

    @torch.no_grad()
    def caption(
        self,
        images: Sequence[Image.Image],
        *,
        beam_size: int | None = None,
        max_len: int | None = None,
        length_normalization: bool | None = None,
        batch_size: int = 16,
    ) -> list[Caption]:
        """Beam-search a caption for each image (from ``load_image``), ``batch_size`` images per search;
        a decoding setting left None is the model's own (``self.decoding``)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        given = {"beam_size": beam_size, "max_len": max_len, "length_normalization": length_normalization}
        decoding = self.decoding | {k: v for k, v in given.items() if v is not None}
        captions: list[Caption] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = normalize_images(stack_planes(chunk)).to(self.device)  # (b, 3, H, W)
            features = self.model.encode(batch)  # (b, P, E)
            result = beam_search(self.model, features, **decoding)
            for row in range(len(chunk)):
                n = int(result.lengths[row])
                ids = result.tokens[row, :n].tolist()
                captions.append(
                    Caption(
                        ids=ids,
                        words=self.vocab.decode(ids),
                        score=float(result.scores[row]),
                        ended=bool(result.ended[row]),
                        alphas=None if result.alphas is None else result.alphas[row, :n],  # (n, P)
                    )
                )
        return captions


# --------------------------------------------------------------------------------------------------
# `captioning caption`: image files in, one entry per file out

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def caption_inputs(inputs: Sequence[str]) -> tuple[list[str], bool]:
    """Expand folders into their image files (sorted by name); True when any input was a folder."""
    paths: list[str] = []
    had_folder = False
    for item in inputs:
        folder = Path(item)
        if folder.is_dir():
            had_folder = True
            paths.extend(
                str(p)
                for p in sorted(folder.iterdir(), key=lambda p: p.name)
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
        else:
            paths.append(item)
    return paths, had_folder


def _read(path: str, predictor: Predictor) -> Image.Image | str:
    """The preprocessed image, or the reason it cannot be captioned."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    try:
        return predictor.load_image(data)
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


def caption_entry(
    path: str,
    image: Image.Image,
    caption: Caption,
    vocab: Vocab,
    visualize_dir: Path | None,
    used_names: set[str],
) -> dict[str, Any]:
    """An image's JSON entry (see the module doc); with ``visualize_dir``, its attention overlay too."""
    n = len(caption.ids)
    entry: dict[str, Any] = {
        "path": path,
        "caption": caption.text,
        "tokens": caption.words,
        "score": caption.score,
        "length": n,
        "ended": caption.ended,
    }
    if visualize_dir is not None:
        entry["visualization"] = None  # models without attention have nothing to show
        if caption.alphas is not None and n > 0:
            alphas = caption.alphas.float().cpu().numpy()  # (n, P)
            grid = math.isqrt(alphas.shape[1])
            if grid * grid == alphas.shape[1]:
                sheet = attention_overlay(image, [vocab.word_of(i) for i in caption.ids], alphas, grid)
                out = _overlay_path(visualize_dir, path, used_names)
                sheet.save(out, format="PNG")
                entry["visualization"] = str(out)
    return entry


def caption_images(
    paths: Sequence[str | os.PathLike[str]],
    checkpoint: str | os.PathLike[str],
    *,
    beam_size: int | None = None,
    max_len: int | None = None,
    length_normalization: bool | None = None,
    batch_size: int = 16,
    visualize_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    engine: Engine = "torch",
) -> list[dict[str, Any]]:
    """One dict per path, in order: a caption entry (see the module doc) or ``{"path", "error"}``.

    ``checkpoint``: a local or s3:// checkpoint (``captioning.model_uri.resolve_model`` turns any model
    source into one). Decoding settings left None are the model's own (``Predictor.decoding``).
    ``device``: where the model runs (default: CUDA when available, else the CPU). With
    ``visualize_dir``, each caption's attention overlay is written there as ``<stem>.png`` and
    its path recorded under ``"visualization"``. Files are read ``batch_size`` at a time. ``progress``:
    show it on stderr (``captioning.progress``: a bar on a terminal, lines otherwise). ``engine``:
    ``"onnxruntime"`` takes an ONNX export folder as ``checkpoint`` (``Predictor.load``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    predictor = Predictor.load(checkpoint, engine, device)
    out_dir = Path(visualize_dir) if visualize_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    names = [os.fspath(p) for p in paths]
    results: list[dict[str, Any] | None] = [None] * len(names)
    used_names: set[str] = set()
    pending: list[tuple[int, Image.Image]] = []  # (position in paths, preprocessed image)

    def flush() -> None:
        images = [image for _, image in pending]
        captions = predictor.caption(
            images,
            beam_size=beam_size,
            max_len=max_len,
            length_normalization=length_normalization,
            batch_size=batch_size,
        )
        for (i, image), caption in zip(pending, captions, strict=True):
            results[i] = caption_entry(names[i], image, caption, predictor.vocab, out_dir, used_names)
        shown.update(len(pending))
        pending.clear()

    with show_progress(len(names), "captioning", unit="image", enabled=progress) as shown:
        for i, name in enumerate(names):
            image = _read(name, predictor)
            if isinstance(image, str):
                results[i] = {"path": name, "error": image}
                shown.update(1)
                continue
            pending.append((i, image))
            if len(pending) == batch_size:
                flush()
        flush()
    return [entry for entry in results if entry is not None]
