"""The benchmark scenarios. Each takes a running server and returns a JSON-able result dict.

Every scenario is bounded in time and in requests, and talks only to the server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from benchmarks.loadgen import LoadResult, percentiles, run_load
from benchmarks.rawhttp import RawHttp, client_ceiling_mb_per_s
from benchmarks.servers import Server

JSON = "application/json"
OCTET = "application/octet-stream"
# Catch-up reads ask for the raw bytes: compression would measure zlib, not the server.
IDENTITY = {"Accept-Encoding": "identity"}

SCENARIOS = ("appends", "appends_many", "longpoll", "catchup", "sse")
Result = dict[str, Any]


@dataclass
class Config:
    duration_s: float = 10.0
    warmup_s: float = 2.0
    connections: int = 75
    many_streams: int = 75
    max_requests: int = 400_000  # per measured load run, on top of the time bound
    longpoll_messages: int = 200
    longpoll_gap_ms: tuple[float, float] = (10.0, 30.0)
    catchup_mb: int = 64
    catchup_chunk_kb: int = 64
    catchup_reads: int = 3
    sse_readers: int = 1000
    sse_hold_s: float = 5.0
    wrk: str | None = None


def _run_id() -> str:
    return f"bench-{int(time.time())}-{secrets.token_hex(3)}"


def _json_body(size: int = 100) -> bytes:
    """A JSON object message of exactly `size` bytes."""
    head = b'{"type":"bench","seq":0,"pad":"'
    tail = b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def _create(client: httpx.Client, server: Server, path: str, content_type: str) -> str:
    resp = client.put(server.stream_url(path), headers={"Content-Type": content_type})
    if resp.status_code not in (200, 201):
        raise RuntimeError(f"PUT {path} -> {resp.status_code}: {resp.text[:200]}")
    return str(resp.headers.get("Stream-Next-Offset", "-1"))


def _read_all(
    client: httpx.Client, server: Server, path: str, max_requests: int = 100_000
) -> tuple[list[bytes], int]:
    """Catch-up read from -1 until Stream-Up-To-Date; returns the bodies and the request count."""
    offset, bodies = "-1", []
    for n in range(1, max_requests + 1):
        resp = client.get(server.stream_url(path), params={"offset": offset}, headers=IDENTITY)
        if resp.status_code != 200:
            raise RuntimeError(f"GET {path}?offset={offset} -> {resp.status_code}")
        bodies.append(resp.content)
        offset = resp.headers["Stream-Next-Offset"]
        if resp.headers.get("Stream-Up-To-Date", "").lower() == "true":
            return bodies, n
    raise RuntimeError(f"{path}: not up to date after {max_requests} reads")


def _settle(client: httpx.Client, server: Server, paths: list[str], limit_s: float = 30) -> None:
    """Wait until no stream's tail moves for half a second (in-flight appends have landed)."""
    previous: list[str] | None = None
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        tails = [
            client.head(server.stream_url(p)).headers.get("Stream-Next-Offset", "") for p in paths
        ]
        if tails == previous:
            return
        previous = tails
        time.sleep(0.5)


def _count_json_messages(
    client: httpx.Client, server: Server, path: str, expected: object
) -> tuple[int, int]:
    """(stored messages, messages differing from `expected`) of a JSON stream."""
    bodies, _ = _read_all(client, server, path)
    count = mismatched = 0
    for body in bodies:
        messages = json.loads(body)
        count += len(messages)
        mismatched += sum(1 for m in messages if m != expected)
    return count, mismatched


# --- Appends under load -------------------------------------------------------------------


