"""`python -m flows.follow`: a flow run's log lines as they come, against a fake API (the pieces) and
a real Prefect server (a flow with a subflow and a task, followed while it runs)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flows import follow
from flows.follow import Follower, LogLine, RunState, format_line, parse_params

T0 = datetime(2026, 1, 5, 12, 0, 0, tzinfo=UTC)
PARENT, CHILD = "run-parent", "run-child"


def line(n: int, second: float, message: str, run: str = PARENT, task: str | None = None) -> LogLine:
    return LogLine(f"log-{n}", T0 + timedelta(seconds=second), 20, message, run, task)


class FakeRuns:
    """The API as the follower sees it, one poll at a time: ``states[i]`` is the run's state at poll i
    (the last one repeats), ``arrivals[i]`` the lines that reach the API just before poll i."""

    def __init__(
        self, states: Sequence[str], arrivals: dict[int, list[LogLine]], child_from: int | None = None
    ) -> None:
        self.states, self.arrivals, self.child_from = list(states), arrivals, child_from
        self.polls = -1
        self.stored: list[LogLine] = []
        self.queries: list[tuple[datetime | None, int]] = []

    def _run(self, run_id: str, label: str, state: str) -> RunState:
        final = state in {"Completed", "Failed", "Crashed", "Cancelled"}
        return RunState(run_id, label, state, final, state == "Completed", T0 + timedelta(seconds=self.polls))

    def flow_run(self, flow_run_id: str) -> RunState:
        self.polls += 1
        self.stored += self.arrivals.get(self.polls, [])
        return self._run(flow_run_id, "train-sat", self.states[min(self.polls, len(self.states) - 1)])

    def subflows(self, parent_ids: Sequence[str]) -> list[RunState]:
        if self.child_from is None or self.polls < self.child_from or PARENT not in parent_ids:
            return []
        return [self._run(CHILD, "prepare-data", "Completed" if self.polls > self.child_from else "Running")]

    def logs(self, flow_run_ids: Sequence[str], after: datetime | None, offset: int) -> list[LogLine]:
        self.queries.append((after, offset))
        found = sorted(
            (
                x
                for x in self.stored
                if x.flow_run_id in flow_run_ids and (after is None or x.timestamp >= after)
            ),
            key=lambda x: x.timestamp,
        )
        return found[offset : offset + follow.PAGE]

    def task_name(self, task_run_id: str) -> str:
        return {"task-xe": "train-xe"}[task_run_id]


def run_follower(source: FakeRuns, **kwargs: Any) -> tuple[RunState, list[str]]:
    written: list[str] = []
    now = [0.0]

    def sleep(seconds: float) -> None:  # the clock moves with the polls only
        now[0] += seconds

    ended = follow.follow(source, PARENT, write=written.append, sleep=sleep, clock=lambda: now[0], **kwargs)
    return ended, written


def messages(written: list[str]) -> list[str]:
    """The log lines' messages (the text after the time and the label), state lines left out."""
    return [w.split(None, 2)[2] for w in written if "->" not in w.split(None, 2)[2][:3]]


def test_lines_come_once_in_order_with_subflows_tasks_and_late_arrivals() -> None:
    source = FakeRuns(
        ["Pending", "Running", "Running", "Running", "Completed"],
        {
            1: [line(1, 1, "Beginning flow run"), line(2, 2, "stage xe starts", task="task-xe")],
            2: [line(3, 5, "stage xe epoch 1/2: loss 2.5; val CIDEr 0.1", task="task-xe")],
            # Batched from another process: earlier than the last line seen, inside the look-back window.
            3: [
                line(4, 3, "shards: up to date", run=CHILD),
                line(5, 9, "stage xe epoch 2/2", task="task-xe"),
            ],
            5: [line(6, 12, "Finished in state Completed()")],  # after the final state: still shown
        },
        child_from=2,
    )
    ended, written = run_follower(source)
    assert ended.state == "Completed" and ended.completed
    assert messages(written) == [
        "Beginning flow run",
        "stage xe starts",
        "stage xe epoch 1/2: loss 2.5; val CIDEr 0.1",
        "shards: up to date",
        "stage xe epoch 2/2",
        "Finished in state Completed()",
    ]
    labels = {w.split(None, 2)[2]: w.split()[1] for w in written}
    assert labels["stage xe starts"] == "train-xe" and labels["shards: up to date"] == "prepare-data"
    assert labels["Beginning flow run"] == "train-sat"
    states = [w.split(None, 1)[1].split() for w in written if " -> " in w]
    assert states == [
        ["train-sat", "->", "Pending"],
        ["train-sat", "->", "Running"],
        ["prepare-data", "->", "Running"],
        ["prepare-data", "->", "Completed"],
        ["train-sat", "->", "Completed"],
    ]
    # Asked again from a little before the newest line seen, never from the start once lines came.
    assert source.queries[0] == (None, 0)
    assert source.queries[-1][0] == T0 + timedelta(seconds=12) - follow.LOOKBACK


