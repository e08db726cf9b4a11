"""Graceful drain of a real `chatops serve` process on SIGTERM (issue 6, item 5).

A rolling deploy sends SIGTERM to the old replica while a new one already serves the same
database. Running generations that fit DRAIN_TIMEOUT_S complete; the rest are saved as
interrupted with a RUN_ERROR on their streams; live readers are ended at once, at a chunk
boundary, and resume on the other replica from their last offset without a gap or a duplicate;
a request already in flight when the signal arrives is refused with 503 `draining`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from durable_streams import astream

from tests.replicas.helpers import (
    BASE_ENV,
    RawSseReader,
    assistant_ids,
    events_of,
    generations,
    persisted_text,
    read_all,
    run_ended,
    text_of,
    wait_exit,
    wait_idle,
)
from tests.support import ServerProcess, migrate, postgres_database

SHORT_TOKENS = 30  # 3 s at 10 tokens/s: running at SIGTERM, and done well within the drain
LONG_TOKENS = 3000  # 300 s: cannot fit the drain
DRAIN_TIMEOUT_S = 8
ENV = {
    **BASE_ENV,
    "SIMULATOR_TOKENS_PER_S": "10",
    "DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
    # Live reads that would wait for minutes: only the drain can end them promptly.
    "STREAMS_LONG_POLL_TIMEOUT_MS": "120000",
    "STREAMS_SSE_MAX_DURATION_S": "600",
}
# Hang guards (a failure, never a measurement): well under the live-read timeouts above.
READER_END_GUARD_S = 30.0
EXIT_GUARD_S = DRAIN_TIMEOUT_S + 40.0
CLEAN_EXIT = (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_database("chatops_drain") as url:
        migrate(url)
        yield url


def sigterm(server: ServerProcess) -> None:
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGTERM)


async def until(condition: Any, guard_s: float, what: str) -> None:
    deadline = time.monotonic() + guard_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {guard_s:.0f}s")
        await asyncio.sleep(0.02)


class FailoverReader:
    """A client on the official durable-streams library following a session through a deploy:
    it reads from A until A ends the event stream, then resumes on B from the last offset it
    was given."""

    def __init__(self, url_a: str, url_b: str) -> None:
        self.url_a, self.url_b = url_a, url_b
        self.from_a: list[dict[str, Any]] = []
        self.from_b: list[dict[str, Any]] = []
        self.offset = "-1"
        self.a_end = "still reading"

    async def run(self, message_id: Any) -> None:
        try:
            async with astream(self.url_a, offset=self.offset, live="sse") as response:
                async for event in response.iter_events(mode="json_batches"):
                    self.from_a.extend(event.data)
                    self.offset = event.next_offset
            self.a_end = "clean"
        except Exception as exc:  # the way a reader learns of a crash, not of a drain
            self.a_end = type(exc).__name__
        async with astream(self.url_b, offset=self.offset, live="sse") as response:
            async for event in response.iter_events(mode="json_batches"):
                self.from_b.extend(event.data)
                if run_ended(self.from_a + self.from_b, message_id()):
                    return


@pytest.mark.timeout(300)
async def test_sigterm_during_twenty_generations(pg_url: str, tmp_path: Path) -> None:
    a = ServerProcess(pg_url, tmp_path, "A", **ENV).start()
    b = ServerProcess(pg_url, tmp_path, "B", **ENV).start()
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None)) as client:
            sids = []
            for _ in range(20):
                created = await client.post(f"{a.base_url}/v1/sessions", json={})
                assert created.status_code == 201, created.text
                sids.append(created.json()["id"])
            short, long = sids[:10], sids[10:]
            followed = long[0]
            stream_a = f"{a.base_url}/v1/stream/sessions/{followed}"
            stream_b = f"{b.base_url}/v1/stream/sessions/{followed}"

            # Two readers of one long session on A, following from the start.
            raw = RawSseReader()
            alive_when_raw_ended: list[bool] = []

            async def follow_raw() -> None:
                await raw.follow(client, stream_a, "-1")
                assert a.proc is not None
                alive_when_raw_ended.append(a.proc.poll() is None)

            raw_task = asyncio.create_task(follow_raw())
            failover = FailoverReader(stream_a, stream_b)

            def followed_message() -> str:
                return assistant_ids(failover.from_a + failover.from_b)[0]

            failover_task = asyncio.create_task(failover.run(followed_message))

            sends = await asyncio.gather(
                *(
                    client.post(
                        f"{a.base_url}/v1/sessions/{sid}/messages",
                        json={"content": f"answer {sid} [[tokens:{n}]]"},
                    )
                    for sid, n in [(s, SHORT_TOKENS) for s in short]
                    + [(s, LONG_TOKENS) for s in long]
                )
            )
            assert [s.status_code for s in sends] == [202] * 20, [s.text for s in sends]
            acked = dict(zip(sids, (s.json() for s in sends), strict=True))
            gen_ids = [acked[sid]["generation_id"] for sid in sids]

            # The readers have some of the followed answer; every generation is running.
            await until(
                lambda: (
                    text_of(events_of(raw.records, assistant_ids(raw.records)[0]))
                    if assistant_ids(raw.records)
                    else False
                ),
                30,
                "the SSE reader on A saw text of the answer",
            )
            await until(lambda: failover.from_a, 30, "the failover reader saw records")
            statuses = generations(pg_url, gen_ids)
            assert {statuses[g][0] for g in gen_ids} == {"running"}, statuses
            signalled = datetime.now(UTC)
            sigterm(a)

            # Live readers are ended by the drain, while A is still finishing generations.
            await asyncio.wait_for(raw_task, READER_END_GUARD_S)
            assert raw.ended and raw.last_kind == "control", "the SSE ended mid-event"
            assert alive_when_raw_ended == [True], "the reader was only ended by the exit"
            await asyncio.wait_for(failover_task, EXIT_GUARD_S + 30)
            assert failover.a_end == "clean"

            assert wait_exit(a.proc, EXIT_GUARD_S) in CLEAN_EXIT

            # Resumed on B: exactly the stream, no gap, no duplicate; the raw reader had a prefix.
            full, _ = await read_all(client, b.base_url, followed)
            assert failover.from_a + failover.from_b == full
            assert raw.records == full[: len(raw.records)]
            assert failover.from_b, "nothing was read on B"

            finished = generations(pg_url, gen_ids)
            for sid in sids:
                session = await wait_idle(client, b.base_url, sid, guard_s=10)
                user, assistant = session["messages"][-2:]
                # The acknowledged user message is there.
                assert user["id"] == acked[sid]["message_id"] and user["role"] == "user"
                records, _ = await read_all(client, b.base_url, sid)
                events = events_of(records, assistant["id"])
                assert text_of(events) == persisted_text(assistant)
                status, finished_at = finished[acked[sid]["generation_id"]]
                assert finished_at is not None and finished_at > signalled
                if sid in short:
                    # It fit the drain: complete, after the signal.
                    assert status == "completed" and assistant["status"] == "complete"
                    assert events[-1]["type"] == "RUN_FINISHED"
                    assert len(persisted_text(assistant).split()) == SHORT_TOKENS
                else:
                    assert status == "interrupted" and assistant["status"] == "interrupted"
                    assert events[-1]["type"] == "RUN_ERROR"
                    assert events[-1]["error"]["code"] == "interrupted"
                    assert persisted_text(assistant), "the partial answer was not kept"
                    terminals = [e for e in events if e["type"] in ("RUN_FINISHED", "RUN_ERROR")]
                    assert len(terminals) == 1

            # Every session takes a new message on the replica that stayed.
            again = await asyncio.gather(
                *(
                    client.post(
                        f"{b.base_url}/v1/sessions/{sid}/messages",
                        json={"content": "still there? [[tokens:3]]"},
                    )
                    for sid in sids
                )
            )
            assert [r.status_code for r in again] == [202] * 20
            for sid in sids:
                session = await wait_idle(client, b.base_url, sid)
                assert session["messages"][-1]["status"] == "complete"
    finally:
        a.stop()
        b.stop()


def _raw_request_head(port: int, body_length: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n" + f"Content-Length: {body_length}\r\n\r\n".encode()
    )
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return status, headers, body


@pytest.mark.timeout(120)
async def test_the_drain_begins_with_the_signal(fresh_database_url: str, tmp_path: Path) -> None:
    """Uvicorn runs the lifespan shutdown only after open connections finish, so a drain begun
    there could not refuse a request already in flight nor end a waiting long-poll. Here a
    request whose body is still arriving when SIGTERM lands must be refused, and a long-poll
    that would wait two minutes must be answered at once."""
    server = ServerProcess(fresh_database_url, tmp_path, "A", **ENV).start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            sid = (await client.post("/v1/sessions", json={})).json()["id"]
            url = f"/v1/stream/sessions/{sid}"
            tail = (await client.head(url)).headers["stream-next-offset"]
            poll = asyncio.create_task(
                client.get(url, params={"offset": tail, "live": "long-poll"})
            )
            in_flight = _raw_request_head(server.port, 2)
            in_flight.sendall(b"{")
            # Ordering help only: let the server take up both requests before the signal.
            await asyncio.sleep(0.5)
            assert not poll.done()
            sigterm(server)

            answered = await asyncio.wait_for(poll, READER_END_GUARD_S)
            assert answered.status_code == 204
            assert answered.headers["stream-next-offset"] == tail
            assert answered.headers.get("stream-up-to-date") == "true"

            # The drain has begun (the long-poll says so); the in-flight request completes now.
            in_flight.sendall(b"}")
            status, headers, body = await asyncio.to_thread(_read_response, in_flight)
            in_flight.close()
            assert status == 503, body
            assert headers["retry-after"].isdigit()
            refused = json.loads(body)
            assert refused["error"] == "draining" and refused["detail"]
        assert wait_exit(server.proc, EXIT_GUARD_S) in CLEAN_EXIT
    finally:
        server.stop()
