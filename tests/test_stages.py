"""captioning.stages without torchrun, MLflow or an orchestrator: the stage command, the one resume rule
as the launcher applies it, the sequence (each stage from the previous best), the best-stage choice."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from captioning import stages, storage
from captioning.config import ConfigError, load_config
from captioning.launch import LaunchError, LaunchResult, torchrun_command
from captioning.stages import StageError, best_stage, run_output, run_stages, stage_command
from captioning.training.stage import (
    RESULT_FILE,
    StageResult,
    read_stage_result,
    settings_fingerprint,
    stage_status,
)

DEMO_EPOCH_1 = settings_fingerprint(load_config("demo", ["--train.xe.epochs=1"]).to_dict())


def result(stage: str, scores: Mapping[str, float], output: str = "runs/demo/r1") -> StageResult:
    """A finished stage's result, as trained with the demo recipe and ``train.xe.epochs=1``."""
    return StageResult(
        stage=stage,
        checkpoint=f"{output}/{stage}/best.pt",
        last_checkpoint=f"{output}/{stage}/last.pt",
        monitor="CIDEr",
        best_score=None,
        best_epoch=None,
        epochs=1,
        steps=3,
        stopped_early=False,
        test_scores=dict(scores),
        history=[],
        duration_s=1.0,
        world_size=2,
        run_id=f"run-{stage}",
        settings=DEMO_EPOCH_1,
    )


# --- choosing and chaining ---------------------------------------------------------------------------


def test_best_stage() -> None:
    xe, ft, scst = (
        result("xe", {"CIDEr": 0.5}),
        result("finetune", {"CIDEr": 0.9}),
        result("scst", {"CIDEr": 0.7}),
    )
    assert best_stage([xe, ft, scst]) is ft
    assert best_stage([scst, xe]) is scst
    # A tie goes to the later stage (it trained longer for the same score).
    tied = result("scst", {"CIDEr": 0.9})
    assert best_stage([xe, ft, tied]) is tied
    assert best_stage([tied, ft]) is ft
    # Another metric; a stage without it never wins.
    assert best_stage([xe, ft], metric="BLEU-4") is ft
    assert best_stage([result("xe", {"BLEU-4": 0.1}), ft], metric="BLEU-4").stage == "xe"
    with pytest.raises(StageError, match="nothing to choose"):
        best_stage([])


def test_run_stages_starts_each_stage_from_the_previous_best() -> None:
    calls: list[tuple[str, str | None]] = []

    def launch(stage: str, init: str | None) -> StageResult:
        calls.append((stage, init))
        return result(stage, {"CIDEr": 1.0})

    got = run_stages(["xe", "finetune", "scst"], launch, init_from="given.pt")
    assert [r.stage for r in got] == ["xe", "finetune", "scst"]
    assert calls == [
        ("xe", "given.pt"),
        ("finetune", "runs/demo/r1/xe/best.pt"),
        ("scst", "runs/demo/r1/finetune/best.pt"),
    ]
    assert run_stages([], launch) == []


def test_final_metrics() -> None:
    xe, ft = result("xe", {"CIDEr": 0.5}), result("finetune", {"CIDEr": 0.9, "BLEU-4": 0.2})
    assert stages.final_metrics([xe, ft], ft) == {
        "xe/test_CIDEr": 0.5,
        "finetune/test_CIDEr": 0.9,
        "finetune/test_BLEU-4": 0.2,
        "test_CIDEr": 0.9,
        "test_BLEU-4": 0.2,
    }


def test_run_output() -> None:
    assert run_output(load_config("demo"), "r1") == "demo-data/runs/demo/r1"
    on_s3 = load_config("demo", ["--storage.run_dir=s3://bucket/runs/"])
    assert run_output(on_s3, "r1") == "s3://bucket/runs/demo/r1"


# --- the command ---------------------------------------------------------------------------------------


def args_after_module(cmd: Sequence[str]) -> list[str]:
    """The arguments of `-m captioning.train` in a torchrun command line."""
    i = list(cmd).index("captioning.train")
    assert cmd[i - 1] == "-m"
    return list(cmd[i + 1 :])


def test_stage_command() -> None:
    cmd = stage_command("demo", "xe", "runs/demo/r1", nproc_per_node=2)
    launcher = torchrun_command([], nproc_per_node=2)
    assert cmd[: len(launcher)] == launcher
    assert args_after_module(cmd) == [
        "--stage", "xe", "--config", "demo", "--output", "runs/demo/r1", "--tracker", "auto",
        "--no-config-warnings",
    ]  # fmt: skip
    full = stage_command(
        "demo",
        "finetune",
        "runs/demo/r1",
        ["train.finetune.epochs=1"],
        nproc_per_node=2,
        init_from="runs/demo/r1/xe/best.pt",
        parent_run_id="abc123",
        tracker="mlflow",
    )
    assert args_after_module(full) == [
        "--stage", "finetune", "--config", "demo", "--output", "runs/demo/r1", "--tracker", "mlflow",
        "--no-config-warnings", "--init-from", "runs/demo/r1/xe/best.pt", "--parent-run-id", "abc123", "--train.finetune.epochs=1",
    ]  # fmt: skip


