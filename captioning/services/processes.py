"""Starting a local service's process: in a session (or process group) of its own, output appended to
its log file, its pid recorded (in a private state folder: ``private_dir``), so ``captioning.launch.stop_process_group`` can take its whole tree
down later, from this process or from another one that reads the pid file."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def private_dir(path: Path) -> Path:
    """``path`` created (with its parents) and readable by its owner only (0700): a service's state
    folder holds databases, logs, pid files and credentials that other users of the machine must
    not read."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_logged(
    cmd: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str],
    pid_path: Path | None = None,
    cwd: Path | None = None,
    detached: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` with stdin closed and stdout + stderr appended to ``log_path``.

    ``detached``: a session of its own (it outlives this process: the stack's servers); otherwise a
    process group of its own in this session (a server that lives as long as its owner, e.g. a test's).
    ``pid_path``: where its pid is written.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # A process started in the background by a shell (`captioning stack up &`, make -j) inherits an
    # ignored SIGINT, and Prefect's worker then ignores the SIGINT that stops it gracefully.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=detached,
            process_group=None if detached else 0,
            preexec_fn=_default_sigint if ignored else None,
        )
    if pid_path is not None:
        pid_path.parent.mkdir(parents=True, exist_ok=True)
        pid_path.write_text(f"{process.pid}\n")
    return process
