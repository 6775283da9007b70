"""The tests' S3 server: the library's `S3Server` (a real `rclone serve s3` on loopback) plus `restart`,
which only tests need.

Tests import it as `from s3server import S3Server, free_port`; the server itself lives in the library
(captioning/services/s3_server.py) because the local stack runs the same one.
"""

from __future__ import annotations

import time

from leftovers import owned_by_fixture

from captioning.services import s3_server
from captioning.services.s3_server import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, free_port, rclone_binary

__all__ = ["DEFAULT_ACCESS_KEY", "DEFAULT_SECRET_KEY", "S3Server", "free_port", "rclone_binary"]


class S3Server(s3_server.S3Server):
    """`captioning.services.s3_server.S3Server` with `restart`:

    with S3Server() as server:
        server.restart(delay_s=1.0)        # same port, same files; in-flight multipart uploads are lost
    """

    def __enter__(self) -> S3Server:
        super().__enter__()
        return self

    def restart(self, delay_s: float = 0.0, *, kill: bool = False) -> None:
        """Stop, stay down for `delay_s` seconds, start again on the same port over the same files."""
        self.stop(kill=kill)
        time.sleep(delay_s)
        self.start()
        if self.process is not None:
            owned_by_fixture(self.process.pid)  # restarted inside a test, stopped by its owner
