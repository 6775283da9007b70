"""Building a captioner from its config section: the only place that reads ``ModelConfig``.

    embeddings = build_embeddings(cfg.model, vocab.words)   # None unless model.embeddings_path
    model = build_captioner(cfg.model, len(vocab), embeddings=embeddings)

Everything below takes plain numbers (STYLE habit 2). The encoder comes back frozen; the trainer
turns fine-tuning on per stage with ``model.encoder.set_fine_tuning(enabled, from_block)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from captioning.config import ModelConfig
from captioning.model.captioner import Captioner
from captioning.model.decoders import CaptionDecoder, FCDecoder, ShowAttendTell, ShowTell
from captioning.model.embeddings import PretrainedEmbeddings, load_glove
from captioning.model.encoder import ResNetEncoder


def build_embeddings(cfg: ModelConfig, words: Sequence[str]) -> PretrainedEmbeddings | None:
    """The pretrained vectors of ``words`` from ``cfg.embeddings_path`` (None when it is unset)."""
    if cfg.embeddings_path is None:
        return None
    return load_glove(cfg.embeddings_path, words, cfg.emb_dim)


def build_captioner(
    cfg: ModelConfig, vocab_size: int, *, embeddings: PretrainedEmbeddings | None = None
) -> Captioner:
    """Encoder + the decoder of ``cfg.arch``; ``embeddings`` (from ``build_embeddings``) are
    loaded into the word embedding and trained or frozen per ``cfg.fine_tune_embeddings``."""
    if cfg.embeddings_path is not None and embeddings is None:
        raise ValueError(
            "model.embeddings_path is set: load the vectors with build_embeddings(cfg, vocab.words) "
            "and pass them as embeddings="
        )
    encoder = ResNetEncoder(
        cfg.encoder, weights=cfg.encoder_weights, encoded_image_size=cfg.encoded_image_size
    )
    E = encoder.encoder_dim
    decoder: CaptionDecoder
    if cfg.arch == "show_attend_tell":
        decoder = ShowAttendTell(vocab_size, E, cfg.emb_dim, cfg.decoder_dim, cfg.attention_dim, cfg.dropout)
    elif cfg.arch == "fc":
        decoder = FCDecoder(vocab_size, E, cfg.emb_dim, cfg.decoder_dim, cfg.dropout)
    elif cfg.arch == "show_tell":
        decoder = ShowTell(vocab_size, E, cfg.emb_dim, cfg.decoder_dim, cfg.dropout)
    else:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; valid: show_attend_tell, fc, show_tell")
    if embeddings is not None:
        decoder.load_pretrained_embeddings(embeddings.vectors, embeddings.found)
        decoder.fine_tune_embeddings(cfg.fine_tune_embeddings)
    model = Captioner(encoder, decoder)
    model.model_config = cfg
    return model
