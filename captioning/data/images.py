"""Turn one encoded image into the stored square RGB JPEG: decode -> orient -> convert -> resize -> encode.

Usage::

    settings = ImageSettings(size=256, resize_mode="squash", jpeg_quality=90, max_image_pixels=178_956_970)
    try:
        image = prepare_image(jpeg_bytes, settings)   # image.jpeg, image.orig_size, image.conversions
    except ImageSkipped as e:
        print(e.reason, e.detail)                     # reason is one of SKIP_REASONS

Bad inputs never raise anything but ``ImageSkipped``: empty, corrupt or truncated files and
decompression bombs (more than ``max_image_pixels`` in the header, checked before any pixel is
decoded) are skipped with a reason; CMYK, grayscale, 16-bit, alpha, palette and EXIF-rotated images
are converted, and each conversion is named in ``PreparedImage.conversions`` so it can be counted.

Large JPEGs are downscaled by the decoder itself (``Image.draft``: DCT scaling by 1/2, 1/4 or 1/8),
never below what the resize needs, so the resize never upsamples what the file had. Only sides of at
least twice the target shrink this way: COCO's 640x480 at 256 px decode at full size. The same input bytes
and settings always give the same output bytes: fixed encoder settings, no EXIF, ICC profile,
comment or DPI in the output. Every setting is required: their defaults live in ``captioning.config``
(``data.shards``). Plain Pillow + numpy: no torch here.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

ResizeMode = Literal["squash", "center-crop", "pad"]
RESIZE_MODES: tuple[str, ...] = ("squash", "center-crop", "pad")

# Why an image is left out of a shard. "missing" and "no_captions" are decided by the shard writer.
SKIP_REASONS: tuple[str, ...] = ("missing", "empty", "corrupt", "truncated", "too_large", "no_captions")
# What was done to an image that was kept ("other_mode": any rarer mode, e.g. YCbCr, LAB, F).
CONVERSIONS: tuple[str, ...] = (
    "cmyk",
    "grayscale",
    "16bit",
    "alpha",
    "palette",
    "exif_rotated",
    "other_mode",
)

# Transparent pixels are composited on white (what viewers show for logos and clip art).
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)
# "pad" fills with the ImageNet mean colour, which the encoder's normalisation maps to about zero.
PAD_COLOUR: tuple[int, int, int] = (124, 116, 104)
# Fixed encoder settings: 4:2:0 chroma, baseline, no optimisation passes; same input -> same bytes.
_JPEG_SUBSAMPLING = 2
# Resample with a pre-reduction only when shrinking more than 3x: indistinguishable from a full
# bicubic at that gap (Pillow's docs), and much faster for large non-JPEG inputs.
_REDUCING_GAP = 3.0
_GRAYSCALE_MODES = frozenset({"L", "1"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class ImageSkipped(Exception):
    """The image cannot be stored; ``reason`` is one of SKIP_REASONS, ``detail`` says what happened."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; valid: {', '.join(SKIP_REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageSettings:
    """How stored images are made: square side in pixels, resize mode, JPEG quality, bomb limit."""

    size: int
    resize_mode: str
    jpeg_quality: int
    max_image_pixels: int

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}; valid: {', '.join(RESIZE_MODES)}")
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive int (pixels), got {self.size!r}")
        if not isinstance(self.jpeg_quality, int) or not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be an int in [1, 100], got {self.jpeg_quality!r}")
        if not isinstance(self.max_image_pixels, int) or self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be a positive int, got {self.max_image_pixels!r}")


@dataclass(frozen=True)
class PreparedImage:
    """The stored JPEG, the input's size as displayed (after EXIF rotation) and what was converted."""

    jpeg: bytes
    orig_size: tuple[int, int]  # (width, height)
    conversions: tuple[str, ...]


def prepare_image(data: bytes, settings: ImageSettings) -> PreparedImage:
    """Decode, orient, convert to RGB, resize to ``settings.size`` square and encode as JPEG.

    Raises ImageSkipped (and nothing else) for inputs that cannot be stored.
    """
    if not data:
        raise ImageSkipped("empty", "zero-byte file")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # Pillow's own limit, checked in open()
        raise ImageSkipped("too_large", str(e)) from None
    except Exception as e:  # UnidentifiedImageError mostly; plugins raise SyntaxError, struct.error, ...
        raise ImageSkipped(*_classify_decode_error(e)) from None
    try:
        return prepare_loaded(image, settings)
    finally:
        image.close()


def prepare_loaded(image: Image.Image, settings: ImageSettings) -> PreparedImage:
    """``prepare_image`` for an image already opened or made in memory (a decoded video frame).

    Raises ImageSkipped (and nothing else).
    """
    try:
        return _prepare(image, settings)
    except ImageSkipped:
        raise
    except Image.DecompressionBombError as e:
        raise ImageSkipped("too_large", str(e)) from None
    except MemoryError:
        raise ImageSkipped("too_large", "out of memory while decoding") from None
    except Exception as e:  # a decoder can fail in many ways; one bad file must not stop a build
        raise ImageSkipped(*_classify_decode_error(e)) from None


