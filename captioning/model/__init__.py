"""The captioning model: ResNet encoder, soft attention, decoders, the captioner, checkpoints.

    from captioning.model import build_captioner, captioner_from_checkpoint
    model = build_captioner(cfg.model, len(vocab))

Modules: ``encoder`` (ResNet trunk to a pixel grid), ``attention`` (additive soft attention),
``decoders`` (Show-Attend-Tell, FC, Show-Tell), ``captioner`` (encode / forward / init_state /
step / generate), ``embeddings`` (GloVe), ``factory`` (``build_*``: the only readers of
``ModelConfig``), ``checkpoint`` (save, load, rebuild), ``search`` (beam search).
"""

from captioning.model.captioner import Captioner, Generation
from captioning.model.checkpoint import captioner_from_checkpoint, load_checkpoint, save_checkpoint
from captioning.model.decoders import CaptionOutput, DecodeState
from captioning.model.factory import build_captioner, build_embeddings

__all__ = [
    "CaptionOutput",
    "Captioner",
    "DecodeState",
    "Generation",
    "build_captioner",
    "build_embeddings",
    "captioner_from_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]
