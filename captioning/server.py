"""``captioning serve``: the HTTP endpoint of a model, safe to expose: it reads only what it is sent.

    captioning serve models:/show-attend-tell@champion --port 5001        # 127.0.0.1 unless --host
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
      -d '{"dataframe_split": {"columns": ["image"], "data": [["<base64 jpeg>"]]}, "params": {"beam_size": 5}}'
    curl -s localhost:5001/invocations -H 'Content-Type: image/jpeg' --data-binary @photo.jpg
    # -> {"predictions": [{"caption": "a man riding a wave on a surfboard"}]}

MLflow's scoring protocol (``mlflow models serve``): ``POST /invocations`` with JSON
(``dataframe_split``, ``dataframe_records``, ``instances`` or ``inputs``, and ``params``) or one raw
image (``Content-Type: image/*``, params in the query string: ``?beam_size=5``); ``GET /ping`` and
``/health`` answer when the model is loaded; ``GET /`` describes the model and its limits.

The model comes from any model source (``captioning.model_uri.resolve_model``: a checkpoint, a run,
``models:/NAME@alias``) as its ``weights_only`` checkpoint, so serving unpickles nothing. Its
captions are the registered pyfunc's (``captioning.serving.CaptionPyfunc``), under the same
``ServingLimits`` (images, bytes and pixels per image, beam size, caption length, the optional
``--file-root``); this server adds what only it can bound: the request body (``Content-Length``
required, refused before it is read when over ``--max-request-bytes``) and one request captioned at
a time (memory stays that of one request). Every error is one line of JSON
(``{"error_code": ..., "message": ...}``): no traceback and no server path; an unexpected failure is
logged here and answered with a generic 500.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pandas as pd

from captioning.serving import CAPTION_COLUMN, IMAGE_COLUMN, CaptionPyfunc, ServingLimits

DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
READ_TIMEOUT_S = 60.0  # a client that stops sending mid-body is dropped

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the server refuses: its HTTP status, an error code and a one-line message."""

    def __init__(self, status: HTTPStatus, message: str, code: str = "BAD_REQUEST") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _one_line(text: str, limit: int = 1000) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def parse_json_request(body: bytes) -> tuple[pd.DataFrame, dict[str, Any]]:
    """MLflow's JSON request formats -> (a DataFrame with an ``image`` column, params)."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"malformed JSON: {e}") from None
    if not isinstance(payload, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the JSON body must be an object")
    params = payload.get("params") or {}
    if not isinstance(params, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "params must be an object")
    formats = [k for k in ("dataframe_split", "dataframe_records", "instances", "inputs") if k in payload]
    if len(formats) != 1:
        raise RequestError(
            HTTPStatus.BAD_REQUEST,
            "give exactly one of dataframe_split, dataframe_records, instances or inputs",
        )
    data = payload[formats[0]]
    try:
        if formats[0] == "dataframe_split":
            if not isinstance(data, dict) or not isinstance(data.get("data"), list):
                raise ValueError("dataframe_split needs {'columns': [...], 'data': [[...], ...]}")
            frame = pd.DataFrame(data["data"], columns=data.get("columns") or [IMAGE_COLUMN])
        elif formats[0] == "dataframe_records":
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise ValueError("dataframe_records needs a list of {'image': ...} objects")
            frame = pd.DataFrame.from_records(data)
        else:  # instances / inputs: a list of cells, or of {"image": ...}, or {"image": [...]}
            if isinstance(data, dict):
                frame = pd.DataFrame(data)
            elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
                frame = pd.DataFrame.from_records(data)
            elif isinstance(data, list):
                frame = pd.DataFrame({IMAGE_COLUMN: pd.Series(data, dtype=object)})
            else:
                raise ValueError(f"{formats[0]} needs a list of images")
    except (ValueError, TypeError) as e:
        raise RequestError(HTTPStatus.BAD_REQUEST, str(e)) from None
    return frame, params


class CaptionServer(ThreadingHTTPServer):
    """The HTTP server: one loaded model, its limits, one prediction at a time."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        model: CaptionPyfunc,
        *,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        description: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(address, CaptionHandler)
        self.model = model
        self.max_request_bytes = max_request_bytes
        self.description = dict(description or {})
        self.predict_lock = threading.Lock()

    def predict(self, frame: pd.DataFrame, params: Mapping[str, Any]) -> list[dict[str, str]]:
        with self.predict_lock:
            out = self.model.predict(None, frame, dict(params))
        return [{CAPTION_COLUMN: str(caption)} for caption in out[CAPTION_COLUMN]]


