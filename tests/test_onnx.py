"""ONNX export and the onnxruntime engine: graphs that pass onnx.checker, any batch size, and the
same beam search (the shared code) giving torch's captions. Exporting takes ~8-12 s per model (torch's
dynamo exporter), too slow for the fast tier's two minutes: the whole module is in the integration tier."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import onnx
import pytest
import torch
from test_caption_cli import write_image, write_tiny_checkpoint

from captioning.cli import main
from captioning.inference import Predictor, caption_images
from captioning.model.checkpoint import captioner_from_checkpoint, save_checkpoint
from captioning.model.onnx_engine import OnnxCaptioner, OnnxModelError
from captioning.model.onnx_export import export_onnx
from captioning.model.search import beam_search

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.integration]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    checkpoint = write_tiny_checkpoint(folder / "model.pt", decoder_scale=4.0)  # varied captions
    export_onnx(checkpoint, folder / "export")
    return checkpoint, folder / "export"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    return [str(write_image(folder / f"{i}.png", seed=i)) for i in range(10)]


def test_the_folder_holds_checked_graphs_vocab_and_settings(exported: tuple[str, Path]) -> None:
    checkpoint, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == [
        "encoder.onnx",
        "init.onnx",
        "model.json",
        "step.onnx",
        "vocab.json",
    ]
    for graph in ("encoder.onnx", "init.onnx", "step.onnx"):
        onnx.checker.check_model(str(folder / graph), full_check=True)
    manifest = json.loads((folder / "model.json").read_text())
    assert manifest["arch"] == "show_attend_tell" and manifest["attention"] is True
    assert manifest["state"] == ["h", "c", "features", "att_proj"] and manifest["step_changes"] == ["h", "c"]
    assert manifest["check"]["max_abs_diff"] < 1e-4
    _, _, ckpt = captioner_from_checkpoint(checkpoint)
    assert manifest["config"]["data"]["shards"] == ckpt["config"]["data"]["shards"]  # the preprocessing
    step = onnx.load(str(folder / "step.onnx"))
    assert [i.name for i in step.graph.input] == ["tokens", "h", "c", "features", "att_proj"]
    assert [o.name for o in step.graph.output] == ["logprobs", "next_h", "next_c", "alpha"]


def test_any_batch_size_and_the_step_passes_unchanged_state_through(exported: tuple[str, Path]) -> None:
    checkpoint, folder = exported
    model, _, _ = captioner_from_checkpoint(checkpoint)
    engine = OnnxCaptioner(folder, threads=1)
    with torch.no_grad():
        for batch in (1, 5):
            images = torch.randn(batch, 3, 64, 64)
            features = engine.encode(images)
            torch.testing.assert_close(features, model.encode(images), atol=1e-4, rtol=1e-4)
            state = engine.init_state(features)
            logprobs, stepped, alpha = engine.step(torch.ones(batch, dtype=torch.long), state)
            assert (
                logprobs.shape == (batch, model.vocab_size)
                and alpha is not None
                and alpha.shape == (batch, 16)
            )
            assert stepped["features"] is state["features"] and stepped["att_proj"] is state["att_proj"]
            assert stepped["h"] is not state["h"]


def test_onnxruntime_captions_equal_torchs_through_the_same_search(
    exported: tuple[str, Path], images: list[str]
) -> None:
    checkpoint, folder = exported
    torch_results = caption_images(images, checkpoint, batch_size=4, beam_size=3)
    onnx_results = caption_images(images, folder, batch_size=3, beam_size=3, engine="onnxruntime")
    assert len({r["caption"] for r in torch_results}) > 3  # the captions differ between images
    for ours, theirs in zip(torch_results, onnx_results, strict=True):
        assert ours["caption"] == theirs["caption"]
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-3)
    predictor = Predictor.from_onnx(folder)
    assert predictor.decoding == Predictor.from_checkpoint(checkpoint, "cpu").decoding
    features = predictor.model.encode(torch.randn(2, 3, 64, 64))
    hyps = beam_search(predictor.model, features, beam_size=4, max_len=8)  # every beam, as for torch
    assert hyps.hyp_tokens.shape == (2, 4, 8) and hyps.alphas is not None


def test_cli_export_then_caption_with_onnxruntime(
    exported: tuple[str, Path], images: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, folder = exported
    assert main(["caption", *images[:3], "--model", checkpoint]) == 0
    torch_lines = capsys.readouterr().out
    assert main(["caption", *images[:3], "--model", str(folder), "--engine", "onnxruntime"]) == 0
    assert capsys.readouterr().out == torch_lines
    assert main(["caption", images[0], "--model", str(tmp_path), "--engine", "onnxruntime"]) == 1
    assert "no model.json; not an ONNX export" in capsys.readouterr().err
    assert (
        main(["caption", images[0], "--model", str(folder), "--engine", "onnxruntime", "--device", "cuda"])
        == 1
    )
    assert "runs on the CPU" in capsys.readouterr().err
    (tmp_path / "model.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(OnnxModelError, match="this code reads 'captioning-onnx' version 1"):
        OnnxCaptioner(tmp_path)
    assert main(["export", str(tmp_path / "x"), "--model", str(tmp_path / "missing.pt")]) == 1
    assert "captioning export: error: " in (err := capsys.readouterr().err) and "no such checkpoint" in err


@pytest.mark.parametrize("arch", ["fc", "show_tell", "show_attend_tell"])
def test_every_architecture_exports_and_captions_as_torch(
    arch: str, images: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_tiny_checkpoint(tmp_path / "sat.pt", decoder_scale=4.0)
    model, vocab, ckpt = captioner_from_checkpoint(source)
    if arch != "show_attend_tell":  # the same encoder and vocabulary, another decoder
        from captioning.model.factory import build_captioner

        assert model.model_config is not None
        cfg = dataclasses.replace(model.model_config, arch=arch)  # type: ignore[arg-type]
        torch.manual_seed(3)
        model = build_captioner(cfg, len(vocab))
        with torch.no_grad():
            for param in model.decoder.parameters():
                param.mul_(4.0)
        model.eval()
    checkpoint = str(tmp_path / f"{arch}.pt")
    save_checkpoint(checkpoint, model=model, vocab=vocab, config=ckpt["config"], step=0)
    assert main(["export", "--format", "onnx", str(tmp_path / arch), "--model", checkpoint]) == 0
    assert f"exported {arch} to" in capsys.readouterr().out
    ours = caption_images(images, checkpoint, beam_size=3)
    theirs = caption_images(images, tmp_path / arch, beam_size=3, engine="onnxruntime")
    assert [r["caption"] for r in ours] == [r["caption"] for r in theirs]
    assert json.loads((tmp_path / arch / "model.json").read_text())["attention"] is (
        arch == "show_attend_tell"
    )
