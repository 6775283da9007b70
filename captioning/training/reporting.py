"""What a run shows its readers besides numbers: attention overlays, sample captions, metric plots.

    images, ids = fixed_images(val_loader, n=4)                       # the same images every epoch
    paths = write_attention_sheets(model, images, ids, vocab, out_dir, beam_size=3, max_len=20)
    write_samples(out_dir / "samples.html", result.captions, result.references, n=20)
    plot_history(out_dir / "history.png", state.history, monitor="val/CIDEr")

Everything writes local files (rank 0), which the caller hands to its tracker as artifacts;
``TrackerReporter`` is the trainer's hook (``StageReporter``) that does both at each evaluation.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from captioning import storage
from captioning.config import EvalConfig
from captioning.data.batch import IMAGENET_MEAN, IMAGENET_STD
from captioning.data.loader import CaptionLoader
from captioning.data.vocab import Vocab
from captioning.model.captioner import Captioner
from captioning.model.checkpoint import unwrap_model
from captioning.model.search import beam_search
from captioning.model.visualize import attention_overlay
from captioning.tracking import Tracker

if TYPE_CHECKING:
    from captioning.evaluation.evaluate import EvalResult
    from captioning.training.stage import StageSetup
    from captioning.training.state import TrainState

NUM_ATTENTION_IMAGES = 4  # validation images whose attention is drawn at every evaluation
NUM_SAMPLE_CAPTIONS = 25  # test images in the sample-captions table

_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
_STD = np.array(IMAGENET_STD, dtype=np.float32)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) ImageNet-normalised float -> the RGB image the model saw."""
    pixels = image.detach().float().cpu().numpy().transpose(1, 2, 0)  # (H, W, 3)
    pixels = (pixels * _STD + _MEAN) * 255.0
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def fixed_images(loader: CaptionLoader, n: int) -> tuple[torch.Tensor, list[int]]:
    """The first ``n`` images of this rank's share of an evaluation split (fixed order), and their ids."""
    images, ids = [], []
    for batch in loader:
        for row in range(len(batch)):
            if not bool(batch.is_pad[row]) and int(batch.image_ids[row]) not in ids:
                images.append(batch.images[row])
                ids.append(int(batch.image_ids[row]))
        if len(ids) >= n:
            break
    if not ids:
        raise ValueError("the evaluation split has no image on this rank")
    return torch.stack(images[:n]), ids[:n]


def write_attention_sheets(
    model: Captioner,
    images: torch.Tensor,
    image_ids: Sequence[int],
    vocab: Vocab,
    out_dir: str | Path,
    *,
    beam_size: int = 3,
    max_len: int = 20,
) -> list[Path]:
    """One PNG per image: the image, then each word of its beam-search caption above the colour heat map
    of its attention (``attention_overlay``: the rendering of ``captioning caption --visualize``).

    Models without attention (FC, Show-Tell) give no sheets.
    """
    inner = unwrap_model(model)
    assert isinstance(inner, Captioner)
    if not inner.decoder.has_attention:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            device = next(inner.parameters()).device
            features = inner.encode(images.to(device))  # (N, P, E)
            result = beam_search(inner, features, beam_size=beam_size, max_len=max_len)
    finally:
        inner.train(was_training)
    grid = inner.encoder.encoded_image_size
    paths = []
    for row, image_id in enumerate(image_ids):
        n = int(result.lengths[row])
        words = [vocab.word_of(int(t)) for t in result.tokens[row, :n]]
        if not words or result.alphas is None:
            continue
        sheet = attention_overlay(to_pil(images[row]), words, result.alphas[row, :n].cpu().numpy(), grid=grid)
        path = out / f"{image_id}.png"
        sheet.save(path)
        paths.append(path)
    return paths


