"""The stream store: the API request handlers use.

Reads run on the event loop against the read engine. Writes are handed to the writer thread
(streams_service/durable/writer.py), which group-commits them; a request awaits its own answer,
given only once its transaction has committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from db import pg_direct, scopes
from db.engine import create_writer_engine
from streams_service.durable import sql, staging, writer
from streams_service.durable.live import LiveHub
from streams_service.durable.model import (
    AppendOutcome,
    AppendRequest,
    CreateOutcome,
    CreateRequest,
    ReadResult,
    StreamState,
    check_live,
    now_ms,
)

T = TypeVar("T")


class StreamStore:
    def __init__(self, database_url: str, read_engine: AsyncEngine, hub: LiveHub) -> None:
        self._database_url = database_url
        self._read_engine = read_engine
        self._hub = hub
        self._writer: writer.StreamWriter | None = None

    @property
    def writer(self) -> writer.StreamWriter:
        assert self._writer is not None, "StreamStore.start() was not called"
        return self._writer

    @property
    def batches_committed(self) -> int:
        return self.writer.batches_committed

    @property
    def appends_committed(self) -> int:
        return self.writer.appends_committed

    async def start(self) -> None:
        engine = create_writer_engine(self._database_url)
        self._writer = writer.StreamWriter(engine, self._hub, asyncio.get_running_loop())
        self._writer.start()

    async def stop(self) -> None:
        if self._writer is not None:
            await self._writer.stop()
            self._writer = None

    # ------------------------------------------------------------------ writes

    async def append(self, path: str, request: AppendRequest) -> AppendOutcome:
        return await self.submit_append(path, request)

    def submit_append(self, path: str, request: AppendRequest) -> asyncio.Future[AppendOutcome]:
        """Queue an append and return its outcome's future, without a coroutine: for callers
        that start many appends from a plain callback (sessions/chunks.py's Flusher)."""
        future: asyncio.Future[AppendOutcome] = asyncio.get_running_loop().create_future()
        self.writer.submit(staging.AppendOp(path, request, future))
        return future

    async def append_many(self, path: str, requests: list[AppendRequest]) -> list[AppendOutcome]:
        """Several appends to one stream, in order, queued together so they share commits
        (each still has its own offset). Each is answered on its own: one may fail alone."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[AppendOutcome]] = []
        for request in requests:
            futures.append(loop.create_future())
            self.writer.submit(staging.AppendOp(path, request, futures[-1]))
        return list(await asyncio.gather(*futures))

    async def create(self, path: str, request: CreateRequest) -> CreateOutcome:
        return await self._control(lambda conn, now: writer.create_stream(conn, path, request, now))

    async def delete(self, path: str) -> None:
        await self._control(lambda conn, now: writer.delete_stream(conn, path, now))

    async def revive(self, path: str) -> bool:
        """Undo a delete that only hid the stream (forks still read it); see `revive_stream`."""
        return await self._control(lambda conn, now: writer.revive_stream(conn, path, now))

    async def sweep(self) -> int:
        """Remove expired streams (or soft-delete those that forks still read). Returns how many."""
        return await self._control(writer.sweep)

    def touch(self, state: StreamState) -> None:
        """Renew a sliding TTL after a read; fire-and-forget, folded into the next batch."""
        if state.ttl_seconds is not None:
            self.writer.submit(writer.TouchOp(state.id, now_ms()))

    async def _control(self, fn: Callable[[Connection, int], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.writer.submit(writer.ControlOp(fn, future))
        return await future

    # ------------------------------------------------------------------ reads

    async def head(self, path: str) -> StreamState:
        async with scopes.connect(self._read_engine) as conn:
            state = await _load(conn, path)
        return check_live(state, path, now_ms())

    async def read(self, path: str, from_pos: int, max_bytes: int) -> ReadResult:
        """Messages after `from_pos`, up to about `max_bytes` (always at least one message)."""
        now = now_ms()
        async with scopes.connect(self._read_engine) as conn:
            state = check_live(await _load(conn, path), path, now)
            if from_pos >= state.tail:
                return ReadResult(state=state, next_pos=state.tail, up_to_date=True)
            # Positions are bytes, so bounding the position bounds the size of the answer.
            upper = from_pos + max_bytes
            chained = sql.needs_chain(state, from_pos)
            pg = None if chained else await pg_direct.on(conn)
            if pg is not None:
                # The stream's own messages, in binary: what catch-up reads spend most on.
                values = {"stream_id": state.id, "from_pos": from_pos, "upper": upper}
                chunks = await _fetch_binary(pg, _UP_TO, values)
                if not chunks:
                    # The next message alone is bigger than the budget: send it whole.
                    chunks = await _fetch_binary(pg, _NEXT, values)
            else:
                segments: sql.Segments = [(state.id, None)]
                if chained:
                    chain = (await conn.execute(sql.fork_chain(state.id))).all()
                    segments = sql.segments_from_chain(chain, from_pos)
                chunks = await _fetch(conn, sql.messages_in(segments, from_pos, upper, None))
                if not chunks:
                    chunks = await _fetch(conn, sql.messages_in(segments, from_pos, None, limit=1))
        next_pos = chunks[-1][0] if chunks else state.tail
        return ReadResult(
            state=state, chunks=chunks, next_pos=next_pos, up_to_date=next_pos >= state.tail
        )

    async def count_streams(self) -> int:
        async with scopes.connect(self._read_engine) as conn:
            count = (await conn.execute(select(func.count()).select_from(sql.streams))).scalar_one()
        return int(count)


async def _load(conn: AsyncConnection, path: str) -> StreamState | None:
    row = (await conn.execute(sql.stream_by_path(path))).first()
    return StreamState.from_row(row) if row is not None else None


async def _fetch(conn: AsyncConnection, stmt: Any) -> list[tuple[int, bytes]]:
    return [(row[0], bytes(row[1])) for row in await conn.execute(stmt)]


_UP_TO = pg_direct.statement(sql.messages_up_to)
_NEXT = pg_direct.statement(sql.next_message)


async def _fetch_binary(
    pg: pg_direct.Direct, stmt: pg_direct.DirectStatement, values: dict[str, int]
) -> list[tuple[int, bytes]]:
    # (end_pos, data) rows: in binary format psycopg gives `bytea` as bytes already.
    return cast(list[tuple[int, bytes]], await pg.rows(stmt, values, binary=True))
