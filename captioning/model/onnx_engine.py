"""The exported captioner on onnxruntime, behind the interface beam search already takes.

    engine = OnnxCaptioner("exported/demo")                     # a folder from ``export_onnx``
    features = engine.encode(images)                            # (B, 3, H, W) -> (B, P, E)
    result = beam_search(engine, features, beam_size=3, max_len=16)   # the same search as torch's

``OnnxCaptioner`` has ``encode``, ``init_state`` and ``step`` with the shapes of
``captioning.model.captioner.Captioner`` (torch tensors in and out, on the CPU), so
``captioning.model.search.beam_search`` and ``captioning.inference.Predictor`` drive it unchanged:
the search is shared, not copied. A step hands back the state tensors it does not change
(features, attention projection) as the very objects it was given, which the search takes as
constant (no per-step gather), as with torch.

Shapes: B images, P pixels, E encoder dim, N decoding rows, V vocab.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioning.data.vocab import Vocab

FORMAT = "captioning-onnx"


class OnnxModelError(ValueError):
    """A folder that is not a usable ONNX export (missing files, another format, wrong version)."""


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``model.json`` of an export folder, validated; raises OnnxModelError naming what is wrong."""
    path = Path(folder) / "model.json"
    if not Path(folder).is_dir():
        raise OnnxModelError(
            f"{folder}: not a folder; give the folder `captioning export --format onnx` wrote"
        )
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise OnnxModelError(f"{folder}: no model.json; not an ONNX export of `captioning export`") from None
    except json.JSONDecodeError as e:
        raise OnnxModelError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != 1:
        raise OnnxModelError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this code reads {FORMAT!r} version 1"
        )
    missing = [
        name
        for name in ("encoder.onnx", "init.onnx", "step.onnx", "vocab.json")
        if not (Path(folder) / name).is_file()
    ]
    if missing:
        raise OnnxModelError(f"{folder}: missing {', '.join(missing)}")
    return manifest


class OnnxCaptioner:
    """Three onnxruntime sessions (encoder, initial state, step) with the captioner's decoding calls.

    ``threads``: onnxruntime's intra-op threads (default: its own choice, all cores);
    ``providers``: onnxruntime execution providers (default: CPU).
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        self.arch: str = self.manifest["arch"]
        self.vocab_size: int = int(self.manifest["vocab_size"])
        self.state_names: list[str] = list(self.manifest["state"])
        self.step_changes: list[str] = list(self.manifest["step_changes"])
        self.has_attention = bool(self.manifest["attention"])
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        # Between two steps the search runs torch ops on torch's threads: onnxruntime's workers must
        # sleep then, not spin on the same cores (spinning made the whole search 3x slower on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = providers or ["CPUExecutionProvider"]

        def session(name: str) -> Any:
            return ort.InferenceSession(os.fspath(self.folder / name), options, providers=providers)

        self._encoder, self._init, self._step = (
            session("encoder.onnx"),
            session("init.onnx"),
            session("step.onnx"),
        )

    def vocab(self) -> Vocab:
        return Vocab.load(self.folder / "vocab.json")

    # The Predictor's model calls: the sessions run where onnxruntime puts them; tensors stay on the CPU.
    def eval(self) -> OnnxCaptioner:
        return self

    def to(self, device: torch.device | str) -> OnnxCaptioner:
        if torch.device(device).type != "cpu":
            raise ValueError("the onnxruntime engine takes and returns CPU tensors; use --device cpu")
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, P, E) features."""
        (features,) = self._encoder.run(None, {"images": _array(images, np.float32)})
        return torch.from_numpy(features)

    def init_state(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, P, E) -> the decoding state of B rows, ready for a first ``step`` on <start>."""
        outputs = self._init.run(None, {"features": _array(features, np.float32)})
        return {name: torch.from_numpy(value) for name, value in zip(self.state_names, outputs, strict=True)}

    def step(
        self, tokens: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """tokens (N,) -> log-probs (N, V), the new state (unchanged tensors: the same objects), alpha (N, P) or None."""
        feeds = {"tokens": _array(tokens, np.int64)} | {
            name: _array(state[name], np.float32) for name in self.state_names
        }
        outputs = self._step.run(None, feeds)
        logprobs = torch.from_numpy(outputs[0])  # (N, V)
        changed = dict(zip(self.step_changes, outputs[1 : 1 + len(self.step_changes)], strict=True))
        new = {
            name: torch.from_numpy(changed[name]) if name in changed else state[name]
            for name in self.state_names
        }
        alpha = torch.from_numpy(outputs[-1]) if self.has_attention else None  # (N, P)
        return logprobs, new, alpha


def _array(tensor: torch.Tensor, dtype: type) -> np.ndarray:
    """A CPU tensor as the contiguous numpy array onnxruntime wants (no copy when it already is one)."""
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=dtype)
