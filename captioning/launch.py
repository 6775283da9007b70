"""Run a command (``torchrun`` above all) as a child whose whole process tree ends with it.

An orchestrator that launches DDP training has three ways to lose control of it: the run is
cancelled (the orchestrator's process gets SIGTERM, or an exception unwinds the launching call), a
time limit passes, or the orchestrating process is killed outright. ``run_streaming`` covers the
three:

    result = run_streaming(torchrun_command(["-m", "captioning.train", ...], nproc_per_node=2),
                           on_line=logger.info, timeout_s=3600)

- the child starts in a session of its own, and on an exception, a timeout or a normal return with
  stragglers, its process group and every descendant found by psutil get SIGTERM, then SIGKILL after
  ``grace_s``;
- the child is started through ``python -m captioning.launch --`` which asks the kernel to SIGKILL it
  when its parent dies (PR_SET_PDEATHSIG, then exec), so even a SIGKILLed orchestrator leaves no
  launcher; torchrun's workers arm the same against the launcher (``training.dist.die_with_launcher``);
- output (stdout and stderr merged) is handed to ``on_line`` line by line as it comes; carriage-return
  progress updates keep only their last state. The last lines are kept for error messages.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from captioning.torchrun import loopback_args

TAIL_LINES = 40


class LaunchError(RuntimeError):
    """The child failed: its exit code and the last lines it printed."""

    def __init__(self, message: str, returncode: int | None, tail: Sequence[str]) -> None:
        super().__init__(message + ("\n" + "\n".join(tail) if tail else ""))
        self.returncode = returncode
        self.tail = list(tail)


class LaunchTimeout(LaunchError, TimeoutError):
    """The child ran past its time limit and was killed with its process tree."""


@dataclass
class LaunchResult:
    returncode: int
    duration_s: float
    tail: list[str] = field(default_factory=list)


def torchrun_command(
    args: Sequence[str],
    *,
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    max_restarts: int = 0,
    rdzv_hosted_elsewhere: bool = False,
    local_addr: str | None = None,
) -> list[str]:
    """``python -m captioning.torchrun`` (torchrun) with this interpreter: one node or several.

    One node (no ``rdzv_endpoint``): its stores and collectives listen on 127.0.0.1 only
    (``captioning.torchrun.loopback_args``). Several nodes need ``rdzv_endpoint`` (host:port of the
    c10d rendezvous, reachable from every node) and the same ``rdzv_id`` on each; torchrun assigns
    ranks when ``node_rank`` is None. ``rdzv_hosted_elsewhere``: no agent hosts the rendezvous store
    (the orchestrator does: ``captioning.torchrun.host_rendezvous_store``). ``local_addr``: the address
    this node's agent and workers are reached at (default: its host name). ``max_restarts``: elastic
    restarts of the worker group after a failure.
    """
    cmd = [sys.executable, "-m", "captioning.torchrun"]
    if max_restarts:
        cmd.append(f"--max-restarts={max_restarts}")
    if nnodes == 1 and rdzv_endpoint is None:
        cmd += loopback_args(nproc_per_node)
    else:
        if rdzv_endpoint is None:
            raise ValueError(f"nnodes={nnodes} needs rdzv_endpoint (host:port reachable from every node)")
        cmd += [
            f"--nproc-per-node={nproc_per_node}",
            f"--nnodes={nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
        ]
        if rdzv_id:
            cmd.append(f"--rdzv-id={rdzv_id}")
        if node_rank is not None:
            cmd.append(f"--node-rank={node_rank}")
        if rdzv_hosted_elsewhere:
            cmd.append("--rdzv-conf=is_host=0")
        if local_addr:
            cmd.append(f"--local-addr={local_addr}")
    return [*cmd, *args]


def _process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def live_process(pid: int) -> Any:
    """The live (non-zombie) psutil.Process ``pid``, else None."""
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process
    except psutil.Error:
        return None


def _tree(pgid: int, known: dict[int, Any]) -> tuple[dict[int, Any], set[int]]:
    """Live processes of group ``pgid`` and their descendants, with the groups those lead (a process
    worker starts each flow run in a session of its own), plus what of ``known`` is still alive.
    Returns (pid -> psutil.Process, process group ids)."""
    by_group: dict[int, list[Any]] = {}
    for process in psutil.process_iter(["status"]):
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if process.info["status"] != psutil.STATUS_ZOMBIE:
                by_group.setdefault(os.getpgid(process.pid), []).append(process)
    found = {pid: p for pid, p in known.items() if live_process(pid) is not None}
    groups = {pgid}
    todo = [pgid]
    while todo:
        for process in by_group.get(todo.pop(), []):
            found[process.pid] = process
    changed = True
    while changed:
        changed = False
        for process in list(found.values()):
            with contextlib.suppress(psutil.Error):
                for child in process.children(recursive=True):
                    if child.pid not in found and live_process(child.pid) is not None:
                        found[child.pid] = child
                        changed = True
        for pid in list(found):
            if pid in by_group and pid not in groups:  # a descendant that leads a group of its own
                groups.add(pid)
                for process in by_group[pid]:
                    found.setdefault(process.pid, process)
                changed = True
    return found, groups


def stop_process_group(
    pgid: int,
    signals: tuple[tuple[signal.Signals, float], ...] = ((signal.SIGTERM, 15.0),),
    reap: subprocess.Popen[bytes] | None = None,
) -> None:
    """Send each (signal, wait_s) in turn to group ``pgid``, its members' descendants and the groups
    those lead, until none is alive; SIGKILL what is left. ``reap`` is our Popen of the leader, if any."""
    members: dict[int, Any] = {}
    for sig, wait_s in (*signals, (signal.SIGKILL, 5.0)):
        members, groups = _tree(pgid, members)
        if not members:
            break
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        for process in members.values():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(process.pid) not in groups:
                    process.send_signal(sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if reap is not None:
                reap.poll()
            if all(live_process(pid) is None for pid in members):
                break
            time.sleep(0.1)
    if reap is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            reap.wait(timeout=5)


def kill_tree(proc: subprocess.Popen[bytes], *, grace_s: float = 10.0) -> None:
    """SIGTERM the child's process group and every descendant (and the groups they lead), then SIGKILL
    what is left after grace_s; the child is reaped.

    Descendants count: torchrun starts its workers in sessions of their own, so the child's process
    group alone would miss them.
    """
    stop_process_group(proc.pid, ((signal.SIGTERM, grace_s),), reap=proc)


def run_streaming(
    cmd: Sequence[str],
    *,
    on_line: Callable[[str], None] = print,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    grace_s: float = 10.0,
) -> LaunchResult:
    """Run ``cmd`` to its end, streaming its output to ``on_line``; never leave its processes behind.

    Returns the result whatever the exit code (the caller decides what a failure means). Raises
    LaunchTimeout after killing the tree when ``timeout_s`` passes; any exception raised while
    waiting (a cancelled run's TerminationSignal, KeyboardInterrupt) kills the tree and propagates.
    """
    start = time.monotonic()
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "captioning.launch", "--parent-pid", str(os.getpid()), "--", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=child_env,
        cwd=cwd,
        start_new_session=True,
    )
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        kill_tree(proc, grace_s=grace_s)

    timer = threading.Timer(timeout_s, on_timeout) if timeout_s is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n").rsplit("\r", 1)[-1]
            tail.append(line)
            on_line(line)
        returncode = proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
            # A timeout's kill may still be waiting out grace_s on a worker that ignores SIGTERM after
            # the launcher's output ended: the tree is gone only once it returns.
            timer.join()
        # Stragglers too: a worker that outlived a launcher which exited on its own.
        if proc.poll() is None or len(_process_tree(proc.pid)) > 0 or _group_alive(proc.pid):
            kill_tree(proc, grace_s=grace_s)
        if proc.stdout is not None:
            proc.stdout.close()
    duration = time.monotonic() - start
    if timed_out.is_set():
        # No exit code: the kill reaped the child before Popen could read its status.
        raise LaunchTimeout(
            f"{' '.join(cmd[:6])} ... ran past its limit of {timeout_s} s and was killed", None, tail
        )
    return LaunchResult(returncode=returncode, duration_s=duration, tail=list(tail))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _exec_with_parent(parent_pid: int, cmd: Sequence[str]) -> None:
    """Arm SIGKILL-on-parent-death, then become ``cmd`` (the setting survives exec)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the request was armed
            os._exit(137)
    os.execvp(cmd[0], list(cmd))


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4 or args[0] != "--parent-pid" or args[2] != "--":
        sys.exit("usage: python -m captioning.launch --parent-pid PID -- COMMAND [ARGS...]")
    _exec_with_parent(int(args[1]), args[3:])


if __name__ == "__main__":
    main()
