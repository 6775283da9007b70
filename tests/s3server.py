"""The tests' S3 server: `captioning.s3_server` (a real `rclone serve s3` on loopback), re-exported.

Tests import it as `from s3server import S3Server, free_port`; the implementation lives in the library
because the local stack (captioning/stack.py) runs the same server.
"""

from __future__ import annotations

from captioning.s3_server import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_SECRET_KEY,
    S3Server,
    free_port,
    rclone_binary,
)

__all__ = ["DEFAULT_ACCESS_KEY", "DEFAULT_SECRET_KEY", "S3Server", "free_port", "rclone_binary"]
