"""Attention overlays: the image, then per generated word a colour heat map of where the model looked.

Usage::

    result = beam_search(model, features, beam_size=5, max_len=20)
    n = int(result.lengths[0])
    words = [vocab.word_of(int(i)) for i in result.tokens[0, :n]]        # ..., "<end>"
    sheet = attention_overlay(image, words, result.alphas[0, :n].numpy(), grid=14)
    sheet.save("overlay.png")

The one rendering for training reports (``captioning.training.reporting``) and ``captioning caption
--visualize`` (``captioning.inference``), after seed 004's ``visualize_att``: the first panel is the
image as the model saw it (``<start>``); then, per word, its (grid x grid) attention map upsampled
smoothly (bicubic) to the panel, stretched to the panel's own range (its least attended pixel at
the bottom of the colour map, its most attended at the top: trained or not, a model's attention is
often nearly flat, and its peaks must still show), coloured with ``COLORMAP`` (dark blue where the
model looked least, through green and yellow, to red where it looked most) and blended at
``OPACITY`` over the image in grey, so that every colour on a panel is attention and the shapes
stay visible. The word is written above its panel; panels fill rows of ``columns``. Pass the image
the model saw (square, after the resize of preprocessing), so that the grid lines up with it.

Shapes: T words, P = grid * grid attention pixels, S panel side in pixels.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# turbo: an even, rainbow-like map with a bright red top, so the peak stands out on any image.
COLORMAP = "turbo"
OPACITY = 0.55  # the colour's share of each pixel; the grey image keeps the rest
FLAT = 1e-4  # weights whose range is below this share of their size count as flat
START_LABEL = "<start>"  # the first panel: the image itself
GREY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma weights
LABEL_HEIGHT = 22  # pixels above each panel for its word
MARGIN = 4  # pixels between panels
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)


def attention_map(alpha: np.ndarray, grid: int, size: tuple[int, int]) -> np.ndarray:
    """(P,) weights -> (H, W) float32 in [0, 1]: bicubic upsampling of the grid, stretched to [0, 1]
    (all zeros when the weights are flat: nowhere is looked at more than elsewhere)."""
    if alpha.shape != (grid * grid,):
        raise ValueError(
            f"expected {grid * grid} attention weights for a {grid}x{grid} grid, got {alpha.shape}"
        )
    small = Image.fromarray(np.asarray(alpha, dtype=np.float32).reshape(grid, grid), mode="F")  # (G, G)
    big = np.asarray(small.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)  # (H, W)
    # bicubic over- and undershoots next to sharp peaks: a dark ring would take the lowest colour
    big = np.clip(big, np.min(alpha), np.max(alpha))
    low, high = float(big.min()), float(big.max())
    if not high - low > FLAT * max(abs(high), abs(low)):  # also catches NaN weights
        return np.zeros_like(big)
    return ((big - low) / (high - low)).astype(np.float32)


@functools.lru_cache(maxsize=4)
def colour_table(name: str = COLORMAP) -> np.ndarray:
    """(256, 3) float32 RGB in [0, 255]: matplotlib's colour map ``name`` sampled at 256 levels."""
    from matplotlib import colormaps  # here: only a rendering process pays for the import

    try:
        cmap = colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colour map {name!r}; e.g. turbo, jet, inferno, viridis") from None
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.float32)


def heat_panel(pixels: np.ndarray, weight: np.ndarray, colormap: str = COLORMAP) -> np.ndarray:
    """(S, S, 3) image and (S, S) weights in [0, 1] -> (S, S, 3) uint8: the coloured weights over the
    image in grey."""
    grey = (pixels @ GREY)[:, :, None]  # (S, S, 1)
    heat = colour_table(colormap)[np.rint(weight * 255.0).astype(np.int64)]  # (S, S, 3)
    blended = (1.0 - OPACITY) * grey + OPACITY * heat
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def attention_overlay(
    image: Image.Image,
    words: Sequence[str],
    alphas: np.ndarray,
    grid: int,
    *,
    panel_size: int = 192,
    columns: int = 5,
    colormap: str = COLORMAP,
) -> Image.Image:
    """A sheet of ``1 + len(words)`` panels: the image (``<start>``), then word t above the heat map of
    ``alphas[t]`` (T, P) over the image.

    Panels are ``panel_size`` pixels square; the sheet is RGB, ready for ``save("x.png")``.
    """
    alphas = np.asarray(alphas)
    if alphas.ndim != 2 or alphas.shape[0] != len(words):
        raise ValueError(f"expected alphas of shape ({len(words)}, {grid * grid}), got {alphas.shape}")
    if not words:
        raise ValueError("nothing to draw: no words")
    panel = image.convert("RGB").resize((panel_size, panel_size), Image.Resampling.BICUBIC)
    pixels = np.asarray(panel, dtype=np.float32)  # (S, S, 3)
    labels = [START_LABEL, *words]
    font = label_font(14)
    cols = max(1, min(columns, len(labels)))
    rows = math.ceil(len(labels) / cols)
    cell_w, cell_h = panel_size + MARGIN, panel_size + LABEL_HEIGHT + MARGIN
    sheet = Image.new("RGB", (cols * cell_w + MARGIN, rows * cell_h + MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for n, label in enumerate(labels):
        x = MARGIN + (n % cols) * cell_w
        y = MARGIN + (n // cols) * cell_h
        draw.text((x + 2, y + 2), label, fill=TEXT_COLOUR, font=font)
        if n == 0:
            sheet.paste(panel, (x, y + LABEL_HEIGHT))
            continue
        weight = attention_map(alphas[n - 1], grid, (panel_size, panel_size))  # (S, S)
        sheet.paste(Image.fromarray(heat_panel(pixels, weight, colormap)), (x, y + LABEL_HEIGHT))
    return sheet
