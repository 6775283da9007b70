"""Attention overlays: one panel per generated word, the image lit where the model looked.

Usage::

    result = beam_search(model, features, beam_size=5, max_len=20)
    n = int(result.lengths[0])
    words = [vocab.word_of(int(i)) for i in result.tokens[0, :n]]        # ..., "<end>"
    sheet = attention_overlay(image, words, result.alphas[0, :n].numpy(), grid=14)
    sheet.save("overlay.png")

Seed 004's ``visualize_att`` as Pillow + numpy (no matplotlib): each (grid x grid) attention map
is upsampled smoothly (bicubic) to the panel, scaled to its own maximum, and alpha-blended over the
image: attended pixels keep their colour, the rest fade to dark. The word is written above its
panel; panels fill rows of ``columns``. Pass the image the model saw (square, after the resize of
preprocessing), so that the grid lines up with it.

Shapes: T words, P = grid * grid attention pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# How dark unattended pixels get: the image is scaled by FLOOR + (1 - FLOOR) * attention.
FLOOR = 0.25
LABEL_HEIGHT = 22  # pixels above each panel for its word
MARGIN = 4  # pixels between panels
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)


def attention_map(alpha: np.ndarray, grid: int, size: tuple[int, int]) -> np.ndarray:
    """(P,) weights -> (H, W) float32 in [0, 1]: bicubic upsampling of the grid, over its maximum."""
    if alpha.shape != (grid * grid,):
        raise ValueError(
            f"expected {grid * grid} attention weights for a {grid}x{grid} grid, got {alpha.shape}"
        )
    small = Image.fromarray(np.asarray(alpha, dtype=np.float32).reshape(grid, grid), mode="F")  # (G, G)
    big = np.asarray(small.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)  # (H, W)
    big = np.clip(big, 0.0, None)  # bicubic overshoots below zero next to sharp peaks
    peak = float(big.max())
    return big / peak if peak > 0 else np.zeros_like(big)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
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
) -> Image.Image:
    """A sheet of ``len(words)`` panels: word t above the image lit by ``alphas[t]`` (T, P).

    Panels are ``panel_size`` pixels square; the sheet is RGB, ready for ``save("x.png")``.
    """
    alphas = np.asarray(alphas)
    if alphas.ndim != 2 or alphas.shape[0] != len(words):
        raise ValueError(f"expected alphas of shape ({len(words)}, {grid * grid}), got {alphas.shape}")
    if not words:
        raise ValueError("nothing to draw: no words")
    panel = image.convert("RGB").resize((panel_size, panel_size), Image.Resampling.BICUBIC)
    pixels = np.asarray(panel, dtype=np.float32)  # (H, W, 3)
    font = _font(14)
    cols = max(1, min(columns, len(words)))
    rows = math.ceil(len(words) / cols)
    cell_w, cell_h = panel_size + MARGIN, panel_size + LABEL_HEIGHT + MARGIN
    sheet = Image.new("RGB", (cols * cell_w + MARGIN, rows * cell_h + MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for t, word in enumerate(words):
        weight = attention_map(alphas[t], grid, (panel_size, panel_size))  # (H, W)
        lit = pixels * (FLOOR + (1.0 - FLOOR) * weight[:, :, None])  # (H, W, 3)
        x = MARGIN + (t % cols) * cell_w
        y = MARGIN + (t // cols) * cell_h
        draw.text((x + 2, y + 2), word, fill=TEXT_COLOUR, font=font)
        sheet.paste(Image.fromarray(np.clip(lit + 0.5, 0, 255).astype(np.uint8)), (x, y + LABEL_HEIGHT))
    return sheet
