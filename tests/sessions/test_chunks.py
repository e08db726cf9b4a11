"""ChunkWriter on the real store (SQLite and Postgres): how AG-UI events become stream appends."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI

from streams_service.app import Services
from streams_service.durable.model import AppendRequest, CreateRequest
from streams_service.errors import AppError
from streams_service.sessions import chunks, records
from streams_service.sessions.chunks import ChunkWriter, Flusher
from streams_service.sessions.generation import FlushPace, flush_interval_s


async def _events(client: httpx.AsyncClient, path: str) -> list[list[dict[str, Any]]]:
    """The chunk events of each append, in order (one inner list per append)."""
    response = await client.get(f"/v1/stream/{path}", params={"offset": "-1"})
    assert response.status_code == 200
    return [[json.loads(row["value"]["chunk"])] for row in response.json()]


async def _writer(
    app: FastAPI, interval_s: float = 0.05, pace: Callable[[], float] | None = None
) -> tuple[str, ChunkWriter]:
    """A fresh stream (the database outlives one test) and a writer onto it."""
    services: Services = app.state.services
    path = f"sessions/chunks-{uuid.uuid4()}"
    await services.store.create(path, CreateRequest(content_type="application/json"))
    writer = ChunkWriter(
        services.store,
        path,
        message_id="m1",
        producer_id="gen-test",
        flush_interval_s=interval_s,
        pace=pace,
    )
    return path, writer


async def test_deltas_merge_and_an_opening_event_rides_with_the_first_delta(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    path, writer = await _writer(app, interval_s=10.0)  # nothing goes out by the timer here
    async with writer:
        await writer.emit(records.event("TEXT_MESSAGE_START", messageId="m1"), defer=True)
        assert writer.appends == 0  # deferred: waits for its first delta
        await writer.emit(
            records.event("TEXT_MESSAGE_CONTENT", messageId="m1", delta="Hel"), flush=True
        )
        assert writer.appends == 1  # the opening event and the first words: one write
        for piece in ("lo", ", ", "world"):
            await writer.emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m1", delta=piece))
        assert writer.appends == 1  # merged and pending
        await writer.emit(records.event("TEXT_MESSAGE_END", messageId="m1"))
        assert writer.appends == 2  # a structural event writes what is pending with it
    rows = [e[0] for e in await _events(client, path)]
    assert [(r["type"], r.get("delta")) for r in rows] == [
        ("TEXT_MESSAGE_START", None),
        ("TEXT_MESSAGE_CONTENT", "Hel"),
        ("TEXT_MESSAGE_CONTENT", "lo, world"),
        ("TEXT_MESSAGE_END", None),
    ]


async def test_pending_deltas_go_out_by_the_timer_and_idle_costs_nothing(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    path, writer = await _writer(app, interval_s=0.05)
    async with writer:
        await writer.emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m1", delta="a"))
        await writer.emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m1", delta="b"))
        assert writer.appends == 0
        for _ in range(100):  # bounded wait for the timer's write
            if writer.appends:
                break
            await asyncio.sleep(0.02)
        assert writer.appends == 1
        await asyncio.sleep(0.2)  # idle: no timer armed, no further writes
        assert writer.appends == 1
        # A deferred opening event with no delta after it is written by the timer too.
        await writer.emit(records.event("STEP_STARTED", stepId="s1"), defer=True)
        for _ in range(100):
            if writer.appends == 2:
                break
            await asyncio.sleep(0.02)
        assert writer.appends == 2
    rows = [e[0] for e in await _events(client, path)]
    assert [(r["type"], r.get("delta")) for r in rows] == [
        ("TEXT_MESSAGE_CONTENT", "ab"),
        ("STEP_STARTED", None),
    ]


async def test_leaving_the_writer_flushes_what_is_pending(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    path, writer = await _writer(app, interval_s=10.0)
    async with writer:
        await writer.emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m1", delta="tail"))
    assert writer.appends == 1
    assert [e[0].get("delta") for e in await _events(client, path)] == ["tail"]


async def test_queue_says_when_a_write_is_due_and_writes_nothing_itself(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    path, writer = await _writer(app, interval_s=10.0)  # nothing goes out by the timer here
    async with writer:
        start = records.event("TEXT_MESSAGE_START", messageId="m1")
        assert writer.queue(start, defer=True) is False
        delta = records.event("TEXT_MESSAGE_CONTENT", messageId="m1", delta="Hel")
        assert writer.queue(delta, flush=True) is True  # the first words: now
        assert writer.appends == 0  # queue never writes: the caller flushes
        await writer.flush()
        assert writer.appends == 1
        more = records.event("TEXT_MESSAGE_CONTENT", messageId="m1", delta="lo")
        assert writer.queue(more) is False  # merges and waits for the timer
        big = records.event("TEXT_MESSAGE_CONTENT", messageId="m1", delta="x" * 400)
        assert writer.queue(big) is True  # past flush_chars (300, the default)
        assert writer.queue(records.event("TEXT_MESSAGE_END", messageId="m1")) is True
        await writer.flush()
        assert writer.appends == 2
    rows = [e[0] for e in await _events(client, path)]
    assert [(r["type"], r.get("delta")) for r in rows] == [
        ("TEXT_MESSAGE_START", None),
        ("TEXT_MESSAGE_CONTENT", "Hel"),
        ("TEXT_MESSAGE_CONTENT", "lo" + "x" * 400),
        ("TEXT_MESSAGE_END", None),
    ]


def test_the_flush_interval_stretches_with_the_number_of_generations() -> None:
    assert flush_interval_s(0, 40, 150) == 0.04
    assert flush_interval_s(100, 40, 150) == 0.04
    assert flush_interval_s(200, 40, 150) == 0.08
    assert flush_interval_s(300, 40, 150) == 0.12
    assert flush_interval_s(5_000, 40, 150) == 0.15
    assert flush_interval_s(5_000, 40, 10) == 0.04  # a ceiling below the base leaves the base


def test_the_flush_pace_follows_the_running_count_both_ways() -> None:
    pace = FlushPace(40, 120)
    assert pace(0) == 0.04
    assert pace(200) == 0.08
    assert pace(200) == 0.08  # remembered for the same count
    assert pace(500) == 0.12  # the ceiling
    assert pace(150) == flush_interval_s(150, 40, 120) == 0.06  # and back down as they end
    assert pace(0) == 0.04


async def test_the_writer_asks_its_pace_for_each_batch(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    asked: list[int] = []

    def pace() -> float:  # what GenerationManager passes: its load-dependent interval
        asked.append(1)
        return 0.02

    path, writer = await _writer(app, interval_s=10.0, pace=pace)
    async with writer:
        for expected, piece in enumerate(("x", "y"), start=1):
            before = len(asked)
            await writer.emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m1", delta=piece))
            for _ in range(100):
                if writer.appends == expected:
                    break
                await asyncio.sleep(0.02)
            assert writer.appends == expected  # by the pace's 20 ms, not the 10 s interval
            assert len(asked) > before  # asked again for this batch
    assert [e[0].get("delta") for e in await _events(client, path)] == ["x", "y"]


class _RecordingFlusher(Flusher):
    """Records how many writers each tick wrote."""

    def __init__(self, interval: Callable[[], float]) -> None:
        super().__init__(interval)
        self.ticks: list[int] = []

    def _write(self, due: list[ChunkWriter]) -> None:  # type: ignore[override]
        self.ticks.append(len(due))
        super()._write(due)


async def _flusher_writers(
    app: FastAPI, flusher: Flusher, count: int
) -> tuple[list[str], list[ChunkWriter]]:
    services: Services = app.state.services
    paths = [f"sessions/chunks-{uuid.uuid4()}" for _ in range(count)]
    writers = []
    for i, path in enumerate(paths):
        await services.store.create(path, CreateRequest(content_type="application/json"))
        writers.append(
            ChunkWriter(
                services.store, path, message_id=f"m{i}", producer_id=f"gen-{i}", flusher=flusher
            )
        )
    return paths, writers


async def test_one_flusher_tick_writes_every_writer_that_has_deltas(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    flusher = _RecordingFlusher(lambda: 0.05)
    paths, writers = await _flusher_writers(app, flusher, 3)
    for writer in writers:
        await writer.__aenter__()
        for piece in ("a", "b"):
            await writer.emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m", delta=piece))
    assert [w.appends for w in writers] == [0, 0, 0]
    for _ in range(100):
        if all(w.appends for w in writers):
            break
        await asyncio.sleep(0.02)
    assert [w.appends for w in writers] == [1, 1, 1]
    assert flusher.ticks == [3]  # one tick wrote the three batches
    # The next delta arms it again, and a flush in between waits for nothing stale.
    await writers[0].emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m", delta="c"))
    await writers[0].flush()
    assert writers[0].appends == 2
    for writer in writers:
        await writer.__aexit__(None, None, None)
    assert flusher.ticks == [3]  # the flush wrote "c" itself; the timer had nothing left
    for path in paths[1:]:
        assert [e[0].get("delta") for e in await _events(client, path)] == ["ab"]
    assert [e[0].get("delta") for e in await _events(client, paths[0])] == ["ab", "c"]
    assert writers[0].last_offset is not None


async def test_a_batch_is_written_within_one_interval_of_its_first_delta(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    flusher = _RecordingFlusher(lambda: 0.2)
    _paths, writers = await _flusher_writers(app, flusher, 2)
    loop = asyncio.get_running_loop()
    async with writers[0], writers[1]:
        await writers[0].emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m", delta="a"))
        await asyncio.sleep(0.1)  # half an interval later, the second writer's first delta
        started = loop.time()
        await writers[1].emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m", delta="b"))
        for _ in range(100):
            if writers[0].appends:
                break
            await asyncio.sleep(0.01)
        # The first is due at 0.2 s, before the second: written alone, at its own deadline.
        assert writers[0].appends == 1 and writers[1].appends == 0
        for _ in range(100):
            if writers[1].appends:
                break
            await asyncio.sleep(0.01)
        waited = loop.time() - started
        assert writers[1].appends == 1
        # At the last tick before its interval ran out (ticks are half an interval apart).
        assert 0.1 <= waited <= 0.3
    assert flusher.ticks == [1, 1]


async def test_a_generation_woken_by_its_tick_joins_the_write_it_precedes(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    interval_s = [0.05]
    flusher = _RecordingFlusher(lambda: interval_s[0])
    paths, writers = await _flusher_writers(app, flusher, 1)
    writer = writers[0]
    loop = asyncio.get_running_loop()
    async with writer:
        await writer.emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m", delta="a"))
        until = writer.until_next_write()
        assert writer.until_next_write() is until

        async def generation() -> None:
            # What a generation does: sleep until the tick, then take what upstream sent
            # meanwhile (here, at once: emitting a delta does not suspend).
            await until
            assert writer.appends == 0  # woken before the write
            await writer.emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m", delta="b"))

        await asyncio.wait_for(generation(), timeout=5)
        for _ in range(100):
            if writer.appends:
                break
            await asyncio.sleep(0.01)
        assert writer.appends == 1
        assert flusher.ticks == [1]

        # `before` runs at the tick (a socket starts being read again); the sleeper wakes a
        # settling moment later, and the write follows it.
        await writer.emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m", delta="x"))
        called: list[float] = []
        until = writer.until_next_write(lambda: called.append(loop.time()))
        await asyncio.wait_for(until, timeout=5)
        woke = loop.time()
        assert len(called) == 1 and woke - called[0] >= chunks.SETTLE_S * 0.9
        assert writer.appends == 1  # woken before the write
        for _ in range(500):  # bounded wait for that write (slow on a loaded machine)
            if writer.appends == 2:
                break
            await asyncio.sleep(0.01)
        assert writer.appends == 2
        assert flusher.ticks == [1, 1]

        # With nothing pending, the sleep lasts one interval (at most), and the tick writes
        # nothing. A batch written some other way meanwhile does not cut it short. (A long
        # interval here, so that the flush's write is done well before it on a loaded machine.)
        interval_s[0] = 1.0
        started = loop.time()
        until = writer.until_next_write()
        await writer.emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m", delta="c"))
        await writer.flush()
        assert writer.appends == 3 and not until.done()
        await asyncio.wait_for(until, timeout=5)
        assert 0.45 <= loop.time() - started <= 2.5  # at the last tick before it is due
        for _ in range(500):  # bounded wait for the tick's write (of nothing) to run
            if len(flusher.ticks) == 3:
                break
            await asyncio.sleep(0.01)
        assert writer.appends == 3
        assert len(flusher.ticks) == 3
    assert [e[0].get("delta") for e in await _events(client, paths[0])] == ["ab", "x", "c"]


async def test_a_timer_write_that_fails_is_retried_by_the_next_flush_which_reports_it(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    services: Services = app.state.services
    path, writer = await _writer(app, interval_s=0.02)
    # Closed under the writer (as when a session is ended): its appends are refused.
    await services.store.append(path, AppendRequest(body=None, close=True))
    await writer.emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m1", delta="lost"))
    await asyncio.sleep(0.2)  # the tick has come and its write has failed
    assert writer.appends == 0
    with pytest.raises(AppError):
        await writer.emit(records.event("TEXT_MESSAGE_END", messageId="m1"))
    assert writer.appends == 0
    assert await _events(client, path) == []


class _SeqSpy:
    """Records each append the store is handed for one stream: its producer seq, and whether
    every earlier one had its outcome by then (False: sent behind a write still in flight)."""

    def __init__(self, services: Services, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[tuple[int, bool]] = []
        self._futures: list[asyncio.Future[Any]] = []
        submit = services.store.submit_append

        def spy(p: str, request: AppendRequest) -> asyncio.Future[Any]:
            future = submit(p, request)
            if p == path and request.producer is not None:
                self.sent.append((request.producer.seq, all(f.done() for f in self._futures)))
                self._futures.append(future)
            return future

        monkeypatch.setattr(services.store, "submit_append", spy)
        monkeypatch.setattr(services.store, "append", spy)


async def _locked_stream_writer(
    app: FastAPI, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, ChunkWriter, _SeqSpy, psycopg.AsyncConnection[Any]]:
    """A writer whose stream row another transaction holds locked: its first write waits in
    the store until the test lets it go (rolls `locker` back) or ends it."""
    path, writer = await _writer(app, interval_s=0.02)
    spy = _SeqSpy(app.state.services, path, monkeypatch)
    locker = await psycopg.AsyncConnection.connect(database_url)
    await locker.execute("SELECT 1 FROM ds_streams WHERE path = %s FOR UPDATE", (path,))
    return path, writer, spy, locker


async def _wait_for_blocked_write(database_url: str) -> int:
    """The backend of the store's write, waiting on the row lock: its pid."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        for _ in range(500):
            row = await (
                await conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
            ).fetchone()
            if row is not None:
                return int(row[0])
            await asyncio.sleep(0.01)
    raise AssertionError("the timer's write never reached the database")


