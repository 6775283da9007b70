"""`captioning serve` under hostile requests: a real server process on loopback, answered over HTTP.

Each refusal is a 4xx with one line of JSON, no traceback and no server path; the server's memory stays
that of a small model however large the request claims or decodes to be.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from PIL import Image
from s3server import free_port
from test_caption_cli import write_tiny_checkpoint

from captioning.inference import caption_images

REPO = Path(__file__).resolve().parents[1]


class Served:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path, paths: list[str]) -> None:
        self.process, self.port, self.log, self.paths = process, port, log, paths

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def invoke(self, payload: Any) -> tuple[int, Any]:
        body = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
        return self.request("POST", "/invocations", body, {"Content-Type": "application/json"})

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("served")
    checkpoint = write_tiny_checkpoint(folder / "model.pt", decoder_scale=4.0)
    port = free_port()
    log = folder / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "captioning.cli", "serve", checkpoint, "--port", str(port)],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    server = Served(process, port, log, [checkpoint, str(folder), str(REPO)])
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if server.request("GET", "/ping")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def jpeg(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def split(*cells: Any) -> dict[str, Any]:
    return {"dataframe_split": {"columns": ["image"], "data": [[c] for c in cells]}}


def check_refusal(served: Served, status: int, body: Any, expected_status: int, *words: str) -> str:
    assert status == expected_status, (status, body)
    assert set(body) == {"error_code", "message"}, body
    message = body["message"]
    assert "\n" not in message and "Traceback" not in message and "File " not in message, message
    assert not any(path in message for path in served.paths), message
    for word in words:
        assert word in message, message
    return str(message)


@pytest.mark.usefixtures("subprocess_tree")
def test_served_captions_are_the_models(served: Served, tmp_path: Path) -> None:
    image = tmp_path / "red.jpg"
    image.write_bytes(jpeg())
    expected = caption_images([str(image)], served.paths[0], device="cpu", beam_size=2)[0]["caption"]
    status, body = served.invoke(split(base64.b64encode(jpeg()).decode()) | {"params": {"beam_size": 2}})
    assert status == 200 and body == {"predictions": [{"caption": expected}]}
    raw = served.request("POST", "/invocations?beam_size=2", jpeg(), {"Content-Type": "image/jpeg"})
    assert raw == (200, {"predictions": [{"caption": expected}]})
    for payload in (
        {"dataframe_records": [{"image": base64.b64encode(jpeg()).decode()}]},
        {"instances": [base64.b64encode(jpeg()).decode()]},
        {"inputs": {"image": [base64.b64encode(jpeg()).decode()]}},
    ):
        status, body = served.invoke(payload | {"params": {"beam_size": 2}})
        assert status == 200 and body["predictions"][0]["caption"] == expected, payload
    status, about = served.request("GET", "/")
    assert status == 200 and about["limits"]["file_root"] == "off" and about["limits"]["max_beam_size"] == 20
    assert about["model"] == "model.pt" and not any(path in json.dumps(about) for path in served.paths)


@pytest.mark.usefixtures("subprocess_tree")
def test_hostile_requests_get_one_line_4xx_and_memory_stays_bounded(served: Served, tmp_path: Path) -> None:
    assert served.invoke(split(base64.b64encode(jpeg()).decode()))[0] == 200
    baseline = served.rss_mb()
    # A server-side file, and whether it exists: one answer for both, and nothing is read.
    existing = check_refusal(served, *served.invoke(split("/etc/hostname")), 400, "not base64")
    absent = check_refusal(served, *served.invoke(split("/etc/no-such-file")), 400, "not base64")
    assert existing.replace("/etc/hostname", "X") == absent.replace("/etc/no-such-file", "X")
    # A 13000 x 13000 PNG: 20 KB on the wire, refused from its header.
    bomb = io.BytesIO()
    Image.new("1", (13000, 13000)).save(bomb, format="PNG", optimize=True)
    check_refusal(served, *served.invoke(split(base64.b64encode(bomb.getvalue()).decode())), 400, "too_large")
    # Decoding far past any limit.
    huge = split(base64.b64encode(jpeg()).decode()) | {"params": {"beam_size": 100000, "max_len": 100000}}
    check_refusal(served, *served.invoke(huge), 400, "beam_size must be at most 20")
    huge["params"] = {"max_len": 100000}
    check_refusal(served, *served.invoke(huge), 400, "max_len must be at most 100")
    # A 50 MB body is refused from its Content-Length, before it is read (only 1 KB of it is sent).
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    try:
        conn.putrequest("POST", "/invocations")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(50 * 2**20))
        conn.endheaders()
        conn.send(b"{" + b" " * 1023)
        response = conn.getresponse()
        check_refusal(served, response.status, json.loads(response.read()), 413, "over this server's limit")
    finally:
        conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    try:
        conn.putrequest("POST", "/invocations")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        response = conn.getresponse()
        check_refusal(served, response.status, json.loads(response.read()), 411, "Content-Length")
    finally:
        conn.close()
    # Malformed and shapeless requests.
    check_refusal(served, *served.invoke(b'{"dataframe_split": '), 400, "malformed JSON")
    check_refusal(served, *served.invoke({"rows": []}), 400, "exactly one of")
    check_refusal(served, *served.invoke({"dataframe_split": {"data": "x"}}), 400, "dataframe_split needs")
    check_refusal(served, *served.invoke(split(12)), 400, "row 0")
    check_refusal(served, *served.invoke(split(*["x"] * 65)), 400, "over the limit of 64")
    status, body = served.request("POST", "/invocations", b"x", {"Content-Type": "text/plain"})
    check_refusal(served, status, body, 415, "Content-Type")
    check_refusal(served, *served.request("GET", "/etc/passwd"), 404)
    # Still serving, and its memory is that of one small request.
    assert served.invoke(split(base64.b64encode(jpeg()).decode()))[0] == 200
    assert served.rss_mb() - baseline < 150, (baseline, served.rss_mb())
    assert served.process.poll() is None
