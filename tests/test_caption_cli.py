"""`captioning caption` and ``caption_images`` end to end on a random-weights checkpoint.

The checkpoint is a Show-Attend-Tell (ResNet-18, tiny decoder, no downloaded weights) saved with a
small vocabulary and the resolved demo config (64 px squash images, a 4x4 attention grid).
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("captioning.model.checkpoint")

from captioning.cli import main
from captioning.config import load_config
from captioning.data.images import prepare_image
from captioning.data.vocab import SPECIALS, Vocab
from captioning.inference import caption_images, image_settings, load_image
from captioning.model.checkpoint import save_checkpoint
from captioning.model.factory import build_captioner

WORDS = ("a", "red", "blue", "circle", "square", "on", "the", "left", "right", "small", "big")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_tiny_checkpoint(
    path: Path, *, decoder_scale: float = 1.0, step: int = 0, overrides: Sequence[str] = ()
) -> str:
    """A random demo-config captioner (small decoder) over WORDS, saved at ``path``.

    ``decoder_scale`` sharpens the decoder's weights: at 1 every caption repeats one word.
    ``overrides``: dotted settings recorded in the checkpoint's config (``--eval.beam_size=1``).
    """
    cfg = load_config("demo", overrides)
    model_cfg = dataclasses.replace(
        cfg.model, encoder_weights=None, emb_dim=16, attention_dim=16, decoder_dim=24, dropout=0.0
    )
    torch.manual_seed(0)
    vocab = Vocab(SPECIALS + WORDS, (0,) * len(SPECIALS) + (5,) * len(WORDS), min_word_freq=1)
    model = build_captioner(model_cfg, len(vocab))
    if decoder_scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.startswith("decoder."):
                    param.mul_(decoder_scale)
    config = dataclasses.replace(cfg, model=model_cfg).to_dict()
    save_checkpoint(str(path), model=model, vocab=vocab, config=config, step=step)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def write_image(path: Path, seed: int, size: tuple[int, int] = (80, 60)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_single_image_prints_caption_and_writes_png_overlay(
    checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = write_image(tmp_path / "photo.jpg", seed=1)
    overlays = tmp_path / "overlays"
    assert main(["caption", str(image), "--checkpoint", checkpoint, "--visualize", str(overlays)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{image}: ")
    caption = lines[0][len(f"{image}: ") :]
    assert all(word in WORDS for word in caption.split())

    png = overlays / "photo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as sheet:
        assert sheet.format == "PNG"
        sheet.load()
        # the image, then one 192 px panel per token (words + <end>; max_len words without <end> if
        # it never ended: the checkpoint's own eval.max_len by default), five per row, 4 px margins,
        # 22 px labels
        max_len = load_config("demo").eval.max_len
        num_words = len(caption.split())
        num_panels = 1 + (num_words + 1 if num_words < max_len else max_len)
        cols = min(5, num_panels)
        rows = -(-num_panels // 5)
        assert sheet.size == (cols * 196 + 4, rows * (192 + 22 + 4) + 4)


def test_folder_gives_json_lines_sorted_by_name_with_errors_per_image(
    checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "b.png", seed=2, size=(50, 90))
    write_image(folder / "a.JPG", seed=3)
    (folder / "c.jpg").write_bytes(b"not a jpeg at all")
    (folder / "notes.txt").write_text("not an image")
    code = main(["caption", str(folder), "--checkpoint", checkpoint, "--beam-size", "3", "--max-len", "8"])
    assert code == 1  # one image failed; the others are still captioned
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(e["path"]).name for e in entries] == ["a.JPG", "b.png", "c.jpg"]
    for entry in entries[:2]:
        assert set(entry) >= {"path", "caption", "tokens", "score"}
        assert entry["caption"] == " ".join(entry["tokens"])
        assert 1 <= entry["length"] <= 8 and entry["score"] <= 0
    assert "error" in entries[2] and "caption" not in entries[2]


def test_missing_file_is_an_error_entry(checkpoint: str, tmp_path: Path) -> None:
    good = write_image(tmp_path / "x.png", seed=4)
    results = caption_images([tmp_path / "nope.jpg", good], checkpoint, beam_size=2, device="cpu")
    assert results[0]["error"].startswith("cannot read")
    assert results[1]["path"] == str(good) and "caption" in results[1]


def test_batching_does_not_change_captions(checkpoint: str, tmp_path: Path) -> None:
    paths = [write_image(tmp_path / f"{i}.png", seed=10 + i, size=(40 + 7 * i, 64)) for i in range(5)]
    one = caption_images(paths, checkpoint, beam_size=3, batch_size=1, device="cpu")
    many = caption_images(paths, checkpoint, beam_size=3, batch_size=4, device="cpu")
    assert [r["tokens"] for r in one] == [r["tokens"] for r in many]
    np.testing.assert_allclose([r["score"] for r in one], [r["score"] for r in many], rtol=1e-4)


def test_preprocessing_is_the_shard_writers_then_the_loaders(checkpoint: str, tmp_path: Path) -> None:
    settings = image_settings(torch.load(checkpoint, weights_only=True)["config"])
    assert (settings.size, settings.resize_mode) == (64, "squash")
    data = (write_image(tmp_path / "wide.png", seed=5, size=(200, 100))).read_bytes()
    image = load_image(data, settings)
    stored = Image.open(io.BytesIO(prepare_image(data, settings).jpeg)).convert("RGB")
    assert image.size == (64, 64)
    assert np.array_equal(np.asarray(image), np.asarray(stored))


def test_overrides_and_empty_folders_are_refused(
    checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["caption", str(tmp_path), "--checkpoint", checkpoint]) == 1
    assert "no images found" in capsys.readouterr().err
    image = write_image(tmp_path / "y.png", seed=6)
    assert main(["caption", str(image), "--checkpoint", checkpoint, "--model.emb_dim=8"]) == 2


def test_decoding_defaults_to_the_models_recorded_eval_settings(tmp_path: Path) -> None:
    recorded = ["--eval.beam_size=1", "--eval.max_len=6"]
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt", decoder_scale=4.0, overrides=recorded)
    paths = [write_image(tmp_path / f"{i}.png", seed=20 + i) for i in range(4)]
    by_default = caption_images(paths, ckpt, device="cpu")
    assert [r["tokens"] for r in by_default] == [
        r["tokens"] for r in caption_images(paths, ckpt, beam_size=1, max_len=6, device="cpu")
    ]
    assert all(r["length"] <= 6 for r in by_default)
    wider = caption_images(paths, ckpt, beam_size=3, device="cpu")  # given: wins over the record
    assert [r["tokens"] for r in wider] != [r["tokens"] for r in by_default]
    assert all(r["length"] <= 6 for r in wider)  # what is not given stays the model's own


def test_model_sources_that_name_nothing_are_one_line_errors(
    checkpoint: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = write_image(tmp_path / "z.png", seed=7)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    had_store = Path("mlflow.db").exists()  # MLflow's default store when no URI is set: not created
    for source, message in (
        (str(tmp_path / "missing.pt"), "no such checkpoint"),
        ("ftp://host/model.pt", "unknown kind of model source"),
        ("models:/show-attend-tell@champion", "set MLFLOW_TRACKING_URI"),
    ):
        assert main(["caption", str(image), "--checkpoint", source]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"captioning caption: error: {source}") and message in err
        assert len(err.splitlines()) == 1
    assert Path("mlflow.db").exists() == had_store


def test_a_checkpoint_on_s3_captions_as_the_local_file(
    checkpoint: str, tmp_path: Path, s3_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from captioning import storage

    image = write_image(tmp_path / "s3.png", seed=8)
    remote = f"{s3_env}/runs/model.pt"
    storage.upload_file(checkpoint, remote)
    assert main(["caption", str(image), "--checkpoint", checkpoint]) == 0
    local = capsys.readouterr().out
    assert main(["caption", str(image), "--checkpoint", remote]) == 0
    assert capsys.readouterr().out == local
