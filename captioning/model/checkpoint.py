"""Checkpoints: one dict of plain data and state dicts, written atomically, loaded with weights_only.

    save_checkpoint("runs/x/step-1000.pt", model=ddp_model, vocab=vocab, config=cfg.to_dict(),
                    step=1000, extra={"optimizer": opt.state_dict()})   # local path or s3://
    ckpt = load_checkpoint("runs/x/step-1000.pt")                      # the dict
    model, vocab, ckpt = captioner_from_checkpoint("runs/x/step-1000.pt")   # eval mode, no outside config
    decoding_of(ckpt)   # {"beam_size": 3, "max_len": 16, "length_normalization": False}: as it was scored

The dict: ``format_version``, ``model`` (state dict of the unwrapped model: no ``module.`` or
``_orig_mod.`` prefixes), ``model_config`` (``dataclasses.asdict(ModelConfig)``), ``vocab``
(``Vocab.to_json()``), ``config`` (the resolved ``Config.to_dict()``), ``step``, and the ``extra``
entries. No pickled objects (STYLE habit 6): ``torch.load(weights_only=True)`` reads it, and a
checkpoint outlives refactors of the classes that wrote it.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from captioning import storage
from captioning.config import Config, normalize_overrides, parse_overrides
from captioning.data.vocab import Vocab
from captioning.model.captioner import Captioner
from captioning.model.factory import build_captioner

FORMAT_VERSION = 1
RESERVED_KEYS = ("format_version", "model", "model_config", "vocab", "config", "step")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        for attr in ("module", "_orig_mod"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def clean_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes (``module.``, ``_orig_mod.``) from every key."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out


def save_checkpoint(
    uri: str,
    *,
    model: nn.Module,
    vocab: Vocab,
    config: Mapping[str, Any],
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a checkpoint to ``uri`` (local: tmp file then rename; s3: one PUT). Call on rank 0."""
    inner = unwrap_model(model)
    model_config = getattr(inner, "model_config", None)
    if model_config is None:
        raise ValueError("the model has no model_config: build it with build_captioner")
    clash = sorted(set(extra or {}) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"extra entries {clash} would overwrite checkpoint fields {list(RESERVED_KEYS)}")
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": clean_state_dict(inner.state_dict()),
        "model_config": dataclasses.asdict(model_config),
        "vocab": vocab.to_json(),
        "config": dict(config),
        "step": int(step),
        **(extra or {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict with ``weights_only=True`` (no code runs on load)."""
    data = storage.read_bytes(uri)
    ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        found = ckpt.get("format_version") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{uri}: not a captioning checkpoint of format {FORMAT_VERSION} (found {found!r})")
    return ckpt


def captioner_from_checkpoint(
    uri_or_dict: str | Mapping[str, Any], map_location: str | torch.device = "cpu"
) -> tuple[Captioner, Vocab, dict[str, Any]]:
    """Rebuild the captioner from the checkpoint alone, in eval mode: (model, vocab, checkpoint dict).

    Encoder weights and pretrained embeddings come from the state dict, never from a download or
    the embeddings file; the model keeps the checkpoint's ``model_config`` for later saves.
    """
    ckpt = (
        dict(uri_or_dict) if isinstance(uri_or_dict, Mapping) else load_checkpoint(uri_or_dict, map_location)
    )
    model_config = Config.from_dict({"model": ckpt["model_config"]}).model  # validated like a recipe
    vocab = Vocab.from_json(ckpt["vocab"])
    skeleton = dataclasses.replace(model_config, encoder_weights=None, embeddings_path=None)
    model = build_captioner(skeleton, len(vocab))
    model.load_state_dict(clean_state_dict(ckpt["model"]))
    model.model_config = model_config
    model.eval()
    return model, vocab, ckpt


def vocab_of_checkpoint(uri: str) -> Vocab:
    """The vocabulary a checkpoint was trained with (new data for its model is encoded with the same ids)."""
    return Vocab.from_json(load_checkpoint(uri)["vocab"])


DECODING_KEYS = ("beam_size", "max_len", "length_normalization")  # the eval settings that decide a caption


def decoding_of(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """How the checkpoint's model was scored in training, so it is decoded the same way everywhere: its
    resolved config's ``eval.beam_size``, ``eval.max_len`` and ``eval.length_normalization`` (the
    schema's defaults for any it lacks)."""
    recorded = (ckpt.get("config") or {}).get("eval") or {}
    ev = Config.from_dict({"eval": {k: recorded[k] for k in DECODING_KEYS if k in recorded}}).eval
    return {k: getattr(ev, k) for k in DECODING_KEYS}


def decoding_given(overrides: Sequence[str] | None) -> list[str]:
    """The ``DECODING_KEYS`` that dotted ``overrides`` set (``eval.beam_size=5``, with or without ``--``):
    decoding asked for on purpose, which replaces the model's own."""
    given = parse_overrides(normalize_overrides(overrides))
    return [k for k in DECODING_KEYS if f"eval.{k}" in given]
