"""Progress where the user looks: the one bar-or-lines decision, the plain lines, a stage's log lines,
and quiet logs (no bars, no MLflow emoji) wherever output goes to a log."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from captioning import progress
from captioning.config import GpuConfig
from captioning.progress import QUIET_ENV, Progress, format_duration, progress_mode, show_progress
from captioning.training.stage_log import batch_line, done_line, epoch_line, stage_eta, start_line

REPO = Path(__file__).resolve().parents[1]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_one_place_decides_bars_lines_or_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert progress_mode(True, Terminal()) == "bar"
    assert progress_mode(True, io.StringIO()) == "lines"  # a pipe, a log file, a CI job
    assert progress_mode(False, Terminal()) == "off"  # --no-progress
    monkeypatch.setenv("TQDM_DISABLE", "1")  # set for torchrun children and flow runs: never a bar
    assert progress_mode(True, Terminal()) == "lines"


def test_a_terminal_gets_a_tqdm_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    out = Terminal()
    with show_progress(4, "shards", unit="shard", stream=out) as bar:
        bar.update(4)
    assert "shards: 100%" in out.getvalue() and "4/4" in out.getvalue() and "\r" in out.getvalue()


@pytest.mark.parametrize(
    ("total", "expected"),
    [
        (130, ["60/130 shard (46%, 2 shard/s, ETA 35 s)", "120/130 shard (92%, 2 shard/s, ETA 5 s)",
               "130/130 shard (100%, 2 shard/s)"]),
        (120, ["60/120 shard (50%, 2 shard/s, ETA 30 s)", "120/120 shard (100%, 2 shard/s)"]),  # not twice
    ],
)  # fmt: skip
def test_plain_lines_come_every_so_often_and_at_the_end(total: int, expected: list[str]) -> None:
    now = [0.0]
    out = io.StringIO()
    with Progress(
        total, "shards", mode="lines", unit="shard", stream=out, every_s=30, clock=lambda: now[0]
    ) as counter:
        for _ in range(total):
            now[0] += 0.5  # 2 shards/s: a line at 30 s and 60 s, then the last one
            counter.update(1)
    assert out.getvalue().splitlines() == [f"shards: {line}" for line in expected]
    assert "\r" not in out.getvalue()


def test_a_short_job_writes_nothing_and_off_writes_nothing() -> None:
    out = io.StringIO()
    with Progress(10, "quick", mode="lines", stream=out, every_s=30) as counter:
        counter.update(10)
    with Progress(10, "off", mode="off", stream=out, every_s=0) as counter:
        counter.update(10)
    assert out.getvalue() == ""


def test_bytes_read_as_a_person_reads_them() -> None:
    now = [0.0]
    out = io.StringIO()
    gib = 1024**3
    counter = Progress(
        6 * gib, "val2014.zip", mode="lines", unit="B", unit_scale=True, initial=gib, stream=out,
        every_s=10, clock=lambda: now[0],
    )  # fmt: skip
    now[0] = 100.0
    counter.update(gib)  # resumed at 1 GiB: the rate counts this run's bytes only
    assert out.getvalue().strip() == "val2014.zip: 2.0 GiB/6.0 GiB (33%, 10.2 MiB/s, ETA 6 min 40 s)"
    unknown = Progress(None, "x", mode="lines", unit="B", unit_scale=True, stream=out, clock=lambda: 2.0)
    unknown.start = 0.0
    unknown.n = 3 * 1024**2
    assert unknown.line() == "x: 3.0 MiB (1.5 MiB/s)"


def test_downloads_and_captions_of_a_folder_report_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wired where the long CLI jobs run: with every update "long enough ago", lines on stderr."""
    from httpserver import FileServer
    from test_caption_cli import write_image, write_tiny_checkpoint

    from captioning.data.download import download_file
    from captioning.inference import caption_images

    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.bin").write_bytes(b"x" * 3000)
    with FileServer(tmp_path / "files") as server:
        download_file(
            f"{server.url}/a.bin", tmp_path / "a.bin", num_retries=1, timeout_s=10, chunk_bytes=1000
        )
    assert capsys.readouterr().err.splitlines()[-1].startswith("a.bin: 2.9 KiB/2.9 KiB (100%, ")
    paths = [str(write_image(tmp_path / f"{i}.png", seed=i)) for i in range(3)] + [str(tmp_path / "gone.png")]
    entries = caption_images(paths, write_tiny_checkpoint(tmp_path / "m.pt"), batch_size=2, progress=True)
    assert len(entries) == 4
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"captioning: {n}/4 image" for n in (2, 3, 4)]


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.4, "0 s"), (42, "42 s"), (247, "4 min 07 s"), (7500, "2 h 05 min"), (-3, "0 s")]
)
def test_durations(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_a_stage_logs_its_start_every_epoch_with_an_eta_and_its_end() -> None:
    texts: dict[str, Any] = {"captions_per_image": 5, "rates": "RATES", "switches": "SWITCHES"}
    assert start_line("xe", 1, 6, 38, 16, 2, **texts) == (
        "stage xe starts: up to 6 epochs of 38 steps, a step 16 images x 5 captions on each of 2 processes; "
        "RATES; SWITCHES"
    )
    assert start_line("xe", 4, 6, 38, 16, 2, **texts).startswith(
        "stage xe resumes at epoch 4: up to 6 epochs"
    )
    scores = {"BLEU-1": 0.7, "BLEU-4": 0.221, "METEOR": 0.201, "ROUGE-L": 0.47, "CIDEr": 0.412}
    means = {"train/loss": 2.817, "train/ce": 2.7952, "train/grad_norm": 1.0}
    line = epoch_line(
        "xe",
        3,
        6,
        means,
        scores,
        monitor="CIDEr",
        best=(0.412, 3),
        epoch_s=41,
        eta_s=stage_eta([40, 42], 3, 5),
    )
    assert line == (
        "stage xe epoch 3/6: loss 2.8170 ce 2.7952; val CIDEr 0.4120 BLEU-4 0.2210 METEOR 0.2010 "
        "ROUGE-L 0.4700 (best CIDEr 0.4120 at epoch 3); 41 s/epoch, stage ETA 2 min 08 s"
    )
    scst = epoch_line(
        "scst", 2, 6, {"train/loss": -0.01, "train/reward": 0.8}, scores, monitor="CIDEr", best=(0.5, 1),
        epoch_s=10, eta_s=0, decayed=True, stopped_after=3,
    )  # fmt: skip
    assert "loss -0.0100 reward 0.8000; val CIDEr" in scst
    assert scst.endswith("stage ETA 0 s; learning rates decayed; early stop: no gain in 3 epochs")
    assert batch_line("xe", 2, 300, 1000, 2.817, 120.44, 250) == (
        "stage xe epoch 2: batch 300/1000, loss 2.8170, 120.4 images/s, epoch ETA 4 min 10 s"
    )
    assert done_line("xe", 252, 6, "CIDEr", (0.512, 5), scores) == (
        "stage xe done in 4 min 12 s: 6 epochs, best val CIDEr 0.5120 at epoch 5; test CIDEr 0.4120 "
        "BLEU-4 0.2210 METEOR 0.2010 ROUGE-L 0.4700"
    )


def test_fit_stage_logs_one_line_per_epoch_with_scores_and_eta(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """fit_stage's lines, with the training and evaluation steps replaced by fakes (no data, no model)."""
    from captioning.training import trainer
    from captioning.training.dist import DistInfo
    from captioning.training.stage import XeSettings

    class FakeSchedule:
        def step_epoch(self, since: int) -> bool:
            return False

    class FakeOpt:
        schedule = FakeSchedule()
        optimizer: Any = None

    class FakeModel:
        class encoder:
            @staticmethod
            def set_fine_tuning(train: bool, block: int) -> None: ...

        def train(self) -> None: ...

    ciders = iter([0.2, 0.3, 0.25])

    class FakeEval:
        def __init__(self) -> None:
            self.scores = {"BLEU-4": 0.1, "CIDEr": next(ciders)}

    setup: Any = type(
        "Setup",
        (),
        {
            "name": "xe", "epochs": 3, "batch_size": 16, "seed": 0, "train_encoder": False,
            "fine_tune_from_block": 2, "objective": XeSettings.__new__(XeSettings), "early_stop_patience": 5,
            "log_every_steps": 1, "checkpoint_every_steps": 0, "checkpoint_every_s": 0.0,"stage_dir": "unused", "last_uri": "unused",
            "lr_decoder": 4e-4, "lr_encoder": 1e-4, "captions_per_image": 5, "lr_reference_captions": 40,
            "lr_scaling": "sqrt", "lr_warmup_epochs": 1.0, "gpu": GpuConfig(), "kind": "xe",
        },
    )()  # fmt: skip
    monkeypatch.setattr(trainer, "build_step", lambda *a: (FakeOpt(), lambda batch: {}))
    monkeypatch.setattr(trainer, "train_one_epoch", lambda *a, **k: {"train/loss": 2.5})
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: FakeEval())
    monkeypatch.setattr(trainer, "group_lrs", lambda optimizer: {})
    monkeypatch.setattr(trainer, "save_best", lambda *a: None)
    monkeypatch.setattr(trainer, "save_training_checkpoint", lambda *a: None)
    monkeypatch.setattr(trainer, "finish_stage", lambda *a: "done")
    monkeypatch.setattr(XeSettings, "scheduled_sampling", 0.0, raising=False)
    tracker = type("T", (), {"log_metrics": lambda self, metrics, step: None})()
    loaders: dict[str, Any] = {"train": [0] * 7, "val": [], "test": []}
    ev = type("Ev", (), {"split": "val", "test_split": "test", "monitor": "CIDEr"})()
    with caplog.at_level(logging.INFO, logger=trainer.__name__):
        assert trainer.fit_stage(setup, FakeModel(), None, loaders, DistInfo(), tracker, ev) == "done"  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == (
        "stage xe starts: up to 3 epochs of 7 steps, a step 16 images x 5 captions on 1 process; 80 captions "
        "per step; lr decoder 5.66e-04 = set x sqrt(80/40) = x1.41, warmup over 7 steps; "
        "channels_last off, fused_adam off, compile off, cudnn_benchmark off, ddp_bucket_view off"
    )
    epochs = lines[1:]
    assert [line.split(":")[0] for line in epochs] == [
        "stage xe epoch 1/3",
        "stage xe epoch 2/3",
        "stage xe epoch 3/3",
    ]
    assert "loss 2.5000; val CIDEr 0.3000 BLEU-4 0.1000 (best CIDEr 0.3000 at epoch 2)" in epochs[1]
    assert all("/epoch, stage ETA " in line for line in epochs)


def test_a_long_epoch_logs_batch_lines_between_its_epoch_lines(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from captioning.training import trainer
    from captioning.training.dist import DistInfo
    from captioning.training.state import TrainState

    class Loader(list[int]):
        def set_epoch(self, epoch: int) -> None: ...

    monkeypatch.setattr(trainer, "LINE_EVERY_S", 0.0)  # every logging window is "long enough ago"
    tracker = type("T", (), {"log_metrics": lambda self, metrics, step: None})()
    state = TrainState(stage="xe", epoch=1, batch_in_epoch=2)  # resumed: two batches replayed
    step = lambda batch: {"loss": 2.0, "grad_norm": 1.0, "images": 8.0}  # noqa: E731
    with caplog.at_level(logging.INFO, logger=trainer.__name__):
        trainer.train_one_epoch(step, Loader(range(8)), state, DistInfo(), tracker, log_every_steps=2)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(",")[0] for line in lines] == [
        "stage xe epoch 2: batch 4/8",
        "stage xe epoch 2: batch 6/8",
    ]
    assert all(
        ", loss 2.0000, " in line and "images/s, epoch ETA " in line for line in lines
    )  # none at the end


def test_quiet_logs_for_torchrun_children_the_stack_worker_and_every_deployment() -> None:
    assert QUIET_ENV["TQDM_DISABLE"] == "1"
    assert QUIET_ENV["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"  # no "🏃 View run ..." lines
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        assert deployment["work_pool"]["job_variables"]["env"] == QUIET_ENV, deployment["name"]
    assert progress.LINE_EVERY_S >= 10  # a few lines per long job in a log, never a flood


def test_automations_are_named_for_what_they_do() -> None:
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    names = {
        trigger["name"]: trigger["description"]
        for deployment in spec["deployments"]
        for trigger in deployment.get("triggers", [])
    }
    assert set(names) == {
        f"retrain {r} when new data lands" for r in ("demo", "coco", "flickr8k", "flickr30k")
    }
    assert all(description.startswith("captioning.data.landed on ") for description in names.values())