def test_stage_command_multi_node() -> None:
    cmd = stage_command(
        "demo", "scst", "s3://bucket/runs/demo/r1/", nproc_per_node=4, nnodes=2, rdzv_endpoint="head:29400"
    )
    launcher = cmd[: cmd.index("captioning.train")]
    assert {"--nnodes=2", "--rdzv-endpoint=head:29400", "--rdzv-id=r1-scst"} <= set(launcher)
    assert not any(flag.startswith("--local-addr") for flag in launcher)


def test_stage_args_are_what_train_main_parses() -> None:
    from captioning.config import split_overrides
    from captioning.train import build_parser

    argv = stages.stage_args(
        "demo", "scst", "out", ["train.scst.epochs=2"], init_from="a.pt", parent_run_id="p"
    )
    own, overrides = split_overrides(argv)
    args = build_parser().parse_args(own)
    assert (args.stage, args.config, args.output, args.init_from, args.parent_run_id, args.tracker) == (
        "scst", "demo", "out", "a.pt", "p", "auto",
    )  # fmt: skip
    assert overrides == ["--train.scst.epochs=2"]


# --- the resume rule, as the launcher applies it (no torchrun: the launch is faked) -------------------


@pytest.fixture(params=["local", "s3_env"])  # a parameter named after a fixture counts as using it (conftest)
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A run folder's parent: a local path, or `s3://<fresh bucket>` on the test server."""
    if request.param == "local":
        return str(tmp_path / "runs")
    return str(request.getfixturevalue(request.param))


def test_stage_status_and_result_file(root: str) -> None:
    output = storage.join(root, "demo", "r1")
    assert stage_status(output, "xe") == "new" and read_stage_result(output, "xe") is None
    storage.write_bytes(storage.join(output, "xe", "last.pt"), b"checkpoint")
    assert stage_status(output, "xe") == "interrupted"
    recorded = result("xe", {"CIDEr": 0.5}, output)
    storage.write_json(storage.join(output, "xe", RESULT_FILE), recorded.to_json())
    assert stage_status(output, "xe") == "finished"
    assert read_stage_result(output, "xe") == recorded
    assert stage_status(output, "finetune") == "new"


def test_a_broken_result_file_is_a_clear_error(tmp_path: Path) -> None:
    output = str(tmp_path / "r1")
    storage.write_json(storage.join(output, "xe", RESULT_FILE), {"stage": "xe"})
    with pytest.raises(ValueError, match=r"result.json: stage result is missing fields"):
        read_stage_result(output, "xe")


def no_launch(*args: Any, **kwargs: Any) -> LaunchResult:
    raise AssertionError(f"launched {args}")


def test_a_finished_stage_is_not_launched_again(root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stages, "run_streaming", no_launch)
    output = storage.join(root, "demo", "r1")
    recorded = result("xe", {"CIDEr": 0.5}, output)
    storage.write_json(storage.join(output, "xe", RESULT_FILE), recorded.to_json())
    lines: list[str] = []
    got = stages.launch_stage("demo", "xe", output, ["train.xe.epochs=1"], on_line=lines.append)
    assert got == recorded
    assert lines == [f"stage xe already finished in {storage.join(output, 'xe')}; not launched again"]
    # The overrides are still checked first.
    with pytest.raises(ConfigError, match="no_such_key"):
        stages.launch_stage("demo", "xe", output, ["train.no_such_key=1"], on_line=lines.append)
    # Where it reports may change; what shapes it may not: never reused under other settings.
    assert (
        stages.launch_stage("demo", "xe", output, ["train.xe.epochs=1", "tracking.experiment=x"]) == recorded
    )
    with pytest.raises(StageError, match="trained with other settings"):
        stages.launch_stage("demo", "xe", output, ["train.xe.epochs=2"], on_line=lines.append)


class FakeLaunch:
    """Stands in for run_streaming: records the command and env, writes what training would, exits."""

    def __init__(self, output: str, returncode: int = 0) -> None:
        self.output, self.returncode = output, returncode
        self.calls: list[tuple[list[str], dict[str, str]]] = []

    def __call__(self, cmd: Sequence[str], *, env: Mapping[str, str], **_: Any) -> LaunchResult:
        self.calls.append((list(cmd), dict(env)))
        if self.returncode == 0:
            done = dataclasses.replace(
                result("xe", {"CIDEr": 0.7}, self.output), checkpoint="ckpt/xe/best.pt"
            )
            storage.write_json(storage.join(self.output, "xe", RESULT_FILE), done.to_json())
        return LaunchResult(returncode=self.returncode, duration_s=1.23456, tail=["last words"])