def appends(server: Server, cfg: Config, streams: int = 1) -> Result:
    """75 concurrent writers POSTing 100-byte JSON messages; then check what was stored."""
    run = _run_id()
    body = _json_body(100)
    expected = json.loads(body)
    paths = [f"{run}-s{i}" for i in range(streams)]
    targets = [server.stream_path(p) for p in paths]

    def load(duration_s: float) -> LoadResult:
        return run_load(
            cfg.wrk,
            server.base_url,
            targets,
            body,
            content_type=JSON,
            connections=cfg.connections,
            duration_s=duration_s,
            max_requests=cfg.max_requests,
        )

    def stored_counts(client: httpx.Client) -> tuple[int, int]:
        total = altered = 0
        for path in paths:
            count, bad = _count_json_messages(client, server, path, expected)
            total += count
            altered += bad
        return total, altered

    with httpx.Client(timeout=120.0) as client:
        for path in paths:
            _create(client, server, path, JSON)
        # Warm up on the same streams (the reference server keeps at most 100 write handles open;
        # more streams written at once make it fail appends), then count what is already there.
        if cfg.warmup_s > 0:
            load(cfg.warmup_s)
            _settle(client, server, paths)
        baseline, _ = stored_counts(client)
        cpu0 = server.cpu_seconds()
        result = load(cfg.duration_s)
        cpu = server.cpu_seconds() - cpu0
        _settle(client, server, paths)  # requests in flight when the generator stopped finish
        after, mismatched = stored_counts(client)
    stored = after - baseline
    # The generator stops with up to one request in flight per connection: the server may store
    # those without the generator counting their 2xx. Fewer stored than acknowledged is data loss;
    # more than the connections' worth means failed (non-2xx) appends were stored anyway.
    extra = stored - result.ok
    durable_ok = 0 <= extra <= cfg.connections and mismatched == 0
    return {
        "streams": streams,
        "connections": cfg.connections,
        "body_bytes": len(body),
        "load": result.as_dict(),
        "appends_per_s": round(result.rate, 1),
        "latency_ms": result.latency_ms,
        "server_cpu_s": round(cpu, 2),
        "server_cpu_ms_per_append": round(cpu * 1000 / result.ok, 4) if result.ok else None,
        "verify": {
            "acknowledged_2xx": result.ok,
            "non_2xx": sum(result.non_2xx.values()),
            "stored": stored,
            "stored_before_run": baseline,
            "stored_minus_acknowledged": extra,
            "allowed_extra": cfg.connections,
            "mismatched_messages": mismatched,
            "ok": durable_ok,
        },
    }


def appends_many(server: Server, cfg: Config) -> Result:
    return appends(server, cfg, streams=cfg.many_streams)


# --- Append -> live long-poll reader ------------------------------------------------------


def longpoll(server: Server, cfg: Config) -> Result:
    """A reader loops GET ?live=long-poll; a writer appends timestamped messages with small gaps."""
    path = f"{_run_id()}-longpoll"
    target = server.stream_path(path)
    total = cfg.longpoll_messages
    received: dict[int, float] = {}
    reader_error: list[str] = []
    reader_requests = [0]
    deadline = time.monotonic() + 30 + total * cfg.longpoll_gap_ms[1] / 1000
    with httpx.Client(timeout=60.0) as setup:
        start_offset = _create(setup, server, path, JSON)

    def reader() -> None:
        offset, cursor = start_offset, None
        with RawHttp(server.base_url) as client:
            while len(received) < total and time.monotonic() < deadline:
                # Query parameters in lexicographic order, as the protocol recommends.
                query: dict[str, str] = {"cursor": cursor} if cursor else {}
                query |= {"live": "long-poll", "offset": offset}
                try:
                    resp = client.request("GET", target, query)
                except (OSError, ValueError) as exc:
                    reader_error.append(repr(exc))
                    return
                now = time.perf_counter_ns()
                reader_requests[0] += 1
                if resp.status == 200:
                    for message in json.loads(resp.body):
                        received[message["i"]] = (now - message["t"]) / 1e6
                elif resp.status != 204:
                    reader_error.append(f"GET -> {resp.status}")
                    return
                offset = resp.headers["stream-next-offset"]
                cursor = resp.headers.get("stream-cursor")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    time.sleep(0.3)  # the reader is parked in its first long-poll before anything is written
    rng = random.Random(7)
    append_ms: list[float] = []
    pad = "y" * 40
    with RawHttp(server.base_url) as client:
        for i in range(total):
            time.sleep(rng.uniform(*cfg.longpoll_gap_ms) / 1000)
            sent = time.perf_counter_ns()
            body = json.dumps({"i": i, "t": sent, "pad": pad}).encode()
            resp = client.request("POST", target, headers={"Content-Type": JSON}, body=body)
            append_ms.append((time.perf_counter_ns() - sent) / 1e6)
            if resp.status // 100 != 2:
                raise RuntimeError(f"append -> {resp.status}: {resp.body[:200]!r}")
    thread.join(timeout=max(1.0, deadline - time.monotonic()))
    latencies = [received[i] for i in sorted(received)]
    return {
        "messages": total,
        "received": len(received),
        "reader_requests": reader_requests[0],
        "reader_error": reader_error[0] if reader_error else None,
        "latency_ms": percentiles(latencies),
        "append_latency_ms": percentiles(append_ms),
        "ok": len(received) == total and not reader_error,
    }


# --- Catch-up read of a large stream ------------------------------------------------------