async def _flush_behind_held_write(
    writer: ChunkWriter,
    spy: _SeqSpy,
    database_url: str,
    event: dict[str, Any],
    flush: bool = False,
) -> tuple[int, asyncio.Task[None]]:
    """A delta the timer writes and the lock holds, then `event` emitted: the held write's
    backend pid, and the emit's task once both writes are in the store's hands."""
    await writer.emit(records.event("TEXT_MESSAGE_CONTENT", messageId="m1", delta="think"))
    pid = await _wait_for_blocked_write(database_url)
    task = asyncio.create_task(writer.emit(event, flush=flush))
    for _ in range(500):
        if len(spy.sent) == 2:
            break
        await asyncio.sleep(0.01)
    # Sent under the next seq while the first was still waiting: not after its outcome.
    assert spy.sent == [(0, True), (1, False)]
    return pid, task


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_flush_sends_its_batch_right_behind_the_timers_write_in_flight(
    app: FastAPI, client: httpx.AsyncClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, writer, spy, locker = await _locked_stream_writer(app, database_url, monkeypatch)
    async with writer, locker:  # the lock goes first, whatever happens
        first_words = records.event("TEXT_MESSAGE_CONTENT", messageId="m1", delta="Hi")
        _, flush = await _flush_behind_held_write(writer, spy, database_url, first_words, True)
        assert writer.appends == 0 and not flush.done()
        await locker.rollback()
        await asyncio.wait_for(flush, timeout=10)
        assert writer.appends == 2
    assert spy.sent == [(0, True), (1, False)]  # nothing was sent twice
    assert [e[0].get("delta") for e in await _events(client, path)] == ["think", "Hi"]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_when_the_write_ahead_fails_both_are_retried_in_order_under_their_seqs(
    app: FastAPI, client: httpx.AsyncClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, writer, spy, locker = await _locked_stream_writer(app, database_url, monkeypatch)
    async with writer, locker:  # the lock goes first, whatever happens
        end = records.event("TEXT_MESSAGE_END", messageId="m1")  # written at once
        pid, flush = await _flush_behind_held_write(writer, spy, database_url, end)
        # The first write's connection dies (a database restart, a failover): it fails, and
        # the one behind it cannot land before it (a sequence gap, or the same outage).
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as kill:
            await kill.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await locker.rollback()
        await asyncio.wait_for(flush, timeout=20)
        assert writer.appends == 2
    # Retried in order, each under the seq it was first sent with.
    assert [seq for seq, _ in spy.sent] == [0, 1, 0, 1]
    events = [e[0] for e in await _events(client, path)]
    assert [(e["type"], e.get("delta")) for e in events] == [
        ("TEXT_MESSAGE_CONTENT", "think"),
        ("TEXT_MESSAGE_END", None),
    ]
