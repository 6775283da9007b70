"""Attention overlays (captioning/model/visualize.py): a coloured heat map per word, peaked where the
attention peaks, smooth, with the word above; the same sheets from training reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.model import visualize
from captioning.model.visualize import (
    LABEL_HEIGHT,
    MARGIN,
    OPACITY,
    attention_map,
    attention_overlay,
    colour_table,
)

PANEL = 64


def _panel(sheet: Image.Image, n: int, columns: int, size: int = PANEL) -> np.ndarray:
    """Panel n of a sheet (0 is the image itself), as float (S, S, 3)."""
    x = MARGIN + (n % columns) * (size + MARGIN)
    y = MARGIN + (n // columns) * (size + LABEL_HEIGHT + MARGIN) + LABEL_HEIGHT
    return np.asarray(sheet, dtype=np.float32)[y : y + size, x : x + size]


def _label(sheet: Image.Image, n: int, columns: int, size: int = PANEL) -> np.ndarray:
    x = MARGIN + (n % columns) * (size + MARGIN)
    y = MARGIN + (n // columns) * (size + LABEL_HEIGHT + MARGIN)
    return np.asarray(sheet.convert("L"), dtype=np.float32)[y : y + LABEL_HEIGHT, x : x + size]


def _peaked(grid: int, cells: list[int], floor: float = 0.02) -> np.ndarray:
    """(T, P) attention: row t peaks on grid cell cells[t], normalised like a softmax output."""
    alphas = np.full((len(cells), grid * grid), floor)
    for t, cell in enumerate(cells):
        alphas[t, cell] = 1.0
    return alphas / alphas.sum(1, keepdims=True)


def _weights_seen(panel: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Invert the blend: for each pixel, the colour-map level (0..1) whose colour the panel shows."""
    grey = (image @ visualize.GREY)[:, :, None]
    heat = (panel - (1.0 - OPACITY) * grey) / OPACITY  # (S, S, 3)
    table = colour_table()  # (256, 3)
    distance = ((heat[:, :, None, :] - table[None, None]) ** 2).sum(-1)  # (S, S, 256)
    return distance.argmin(-1) / 255.0


def test_sheet_starts_with_the_image_then_one_labelled_panel_per_word() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (PANEL, PANEL, 3), dtype=np.uint8))
    words = ["a", "red", "square", "<end>"]
    sheet = attention_overlay(image, words, _peaked(4, [0, 5, 10, 15]), grid=4, panel_size=PANEL, columns=3)
    # 5 panels (the image + 4 words) in rows of 3
    assert sheet.mode == "RGB" and sheet.size == (
        3 * (PANEL + MARGIN) + MARGIN,
        2 * (PANEL + LABEL_HEIGHT + MARGIN) + MARGIN,
    )
    assert np.array_equal(_panel(sheet, 0, 3), np.asarray(image, dtype=np.float32))
    for n in range(5):  # a label (dark text on white) above every panel
        assert _label(sheet, n, 3).min() < 100
    assert _label(sheet, 5, 3).min() == 255  # the empty sixth cell has none


