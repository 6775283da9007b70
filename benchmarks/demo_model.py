"""What the inference benchmarks caption with: synthetic scene images and a demo-sized model.

    images = scene_images(256, size=96, seed=0)         # JPEG bytes of synthetic scenes
    checkpoint = demo_checkpoint(path, images_seed=0)   # or a trained one given on the command line

The default model is the ``demo`` recipe's Show-Attend-Tell (ResNet-18 at 64 px, a 4 x 4 attention
grid, emb/attention 64, decoder 128) with random weights over the synthetic captions' vocabulary,
its decoder weights scaled x4 so that captions vary between images (at x1 every caption repeats one
word). A trained checkpoint (``make demo``'s ``runs/demo/*/scst/best.pt``) can be given instead.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import torch

from captioning.config import load_config
from captioning.data.scenes import scene_pictures
from captioning.data.vocab import SPECIALS, Vocab
from captioning.model.checkpoint import save_checkpoint
from captioning.model.factory import build_captioner


def scene_images(count: int, *, size: int = 96, seed: int = 0) -> tuple[list[bytes], list[str]]:
    """``count`` synthetic scenes as JPEG bytes, and every word of their captions (sorted)."""
    images, words = [], set()
    for image, captions in scene_pictures(count, size=size, seed=seed):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
        words.update(w for caption in captions for w in caption.split())
    return images, sorted(words)


def demo_checkpoint(path: Path, words: list[str], *, seed: int = 0, decoder_scale: float = 4.0) -> str:
    """The demo recipe's captioner with random weights over ``words``, saved at ``path``."""
    cfg = load_config("demo")
    model_cfg = dataclasses.replace(cfg.model, encoder_weights=None, dropout=0.0)
    torch.manual_seed(seed)
    vocab = Vocab(SPECIALS + tuple(words), (0,) * len(SPECIALS) + (5,) * len(words), min_word_freq=1)
    model = build_captioner(model_cfg, len(vocab)).eval()
    with torch.no_grad():
        for param in model.decoder.parameters():
            param.mul_(decoder_scale)
    config = dataclasses.replace(cfg, model=model_cfg).to_dict()
    save_checkpoint(str(path), model=model, vocab=vocab, config=config, step=0)
    return str(path)