def test_the_last_lines_are_awaited_after_the_run_ends() -> None:
    source = FakeRuns(["Running", "Failed"], {0: [line(1, 1, "a")], 2: [line(2, 2, "Traceback: boom")]})
    ended, written = run_follower(source)
    assert ended.state == "Failed" and not ended.completed
    assert messages(written) == ["a", "Traceback: boom"]
    assert source.polls == 2 + follow.SETTLE_POLLS  # quiet polls after the last line, then it stops


def test_pages_are_read_to_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow, "PAGE", 3)
    burst = [line(i, 1 + i / 10, f"m{i}") for i in range(8)]  # more than a page in one poll
    source = FakeRuns(["Running", "Completed"], {0: burst})
    _, written = run_follower(source)
    assert messages(written) == [f"m{i}" for i in range(8)]
    assert [offset for _, offset in source.queries[:3]] == [0, 3, 6]


def test_a_run_no_worker_takes_gets_one_hint() -> None:
    now = [0.0]
    source = FakeRuns(["Scheduled"] * 4 + ["Cancelled"], {})
    written: list[str] = []
    follower = Follower(source, PARENT, written.append, clock=lambda: now[0])
    while follower.poll() is None:
        now[0] += 40.0
    hints = [w for w in written if "is a worker polling its work pool" in w]
    assert len(hints) == 1 and "still Scheduled after 60 s" in hints[0]


def test_format_line_names_warnings_and_indents_continuations() -> None:
    log = LogLine("x", T0, 40, "stage failed\nTraceback (most recent call last):\n  boom", PARENT, None)
    first, second, third = format_line(log, "train-xe").split("\n")
    assert first.endswith("train-xe       ERROR stage failed")
    assert second.strip() == "Traceback (most recent call last):" and third.strip() == "boom"
    assert len(second) - len(second.lstrip()) == len(first) - len("ERROR stage failed")
    assert "WARNING" not in format_line(line(1, 0, "fine"), "train-sat")
    torchrun = line(2, 0, "2026-12-06 13:56:12,180 [rank 0] captioning.training.trainer: stage xe starts")
    assert format_line(torchrun, "train-xe").endswith(
        "train-xe       [rank 0] captioning.training.trainer: stage xe starts"
    )


def test_parameters_as_prefect_deployment_run_takes_them() -> None:
    params = parse_params(
        ['overrides=["train.xe.epochs=1"]', "output=runs/x", "prepare=false"], '{"recipe": "demo"}'
    )
    assert params == {
        "recipe": "demo",
        "overrides": ["train.xe.epochs=1"],
        "output": "runs/x",
        "prepare": False,
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_params(["novalue"], None)
    with pytest.raises(ValueError, match="JSON object"):
        parse_params([], "[1]")


def test_command_line_refusals_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with pytest.raises(SystemExit) as info:
        follow.main([])
    assert info.value.code == 2 and "give a deployment to run or --id" in capsys.readouterr().err
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert follow.main(["--id", "0b7e5f6e-0000-4000-8000-000000000000"]) == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err


# --- against a real Prefect server ------------------------------------------------------------------


def test_follows_a_real_flow_run_with_its_subflow_and_task(prefect_server: None) -> None:
    from prefect import flow, get_run_logger, task
    from prefect.client.orchestration import get_client

    started = threading.Event()
    release = threading.Event()

    @task(name="train-stage", task_run_name="train-xe")
    def stage() -> None:
        get_run_logger().info("stage xe epoch 1/1: loss 2.5000; val CIDEr 0.1000")

    @flow(name="prepare-data")
    def prepare() -> None:
        get_run_logger().info("shards up to date")

    @flow(name="train-sat")
    def train() -> None:
        get_run_logger().info("waiting for the follower")
        started.set()
        release.wait(60)
        prepare()
        stage()

    runner = threading.Thread(target=train, daemon=True)
    runner.start()
    assert started.wait(60)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        run_id = str(next(r.id for r in runs if r.state is not None and r.state.is_running()))
        written: list[str] = []

        def write(text: str) -> None:
            written.append(text)
            if "waiting for the follower" in text:
                release.set()  # the rest happens while the follower polls

        ended = follow.follow(follow.PrefectRuns(client), run_id, write=write, poll_s=0.5)
    runner.join(60)
    assert ended.completed and ended.label == "train-sat"
    text = "\n".join(written)
    for expected in (
        "train-sat      waiting for the follower",
        "prepare-data   shards up to date",
        "train-xe       stage xe epoch 1/1: loss 2.5000; val CIDEr 0.1000",
        "train-sat      -> Completed",
    ):
        assert expected in text, text
