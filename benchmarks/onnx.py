"""torch vs onnxruntime on the same checkpoint and images: the same captions, and images/s for each.

The checkpoint (--checkpoint; default: ``demo_model.demo_checkpoint``, the demo recipe's model with
random weights) is exported with ``captioning.model.onnx_export.export_onnx`` (timed apart). Both
engines then caption the same --num-images synthetic scene images (``demo_model.scene_images``),
preprocessed once outside the timing, --chunk images per call: encode, then the shared batched beam
search (``captioning.model.search.beam_search``) driven by the torch ``Captioner`` or the
``OnnxCaptioner``. Each repetition times all images on both engines, one after the other, and the
engine that goes first alternates between repetitions so that other load on the machine hits both
alike; the images/s are medians over --repeats.

Every caption is compared word for word. A caption that differs is printed with both engines' scores
and torch's margin between its best and second-best hypothesis: float32 differences between the two
runtimes (~1e-6 in log-prob) can only change a caption where two hypotheses are that close to a tie.
Last line: ``RESULT onnx_identical=F onnx_vs_torch=R`` (F: the share of identical captions; R: onnxruntime
images/s over torch images/s). Run::

    .venv/bin/python benchmarks/onnx.py                        # 256 images, beam 3, 2 threads each
    .venv/bin/python benchmarks/onnx.py --checkpoint runs/demo/NAME/scst/best.pt --beam-size 5
"""

from __future__ import annotations

import sys

# This file is onnx.py: its folder, first on sys.path when run as a script, would shadow the onnx
# package the exporter imports. The folder goes last (demo_model is still found there).
sys.path.append(sys.path.pop(0))

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from demo_model import demo_checkpoint, scene_images

from captioning.data.batch import normalize_images, stack_planes
from captioning.inference import Predictor
from captioning.model.onnx_export import export_onnx
from captioning.model.search import BeamResult, beam_search


def caption_all(
    predictor: Predictor, images: list[Any], chunk: int, decoding: dict[str, Any]
) -> tuple[list[BeamResult], float]:
    """One engine over every chunk: (results per chunk, seconds)."""
    results, seconds = [], 0.0
    for start in range(0, len(images), chunk):
        batch = normalize_images(stack_planes(images[start : start + chunk]))
        begin = time.perf_counter()
        with torch.no_grad():
            result = beam_search(predictor.model, predictor.model.encode(batch), **decoding)
        seconds += time.perf_counter() - begin
        results.append(result)
    return results, seconds


def rows(results: list[BeamResult]) -> list[tuple[list[int], float, float]]:
    """(tokens, score, margin to the second hypothesis) per image."""
    out = []
    for result in results:
        for b in range(result.tokens.size(0)):
            n = int(result.lengths[b])
            scores = result.hyp_scores[b]
            margin = (
                float(scores[0] - scores[1])
                if scores.numel() > 1 and torch.isfinite(scores[1])
                else float("inf")
            )
            out.append((result.tokens[b, :n].tolist(), float(result.scores[b]), margin))
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a checkpoint file (default: the demo model, random weights)")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=16, help="images per call")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=None, help="default: the model's eval.max_len")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of torch and of onnxruntime")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        data, words = scene_images(args.num_images, seed=1)
        checkpoint = args.checkpoint or demo_checkpoint(Path(tmp) / "demo.pt", words)
        begin = time.perf_counter()
        manifest = export_onnx(checkpoint, Path(tmp) / "onnx")
        export_s = time.perf_counter() - begin
        torch_predictor = Predictor.from_checkpoint(checkpoint, "cpu")
        onnx_predictor = Predictor.from_onnx(Path(tmp) / "onnx", threads=args.threads)
        images = [torch_predictor.load_image(item) for item in data]
        decoding = torch_predictor.decoding | {"beam_size": args.beam_size}
        if args.max_len is not None:
            decoding["max_len"] = args.max_len
        print(
            f"model: {manifest['arch']} from {args.checkpoint or 'the demo recipe (random weights)'}; "
            f"export {export_s:.1f} s (check: max |diff| {manifest['check']['max_abs_diff']:.1e}); "
            f"{len(images)} images, {decoding}, chunk {args.chunk}, {args.threads} threads; "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        # Warm both (allocators, ORT's first-run planning), then alternate per repetition.
        caption_all(torch_predictor, images[: args.chunk], args.chunk, decoding)
        caption_all(onnx_predictor, images[: args.chunk], args.chunk, decoding)
        speeds: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        outputs: dict[str, Any] = {}
        for rep in range(args.repeats):
            order = [("torch", torch_predictor), ("onnxruntime", onnx_predictor)]
            for name, predictor in order if rep % 2 == 0 else order[::-1]:
                results, seconds = caption_all(predictor, images, args.chunk, decoding)
                speeds[name].append(len(images) / seconds)
                outputs[name] = rows(results)
            print(
                f"  repetition {rep + 1}: torch {speeds['torch'][-1]:.1f} images/s, "
                f"onnxruntime {speeds['onnxruntime'][-1]:.1f} images/s",
                flush=True,
            )

    vocab = torch_predictor.vocab
    differ = [
        i
        for i, (a, b) in enumerate(zip(outputs["torch"], outputs["onnxruntime"], strict=True))
        if a[0] != b[0]
    ]
    for i in differ:
        (tt, ts, margin), (ot, os_, _) = outputs["torch"][i], outputs["onnxruntime"][i]
        print(
            f"  image {i}: torch {' '.join(vocab.decode(tt))!r} ({ts:.6f}), onnxruntime "
            f"{' '.join(vocab.decode(ot))!r} ({os_:.6f}); torch's margin to its 2nd hypothesis {margin:.2e}"
        )
    identical = 1 - len(differ) / len(images)
    torch_speed, onnx_speed = statistics.median(speeds["torch"]), statistics.median(speeds["onnxruntime"])
    spread = {k: f"{min(v):.1f}-{max(v):.1f}" for k, v in speeds.items()}
    print(
        f"identical captions: {len(images) - len(differ)}/{len(images)}; images/s (median of {args.repeats}): "
        f"torch {torch_speed:.1f} [{spread['torch']}], onnxruntime {onnx_speed:.1f} [{spread['onnxruntime']}]; "
        f"load {os.getloadavg()[0]:.1f}"
    )
    ratio = onnx_speed / torch_speed
    print(f"RESULT onnx_identical={identical:.4f} onnx_vs_torch={ratio:.2f}")
    return {"onnx_identical": identical, "onnx_vs_torch": ratio}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
