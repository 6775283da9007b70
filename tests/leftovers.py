"""The guard against processes a test leaves alive (conftest's autouse ``no_leftover_processes``).

Every test is compared with a snapshot of the live processes below pytest taken before it: what is new
and still alive 10 s after the test fails it, and is killed. Servers of module- and session-scoped
fixtures start before the snapshot and do not count; a fixture that (re)starts its server inside a
test (a restart test) says so with ``owned_by_fixture(pid)``: that process and its descendants are
its fixture's to stop.

    from leftovers import owned_by_fixture
    owned_by_fixture(server.process.pid)
"""

from __future__ import annotations

import contextlib
import time

import psutil

# Helpers that live as long as the test session by design (Python's own, started on first use).
SESSION_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
WAIT_S = 10.0

_owned: set[int] = set()


def owned_by_fixture(pid: int) -> None:
    """Process ``pid`` (and its descendants) belongs to a fixture that stops it: never a leftover."""
    _owned.add(pid)


def _fixture_processes() -> set[int]:
    pids: set[int] = set()
    for pid in list(_owned):
        try:
            root = psutil.Process(pid)
            pids |= {pid, *(child.pid for child in root.children(recursive=True))}
        except psutil.Error:
            _owned.discard(pid)
    return pids


def live_descendants() -> dict[int, str]:
    """pid -> command line of every live (not zombie) process below this one, but session helpers and
    fixture-owned servers."""
    found: dict[int, str] = {}
    owned = _fixture_processes()
    for child in psutil.Process().children(recursive=True):
        if child.pid in owned:
            continue
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if not any(helper in cmdline for helper in SESSION_HELPERS):
            found[child.pid] = cmdline
    return found


def leftovers(before: set[int], wait_s: float = WAIT_S) -> dict[int, str]:
    """The processes not in ``before`` still alive after up to ``wait_s`` seconds; they are killed."""
    deadline = time.monotonic() + wait_s
    while (left := {p: c for p, c in live_descendants().items() if p not in before}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    return left