def _prepare(image: Image.Image, settings: ImageSettings) -> PreparedImage:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageSkipped("corrupt", f"header declares a {width}x{height} image")
    if width * height > settings.max_image_pixels:
        raise ImageSkipped(
            "too_large",
            f"{width}x{height} = {width * height} pixels > max_image_pixels {settings.max_image_pixels}",
        )
    conversions: list[str] = []
    if image.format in ("JPEG", "MPO"):  # MPO: multi-picture JPEGs from cameras
        # Ask the decoder for the smallest 1/2^k scale that is still >= the resize target on the
        # sides that matter; draft never goes below the size asked for.
        image.draft("RGB", _draft_request(width, height, settings))
    image.load()

    orientation = _orientation(image)  # after load: some formats keep EXIF after the pixel data
    if orientation in range(2, 9):
        image = ImageOps.exif_transpose(image)
        conversions.append("exif_rotated")
    displayed_size = (width, height) if orientation not in (5, 6, 7, 8) else (height, width)

    image, converted = _to_rgb(image)
    conversions.extend(converted)
    resized = _resize(image, settings.size, settings.resize_mode)
    resized.info = {}  # no EXIF, ICC profile, comment or DPI carried into the output
    buffer = io.BytesIO()
    resized.save(
        buffer,
        format="JPEG",
        quality=settings.jpeg_quality,
        subsampling=_JPEG_SUBSAMPLING,
        optimize=False,
        progressive=False,
    )
    return PreparedImage(jpeg=buffer.getvalue(), orig_size=displayed_size, conversions=tuple(conversions))


def _orientation(image: Image.Image) -> int:
    """EXIF orientation tag (1..8), 1 when absent or unreadable (broken EXIF is not a reason to skip)."""
    try:
        value = image.getexif().get(0x0112, 1)
        return int(value) if isinstance(value, int) else 1
    except Exception:
        return 1


def _draft_request(width: int, height: int, settings: ImageSettings) -> tuple[int, int]:
    """Size to ask the JPEG decoder for, in the file's own (unrotated) frame.

    squash and center-crop need both sides >= size (squash resizes each side to it; center-crop
    scales the shorter side to it); pad needs the scaled content size, i.e. the longer side >= size.
    """
    size = settings.size
    if settings.resize_mode != "pad":
        return (size, size)
    scale = size / max(width, height)
    return (max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale)))


def _to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """Convert any mode to RGB; transparency is composited on ALPHA_BACKGROUND."""
    mode = image.mode
    if mode == "RGB":
        return image, []
    if mode == "CMYK":
        return image.convert("RGB"), ["cmyk"]
    if mode in _GRAYSCALE_MODES:
        return image.convert("RGB"), ["grayscale"]
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's I;16 -> L conversion clips at 255 instead of scaling; scale 0..65535 to 0..255.
        values = np.asarray(image).astype(np.int64)
        gray = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB"), ["16bit"]
    if mode in ("RGBA", "RGBa", "LA", "La"):
        converted = ["grayscale", "alpha"] if mode in ("LA", "La") else ["alpha"]
        return _composite(image.convert("RGBA")), converted
    if mode in ("P", "PA"):
        if mode == "PA" or "transparency" in image.info:
            return _composite(image.convert("RGBA")), ["palette", "alpha"]
        return image.convert("RGB"), ["palette"]
    return image.convert("RGB"), ["other_mode"]


def _composite(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _resize(image: Image.Image, size: int, mode: str) -> Image.Image:
    """Resize an RGB image to size x size: squash, center-crop (shorter side) or pad (longer side)."""
    width, height = image.size
    resample = Image.Resampling.BICUBIC
    if mode == "squash":
        return image.resize((size, size), resample, reducing_gap=_REDUCING_GAP)
    if mode == "center-crop":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
        return image.resize((size, size), resample, box=box, reducing_gap=_REDUCING_GAP)
    if mode == "pad":
        scale = size / max(width, height)
        new_w = min(size, max(1, round(width * scale)))
        new_h = min(size, max(1, round(height * scale)))
        content = image.resize((new_w, new_h), resample, reducing_gap=_REDUCING_GAP)
        canvas = Image.new("RGB", (size, size), PAD_COLOUR)
        canvas.paste(content, ((size - new_w) // 2, (size - new_h) // 2))
        return canvas
    raise ValueError(f"unknown resize_mode {mode!r}; valid: {', '.join(RESIZE_MODES)}")


def _classify_decode_error(error: BaseException) -> tuple[str, str]:
    """(reason, detail) for an exception raised while opening or decoding."""
    detail = f"{type(error).__name__}: {error}"
    if isinstance(error, EOFError) or "truncat" in str(error).lower():
        return "truncated", detail
    return "corrupt", detail