def write_samples(
    path: str | Path, captions: Mapping[int, str], references: Mapping[int, Sequence[str]], n: int = 20
) -> tuple[Path, Path]:
    """An HTML table (and the same rows as JSON) of the first ``n`` images: caption vs references."""
    rows = [(i, captions[i], list(references.get(i, []))) for i in sorted(captions)[:n]]
    html_path = Path(path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(
        f"<tr><td>{i}</td><td><b>{html.escape(caption)}</b></td>"
        f"<td>{'<br>'.join(html.escape(x) for x in refs)}</td></tr>"
        for i, caption, refs in rows
    )
    html_path.write_text(
        "<!doctype html><meta charset='utf-8'><title>sample captions</title>"
        "<table border=1 cellpadding=4><tr><th>image</th><th>caption</th><th>references</th></tr>"
        f"{body}</table>\n",
        encoding="utf-8",
    )
    json_path = html_path.with_suffix(".json")
    records = [{"image_id": i, "caption": c, "references": r} for i, c, r in rows]
    json_path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    return html_path, json_path


def plot_history(
    path: str | Path, history: Sequence[Mapping[str, float]], metrics: Sequence[str]
) -> Path | None:
    """A PNG of per-epoch curves (one panel per metric present in ``history``); None when empty."""
    present = [m for m in metrics if any(m in h for h in history)]
    if not present:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in any process
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], present, strict=True):
        points = [(h["epoch"] + 1, h[metric]) for h in history if metric in h]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


class TrackerReporter:
    """Rank 0: after each validation, attention overlays of fixed images; after the test evaluation,
    a child run with the test scores, sample captions, curves, the captions file and checkpoints."""

    def __init__(
        self,
        tracker: Tracker,
        model: Captioner,
        vocab: Vocab,
        loaders: dict[str, CaptionLoader],
        ev: EvalConfig,
    ) -> None:
        self.tracker, self.model, self.vocab, self.loaders, self.ev = tracker, model, vocab, loaders, ev
        self.fixed: tuple[torch.Tensor, list[int]] | None = None
        self.scratch = tempfile.mkdtemp(prefix="captioning-report-")

    def validated(self, setup: StageSetup, state: TrainState, result: EvalResult) -> None:
        if self.fixed is None:
            self.fixed = fixed_images(self.loaders[self.ev.split], NUM_ATTENTION_IMAGES)
        images, ids = self.fixed
        folder = os.path.join(self.scratch, setup.name, "attention", f"epoch-{state.epoch + 1:03d}")
        paths = write_attention_sheets(
            self.model, images, ids, self.vocab, folder, beam_size=self.ev.beam_size, max_len=self.ev.max_len
        )
        if paths:
            self.tracker.log_artifact(folder, "attention")
        self._log_if_local(storage.join(setup.stage_dir, "val", f"epoch-{state.epoch + 1:03d}.json"), "val")

    def tested(self, setup: StageSetup, state: TrainState, result: EvalResult) -> None:
        folder = os.path.join(self.scratch, setup.name, "report")
        samples_html, samples_json = write_samples(
            os.path.join(folder, "samples.html"), result.captions, result.references, NUM_SAMPLE_CAPTIONS
        )
        curves = plot_history(
            os.path.join(folder, "curves.png"),
            state.history,
            ["train/loss", "train/reward", f"val/{self.ev.monitor}", "val/BLEU-4"],
        )
        evaluation = self.tracker.child(f"{setup.name}-test")
        evaluation.set_tags({"stage": setup.name, "split": self.ev.test_split, "kind": "evaluation"})
        evaluation.log_metrics(dict(result.scores), step=state.step)
        for path in (samples_html, samples_json):
            evaluation.log_artifact(str(path))
        self._log_if_local(storage.join(setup.stage_dir, "test-captions.json"), None, evaluation)
        evaluation.close()
        if curves is not None:
            self.tracker.log_artifact(str(curves), "plots")
        for name in ("best.pt", "last.pt"):
            self._log_if_local(storage.join(setup.stage_dir, name), "checkpoints")

    def _log_if_local(self, uri: str, artifact_path: str | None, tracker: Tracker | None = None) -> None:
        """Local files become artifacts; s3:// ones are already durable and are named in the result."""
        if not storage.is_s3(uri) and os.path.exists(uri):
            (tracker or self.tracker).log_artifact(uri, artifact_path)
