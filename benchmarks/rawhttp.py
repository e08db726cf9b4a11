"""A minimal blocking HTTP/1.1 keep-alive client for the latency and throughput paths.

httpx costs a few hundred microseconds per request and tops out around 150-250 MB/s on one
response here, which is the same order as what we measure; this client keeps the harness's own
share small. It speaks just enough HTTP/1.1 for our servers: Content-Length and chunked bodies.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from typing import BinaryIO, cast
from urllib.parse import quote, urlsplit

_BUFFER = 1 << 20


class RawResponse:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


class RawHttp:
    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        url = urlsplit(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._file: BinaryIO | None = None

    def _connect(self) -> tuple[socket.socket, BinaryIO]:
        if self._sock is None or self._file is None:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            file = cast(BinaryIO, sock.makefile("rb", buffering=_BUFFER))
            self._sock, self._file = sock, file
            return sock, file
        return self._sock, self._file

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._sock:
            self._sock.close()
        self._sock = self._file = None

    def __enter__(self) -> RawHttp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> RawResponse:
        target = path
        if query:
            target += "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        sock, file = self._connect()
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        status_line = file.readline()
        if not status_line:
            self.close()
            raise ConnectionError("server closed the connection")
        status = int(status_line.split(b" ", 2)[1])
        resp_headers: dict[str, str] = {}
        while True:
            line = file.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode("latin-1").partition(":")
            resp_headers[key.strip().lower()] = value.strip()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            data = b""
        elif resp_headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(file.readline().split(b";")[0], 16)
                if size == 0:
                    while file.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                parts.append(file.read(size))
                file.readline()
            data = b"".join(parts)
        elif "content-length" in resp_headers:
            data = file.read(int(resp_headers["content-length"]))
        else:
            data = file.read()
            self.close()
        if resp_headers.get("connection", "").lower() == "close":
            self.close()
        return RawResponse(status, resp_headers, data)


_BLOB_SERVER = """
import os, socket, sys
data = os.urandom(int(sys.argv[1]))
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(4)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    f = conn.makefile("rb")
    while f.readline() not in (b"\\r\\n", b""):
        pass
    conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n" % len(data) + data)
    conn.close()
"""


def client_ceiling_mb_per_s(size: int, reads: int = 3) -> float:
    """Best MB/s this client reads one `size`-byte response from a trivial local server."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOB_SERVER, str(size)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        best = 0.0
        for _ in range(reads):
            with RawHttp(f"http://127.0.0.1:{port}") as client:
                t0 = time.perf_counter()
                got = len(client.request("GET", "/").body)
                best = max(best, got / 1e6 / (time.perf_counter() - t0))
        return round(best, 1)
    finally:
        proc.kill()
        proc.wait()
