"""Local capture servers for the network edge: the real SDKs post to 127.0.0.1, and the tests
read what arrived, decoded the way Sentry's and PostHog's ingestion decode it."""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    raw: bytes  # as sent (compressed or not)
    body: bytes  # decoded


def decode_body(raw: bytes, encoding: str | None) -> bytes:
    if not encoding or encoding == "identity":
        return raw
    if encoding == "gzip":
        return gzip.decompress(raw)
    if encoding == "deflate":
        return zlib.decompress(raw)
    raise AssertionError(f"unexpected Content-Encoding {encoding!r}")


class CaptureServer:
    """A threaded HTTP server that records every request and answers `reply`."""

    def __init__(self, reply: bytes = b"{}") -> None:
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._reply = reply
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                body = decode_body(raw, headers.get("content-encoding"))
                with server._lock:
                    server.received.append(Received(self.command, self.path, headers, raw, body))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server._reply)))
                self.end_headers()
                self.wfile.write(server._reply)

            do_POST = _record
            do_GET = _record

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def all_bytes(self) -> bytes:
        """Everything that arrived, raw and decoded (what a leak check must search)."""
        return b"\n".join(part for r in self.requests() for part in (r.raw, r.body))

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout_s: float = 15) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate(self.requests()):
            if time.monotonic() > deadline:
                raise AssertionError(f"capture server: condition not met; got {self.requests()}")
            time.sleep(0.02)

    @contextmanager
    def running(self) -> Iterator[CaptureServer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()


# ---------------------------------------------------------------------- Sentry


@dataclass
class EnvelopeItem:
    headers: dict[str, Any]
    payload: bytes

    @property
    def type(self) -> str:
        return str(self.headers.get("type"))

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.payload)
        return value


def parse_envelope(body: bytes) -> tuple[dict[str, Any], list[EnvelopeItem]]:
    """Sentry's envelope format: a header line, then items of an item header line and a payload
    (`length` bytes when the header gives one, else up to the next newline)."""
    header_line, _, rest = body.partition(b"\n")
    header: dict[str, Any] = json.loads(header_line)
    items: list[EnvelopeItem] = []
    while rest.strip():
        item_line, _, rest = rest.partition(b"\n")
        item_header: dict[str, Any] = json.loads(item_line)
        length = item_header.get("length")
        if length is not None:
            payload, rest = rest[:length], rest[length:]
            rest = rest.removeprefix(b"\n")
        else:
            payload, _, rest = rest.partition(b"\n")
        items.append(EnvelopeItem(item_header, payload))
    return header, items


def sentry_items(server: CaptureServer, project: str = "1") -> list[EnvelopeItem]:
    out: list[EnvelopeItem] = []
    for r in server.requests():
        assert r.method == "POST" and r.path == f"/api/{project}/envelope/", r.path
        assert r.headers["content-type"] == "application/x-sentry-envelope"
        assert "sentry_key=public" in r.headers.get("x-sentry-auth", "")
        _, items = parse_envelope(r.body)
        out.extend(items)
    return out


def sentry_events(server: CaptureServer) -> list[dict[str, Any]]:
    return [item.json() for item in sentry_items(server) if item.type == "event"]


# ---------------------------------------------------------------------- PostHog


def posthog_events(server: CaptureServer, api_key: str) -> list[dict[str, Any]]:
    """Events posted to PostHog's batch endpoint (`POST /batch/`, JSON, gzip)."""
    out: list[dict[str, Any]] = []
    for r in server.requests():
        assert r.method == "POST" and r.path == "/batch/", r.path
        payload = json.loads(r.body)
        assert payload["api_key"] == api_key
        out.extend(payload["batch"])
    return out
