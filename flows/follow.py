"""Follow a flow run: print its log lines (and its subflows') as they come, until it ends.

    python -m flows.follow train-sat/demo -p 'overrides=["train.xe.epochs=1"]'   # start a run, follow it
    python -m flows.follow --id FLOW_RUN_ID     # attach to a run started elsewhere (or read a finished one)

``prefect flow-run logs`` has no follow mode, and ``prefect deployment run --watch`` shows log lines
only where the server streams them (the local stack's does; a server's default does not). This asks
the API for new lines every ``--poll-s`` seconds, so it works against any server: every stage start,
each epoch's loss, validation scores and ETA, the test scores. Flow-run state changes are lines too.
The exit code is 0 when the run completes and 1 when it fails, crashes or is cancelled; Ctrl-C stops
following (the run goes on) and says how to attach again or cancel it. ``-p KEY=VALUE`` (a JSON value,
else a string) and ``--params JSON`` are ``prefect deployment run``'s.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

STAMP = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[,.]\d+)? ")
LOOKBACK = timedelta(seconds=10)  # lines reach the API in batches: ask again this far back (seen ones skip)
PAGE = 200
SETTLE_POLLS = 2  # after the run ends: polls without a new line before stopping (the last batch lands)
# ... and at least this long: a flow run's last lines reach the API one batch interval (2 s by default,
# PREFECT_LOGGING_TO_API_BATCH_INTERVAL) after they were logged, which can be after its final state.
SETTLE_S = 3.0
HOLD_POLLS = 3  # polls a state change waits for the log lines from before it
WAITING = ("Scheduled", "Late", "AwaitingRetry")  # states in which no worker has taken the run yet
WAITING_HINT_S = 60.0


@dataclass(frozen=True)
class RunState:
    """A flow run as the follower shows it: ``label`` is its flow's name, ``state`` e.g. Running."""

    id: str
    label: str
    state: str
    final: bool
    completed: bool = False
    at: datetime | None = None  # when it entered the state (None: now)


@dataclass(frozen=True)
class LogLine:
    id: str
    timestamp: datetime
    level: int
    message: str
    flow_run_id: str | None
    task_run_id: str | None


class RunSource(Protocol):
    """What the follower reads from the API (``PrefectRuns``; a fake in the tests)."""

    def flow_run(self, flow_run_id: str) -> RunState: ...

    def subflows(self, parent_ids: Sequence[str]) -> list[RunState]: ...

    def logs(self, flow_run_ids: Sequence[str], after: datetime | None, offset: int) -> list[LogLine]: ...

    def task_name(self, task_run_id: str) -> str: ...


def format_line(line: LogLine, label: str) -> str:
    """``12:04:05 train-xe  message`` (WARNING and above name their level); later lines indented. A
    date and time the message starts with (torchrun workers' logging format) is left out: shown once."""
    level = "" if line.level < 30 else {30: "WARNING ", 40: "ERROR "}.get(line.level, "CRITICAL ")
    head = f"{line.timestamp.astimezone().strftime('%H:%M:%S')} {label:<14} "
    first, *rest = STAMP.sub("", line.message.rstrip("\n"), count=1).split("\n")
    return "\n".join([head + level + first, *(" " * len(head) + more for more in rest)])


