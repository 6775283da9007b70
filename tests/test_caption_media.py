"""Batch captioning of folders and s3:// prefixes: ``captioning.media`` (fast tier, the colour
captioner) and the ``caption-media`` flow on a real Prefect server, over a folder and over a prefix of
the rclone S3 server, with a real checkpoint (integration tier)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from media import COLOURS, colour_predictor, write_video
from PIL import Image
from test_caption_cli import write_tiny_checkpoint

from captioning import storage
from captioning.inference import caption_images
from captioning.media import MediaBatch, batch_uri, caption_batch, list_media, plan_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_folder(root: Path) -> dict[str, Path]:
    """Three images, two videos (one in a subfolder), a corrupt image, a truncated video, a text file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "clips").mkdir(exist_ok=True)
    files = {}
    for n, colour in enumerate(("red", "green", "blue")):
        files[colour] = root / f"{n}-{colour}.jpg"
        Image.new("RGB", (48, 40), COLOURS[colour]).save(files[colour])
    files["video"] = write_video(root / "clips" / "scenes.mp4", [("red", 1.0), ("blue", 1.0)], fps=4)
    files["video2"] = write_video(root / "zz.mkv", [("green", 1.0)], fps=4)
    whole = write_video(root / "cut.mkv", [("green", 2.0), ("red", 2.0)], fps=4)
    whole.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (root / "broken.png").write_bytes(b"not an image at all " * 10)
    (root / "notes.txt").write_text("not a medium")
    return files


def lines_of(uri: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in storage.read_text(uri).splitlines()]


def test_a_folder_is_captioned_in_batches_with_bad_files_counted_and_a_rerun_does_nothing(
    tmp_path: Path,
) -> None:
    source = str(tmp_path / "in")
    make_folder(Path(source))
    files, others = list_media(source)
    assert [Path(f).name for f in files] == [
        "0-red.jpg",
        "1-green.jpg",
        "2-blue.jpg",
        "broken.png",
        "scenes.mp4",
        "cut.mkv",
        "zz.mkv",
    ]  # sorted by full path: clips/ sorts among the files
    assert [Path(f).name for f in others] == ["notes.txt"]
    batches = plan_batches(files, 3)
    assert [len(b.files) for b in batches] == [3, 3, 1] and len({b.name for b in batches}) == 3
    predictor = colour_predictor()
    results = [caption_batch(b, predictor, source=source, output=source, fps=2) for b in batches]
    assert sum(r["files"] for r in results) == 7 and sum(r["captioned"] for r in results) == 5
    errors: dict[str, int] = {}
    for r in results:
        for reason, n in r["errors"].items():
            errors[reason] = errors.get(reason, 0) + n
    assert errors == {"corrupt": 1, "truncated": 1}
    lines = {Path(line["path"]).name: line for b in batches for line in lines_of(batch_uri(source, b))}
    assert lines["0-red.jpg"]["caption"] == "a red scene" and lines["2-blue.jpg"]["kind"] == "image"
    assert "cannot decode" in lines["broken.png"]["error"] and lines["broken.png"]["reason"] == "corrupt"
    assert "truncated" in lines["cut.mkv"]["error"]
    video = lines["scenes.mp4"]
    assert video["vtt"] == str(Path(source) / "clips" / "scenes.vtt")  # beside the video
    assert [c["caption"] for c in video["cues"]] == ["a red scene", "a blue scene"]
    assert Path(video["vtt"]).read_text().startswith("WEBVTT")
    assert not (Path(source) / "cut.vtt").exists()
    # The results are not media for the next listing; a re-run finds every batch done.
    assert list_media(source)[0] == files
    stamps = {p: p.stat().st_mtime_ns for p in Path(source).rglob("*")}
    again = [caption_batch(b, predictor, source=source, output=source, fps=2) for b in batches]
    assert all(r["done_before"] for r in again)
    assert [{**r, "done_before": False} for r in again] == results
    assert {p: p.stat().st_mtime_ns for p in Path(source).rglob("*")} == stamps
    # A changed listing makes new batch names: old results are never taken for new files.
    assert MediaBatch(0, (*batches[0].files, "x.jpg")).name != batches[0].name
    with pytest.raises(FileNotFoundError, match="no such folder"):
        list_media(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no files there"):
        list_media(str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", decoder_scale=4.0)


def run_flow(**params: Any) -> dict[str, Any]:
    from flows.caption_media import caption_media

    state = caption_media(return_state=True, **params)
    assert state.is_completed(), state.message
    return state.result()


def test_the_flow_over_a_folder_writes_every_result_and_a_rerun_does_no_work(
    prefect_server: None, checkpoint: str, tmp_path: Path
) -> None:
    source, output = tmp_path / "in", tmp_path / "out"
    make_folder(source)
    summary = run_flow(source=str(source), model=checkpoint, output=str(output), batch_size=3, fps=2)
    assert (summary["files"], summary["ignored"], summary["batches"], summary["captioned"]) == (7, 1, 3, 5)
    assert (summary["images"], summary["videos"], summary["skipped"]) == (
        3,
        2,
        {"corrupt": 1, "truncated": 1},
    )
    written = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())
    assert len([w for w in written if w.startswith("captions/")]) == 3
    assert {"clips/scenes.vtt", "zz.vtt"} <= set(written)
    lines = [line for p in sorted((output / "captions").iterdir()) for line in lines_of(str(p))]
    images = [line for line in lines if line["kind"] == "image" and "error" not in line]
    expected = caption_images([line["path"] for line in images], checkpoint)
    assert [line["caption"] for line in images] == [e["caption"] for e in expected]  # as `captioning caption`
    stamps = {p: p.stat().st_mtime_ns for p in output.rglob("*")}
    again = run_flow(source=str(source), model=checkpoint, output=str(output), batch_size=3, fps=2)
    assert again["batches_done_before"] == 3 and again["captioned"] == 5
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*")} == stamps


def test_the_flow_over_an_s3_prefix_with_results_beside_the_inputs(
    prefect_server: None, s3_env: str, checkpoint: str, tmp_path: Path
) -> None:
    local = tmp_path / "in"
    make_folder(local)
    prefix = f"{s3_env}/holiday"
    for path in local.rglob("*"):
        if path.is_file():
            storage.upload_file(path, storage.join(prefix, str(path.relative_to(local))))
    summary = run_flow(source=prefix, model=checkpoint, batch_size=4)
    assert (summary["files"], summary["captioned"], summary["skipped"]) == (
        7,
        5,
        {"corrupt": 1, "truncated": 1},
    )
    listed = storage.list_files(prefix)
    assert len([u for u in listed if "/captions/" in u]) == 2
    assert f"{prefix}/clips/scenes.vtt" in listed and f"{prefix}/zz.vtt" in listed
    lines = [line for u in listed if u.endswith(".jsonl") for line in lines_of(u)]
    assert sorted(line["path"] for line in lines) == sorted(
        u for u in listed if "/captions/" not in u and not u.endswith((".vtt", ".txt"))
    )
    cut = next(line for line in lines if line["path"].endswith("cut.mkv"))
    assert cut["error"].startswith(f"{prefix}/cut.mkv: truncated")  # the URI, not the download's path
    again = run_flow(source=prefix, model=checkpoint, batch_size=4)
    assert again["batches_done_before"] == 2 and storage.list_files(prefix) == listed