class CaptionHandler(BaseHTTPRequestHandler):
    server: CaptionServer
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: HTTPStatus, payload: Any) -> None:
        body = (json.dumps(payload) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _error(self, error: RequestError) -> None:
        self._send(error.status, {"error_code": error.code, "message": _one_line(str(error))})

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path in ("/ping", "/health"):
            self._send(HTTPStatus.OK, {"status": "ok"})
        elif path in ("/", "/version"):
            self._send(HTTPStatus.OK, self.server.description)
        else:
            self._error(RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {path}", "NOT_FOUND"))

    def do_POST(self) -> None:
        try:
            url = urllib.parse.urlsplit(self.path)
            if url.path != "/invocations":
                raise RequestError(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {url.path}", "NOT_FOUND")
            body = self._read_body()
            kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind == "application/json":
                frame, params = parse_json_request(body)
            elif kind.startswith("image/") or kind == "application/octet-stream":
                frame = pd.DataFrame({IMAGE_COLUMN: pd.Series([body], dtype=object)})
                params = dict(urllib.parse.parse_qsl(url.query))
            else:
                raise RequestError(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    f"Content-Type {kind or '(none)'!r}: send application/json or an image/* body",
                    "UNSUPPORTED_MEDIA_TYPE",
                )
            try:
                predictions = self.server.predict(frame, params)
            except ValueError as e:  # the model's own refusals: bad images, params, limits
                raise RequestError(HTTPStatus.BAD_REQUEST, str(e)) from None
            self._send(HTTPStatus.OK, {"predictions": predictions})
        except RequestError as e:
            self._error(e)
        except Exception:  # the traceback stays in this server's log
            log.exception("POST %s failed", self.path)
            self._error(
                RequestError(
                    HTTPStatus.INTERNAL_SERVER_ERROR, "internal error (see the server log)", "INTERNAL_ERROR"
                )
            )

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise RequestError(
                HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted: send Content-Length"
            )
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required", "LENGTH_REQUIRED")
        try:
            length = int(length_header)
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length_header!r}") from None
        if length < 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length}")
        if length > self.server.max_request_bytes:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body has {length} bytes, over this server's limit of {self.server.max_request_bytes}",
                "REQUEST_TOO_LARGE",
            )
        body = self.rfile.read(length)
        if len(body) != length:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body ended after {len(body)} of {length} bytes")
        return body


DESCRIPTION = "Serve a model over HTTP (MLflow's /invocations protocol) with bounded requests."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``captioning serve``'s arguments (the CLI's subcommand and this module's ``main``)."""
    defaults = ServingLimits()
    parser.add_argument(
        "model", help="a model source: checkpoint path or s3:// URI, runs:/ID, models:/NAME@ALIAS"
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5001, help="port (default 5001)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--file-root", default="", help="let image cells name files under this folder (default: off)"
    )
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    parser.add_argument("--max-images", type=int, default=defaults.max_images, help="images per request")
    parser.add_argument("--max-image-bytes", type=int, default=defaults.max_image_bytes)
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=defaults.max_image_pixels,
        help="from the header, before decoding",
    )
    parser.add_argument("--max-beam-size", type=int, default=defaults.max_beam_size)
    parser.add_argument("--max-len", type=int, default=defaults.max_len, help="the largest max_len param")


def make_server(args: argparse.Namespace) -> CaptionServer:
    """Resolve and load the model, then bind (the port is taken only once the model is ready)."""
    from captioning.model_uri import resolve_model

    limits = ServingLimits(
        file_root=args.file_root,
        max_images=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_beam_size=args.max_beam_size,
        max_len=args.max_len,
    )
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    resolved = resolve_model(args.model)
    model = CaptionPyfunc()
    model.load(resolved.checkpoint, device=args.device, limits=limits)
    assert model.predictor is not None
    shown = args.model if args.model.startswith(("models:/", "runs:/")) else os.path.basename(args.model)
    description = {
        "model": shown,  # a registry name as given; a file by its name only (no server path)
        "decoding": model.predictor.decoding,
        "limits": limits.to_config() | {"file_root": "on" if limits.file_root else "off"},
        "max_request_bytes": args.max_request_bytes,
    }
    return CaptionServer(
        (args.host, args.port), model, max_request_bytes=args.max_request_bytes, description=description
    )


def serve(args: argparse.Namespace) -> int:
    """Load, bind, serve until interrupted (SIGINT; SIGTERM ends the process as usual)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from captioning.model_uri import RegistryError

    try:
        server = make_server(args)
    except (RegistryError, ValueError, OSError) as e:  # no such model, bad limits, port taken
        print(f"captioning serve: error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    url = f"http://{args.host}:{server.server_port}"
    print(f"serving {args.model} at {url}/invocations (limits: {url}/; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m captioning.server", description=DESCRIPTION)
    add_arguments(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
