"""Test-only media: videos with known scenes (H.264 encoded by PyAV, the pinned library, through ``captioning.video.VideoWriter``) and a captioner
whose caption is a frame's colour, so that a video's expected cues are known exactly.

    write_video(path, [("red", 2.0), ("white", 0.1), ("blue", 2.0)], fps=10)   # H.264 in MP4
    predictor = colour_predictor()          # "a red scene" for a red frame, "a white flash" ...
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from captioning.data.images import ImageSettings
from captioning.data.vocab import END_ID, SPECIALS, Vocab
from captioning.inference import Predictor
from captioning.video import VideoWriter

COLOURS = {"red": (210, 20, 20), "green": (20, 190, 30), "blue": (20, 30, 210), "white": (250, 250, 250)}
WORDS = ("a", "red", "green", "blue", "white", "scene", "flash")


def write_video(
    path: Path, scenes: Sequence[tuple[str, float]], *, fps: int = 10, size: tuple[int, int] = (160, 120)
) -> Path:
    """Solid-colour scenes (a moving grey disc on each, so frames differ) of the given seconds each."""
    writer = VideoWriter(path, fps)
    n = 0
    for colour, seconds in scenes:
        for _ in range(round(seconds * fps)):
            image = Image.new("RGB", size, COLOURS[colour])
            x = 10 + (n * 3) % (size[0] - 50)
            ImageDraw.Draw(image).ellipse((x, 40, x + 30, 70), fill=(128, 128, 128))
            writer.write(image)
            n += 1
    writer.close(keep=True)
    return path


class ColourCaptioner:
    """A hand-built step model: its features are the image's mean colour, its caption "a <colour>
    scene" (or "a white flash"), emitted by the shared beam search step by step like any model's."""

    def __init__(self) -> None:
        self.vocab = Vocab(SPECIALS + WORDS, (0,) * len(SPECIALS) + (5,) * len(WORDS), min_word_freq=1)
        ids = {w: self.vocab.id_of(w) for w in WORDS}
        # One row per colour: the word ids it emits, then <end>.
        self.sentences = torch.tensor(
            [
                [ids["a"], ids[c], ids["flash" if c == "white" else "scene"], END_ID]
                for c in ("red", "green", "blue", "white")
            ]
        )

    def eval(self) -> ColourCaptioner:
        return self

    def to(self, device: object) -> ColourCaptioner:
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3)).unsqueeze(1)  # (B, 1, 3) mean normalised colour

    def init_state(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        rgb = features[:, 0]  # (B, 3)
        colour = rgb.argmax(1)  # 0 red, 1 green, 2 blue
        colour = torch.where(rgb.min(1).values > 1.0, 3, colour)  # bright in every channel: white
        return {"colour": colour, "t": torch.zeros_like(colour)}

    def step(
        self, tokens: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], None]:
        word = self.sentences[state["colour"], state["t"].clamp(max=3)]  # (N,)
        logits = torch.full((tokens.numel(), len(self.vocab)), -8.0)
        logits[torch.arange(tokens.numel()), word] = 8.0
        return torch.log_softmax(logits, 1), {"colour": state["colour"], "t": state["t"] + 1}, None


def colour_predictor(size: int = 32) -> Predictor:
    engine = ColourCaptioner()
    settings = ImageSettings(size=size, resize_mode="squash", jpeg_quality=95, max_image_pixels=10**8)
    decoding = {"beam_size": 2, "max_len": 6, "length_normalization": False}
    return Predictor(engine, engine.vocab, settings, torch.device("cpu"), decoding)