@pytest.mark.parametrize(("grid", "cell"), [(4, 0), (4, 6), (4, 15), (7, 3), (7, 24), (7, 42), (14, 100)])
def test_the_colour_peak_is_where_the_attention_peaks(grid: int, cell: int) -> None:
    rng = np.random.default_rng(cell)
    image = Image.fromarray(rng.integers(0, 256, (PANEL, PANEL, 3), dtype=np.uint8))  # any content
    sheet = attention_overlay(image, ["w"], _peaked(grid, [cell]), grid=grid, panel_size=PANEL)
    seen = _weights_seen(_panel(sheet, 1, 2), np.asarray(image, dtype=np.float32))
    row, col = np.unravel_index(int(seen.argmax()), seen.shape)
    step = PANEL / grid
    assert (int(row // step), int(col // step)) == divmod(cell, grid)
    assert seen.max() > 0.95  # the peak takes the top colour...
    r, c = divmod(cell, grid)  # ...the corner farthest from it the bottom ones
    far = (0 if r >= grid / 2 else grid - 1, 0 if c >= grid / 2 else grid - 1)
    y, x = int((far[0] + 0.5) * step), int((far[1] + 0.5) * step)
    assert seen[y, x] < 0.2


def test_word_panels_are_in_colour_and_the_image_panel_is_not_changed() -> None:
    image = Image.new("RGB", (PANEL, PANEL), (128, 128, 128))
    cells, far_cells = [1, 14], [15, 0]
    sheet = attention_overlay(image, ["a", "b"], _peaked(4, cells), grid=4, panel_size=PANEL)
    start = _panel(sheet, 0, 3)
    assert np.ptp(start, axis=-1).max() == 0  # grey stays grey
    for n in (1, 2):
        panel = _panel(sheet, n, 3)
        chroma = np.ptp(panel, axis=-1)  # (S, S): max - min over R, G, B
        assert chroma.mean() > 20 and chroma.max() > 100, f"panel {n}: chroma {chroma.mean():.1f} on average"
        # red where it looks most; dark purple, then blue, elsewhere
        for cell, warm in ((cells[n - 1], True), (far_cells[n - 1], False)):
            r, c = divmod(cell, 4)
            red, _, blue = panel[r * 16 + 8, c * 16 + 8]
            assert (red - blue > 50) if warm else (blue >= red), (n, cell, panel[r * 16 + 8, c * 16 + 8])


def test_upsampling_is_smooth_and_stretched_to_the_full_range() -> None:
    alpha = _peaked(4, [5])[0]
    weight = attention_map(alpha, 4, (192, 192))  # (H, W)
    assert weight.shape == (192, 192) and weight.dtype == np.float32
    assert weight.min() == 0.0 and weight.max() == 1.0
    steps = max(np.abs(np.diff(weight, axis=0)).max(), np.abs(np.diff(weight, axis=1)).max())
    assert steps < 0.1  # no blocks: nearest-neighbour upsampling would jump by 1.0 at cell edges
    # A nearly flat attention (a weak model) still shows its peak in the full colour range.
    nearly_flat = np.full(16, 1 / 16)
    nearly_flat[5] += 0.002
    weight = attention_map(nearly_flat / nearly_flat.sum(), 4, (64, 64))
    assert weight.max() == 1.0 and np.unravel_index(int(weight.argmax()), weight.shape)[0] // 16 == 1


def test_flat_or_broken_attention_draws_no_peak() -> None:
    assert not attention_map(np.full(16, 1 / 16), 4, (32, 32)).any()
    assert not attention_map(np.full(16, np.nan), 4, (32, 32)).any()


def test_bad_input_is_refused_with_the_reason() -> None:
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="alphas of shape"):
        attention_overlay(image, ["a"], np.zeros((2, 16)), grid=4)
    with pytest.raises(ValueError, match="16 attention weights for a 4x4 grid"):
        attention_map(np.zeros(9), 4, (8, 8))
    with pytest.raises(ValueError, match="no words"):
        attention_overlay(image, [], np.zeros((0, 16)), grid=4)
    with pytest.raises(ValueError, match="unknown colour map 'nope'"):
        attention_overlay(image, ["a"], np.zeros((1, 16)), grid=4, colormap="nope")


def test_training_reports_draw_the_same_coloured_sheets(tmp_path: Path) -> None:
    from captioning.config import ModelConfig
    from captioning.data.vocab import SPECIALS, Vocab
    from captioning.model.factory import build_captioner
    from captioning.training.reporting import to_pil, write_attention_sheets

    torch.manual_seed(0)
    words = [*SPECIALS, "a", "red", "square"]
    vocab = Vocab(tuple(words), tuple([0] * 4 + [5] * 3), min_word_freq=1)
    cfg = ModelConfig(
        encoder="resnet18", encoder_weights=None, encoded_image_size=3, emb_dim=8, attention_dim=8,
        decoder_dim=8, dropout=0.0,
    )  # fmt: skip
    model = build_captioner(cfg, len(vocab)).eval()
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    paths = write_attention_sheets(model, images, [7, 9], vocab, tmp_path, beam_size=2, max_len=4)
    assert [p.name for p in paths] == ["7.png", "9.png"]
    with Image.open(paths[0]) as sheet:
        sheet.load()
    columns = min(5, (sheet.size[0] - MARGIN) // (192 + MARGIN))
    start = _panel(sheet, 0, columns, 192)
    assert np.array_equal(
        start, np.asarray(to_pil(images[0]).resize((192, 192), Image.Resampling.BICUBIC), dtype=np.float32)
    )
    assert np.ptp(_panel(sheet, 1, columns, 192), axis=-1).mean() > 40  # the first word's panel: in colour