class Follower:
    """One flow run and its subflows: ``poll()`` writes what is new and says whether the run has ended."""

    def __init__(
        self,
        source: RunSource,
        flow_run_id: str,
        write: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source, self.flow_run_id, self.write, self.clock = source, flow_run_id, write, clock
        self.started = clock()
        self.hinted = False
        self.runs: dict[str, RunState] = {}
        self.tasks: dict[str, str] = {}
        self.seen: set[str] = set()
        self.after: datetime | None = None
        self.quiet = 0
        self.final_at: float | None = None  # when the run was first seen final (the clock's time)
        self.held: list[tuple[datetime, str, int]] = []  # state changes not written yet: time, line, polls

    def poll(self) -> RunState | None:
        """Write new state changes and log lines; the run's final state once it ended and settled.

        Log lines reach the API in batches, state changes at once: a state change waits (at most
        HOLD_POLLS polls) for the lines before it, so that the output reads in time order."""
        run = self.source.flow_run(self.flow_run_id)
        for state in [run, *self.source.subflows(list(self.runs) or [self.flow_run_id])]:
            known = self.runs.get(state.id)
            if known is None or known.state != state.state:
                at = state.at or datetime.now().astimezone()
                text = f"{at.astimezone().strftime('%H:%M:%S')} {state.label:<14} -> {state.state}"
                self.held.append((at, text, 0))
            self.runs[state.id] = state
        if run.state in WAITING and not self.hinted and self.clock() - self.started >= WAITING_HINT_S:
            self.hinted = True
            self.write(
                f"the run is still {run.state} after {WAITING_HINT_S:.0f} s: is a worker polling its work "
                "pool? (`captioning stack status`, or `prefect worker start --pool POOL`)"
            )
        fresh = self._new_lines()
        self.quiet = 0 if fresh or not run.final else self.quiet + 1
        if run.final and self.final_at is None:
            self.final_at = self.clock()
        settled = self.final_at is not None and self.clock() - self.final_at >= SETTLE_S
        ended = run.final and self.quiet >= SETTLE_POLLS and settled
        due = [h for h in self.held if ended or h[2] >= HOLD_POLLS or (self.after and h[0] <= self.after)]
        self.held = [(at, text, polls + 1) for at, text, polls in self.held if (at, text, polls) not in due]
        out = [(line.timestamp, format_line(line, self._label(line))) for line in fresh]
        for _, text in sorted(out + [(at, text) for at, text, _ in due], key=lambda item: item[0]):
            self.write(text)
        return run if ended else None

    def _new_lines(self) -> list[LogLine]:
        fresh: list[LogLine] = []
        since = None if self.after is None else self.after - LOOKBACK
        offset = 0
        while True:
            page = self.source.logs(list(self.runs), since, offset)
            for line in page:
                if line.id not in self.seen:
                    self.seen.add(line.id)
                    fresh.append(line)
                    self.after = max(self.after or line.timestamp, line.timestamp)
            if len(page) < PAGE:
                return fresh
            offset += len(page)

    def _label(self, line: LogLine) -> str:
        if line.task_run_id is not None:
            if line.task_run_id not in self.tasks:
                self.tasks[line.task_run_id] = self.source.task_name(line.task_run_id)
            return self.tasks[line.task_run_id]
        run = self.runs.get(line.flow_run_id or "")
        return run.label if run is not None else "flow"


def follow(
    source: RunSource,
    flow_run_id: str,
    *,
    write: Callable[[str], None] = print,
    poll_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> RunState:
    """Poll until the run has ended and its last lines are written; returns its final state."""
    follower = Follower(source, flow_run_id, write, clock=clock)
    while (ended := follower.poll()) is None:
        sleep(poll_s)
    return ended


class PrefectRuns:
    """``RunSource`` over the Prefect API at PREFECT_API_URL (a sync client)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.flows: dict[str, str] = {}

    def _state(self, run: Any) -> RunState:
        flow_id = str(run.flow_id)
        if flow_id not in self.flows:
            self.flows[flow_id] = self.client.read_flow(run.flow_id).name
        state = run.state
        return RunState(
            id=str(run.id),
            label=self.flows[flow_id],
            state=state.name if state is not None else "Pending",
            final=bool(state is not None and state.is_final()),
            completed=bool(state is not None and state.is_completed()),
            at=state.timestamp if state is not None else None,
        )

    def flow_run(self, flow_run_id: str) -> RunState:
        return self._state(self.client.read_flow_run(flow_run_id))

    def subflows(self, parent_ids: Sequence[str]) -> list[RunState]:
        from prefect.client.schemas.filters import FlowRunFilter

        runs = FlowRunFilter.model_validate({"parent_flow_run_id": {"any_": list(parent_ids)}})
        return [self._state(run) for run in self.client.read_flow_runs(flow_run_filter=runs)]

    def logs(self, flow_run_ids: Sequence[str], after: datetime | None, offset: int) -> list[LogLine]:
        from prefect.client.schemas.filters import LogFilter
        from prefect.client.schemas.sorting import LogSort

        wanted: dict[str, Any] = {"flow_run_id": {"any_": list(flow_run_ids)}}
        if after is not None:
            wanted["timestamp"] = {"after_": after}
        found = self.client.read_logs(
            log_filter=LogFilter.model_validate(wanted), limit=PAGE, offset=offset, sort=LogSort.TIMESTAMP_ASC
        )
        return [
            LogLine(
                id=str(log.id),
                timestamp=log.timestamp,
                level=log.level,
                message=log.message,
                flow_run_id=str(log.flow_run_id) if log.flow_run_id else None,
                task_run_id=str(log.task_run_id) if log.task_run_id else None,
            )
            for log in found
        ]

    def task_name(self, task_run_id: str) -> str:
        return str(self.client.read_task_run(task_run_id).name)


def parse_params(pairs: Sequence[str], params_json: str | None) -> dict[str, Any]:
    """``--params JSON`` then each ``KEY=VALUE`` (the value as JSON when it parses, else the string)."""
    params: dict[str, Any] = {}
    if params_json:
        loaded = json.loads(params_json)
        if not isinstance(loaded, dict):
            raise ValueError(f"--params must be a JSON object, got {params_json!r}")
        params.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"-p takes KEY=VALUE, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.follow", description=__doc__.split("\n\n")[0])
    p.add_argument("deployment", nargs="?", help="FLOW/DEPLOYMENT to run, e.g. train-sat/demo")
    p.add_argument("--id", dest="flow_run_id", help="follow this flow run instead of starting one")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="a parameter")
    p.add_argument("--params", help="parameters as a JSON object")
    p.add_argument("--poll-s", type=float, default=2.0, help="seconds between polls (default 2)")
    args = p.parse_args(argv)
    if (args.deployment is None) == (args.flow_run_id is None):
        p.error("give a deployment to run or --id of a flow run, not both")
    try:
        params = parse_params(args.param, args.params)
    except ValueError as exc:
        p.error(str(exc))
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    if hasattr(sys.stdout, "reconfigure"):  # each line as it comes, also into a pipe (`make demo | tee`)
        sys.stdout.reconfigure(line_buffering=True)
    api = PREFECT_API_URL.value()
    if not api:  # Prefect would start a throw-away server of its own, which knows no run
        print(
            'follow: error: PREFECT_API_URL is not set: eval "$(captioning stack env)" first', file=sys.stderr
        )
        return 2
    flow_run_id = args.flow_run_id
    try:
        if flow_run_id is None:
            from prefect.client.schemas.objects import FlowRun
            from prefect.deployments import run_deployment

            run = run_deployment(args.deployment, parameters=params, timeout=0, as_subflow=False)
            assert isinstance(run, FlowRun)  # the sync call returns the run, not a coroutine
            flow_run_id = str(run.id)
            print(f"started {args.deployment}: flow run {run.name} ({flow_run_id})")
        if PREFECT_UI_URL.value():
            print(f"in the Prefect UI: {PREFECT_UI_URL.value()}/runs/flow-run/{flow_run_id}")
        with get_client(sync_client=True) as client:
            ended = follow(PrefectRuns(client), flow_run_id, poll_s=args.poll_s)
    except ObjectNotFound:
        what = f"flow run {flow_run_id}" if flow_run_id else f"deployment {args.deployment}"
        print(f"follow: error: no {what} at {api} (`prefect deployment ls` lists them)", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(
            f"follow: error: the Prefect API at {api} did not answer ({exc}); is the server up?",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            f"\nstopped following; the run goes on. Attach again: python -m flows.follow --id {flow_run_id}"
            f"   cancel it: prefect flow-run cancel {flow_run_id}",
            file=sys.stderr,
        )
        return 130
    print(f"flow run {flow_run_id} ({ended.label}): {ended.state}")
    return 0 if ended.completed else 1


if __name__ == "__main__":
    sys.exit(main())
