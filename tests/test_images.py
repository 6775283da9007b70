"""prepare_image: resize modes, the JPEG draft fast path, conversions, skips and reproducible bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from captioning.data.images import (
    ALPHA_BACKGROUND,
    PAD_COLOUR,
    ImageSettings,
    ImageSkipped,
    _draft_request,
    prepare_image,
)

RED, GREEN, BLUE = (220, 20, 30), (30, 200, 40), (30, 40, 220)


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.mode == "RGB"
        return np.asarray(image, dtype=np.int32)


def close(pixel: np.ndarray, colour: tuple[int, int, int], tol: int = 30) -> bool:
    return bool(np.abs(pixel - np.array(colour)).max() <= tol)


def banded(width: int = 200, height: int = 100) -> Image.Image:
    """Red side bands (a quarter of the width each) around a green centre: known content per mode."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(GREEN, (width // 4, 0, width - width // 4, height))
    return image


def settings(**overrides: object) -> ImageSettings:
    values = {"size": 64, "resize_mode": "squash", "jpeg_quality": 95, "max_image_pixels": 178_956_970}
    return ImageSettings(**{**values, **overrides})  # type: ignore[arg-type]


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (CRC fixed) but whose pixel data is a 4x4 image's."""
    data = bytearray(encode(Image.new("L", (4, 4))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ---------------------------------------------------------------------------------- resize modes


def test_squash_stretches_to_square() -> None:
    pixels = decode(prepare_image(encode(banded()), settings(resize_mode="squash")).jpeg)
    assert pixels.shape == (64, 64, 3)
    # The bands keep their share of the width: red in the outer quarters, green in the middle.
    assert close(pixels[32, 4], RED) and close(pixels[32, 59], RED) and close(pixels[32, 32], GREEN)
    assert close(pixels[2, 32], GREEN) and close(pixels[61, 32], GREEN)


def test_center_crop_keeps_aspect_and_takes_the_centre() -> None:
    pixels = decode(prepare_image(encode(banded()), settings(resize_mode="center-crop")).jpeg)
    assert pixels.shape == (64, 64, 3)
    # The central 100x100 of the 200x100 image is all green: no red band survives, nothing stretched.
    assert all(close(pixels[y, x], GREEN) for y in (2, 32, 61) for x in (2, 32, 61))


def test_pad_keeps_aspect_with_fixed_colour_bands() -> None:
    pixels = decode(prepare_image(encode(banded()), settings(resize_mode="pad")).jpeg)
    assert pixels.shape == (64, 64, 3)
    # 200x100 -> 64x32 content centred vertically: pad rows 0..15 and 48..63.
    for y in (2, 13, 50, 61):
        assert close(pixels[y, 32], PAD_COLOUR, tol=8), y
    assert close(pixels[32, 4], RED) and close(pixels[32, 32], GREEN) and close(pixels[32, 59], RED)
    # Content band edges: rows 16..47 hold the image.
    assert close(pixels[20, 32], GREEN) and close(pixels[43, 32], GREEN)


def test_pad_portrait_pads_left_and_right() -> None:
    pixels = decode(prepare_image(encode(banded(50, 100)), settings(resize_mode="pad")).jpeg)
    assert close(pixels[32, 3], PAD_COLOUR, tol=8) and close(pixels[32, 60], PAD_COLOUR, tol=8)
    assert close(pixels[32, 32], GREEN)


@pytest.mark.parametrize("mode", ["squash", "center-crop", "pad"])
@pytest.mark.parametrize("size", [16, 48, 100])
def test_every_mode_gives_the_configured_size(mode: str, size: int) -> None:
    for shape in ((40, 30), (30, 80), (300, 200)):
        image = prepare_image(encode(banded(*shape), "JPEG"), settings(size=size, resize_mode=mode))
        with Image.open(io.BytesIO(image.jpeg)) as out:
            assert out.size == (size, size)
        assert image.orig_size == shape


# ------------------------------------------------------------------------------ JPEG fast path


@pytest.mark.parametrize(
    ("shape", "mode", "size", "expected"),
    [
        ((640, 480), "squash", 64, (64, 64)),  # draft keeps both sides >= 64: 640/8=80, 480/8=60 -> 1/4
        ((640, 480), "pad", 64, (64, 48)),  # pad needs only the scaled content size
        ((1000, 130), "center-crop", 128, (128, 128)),  # shorter side 130 -> no DCT scaling
    ],
)
def test_draft_request(shape: tuple[int, int], mode: str, size: int, expected: tuple[int, int]) -> None:
    assert _draft_request(*shape, settings(size=size, resize_mode=mode)) == expected


@pytest.mark.parametrize("mode", ["squash", "center-crop", "pad"])
def test_draft_never_goes_below_the_target(mode: str) -> None:
    """The DCT-scaled decode must look like a full decode + resize (PSNR well above JPEG noise)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    base = np.stack([xx * 255 / 640, yy * 255 / 480, (xx + yy) * 255 / 1120], axis=-1)
    pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    data = encode(Image.fromarray(pixels), "JPEG", quality=90)
    ours = decode(prepare_image(data, settings(size=100, resize_mode=mode)).jpeg).astype(float)
    # Reference: full-resolution decode, resized by prepare_image's own path on a lossless copy.
    lossless = encode(Image.open(io.BytesIO(data)).convert("RGB"), "PNG")
    reference = decode(prepare_image(lossless, settings(size=100, resize_mode=mode)).jpeg).astype(float)
    mse = float(np.mean((ours - reference) ** 2))
    assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 35


# ---------------------------------------------------------------------------------- conversions


def test_cmyk_jpeg_is_converted() -> None:
    image = prepare_image(encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), settings())
    assert image.conversions == ("cmyk",)
    assert close(decode(image.jpeg)[10, 10], (255, 0, 0), tol=25)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_is_converted(mode: str) -> None:
    image = prepare_image(encode(Image.new(mode, (40, 30), 255)), settings())
    assert image.conversions == ("grayscale",)
    assert close(decode(image.jpeg)[10, 10], (255, 255, 255), tol=3)


def test_rgba_is_composited_on_the_fixed_background() -> None:
    source = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    source.paste((*BLUE, 255), (20, 0, 40, 30))
    image = prepare_image(encode(source), settings(resize_mode="squash"))
    assert image.conversions == ("alpha",)
    pixels = decode(image.jpeg)
    assert close(pixels[32, 4], ALPHA_BACKGROUND, tol=8) and close(pixels[32, 60], BLUE)


def test_la_counts_grayscale_and_alpha() -> None:
    image = prepare_image(encode(Image.new("LA", (20, 20), (0, 0))), settings())
    assert image.conversions == ("grayscale", "alpha")
    assert close(decode(image.jpeg)[5, 5], ALPHA_BACKGROUND, tol=3)


def test_palette_with_transparency() -> None:
    source = Image.new("P", (20, 20), 0)
    source.putpalette([*RED, *GREEN] + [0] * 762)
    source.paste(1, (10, 0, 20, 20))
    image = prepare_image(encode(source, transparency=0), settings())
    assert image.conversions == ("palette", "alpha")
    pixels = decode(image.jpeg)
    assert close(pixels[32, 4], ALPHA_BACKGROUND, tol=8) and close(pixels[32, 60], GREEN)


def test_palette_without_transparency() -> None:
    source = Image.new("P", (20, 20), 0)
    source.putpalette([*RED] + [0] * 765)
    image = prepare_image(encode(source), settings())
    assert image.conversions == ("palette",)
    assert close(decode(image.jpeg)[5, 5], RED)


def test_16bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.zeros((20, 30), dtype=np.uint16)
    values[:, 10:20] = 32896  # mid-grey in 16 bits; Pillow's own convert would clip it to 255
    values[:, 20:] = 65535
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    image = prepare_image(encode(source), settings(resize_mode="squash"))
    assert image.conversions == ("16bit",)
    pixels = decode(image.jpeg)
    assert close(pixels[32, 3], (0, 0, 0), tol=6)
    assert close(pixels[32, 32], (128, 128, 128), tol=6)
    assert close(pixels[32, 60], (255, 255, 255), tol=6)


def test_exif_rotation_is_applied() -> None:
    """An 80x40 landscape file tagged "rotate 90 CW" (orientation 6) is a 40x80 portrait: red on the right."""
    source = Image.new("RGB", (80, 40), BLUE)
    source.paste(RED, (0, 0, 80, 20))  # top half red in the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    image = prepare_image(encode(source, "JPEG", exif=exif.tobytes()), settings(resize_mode="pad"))
    assert image.conversions == ("exif_rotated",)
    assert image.orig_size == (40, 80)
    pixels = decode(image.jpeg)
    # Portrait content 32x64 centred: pad columns on both sides, blue left half, red right half.
    assert close(pixels[32, 3], PAD_COLOUR, tol=8) and close(pixels[32, 60], PAD_COLOUR, tol=8)
    assert close(pixels[32, 22], BLUE) and close(pixels[32, 42], RED)


def test_output_carries_no_metadata_and_is_reproducible() -> None:
    exif = Image.Exif()
    exif[0x010F] = "camera"
    data = encode(banded(), "JPEG", exif=exif.tobytes(), comment=b"hello", dpi=(300, 300))
    first = prepare_image(data, settings()).jpeg
    assert first == prepare_image(data, settings()).jpeg
    with Image.open(io.BytesIO(first)) as out:
        assert not out.getexif() and "comment" not in out.info and "icc_profile" not in out.info
    assert b"camera" not in first and b"hello" not in first


# ---------------------------------------------------------------------------------------- skips


def truncated_jpeg() -> bytes:
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("data", "reason", "limit"),
    [
        (b"", "empty", None),
        (b"this is not an image" * 10, "corrupt", None),
        (truncated_jpeg(), "truncated", None),
        (encode(Image.new("RGB", (120, 120))), "too_large", 100 * 100),  # our own header check
        (png_with_header_size(500, 500), "too_large", 100 * 100),  # decided before decoding garbage
        (png_with_header_size(30000, 30000), "too_large", None),  # Pillow's DecompressionBombError
    ],
    ids=["empty", "corrupt", "truncated", "limit", "header-before-decode", "bomb"],
)
def test_bad_inputs_are_skipped_with_a_reason(data: bytes, reason: str, limit: int | None) -> None:
    overrides = {"max_image_pixels": limit} if limit else {}
    with pytest.raises(ImageSkipped) as info:
        prepare_image(data, settings(**overrides))
    assert info.value.reason == reason


def test_header_size_garbage_within_limit_is_corrupt_or_truncated() -> None:
    with pytest.raises(ImageSkipped) as info:
        prepare_image(png_with_header_size(500, 500), settings())
    assert info.value.reason in ("corrupt", "truncated")


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="resize_mode"):
        settings(resize_mode="stretch")
    with pytest.raises(ValueError, match="jpeg_quality"):
        settings(jpeg_quality=0)
    with pytest.raises(ValueError, match="unknown skip reason"):
        ImageSkipped("bad")


def test_large_jpegs_are_scaled_in_the_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import JpegImagePlugin

    scales: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> object:
        result = original(self, mode, size)
        scales.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    image = prepare_image(encode(banded(640, 480), "JPEG"), settings(size=64))
    assert scales == [(160, 120)]  # decoded at 1/4 scale, still >= 64 on both sides
    with Image.open(io.BytesIO(image.jpeg)) as out:
        assert out.size == (64, 64)
