"""Videos and cameras: sampling, debounced cues, WebVTT / JSON lines / annotated outputs, bad files.

The scene videos are H.264 files written with PyAV (``tests/media.py``); the colour captioner makes
each scene's caption known, so the cues can be checked exactly. A real (random-weights) checkpoint
checks that a frame is captioned as the same picture given as an image file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import av
import numpy as np
import pytest
from media import colour_predictor, write_video
from PIL import Image
from test_caption_cli import write_tiny_checkpoint

from captioning.cli import main
from captioning.inference import Predictor, caption_images
from captioning.video import (
    CaptionHold,
    Cue,
    Frame,
    VideoError,
    camera_frames,
    caption_video,
    format_vtt,
    video_frames,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCENES = [
    ("red", 2.0),
    ("blue", 1.0),
    ("white", 0.1),
    ("blue", 0.9),
    ("green", 2.0),
]  # a one-frame flash at 3 s


@pytest.fixture(scope="module")
def scene_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "scenes.mp4", SCENES)


def vtt_cues(text: str) -> list[tuple[str, str, str]]:
    blocks = text.strip().split("\n\n")
    assert blocks[0] == "WEBVTT"
    cues = []
    for block in blocks[1:]:
        number, times, caption = block.split("\n")
        start, end = times.split(" --> ")
        cues.append((start, end, caption))
        assert number == str(len(cues))
    return cues


def test_one_cue_per_scene_and_a_one_frame_flash_never_shows(scene_video: Path, tmp_path: Path) -> None:
    summary = caption_video(
        video_frames(scene_video, fps=10),
        colour_predictor(),
        vtt=tmp_path / "s.vtt",
        jsonl=tmp_path / "s.jsonl",
        annotated=tmp_path / "s.mp4",
        fps=10,
        stable_frames=2,
        batch_size=7,
    )
    assert vtt_cues((tmp_path / "s.vtt").read_text()) == [
        ("00:00:00.000", "00:00:02.000", "a red scene"),
        ("00:00:02.000", "00:00:04.000", "a blue scene"),
        ("00:00:04.000", "00:00:06.000", "a green scene"),
    ]
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert summary == {
        "frames": 60,
        "cues": 3,
        "duration": 6.0,
        "outputs": summary["outputs"],
        "timeline": summary["timeline"],
    }
    assert [(c["start"], c["end"], c["caption"]) for c in summary["timeline"]] == [
        (0.0, 2.0, "a red scene"),
        (2.0, 4.0, "a blue scene"),
        (4.0, 6.0, "a green scene"),
    ]
    assert [line["time"] for line in lines] == [round(i / 10, 3) for i in range(60)]
    flash = lines[30]
    assert (flash["time"], flash["caption"], flash["cue"]) == (3.0, "a white flash", 1)  # inside the blue cue
    assert {line["caption"] for line in lines} == {
        "a red scene",
        "a blue scene",
        "a white flash",
        "a green scene",
    }
    assert all(line["score"] < 0 and line["tokens"] == line["caption"].split() for line in lines)
    with av.open(str(tmp_path / "s.mp4")) as container:  # the annotated video: one frame per caption
        frames = list(container.decode(video=0))
    assert len(frames) == 60 and frames[0].width == 160
    assert not list(tmp_path.glob("*.part"))


def test_sampling_follows_the_fps_grid(scene_video: Path) -> None:
    times = [frame.time for frame in video_frames(scene_video, fps=2)]
    assert times == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5]
    assert {frame.image.size for frame in video_frames(scene_video, fps=0.5)} == {(160, 120)}
    with pytest.raises(ValueError, match="fps must be > 0"):
        next(video_frames(scene_video, fps=0))


def test_caption_hold_debounces() -> None:
    hold = CaptionHold(stable_frames=3)
    for t, text in enumerate(["a", "a", "b", "a", "a", "a", "b", "b", "b", "c", "c"]):
        hold.push(float(t), text, -1.0)
    # "a" twice is not enough; from 3 s it is; "c" twice never shows
    assert hold.finish(11.0) == [Cue(3.0, 6.0, "a", -1.0), Cue(6.0, 11.0, "b", -1.0)]
    hold = CaptionHold(stable_frames=1)
    for t, text in enumerate(["a", "b", "b"]):
        hold.push(float(t), text, -2.0)
    assert [(c.start, c.end, c.text) for c in hold.finish(3.0)] == [(0.0, 1.0, "a"), (1.0, 3.0, "b")]
    with pytest.raises(ValueError, match="stable_frames"):
        CaptionHold(0)
    assert (
        format_vtt([Cue(3723.5, 3725.25, "a --> b", 0.0)])
        == "WEBVTT\n\n1\n01:02:03.500 --> 01:02:05.250\na -> b\n"
    )


def test_a_frame_is_captioned_as_the_same_picture_given_as_an_image(
    scene_video: Path, tmp_path: Path
) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt", decoder_scale=4.0)
    frames = list(video_frames(scene_video, fps=1))
    paths = []
    for frame in frames:
        paths.append(str(tmp_path / f"{frame.time}.png"))
        frame.image.save(paths[-1])  # lossless: the same pixels
    caption_video(
        iter(frames), Predictor.from_checkpoint(checkpoint, "cpu"), jsonl=tmp_path / "v.jsonl", fps=1
    )
    lines = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [line["caption"] for line in lines] == [e["caption"] for e in caption_images(paths, checkpoint)]


def test_bad_videos_are_clear_errors_and_write_nothing(scene_video: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video " * 100)
    with pytest.raises(VideoError, match=r"garbage\.mp4: cannot open as a video: Invalid data"):
        list(video_frames(garbage))
    with pytest.raises(VideoError, match=r"nope\.mp4: cannot open as a video: No such file"):
        list(video_frames(tmp_path / "nope.mp4"))
    image = tmp_path / "still.png"
    Image.new("RGB", (8, 8)).save(image)
    # An MKV cut short still opens (its header declares 6 s); its frames end early.
    mkv = write_video(tmp_path / "whole.mkv", SCENES)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(mkv.read_bytes()[: mkv.stat().st_size // 2])
    with pytest.raises(
        VideoError, match=r"cut.mkv: truncated: frames end at .* of the 6.00 s the file declares"
    ):
        caption_video(
            video_frames(cut, fps=2),
            colour_predictor(),
            vtt=tmp_path / "cut.vtt",
            annotated=tmp_path / "cut.mp4",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.mkv", "garbage.mp4", "still.png", "whole.mkv"]


def test_cli_video_writes_beside_the_file_and_prints_the_cues(
    scene_video: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = write_tiny_checkpoint(tmp_path / "m.pt", decoder_scale=4.0)
    video = tmp_path / "clip.mp4"
    video.write_bytes(scene_video.read_bytes())
    assert (
        main(
            ["caption", "--video", str(video), "--model", checkpoint, "--fps", "2", "--annotate", "--heatmap"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.strip().endswith(
        f"12 frames, {len(vtt_cues((tmp_path / 'clip.vtt').read_text()))} cues over 6.0 s: "
        f"vtt {tmp_path}/clip.vtt, jsonl {tmp_path}/clip.jsonl, annotated {tmp_path}/clip.annotated.mp4"
    )
    assert len((tmp_path / "clip.jsonl").read_text().splitlines()) == 12
    garbage = tmp_path / "bad.mp4"
    garbage.write_bytes(b"x" * 100)
    assert main(["caption", "--video", str(garbage), "--model", checkpoint]) == 1
    assert "captioning caption: error: " in capsys.readouterr().err
    assert main(["caption", str(garbage), "--video", str(video), "--model", checkpoint]) == 1


class FakeCapture:
    """cv2.VideoCapture's interface over a list of BGR frames; raises KeyboardInterrupt at the end when
    asked (a user's Ctrl-C)."""

    opened: ClassVar[list[FakeCapture]] = []

    def __init__(self, frames: list[np.ndarray], interrupt: bool) -> None:
        self.frames, self.interrupt, self.released = list(frames), interrupt, False
        FakeCapture.opened.append(self)

    def isOpened(self) -> bool:
        return True

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.frames:
            return True, self.frames.pop(0)
        if self.interrupt:
            raise KeyboardInterrupt
        return False, None

    def release(self) -> None:
        self.released = True


def fake_camera(monkeypatch: pytest.MonkeyPatch, colours: list[str], interrupt: bool) -> None:
    import cv2
    from media import COLOURS

    bgr = [np.full((48, 64, 3), COLOURS[c][::-1], dtype=np.uint8) for c in colours]
    monkeypatch.setattr(cv2, "VideoCapture", lambda index: FakeCapture(bgr, interrupt))


def test_camera_frames_are_timed_and_sampled_by_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_camera(monkeypatch, ["red"] * 10, interrupt=False)
    ticks: Iterator[float] = iter([100.0 + 0.25 * i for i in range(10)])  # a frame every 0.25 s
    frames = list(camera_frames(0, fps=1, clock=lambda: next(ticks)))
    assert [f.time for f in frames] == [0.0, 1.0, 2.0]
    assert frames[0].image.getpixel((0, 0)) == (210, 20, 20)  # BGR -> RGB
    assert FakeCapture.opened[-1].released


def test_cli_camera_prints_captions_and_ctrl_c_writes_its_outputs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import captioning.inference

    fake_camera(monkeypatch, ["red"] * 3 + ["blue"] * 3, interrupt=True)
    monkeypatch.setattr(
        captioning.inference.Predictor, "load", classmethod(lambda cls, *a, **k: colour_predictor())
    )
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    # fps high enough that every fake frame (read back to back) is kept; the onnxruntime engine takes the
    # model as a folder (no resolving), and Predictor.load gives the colour captioner
    argv = ["caption", "--camera", "0", "--model", "unused", "--engine", "onnxruntime", "--fps", "1000000"]
    code = main([*argv, "--out-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("] ")[1] for line in out[:-1]] == ["a red scene", "a blue scene"]
    assert out[-1].startswith("6 frames, 2 cues")
    assert [c[2] for c in vtt_cues((tmp_path / "camera0.vtt").read_text())] == ["a red scene", "a blue scene"]
    assert FakeCapture.opened[-1].released
    monkeypatch.setattr("cv2.VideoCapture", lambda index: _Closed())
    assert main(["caption", "--camera", "3", "--model", "unused", "--engine", "onnxruntime"]) == 1
    assert "camera 3: cannot be opened" in capsys.readouterr().err


class _Closed:
    def isOpened(self) -> bool:
        return False

    def release(self) -> None:
        pass


def test_ctrl_c_stops_a_video_run_without_outputs_but_ends_a_camera_run_with_them(tmp_path: Path) -> None:
    def frames() -> Iterator[Frame]:
        yield Frame(0.0, Image.new("RGB", (40, 30), (210, 20, 20)))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        caption_video(frames(), colour_predictor(), vtt=tmp_path / "v.vtt", annotated=tmp_path / "v.mp4")
    assert list(tmp_path.iterdir()) == []
    summary = caption_video(
        frames(),
        colour_predictor(),
        vtt=tmp_path / "c.vtt",
        stable_frames=1,
        batch_size=1,
        interruptible=True,
    )  # a camera run captions each frame as it comes
    assert summary["cues"] == 1 and (tmp_path / "c.vtt").is_file()


def test_frames_from_any_iterable_and_empty_sources(tmp_path: Path) -> None:
    frames: list[Any] = [Frame(0.0, Image.new("RGB", (40, 30), (210, 20, 20)))]
    summary = caption_video(frames, colour_predictor(), vtt=tmp_path / "one.vtt", stable_frames=1)
    assert summary["cues"] == 1 and vtt_cues((tmp_path / "one.vtt").read_text())[0][2] == "a red scene"
    assert caption_video([], colour_predictor(), vtt=tmp_path / "none.vtt")["frames"] == 0
    assert (tmp_path / "none.vtt").read_text() == "WEBVTT\n"