def test_launch_stage_launches_reads_the_result_and_then_skips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = str(tmp_path / "r1")
    fake = FakeLaunch(output)
    monkeypatch.setattr(stages, "run_streaming", fake)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    lines: list[str] = []
    got = stages.launch_stage(
        "demo", "xe", output, ["train.xe.epochs=1"], parent_run_id="parent", on_line=lines.append
    )
    assert got.stage == "xe" and got.checkpoint == "ckpt/xe/best.pt" and got.test_scores == {"CIDEr": 0.7}
    assert got.run_id == "run-xe"
    [(cmd, env)] = fake.calls
    args = args_after_module(cmd)
    assert args[args.index("--stage") + 1] == "xe" and args[-1] == "--train.xe.epochs=1"
    assert args[args.index("--parent-run-id") + 1] == "parent"
    assert "--nproc-per-node=2" in cmd  # the demo recipe's train.nproc_per_node
    assert env["OMP_NUM_THREADS"] == "1" and env["TQDM_DISABLE"] == "1"
    assert lines[0].startswith("torchrun --nproc-per-node=2") and "--stage xe" in lines[0]
    assert read_stage_result(output, "xe") == got
    # Run again with the same output: nothing launched, the same result.
    again = stages.launch_stage("demo", "xe", output, ["train.xe.epochs=1"], on_line=print)
    assert len(fake.calls) == 1 and again == got


def test_launch_stage_resumes_and_reports_a_failed_launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = str(tmp_path / "r1")
    storage.write_bytes(storage.join(output, "xe", "last.pt"), b"checkpoint")
    fake = FakeLaunch(output, returncode=3)
    monkeypatch.setattr(stages, "run_streaming", fake)
    lines: list[str] = []
    with pytest.raises(LaunchError, match="exit 3") as info:
        stages.launch_stage("demo", "xe", output, on_line=lines.append)
    assert info.value.returncode == 3 and info.value.tail == ["last words"]
    assert lines[0].startswith("resuming: torchrun")  # the stage's last.pt makes it resume
    assert read_stage_result(output, "xe") is None


def test_a_launch_that_leaves_no_result_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stages, "run_streaming", lambda *a, **k: LaunchResult(0, 0.1, []))
    with pytest.raises(StageError, match="left no result"):
        stages.launch_stage("demo", "xe", str(tmp_path / "r1"), on_line=print)


def test_check_new_output(tmp_path: Path) -> None:
    output = str(tmp_path / "r1")
    stages.check_new_output(output, ["xe", "scst"])  # nothing there yet
    storage.write_bytes(storage.join(output, "scst", "last.pt"), b"checkpoint")
    stages.check_new_output(output, ["xe"])  # other stages do not count
    with pytest.raises(StageError, match=r"already holds stages \['scst'\]: pass --resume"):
        stages.check_new_output(output, ["xe", "scst"])


def test_settings_added_since_a_stage_was_recorded_count_as_their_defaults() -> None:
    from captioning.training.stage import changed_settings

    current = load_config("demo").to_dict()
    recorded = load_config("demo").to_dict()
    del recorded["data"]["extra_shard_dirs"]  # a stage recorded before the setting existed
    assert changed_settings(recorded, current) == []
    retrain = load_config("demo", ["--data.retrain_on=new"]).to_dict()
    assert changed_settings(current, retrain) == []  # free: its effect is in data.extra_shard_dirs
    changed = load_config("demo", ["--data.extra_shard_dirs=/old/shards"]).to_dict()
    assert changed_settings(recorded, changed) == ["data.extra_shard_dirs: [] -> ['/old/shards']"]


def test_the_first_stage_starts_from_any_model_source_resolved_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from captioning.model_uri import RegistryError
    from captioning.tracking import TrackingUnavailable

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def never(*args: Any, **kwargs: Any) -> StageResult:
        raise AssertionError("launched")

    with pytest.raises(RegistryError, match="no such checkpoint"):
        stages.train_pipeline(
            "demo",
            output=str(tmp_path / "r"),
            init_from=str(tmp_path / "nope.pt"),
            tracker="none",
            launch=never,
        )
    with pytest.raises(TrackingUnavailable, match="MLFLOW_TRACKING_URI"):  # models:/ but no server named
        stages.train_pipeline(
            "demo", output=str(tmp_path / "r"), init_from="models:/m@champion", tracker="none", launch=never
        )
