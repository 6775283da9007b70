"""captioning.launch: streamed output, exit codes, and no process left behind (timeout, error, killed parent).

The process trees are small `python -c` scripts that print their pids first; the tests read the pids
from the streamed lines and check with psutil that each process is dead afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from captioning import launch
from captioning.launch import (
    LaunchError,
    LaunchResult,
    LaunchTimeout,
    kill_tree,
    run_streaming,
    torchrun_command,
)

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
# How long the test processes sleep: far past every limit below, yet a kill that does not happen fails
# a test in a minute (the process then writes the test's `done` file) instead of hanging it.
SLEEP_S = 60

# A grandchild like torchrun's workers: a session of its own (the child's process group misses it),
# and it ignores SIGTERM, so only the SIGKILL after grace_s ends it. DETACH: it also lets go of the
# output pipe, so the launcher's output ends as soon as the child dies.
GRANDCHILD = (
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('grandchild', os.getpid(), flush=True)\n"
    "if DETACH:\n"
    "    null = os.open(os.devnull, os.O_WRONLY); os.dup2(null, 1); os.dup2(null, 2)\n"
    "time.sleep(SLEEP_S)\n"
    "open(DONE, 'a').write('grandchild slept through\\n')\n"
)


def tree_script(done: Path, *, detach: bool = False) -> str:
    """A child that prints its pid, starts GRANDCHILD in a new session, then sleeps; a process that
    was not killed appends to `done` when it wakes."""
    settings = f"SLEEP_S = {SLEEP_S}\nDONE = {str(done)!r}\n"
    grandchild = settings + f"DETACH = {detach}\n" + GRANDCHILD
    return (
        settings + "import os, subprocess, sys, time\n"
        "print('child', os.getpid(), flush=True)\n"
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}], start_new_session=True)\n"
        "time.sleep(SLEEP_S)\n"
        "open(DONE, 'a').write('child slept through\\n')\n"
    )


def is_dead(pid: int) -> bool:
    """Gone, or a zombie waiting for its (new) parent to reap it: either way it runs no more."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_dead(pid: int, limit_s: float = 60.0) -> bool:
    """Poll until `pid` is dead; the limit is a safety net against a hung test, not a measurement."""
    deadline = time.monotonic() + limit_s
    while not is_dead(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def pids() -> Iterator[dict[str, int]]:
    """Pids the test's processes report ("child" -> pid); whatever a failed test left running is killed."""
    found: dict[str, int] = {}
    yield found
    for pid in found.values():
        if pid != os.getpid() and not is_dead(pid):
            os.kill(pid, signal.SIGKILL)


def record_pids(
    found: dict[str, int], *, raise_on: str | None = None, exc: BaseException | None = None
) -> Callable[[str], None]:
    """An on_line that records "name pid" lines, raising `exc` once it has seen `raise_on`."""

    def on_line(line: str) -> None:
        name, _, pid = line.partition(" ")
        if pid.isdigit():
            found[name] = int(pid)
        if name == raise_on and exc is not None:
            raise exc

    return on_line


# --- output and exit codes ---------------------------------------------------------------------------


def test_lines_arrive_in_order_with_stderr_and_progress_as_its_last_state() -> None:
    script = (
        "import sys\n"
        "print('one', flush=True)\n"
        "print('two (stderr)', file=sys.stderr, flush=True)\n"
        "sys.stdout.write('progress 1%\\rprogress 50%\\rprogress 100%\\n'); sys.stdout.flush()\n"
        "print('caf\\u00e9', flush=True)\n"
        "sys.stdout.write('no newline at the end'); sys.stdout.flush()\n"
    )
    lines: list[str] = []
    result = run_streaming([PY, "-c", script], on_line=lines.append, timeout_s=120)
    expected = ["one", "two (stderr)", "progress 100%", "café", "no newline at the end"]
    assert lines == expected
    assert isinstance(result, LaunchResult)
    assert result.returncode == 0 and result.tail == expected and result.duration_s > 0


def test_tail_keeps_the_last_lines() -> None:
    script = f"for i in range({launch.TAIL_LINES + 25}): print('line', i)"
    lines: list[str] = []
    result = run_streaming([PY, "-c", script], on_line=lines.append, timeout_s=120)
    assert len(lines) == launch.TAIL_LINES + 25
    assert result.tail == lines[-launch.TAIL_LINES :]


@pytest.mark.parametrize(
    ("code", "expected"), [("raise SystemExit(3)", 3), ("import os; os.kill(os.getpid(), 15)", -15)]
)
def test_a_failed_command_returns_its_exit_code(code: str, expected: int) -> None:
    result = run_streaming([PY, "-c", f"print('before'); {code}"], on_line=lambda _: None, timeout_s=120)
    assert result.returncode == expected and result.tail == ["before"]


def test_env_and_cwd_reach_the_child(tmp_path: Path) -> None:
    script = "import os; print(os.environ['LAUNCH_TEST'], os.environ['PYTHONUNBUFFERED'], os.getcwd())"
    env = {**os.environ, "LAUNCH_TEST": "hello"}
    env.pop("PYTHONUNBUFFERED", None)
    lines: list[str] = []
    run_streaming([PY, "-c", script], on_line=lines.append, env=env, cwd=str(tmp_path), timeout_s=120)
    assert lines == [f"hello 1 {tmp_path}"]


def test_the_launcher_becomes_the_command() -> None:
    """PR_SET_PDEATHSIG then exec: the command runs in the launcher's own process, in a new session."""
    script = "import os; print('child', os.getpid()); print('session', os.getsid(0)); print('parent', os.getppid())"
    seen: dict[str, int] = {}  # not the `pids` fixture: it would kill this test's own process
    run_streaming([PY, "-c", script], on_line=record_pids(seen), timeout_s=120)
    assert seen["session"] == seen["child"]  # the session leader is the launched process itself
    assert seen["parent"] == os.getpid()


# --- nothing is left behind --------------------------------------------------------------------------


@pytest.mark.parametrize("detach", [False, True], ids=["grandchild-holds-output", "grandchild-detached"])
def test_timeout_kills_the_whole_tree(pids: dict[str, int], tmp_path: Path, detach: bool) -> None:
    # 3 s is ample for three interpreters to start; the test fails loudly below if they did not.
    with pytest.raises(LaunchTimeout) as info:
        run_streaming(
            [PY, "-c", tree_script(tmp_path / "done", detach=detach)],
            on_line=record_pids(pids),
            timeout_s=3.0,
            grace_s=0.5,
        )
    assert set(pids) == {"child", "grandchild"}, f"the tree did not start before the timeout: {pids}"
    # Dead when the call returns: the grandchild ignored SIGTERM, so the SIGKILL after grace_s did it.
    assert is_dead(pids["child"]) and is_dead(pids["grandchild"])
    assert isinstance(info.value, LaunchError) and isinstance(info.value, TimeoutError)
    assert "ran past its limit" in str(info.value) and info.value.returncode is None
    assert info.value.tail[:1] == [f"child {pids['child']}"]
    assert not (tmp_path / "done").exists()


@pytest.mark.parametrize(
    "exc", [RuntimeError("on_line failed"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
def test_an_exception_while_waiting_kills_the_tree_and_propagates(
    pids: dict[str, int], tmp_path: Path, exc: BaseException
) -> None:
    on_line = record_pids(pids, raise_on="grandchild", exc=exc)
    with pytest.raises(type(exc)):
        run_streaming([PY, "-c", tree_script(tmp_path / "done")], on_line=on_line, timeout_s=600, grace_s=0.5)
    assert set(pids) == {"child", "grandchild"}
    assert is_dead(pids["child"]) and is_dead(pids["grandchild"])
    assert not (tmp_path / "done").exists()


def test_kill_tree(pids: dict[str, int], tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [PY, "-c", tree_script(tmp_path / "done")], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        for _ in range(2):
            name, pid = proc.stdout.readline().decode().split()
            pids[name] = int(pid)
        kill_tree(proc, grace_s=0.5)
        assert proc.returncode is not None
        assert is_dead(pids["child"]) and is_dead(pids["grandchild"])
        assert not (tmp_path / "done").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()


# The child sleeps well past wait_dead's limit, so only a kill can make it dead in time.
HELPER = """
import sys
from captioning.launch import run_streaming

child = "import os, sys, time; open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid())); os.replace(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(600)"
run_streaming([sys.executable, "-c", child, sys.argv[1]], on_line=print, timeout_s=600)
"""


def test_the_child_dies_when_its_parent_is_killed(tmp_path: Path) -> None:
    """A SIGKILLed orchestrator runs no cleanup: PR_SET_PDEATHSIG is what ends the child then."""
    pid_file = tmp_path / "child.pid"
    helper = subprocess.Popen([PY, "-c", HELPER, str(pid_file)], cwd=REPO)
    child = None
    try:
        deadline = time.monotonic() + 120  # safety net only
        while not pid_file.exists():
            assert helper.poll() is None, f"the helper exited early ({helper.returncode})"
            assert time.monotonic() < deadline, "the child never wrote its pid"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert not is_dead(child) and psutil.Process(child).ppid() == helper.pid
        helper.kill()
        helper.wait()
        assert wait_dead(child), "the child outlived its SIGKILLed parent"
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        if child is not None and not is_dead(child):
            os.kill(child, signal.SIGKILL)


# --- the launcher module and the torchrun command ----------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--parent-pid", "1"],
        ["--parent-pid", "1", "--"],
        ["--pid", "1", "--", "true"],
        ["--parent-pid", "1", "x", "true"],
    ],
)
def test_launcher_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match=r"usage: python -m captioning\.launch"):
        launch.main(argv)


def test_launcher_module_usage_error() -> None:
    out = subprocess.run([PY, "-m", "captioning.launch", "true"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "usage: python -m captioning.launch --parent-pid PID" in out.stderr


def test_launcher_exits_when_its_parent_is_already_gone(tmp_path: Path) -> None:
    """A launcher whose parent is not the pid it was given (it died before PDEATHSIG was armed) exits."""
    marker = tmp_path / "ran"
    cmd = [PY, "-m", "captioning.launch", "--parent-pid", "1", "--", PY, "-c", f"open({str(marker)!r}, 'w')"]
    out = subprocess.run(cmd, capture_output=True, timeout=120)
    assert out.returncode == 137 and not marker.exists()


def test_torchrun_command_standalone() -> None:
    cmd = torchrun_command(["-m", "captioning.train", "--config", "demo"], nproc_per_node=2)
    assert cmd == [
        PY,
        "-m",
        "captioning.torchrun",
        "--nproc-per-node=2",
        "--nnodes=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        "--local-addr=127.0.0.1",
        "-m",
        "captioning.train",
        "--config",
        "demo",
    ]


def test_torchrun_command_multi_node() -> None:
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command(["-m", "x"], nproc_per_node=2, nnodes=2)
    cmd = torchrun_command(
        ["-m", "captioning.train"],
        nproc_per_node=4,
        nnodes=2,
        node_rank=1,
        rdzv_endpoint="head:29400",
        rdzv_id="run-xe",
    )
    assert cmd[:3] == [PY, "-m", "captioning.torchrun"] and cmd[-2:] == ["-m", "captioning.train"]
    flags = cmd[3:-2]
    assert not any(flag.startswith("--local-addr") for flag in flags)
    assert set(flags) == {
        "--nproc-per-node=4",
        "--nnodes=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=head:29400",
        "--rdzv-id=run-xe",
        "--node-rank=1",
    }
    # Ranks assigned by torchrun; one node with an endpoint is a rendezvous too.
    single = torchrun_command(["-m", "x"], nproc_per_node=1, rdzv_endpoint="head:29400")
    assert "--rdzv-endpoint=head:29400" in single and "--nnodes=1" in single
    assert not any(f.startswith(("--node-rank", "--rdzv-id")) for f in single)


ALL_REDUCE = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
print(f"rank {dist.get_rank()} of {dist.get_world_size()}: sum {value.item()}", flush=True)
dist.destroy_process_group()
"""


def test_two_loopback_nodes_meet_at_one_rendezvous(tmp_path: Path, torchrun: str) -> None:
    """Two agents on this machine (loopback "nodes"), one process each, joined by the c10d rendezvous of
    ``torchrun_command(nnodes=2)``: the first hosts the store, the second finds the port taken and joins."""
    from s3server import free_port

    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    cmd = torchrun_command(
        [str(script)],
        nproc_per_node=1,
        nnodes=2,
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_id="two-nodes",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    agents = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    try:
        outputs = [agent.communicate(timeout=180)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    lines = sorted(line for o in outputs for line in o.splitlines() if line.startswith("rank "))
    assert lines == ["rank 0 of 2: sum 3.0", "rank 1 of 2: sum 3.0"]