def _raw_read_all(client: RawHttp, target: str, limit: int = 100_000) -> tuple[list[bytes], int]:
    offset, bodies = "-1", []
    for n in range(1, limit + 1):
        resp = client.request("GET", target, {"offset": offset}, {"Accept-Encoding": "identity"})
        if resp.status != 200:
            raise RuntimeError(f"GET {target}?offset={offset} -> {resp.status}")
        bodies.append(resp.body)
        offset = resp.headers["stream-next-offset"]
        if resp.headers.get("stream-up-to-date", "").lower() == "true":
            return bodies, n
    raise RuntimeError(f"{target}: not up to date after {limit} reads")


def catchup(server: Server, cfg: Config) -> Result:
    """Write ~64 MB in 64 KB appends, then read it back from -1 following Stream-Next-Offset."""
    path = f"{_run_id()}-catchup"
    target = server.stream_path(path)
    chunk = cfg.catchup_chunk_kb * 1024
    count = cfg.catchup_mb * 1024 * 1024 // chunk
    digest = hashlib.sha256()
    with httpx.Client(timeout=60.0) as setup:
        _create(setup, server, path, OCTET)
    with RawHttp(server.base_url) as client:
        t0 = time.perf_counter()
        for _ in range(count):
            data = os.urandom(chunk)
            digest.update(data)
            resp = client.request("POST", target, headers={"Content-Type": OCTET}, body=data)
            if resp.status // 100 != 2:
                raise RuntimeError(f"append -> {resp.status}: {resp.body[:200]!r}")
        write_s = time.perf_counter() - t0
    total = count * chunk
    reads: list[dict[str, Any]] = []
    verified = True
    for _ in range(cfg.catchup_reads):
        with RawHttp(server.base_url, timeout=120.0) as client:  # a new connection, a new client
            t0 = time.perf_counter()
            bodies, requests = _raw_read_all(client, target)
            elapsed = time.perf_counter() - t0
        got = sum(len(b) for b in bodies)
        same = got == total and hashlib.sha256(b"".join(bodies)).digest() == digest.digest()
        verified = verified and same
        reads.append(
            {
                "seconds": round(elapsed, 3),
                "mb_per_s": round(got / 1e6 / elapsed, 1),
                "requests": requests,
                "bytes": got,
                "verified": same,
            }
        )
        del bodies
    rates = sorted(r["mb_per_s"] for r in reads)
    return {
        "bytes": total,
        "appends": count,
        "append_bytes": chunk,
        "write_mb_per_s": round(total / 1e6 / write_s, 1),
        "write_appends_per_s": round(count / write_s, 1),
        "reads": reads,
        "read_mb_per_s_median": rates[len(rates) // 2],
        "read_mb_per_s_best": rates[-1],
        "client_ceiling_mb_per_s": client_ceiling_mb_per_s(min(total, 64 * 1024 * 1024)),
        "ok": verified,
    }


# --- 1,000 idle SSE readers ---------------------------------------------------------------


class _ChunkedDecoder:
    """Incremental decoder for a Transfer-Encoding: chunked body."""

    def __init__(self) -> None:
        self._buf = b""
        self._remaining = 0  # data bytes left in the current chunk
        self._need_crlf = False  # the CRLF that ends a chunk's data is still to come
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while not self.done:
            if self._remaining:
                if not self._buf:
                    break
                take = self._buf[: self._remaining]
                out += take
                self._buf = self._buf[len(take) :]
                self._remaining -= len(take)
                self._need_crlf = self._remaining == 0
            elif self._need_crlf:
                if len(self._buf) < 2:
                    break
                self._buf = self._buf[2:]
                self._need_crlf = False
            else:
                line_end = self._buf.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(self._buf[:line_end].split(b";")[0], 16)
                self._buf = self._buf[line_end + 2 :]
                self._remaining = size
                self.done = size == 0
        return bytes(out)


class _SseReader:
    """One raw-socket SSE reader: records when the stream opened and when a data event arrived."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host, self.port, self.path = host, port, path
        self.opened = asyncio.Event()
        self.got_data = asyncio.Event()
        self.data_at_ns = 0
        self.closed_early = False
        self.error: str | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def run(self) -> None:
        try:
            reader, self._writer = await asyncio.open_connection(self.host, self.port)
            self._writer.write(
                f"GET {self.path}?live=sse&offset=-1 HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Accept: text/event-stream\r\nAccept-Encoding: identity\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1]
            if status != b"200":
                self.error = f"status {status.decode()}"
                return
            chunked = b"transfer-encoding: chunked" in head.lower()
            decoder = _ChunkedDecoder() if chunked else None
            text = b""
            while True:
                data = await reader.read(65536)
                if not data:
                    self.closed_early = True
                    return
                text += decoder.feed(data) if decoder else data
                text = text.replace(b"\r\n", b"\n")
                while b"\n\n" in text:
                    event, text = text.split(b"\n\n", 1)
                    kind = next(
                        (ln[6:].strip() for ln in event.split(b"\n") if ln.startswith(b"event:")),
                        b"",
                    )
                    if kind == b"control":
                        self.opened.set()
                    elif kind == b"data" and not self.got_data.is_set():
                        self.data_at_ns = time.perf_counter_ns()
                        self.got_data.set()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.error = repr(exc)
        finally:
            self.opened.set()  # never leave a waiter hanging

    def close(self) -> None:
        if self._writer:
            self._writer.close()


async def _gather_limited(limit: int, items: list[str], fn: Callable[[str], Any]) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(item: str) -> Any:
        async with sem:
            return await fn(item)

    return await asyncio.gather(*(one(i) for i in items))


async def _sse(server: Server, cfg: Config) -> Result:
    run = _run_id()
    n = cfg.sse_readers
    paths = [f"{run}-sse-{i}" for i in range(n)]
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:

        async def create(path: str) -> int:
            resp = await client.put(server.stream_url(path), headers={"Content-Type": JSON})
            return resp.status_code

        statuses = await _gather_limited(32, paths, create)
        if any(s not in (200, 201) for s in statuses):
            raise RuntimeError(f"stream creation failed: {sorted(set(statuses))}")
        await asyncio.sleep(1.0)
        rss_before = server.rss_bytes()

        host = server.base_url.split("//", 1)[1].split(":")[0]
        port = int(server.base_url.rsplit(":", 1)[1])
        readers = [_SseReader(host, port, server.stream_path(p)) for p in paths]
        t0 = time.perf_counter()
        tasks: list[asyncio.Task[None]] = []
        for reader in readers:
            tasks.append(asyncio.create_task(reader.run()))
            if len(tasks) % 100 == 0:
                await asyncio.sleep(0)  # let accepts keep up with connects
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(r.opened.wait() for r in readers)), timeout=60
                )
            open_s = time.perf_counter() - t0
            opened = sum(1 for r in readers if r.opened.is_set() and r.error is None)
            samples = []
            for _ in range(max(1, round(cfg.sse_hold_s))):
                await asyncio.sleep(1.0)
                samples.append(server.rss_bytes())
            rss_after = max(samples)
            still_open = sum(1 for r in readers if not r.closed_early and r.error is None)

            # Liveness: one append per stream must reach its idle reader.
            sent_at: dict[str, int] = {}

            async def append(path: str) -> int:
                sent_at[path] = time.perf_counter_ns()
                resp = await client.post(
                    server.stream_url(path), content=b'{"ping":1}', headers={"Content-Type": JSON}
                )
                return resp.status_code

            append_status = await _gather_limited(32, paths, append)
            acked = [r for r, s in zip(readers, append_status, strict=True) if 200 <= s < 300]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(r.got_data.wait() for r in acked)), timeout=30
                )
            delivered = [
                (r.data_at_ns - sent_at[p]) / 1e6
                for r, p in zip(readers, paths, strict=True)
                if r.got_data.is_set()
            ]
        finally:
            for reader in readers:
                reader.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    errors = sorted({r.error for r in readers if r.error})
    mb = 1024 * 1024
    return {
        "readers": n,
        "opened": opened,
        "open_seconds": round(open_s, 2),
        "still_open_after_hold": still_open,
        "hold_s": cfg.sse_hold_s,
        "rss_before_mb": round(rss_before / mb, 1),
        "rss_with_readers_mb": round(rss_after / mb, 1),
        "rss_delta_mb": round((rss_after - rss_before) / mb, 1),
        "rss_per_reader_kb": round((rss_after - rss_before) / 1024 / n, 1),
        "live_appends_2xx": len(acked),
        "live_append_statuses": {
            str(code): append_status.count(code) for code in sorted(set(append_status))
        },
        "live_delivered": len(delivered),
        "live_delivery_ms": percentiles(delivered),
        "errors": errors[:5],
        "ok": opened == n and still_open == n and len(acked) == n and len(delivered) == n,
    }


def sse(server: Server, cfg: Config) -> Result:
    return asyncio.run(_sse(server, cfg))


RUNNERS: dict[str, Callable[[Server, Config], Result]] = {
    "appends": appends,
    "appends_many": appends_many,
    "longpoll": longpoll,
    "catchup": catchup,
    "sse": sse,
}
