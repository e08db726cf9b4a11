"""Two `chatops serve` processes on one Postgres database (DESIGN §2, "Across replicas").

Every replica serves every stream; live wake-ups cross replicas through Postgres LISTEN/NOTIFY;
concurrent appends through different replicas keep offsets strictly increasing and lose nothing.

Both servers run with a 20 s long-poll timeout, so a live reader that is only answered because a
timer ran out (a 204 for long-poll; a keep-alive re-read for SSE) is told apart from one that was
woken by the other process: the SSE checks give up waiting after 10 s, well before that timer.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ServerProcess, SseEvent, migrate, postgres_database, sse_events, tail

LONG_POLL_TIMEOUT_MS = 20_000
# Longest wait for one SSE event: under the servers' 20 s idle re-read, so only a cross-process
# wake-up can deliver the event in time. A hang guard, not a performance assertion.
SSE_EVENT_GUARD_S = 10.0
# Hang guard for a long-poll: past the server's timeout, so a missed wake-up shows as its 204.
LONG_POLL_GUARD_S = LONG_POLL_TIMEOUT_MS / 1000 + 15
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass
class Pair:
    a: ServerProcess
    b: ServerProcess

    def logs(self) -> str:
        return "\n".join(
            f"--- {s.name} stderr ---\n{tail(s.stderr_path, 2000)}" for s in (self.a, self.b)
        )


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Servers A and B on one freshly migrated Postgres database."""
    log_dir: Path = tmp_path_factory.mktemp("cross_process")
    env = {"STREAMS_LONG_POLL_TIMEOUT_MS": str(LONG_POLL_TIMEOUT_MS)}
    with postgres_database("chatops_xproc") as url:
        migrate(url)
        with (
            ServerProcess(url, log_dir, "A", **env) as a,
            ServerProcess(url, log_dir, "B", **env) as b,
        ):
            yield Pair(a, b)


def stream_url(server: ServerProcess, path: str) -> str:
    return f"{server.base_url}/v1/stream/{path}"


def new_path(kind: str) -> str:
    return f"xproc/{kind}-{secrets.token_hex(4)}"


async def create_stream(client: httpx.AsyncClient, url: str) -> None:
    response = await client.put(url, headers=JSON_HEADERS)
    assert response.status_code == 201, f"PUT {url}: {response.status_code} {response.text}"


async def append(client: httpx.AsyncClient, url: str, message: Any) -> str:
    response = await client.post(url, json=message, headers=JSON_HEADERS)
    assert response.status_code == 204, f"POST {url}: {response.status_code} {response.text}"
    offset: str = response.headers["Stream-Next-Offset"]
    return offset


async def read_all(
    client: httpx.AsyncClient, url: str, offset: str = "-1"
) -> tuple[list[Any], str]:
    """Catch-up read to the tail, following Stream-Next-Offset until Stream-Up-To-Date."""
    items: list[Any] = []
    for _ in range(10_000):
        response = await client.get(url, params={"offset": offset})
        assert response.status_code == 200, f"GET ?offset={offset}: {response.status_code}"
        body = response.json()
        assert isinstance(body, list)
        items.extend(body)
        next_offset: str = response.headers["Stream-Next-Offset"]
        if response.headers.get("Stream-Up-To-Date") == "true":
            return items, next_offset
        assert body, f"a partial read from {offset} returned nothing and is not up to date"
        offset = next_offset
    pytest.fail("the read never reached Stream-Up-To-Date")


# --------------------------------------------------------------------------- (a) long-poll


