"""A real HTTP file server on loopback for download tests: Range requests, and misbehaviour on demand.

Serves the files of one folder at ``http://127.0.0.1:<port>/<name>`` from a background thread,
logs every request, and can be told to fail the way real servers do::

    with FileServer(folder) as server:
        server.cut_after(1000)            # next GET: send 1000 body bytes, then drop the connection
        server.fail(500, times=2)         # next two GETs: HTTP 500
        server.ignore_range = True        # answer Range requests with 200 and the whole file
        server.no_length = True           # no Content-Length: the body ends when the connection closes
        server.substitute["a.zip"] = b"other bytes"   # serve a different file under that name
        download_file(f"{server.url}/a.zip", dest, num_retries=5, timeout_s=10.0)
        server.requests                   # [Request(path, range, status, body_bytes), ...]
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Request:
    """One GET as the server saw it: the file name, its Range header, the status and body bytes sent."""

    path: str
    range: str | None
    status: int
    body_bytes: int


class FileServer:
    """ThreadingHTTPServer over `root` on 127.0.0.1 (an ephemeral port), with switchable faults."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.ignore_range = False
        self.no_length = False
        self.substitute: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._cuts: list[int] = []
        self._failures: list[int] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="FileServer", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def cut_after(self, num_bytes: int, *, times: int = 1) -> None:
        """The next `times` GETs send num_bytes of the body (with the full length announced), then close."""
        with self._lock:
            self._cuts.extend([num_bytes] * times)

    def fail(self, status: int = 500, *, times: int = 1) -> None:
        """The next `times` GETs answer `status` with a short body."""
        with self._lock:
            self._failures.extend([status] * times)

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # Called from handler threads.
    def _next_fault(self) -> tuple[int | None, int | None]:
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
            cut = None if failure is not None or not self._cuts else self._cuts.pop(0)
            return failure, cut

    def _log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)


def _make_handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def do_GET(self) -> None:
            name = unquote(urlsplit(self.path).path).lstrip("/")
            range_header = self.headers.get("Range")
            failure, cut = server._next_fault()
            if failure is not None:
                self._send(name, range_header, failure, b"server error\n", {})
                return
            data = server.substitute.get(name)
            if data is None:
                path = server.root / name
                if "/" in name or not path.is_file():
                    self._send(name, range_header, 404, b"not found\n", {})
                    return
                data = path.read_bytes()
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
            if match is None or server.ignore_range:
                self._send(name, range_header, 200, data, {}, cut=cut)
                return
            start = int(match.group(1))
            end = min(int(match.group(2)), len(data) - 1) if match.group(2) else len(data) - 1
            if start >= len(data):
                self._send(name, range_header, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            headers = {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
            self._send(name, range_header, 206, data[start : end + 1], headers, cut=cut)

        def _send(
            self,
            name: str,
            range_header: str | None,
            status: int,
            body: bytes,
            headers: dict[str, str],
            *,
            cut: int | None = None,
        ) -> None:
            sent = body if cut is None else body[:cut]
            server._log(Request(name, range_header, status, len(sent)))  # before the client can see it
            unframed = server.no_length and status in (200, 206)  # the body ends where the connection does
            self.send_response(status)
            if not unframed:
                self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(sent)
            if cut is not None or unframed:  # (part of) the body, then hang up
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

    return Handler
