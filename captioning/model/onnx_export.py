"""Export a checkpoint's captioner to ONNX: the encoder, the decoder's initial state and its single step.

    manifest = export_onnx("runs/demo/best.pt", "exported/demo")   # writes the folder below
    manifest["check"]                         # {"max_abs_diff": ..., "rows": ...}: ORT vs torch

The folder (what ``captioning.model.onnx_engine.OnnxCaptioner`` and ``captioning caption --engine
onnxruntime --model DIR`` read):

    encoder.onnx   images (B, 3, H, W) float32, ImageNet-normalised -> features (B, P, E)
    init.onnx      features (B, P, E) -> the decoding state, one output per state tensor (initial_<name>)
    step.onnx      tokens (N,) int64 + every state tensor -> logprobs (N, V), the state tensors the
                   step changes (next_<name>), then alpha (N, P) for Show-Attend-Tell
    vocab.json     the vocabulary (``Vocab.save``)
    model.json     format, architecture, the state's names and which of them a step changes, the
                   image settings and decoding the checkpoint was scored with, its resolved config,
                   and the export's own check

Every batch dimension is dynamic (any B or N >= 1); the image side is the checkpoint's
``data.shards.image_size``. A step's unchanged state (features and their attention projection) is
an input only, never an output: the search keeps it as it is, so it is never copied per step. The
graphs come from ``torch.onnx.export(..., dynamo=True)`` (which needs onnxscript), are checked with
``onnx.checker`` and then run once on onnxruntime beside torch on a batch of random images: an
export whose log-probs differ by more than ``TOLERANCE`` is an error, not a file.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from captioning.model.captioner import Captioner
from captioning.model.checkpoint import captioner_from_checkpoint, decoding_of

FORMAT = "captioning-onnx"
FORMAT_VERSION = 1
GRAPHS = ("encoder.onnx", "init.onnx", "step.onnx")
TOLERANCE = 1e-3  # log-probs of ORT vs torch on the check batch (float32 differences are ~1e-6)


class _Encoder(nn.Module):
    def __init__(self, model: Captioner) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images)  # (B, P, E)


class _Init(nn.Module):
    def __init__(self, model: Captioner, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = self.model.init_state(features)
        return tuple(state[name] for name in self.names)


class _Step(nn.Module):
    def __init__(self, model: Captioner, names: list[str], changed: list[str]) -> None:
        super().__init__()
        self.model, self.names, self.changed = model, names, changed

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logprobs, new, alpha = self.model.step(tokens, dict(zip(self.names, state, strict=True)))
        outputs = [logprobs, *(new[name] for name in self.changed)]
        return (*outputs, alpha) if alpha is not None else tuple(outputs)


def _export(
    module: nn.Module, args: tuple[Any, ...], path: Path, inputs: list[str], outputs: list[str]
) -> None:
    batch = torch.export.Dim("batch", min=1)
    shapes: tuple[Any, ...] = (
        ({0: batch},) if len(args) == 1 else ({0: batch}, tuple({0: batch} for _ in args[1:]))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            dynamic_shapes=shapes,
            input_names=inputs,
            output_names=outputs,
            verbose=False,
        )
    if program is None:
        raise RuntimeError(f"torch.onnx.export returned no program for {path.name}")
    program.save(os.fspath(path))


def export_onnx(checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the ONNX folder of a local checkpoint (see the module doc); returns its manifest."""
    import onnx

    from captioning.inference import image_settings
    from captioning.model.onnx_engine import OnnxCaptioner

    model, vocab, ckpt = captioner_from_checkpoint(os.fspath(checkpoint))
    model = model.float().eval()
    config = ckpt.get("config") or {}
    settings = image_settings(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # (2, 3, H, W): an example batch of 2, from a generator of its own (the caller's RNG is left alone)
    images = torch.randn(2, 3, settings.size, settings.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.encode(images)  # (2, P, E)
        state = model.init_state(features)
        names = list(state)
        tokens = torch.tensor([1, 1])  # any ids: shapes are what the export follows
        _, stepped, alpha = model.step(tokens, state)
    changed = [name for name in names if stepped[name] is not state[name]]
    step_outputs = ["logprobs", *(f"next_{n}" for n in changed)] + (["alpha"] if alpha is not None else [])

    _export(_Encoder(model), (images,), out / "encoder.onnx", ["images"], ["features"])
    # Output names differ from the input's (ONNX graphs are SSA): the state's "features" is the input.
    _export(
        _Init(model, names), (features,), out / "init.onnx", ["features"], [f"initial_{n}" for n in names]
    )
    _export(
        _Step(model, names, changed),
        (tokens, *state.values()),
        out / "step.onnx",
        ["tokens", *names],
        step_outputs,
    )
    for graph in GRAPHS:
        onnx.checker.check_model(os.fspath(out / graph))  # by path: works with external weight files
    vocab.save(out / "vocab.json")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "arch": model.arch,
        "vocab_size": model.vocab_size,
        "state": names,
        "step_changes": changed,
        "attention": alpha is not None,
        "image_size": settings.size,
        "decoding": decoding_of(ckpt),
        "config": config,
        "source": os.fspath(checkpoint),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }
    (out / "model.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    manifest["check"] = _check(model, OnnxCaptioner(out), settings.size)
    (out / "model.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


@torch.no_grad()
def _check(model: Captioner, engine: Any, size: int, rows: int = 3, steps: int = 3) -> dict[str, Any]:
    """Run torch and onnxruntime side by side on random images (a batch size the export never saw)
    for a few greedy steps; raise when their log-probs or attention differ by more than TOLERANCE."""
    images = torch.randn(rows, 3, size, size, generator=torch.Generator().manual_seed(1))
    ours, theirs = model.init_state(model.encode(images)), engine.init_state(engine.encode(images))
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    tokens = torch.ones(rows, dtype=torch.long)  # <start>
    for _ in range(steps):
        lp, ours, alpha = model.step(tokens, ours)
        lp_ort, theirs, alpha_ort = engine.step(tokens, theirs)
        worst = max(worst, (lp - lp_ort).abs().max().item())
        if alpha is not None and alpha_ort is not None:
            worst = max(worst, (alpha - alpha_ort).abs().max().item())
        tokens = lp.argmax(1)
    if not worst <= TOLERANCE:
        raise RuntimeError(
            f"the ONNX graphs disagree with torch by {worst:.3g} (> {TOLERANCE}) on a check batch; "
            "the export is not usable"
        )
    return {"max_abs_diff": worst, "rows": rows, "steps": steps}