async def test_long_poll_on_one_process_is_woken_by_append_on_the_other(pair: Pair) -> None:
    path = new_path("long-poll")
    async with httpx.AsyncClient(timeout=LONG_POLL_GUARD_S) as client:
        await create_stream(client, stream_url(pair.a, path))
        tail_offset = await append(client, stream_url(pair.a, path), {"seed": True})

        # Reader on B, writer A (the case in question), then the other way round, then again.
        rounds = [(pair.a, pair.b), (pair.b, pair.a), (pair.a, pair.b)]
        for i, (writer, reader) in enumerate(rounds):
            poll = asyncio.create_task(
                client.get(
                    stream_url(reader, path), params={"offset": tail_offset, "live": "long-poll"}
                )
            )
            # Ordering help only: let the long-poll reach the reader and start waiting. Even if it
            # did not, the assertions below stay correct (they are on status and content).
            await asyncio.sleep(0.5)
            assert not poll.done(), (
                f"round {i}: the long-poll on {reader.name} answered before anything was "
                f"appended: {poll.result().status_code} {poll.result().text[:200]}"
            )
            message = {"round": i, "via": writer.name}
            started = time.monotonic()
            offset = await append(client, stream_url(writer, path), message)
            response = await asyncio.wait_for(poll, LONG_POLL_GUARD_S)
            elapsed = time.monotonic() - started
            assert response.status_code == 200, (
                f"round {i}: the long-poll on {reader.name} got {response.status_code} "
                f"{elapsed:.1f}s after the append through {writer.name}; a 204 at the "
                f"{LONG_POLL_TIMEOUT_MS / 1000:.0f}s timeout means the wake-up never crossed "
                f"processes\n{pair.logs()}"
            )
            assert response.json() == [message], f"round {i} (answered after {elapsed:.1f}s)"
            assert response.headers["Stream-Next-Offset"] == offset
            assert response.headers.get("Stream-Up-To-Date") == "true"
            tail_offset = offset


# --------------------------------------------------------------------------- (b) SSE


class SseReader:
    """Follows one SSE response, checking the framing as it goes: every data event (a JSON array)
    is followed by a control event; `delivered` is every message seen so far, in order."""

    def __init__(self, response: httpx.Response) -> None:
        self._events = sse_events(response)
        self.delivered: list[Any] = []
        # (streamNextOffset, len(delivered)) for each control event that followed data
        self.data_controls: list[tuple[str, int]] = []
        self._after_data = False

    async def _next(self, waiting_for: str) -> SseEvent:
        try:
            return await asyncio.wait_for(anext(self._events), SSE_EVENT_GUARD_S)
        except TimeoutError:
            pytest.fail(
                f"no SSE event within {SSE_EVENT_GUARD_S:.0f}s while waiting for {waiting_for}; "
                f"delivered so far: {self.delivered}"
            )
        except StopAsyncIteration:
            pytest.fail(f"the SSE stream ended while waiting for {waiting_for}")

    async def until(self, offset: str) -> dict[str, Any]:
        """Read events until a control event with streamNextOffset == offset; return it."""
        while True:
            event = await self._next(f"a control event at {offset}")
            if event.kind == "data":
                assert not self._after_data, "two data events without a control event between"
                batch = json.loads(event.data)
                assert isinstance(batch, list), (
                    f"a JSON-stream data event must be an array: {batch!r}"
                )
                self.delivered.extend(batch)
                self._after_data = True
                continue
            assert event.kind == "control", f"unexpected SSE event {event}"
            control: dict[str, Any] = json.loads(event.data)
            next_offset = control["streamNextOffset"]
            if self._after_data:
                self.data_controls.append((next_offset, len(self.delivered)))
                self._after_data = False
            if next_offset == offset:
                return control
            assert next_offset < offset, f"control event at {next_offset}, beyond {offset}"


async def test_sse_on_one_process_sees_appends_made_through_the_other(pair: Pair) -> None:
    path = new_path("sse")
    url_a, url_b = stream_url(pair.a, path), stream_url(pair.b, path)
    sent: list[Any] = []
    offsets: list[str] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None)) as client:
        await create_stream(client, url_a)
        for i in range(2):  # history the SSE reader catches up on first
            sent.append({"i": i, "phase": "history"})
            offsets.append(await append(client, url_a, sent[-1]))

        async with client.stream("GET", url_b, params={"offset": "-1", "live": "sse"}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].split(";")[0] == "text/event-stream"
            reader = SseReader(resp)
            control = await reader.until(offsets[-1])
            assert control.get("upToDate") is True
            assert reader.delivered == sent

            # Live: one append through A at a time, each must reach the reader on B on its own
            # (each needs its own cross-process wake-up).
            for i in range(2, 8):
                sent.append({"i": i, "phase": "live"})
                offsets.append(await append(client, url_a, sent[-1]))
                control = await reader.until(offsets[-1])
                assert control.get("upToDate") is True
                assert reader.delivered == sent, f"after live append {i}"

    # Every control event after data names an offset A returned, and the data up to it is
    # exactly what had been appended up to that offset.
    assert reader.data_controls, "no control event followed a data event"
    for next_offset, count in reader.data_controls:
        assert next_offset in offsets, f"control offset {next_offset} was never returned by A"
        assert count == offsets.index(next_offset) + 1, (
            f"at control offset {next_offset} the reader had {count} messages"
        )
    assert [o for o, _ in reader.data_controls] == sorted({o for o, _ in reader.data_controls})


# --------------------------------------------------------------------------- (c) concurrent writes


WRITERS_PER_PROCESS = 8
APPENDS_PER_WRITER = 30


@dataclass(frozen=True)
class Ack:
    writer: int
    n: int
    offset: str


async def test_concurrent_appends_through_both_processes_lose_nothing(pair: Pair) -> None:
    path = new_path("concurrent")
    url_a, url_b = stream_url(pair.a, path), stream_url(pair.b, path)
    acks: list[Ack] = []

    async def writer(client: httpx.AsyncClient, url: str, w: int) -> None:
        for n in range(APPENDS_PER_WRITER):
            acks.append(Ack(w, n, await append(client, url, {"w": w, "n": n})))

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        await create_stream(client, url_a)
        total = 2 * WRITERS_PER_PROCESS
        await asyncio.wait_for(
            asyncio.gather(
                *(writer(client, url_a if w % 2 == 0 else url_b, w) for w in range(total))
            ),
            timeout=90,
        )
        assert len(acks) == total * APPENDS_PER_WRITER

        items_a, tail_a = await read_all(client, url_a)
        items_b, tail_b = await read_all(client, url_b)
        assert items_a == items_b, "the two processes serve different logs"
        assert tail_a == tail_b

        stream = [(m["w"], m["n"]) for m in items_a]
        counts = Counter(stream)
        assert not [k for k, c in counts.items() if c > 1], "messages stored more than once"
        assert set(counts) == {(a.writer, a.n) for a in acks}, "lost or phantom messages"
        for w in range(total):
            assert [n for ww, n in stream if ww == w] == list(range(APPENDS_PER_WRITER))

        offsets = [a.offset for a in acks]
        assert len(set(offsets)) == len(offsets), "two appends were given the same offset"
        position = {k: i for i, k in enumerate(stream)}
        by_offset = [(a.writer, a.n) for a in sorted(acks, key=lambda a: a.offset)]
        assert by_offset == stream, "offsets do not increase strictly along the stream"
        assert tail_a == max(offsets)
        for w in range(total):
            mine = [a.offset for a in acks if a.writer == w]
            assert mine == sorted(mine) and len(set(mine)) == len(mine)

        # An offset one process returned resumes correctly on the other.
        ordered = sorted(acks, key=lambda a: a.offset)
        for ack in ordered[:: len(ordered) // 8]:
            other = url_b if ack.writer % 2 == 0 else url_a
            items, _ = await read_all(client, other, ack.offset)
            expected = stream[position[(ack.writer, ack.n)] + 1 :]
            assert [(m["w"], m["n"]) for m in items] == expected

        for url in (url_a, url_b):
            head = await client.head(url)
            assert head.headers["Stream-Next-Offset"] == tail_a
