"""The stream store: durable, group-committed appends and offset reads on SQLite or Postgres.

All writes of a process go through one writer task. It takes whatever requests queued up while
its previous transaction ran and commits them together: concurrent appends share one transaction
(and one fsync), and each request is acknowledged only after that commit. Requests that create,
delete or sweep streams run alone in their own transaction, in queue order.

Across processes, the batch locks the stream rows it writes (`SELECT ... FOR UPDATE` on Postgres;
SQLite's BEGIN IMMEDIATE serialises writers), so offsets stay strictly increasing whoever writes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import structlog
from sqlalchemy import Table, and_, bindparam, delete, func, insert, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from db.models import DsMessage, DsProducer, DsStream
from streams_service.durable.live import LiveHub
from streams_service.durable.model import (
    DEFAULT_CONTENT_TYPE,
    AppendOutcome,
    AppendRequest,
    Availability,
    CreateOutcome,
    CreateRequest,
    ReadResult,
    StreamState,
    encode_json_append,
    is_json,
    json_items,
    json_prefix,
    media_type,
    now_ms,
)
from streams_service.durable.offsets import format_offset
from streams_service.errors import (
    AppError,
    BadRequest,
    Conflict,
    Forbidden,
    Gone,
    NotFound,
    ServiceUnavailable,
)

log = structlog.get_logger(__name__)

# Core tables: the batch paths issue executemany statements, not ORM unit-of-work flushes.
streams = cast(Table, DsStream.__table__)
messages = cast(Table, DsMessage.__table__)
producers = cast(Table, DsProducer.__table__)

T = TypeVar("T")

# Producer state older than this is forgotten (the protocol suggests about 7 days).
PRODUCER_STATE_TTL_MS = 7 * 24 * 3600 * 1000
# Requests the writer takes into one transaction at most.
MAX_BATCH = 512
# Bytes of append payload one transaction carries at most (big appends commit in smaller groups).
MAX_BATCH_BYTES = 16 * 1024 * 1024


@dataclass(slots=True)
class _AppendOp:
    path: str
    request: AppendRequest
    future: asyncio.Future[AppendOutcome]


@dataclass(slots=True)
class _ControlOp:
    fn: Callable[[AsyncConnection, int], Awaitable[Any]]
    future: asyncio.Future[Any]
    wakes: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _TouchOp:
    stream_id: int
    at_ms: int


_Op = _AppendOp | _ControlOp | _TouchOp


def _missing(path: str) -> NotFound:
    return NotFound(f"stream {path!r} does not exist")


def _gone(path: str) -> Gone:
    return Gone(f"stream {path!r} was deleted; its forks still hold its data")


def _check_live(state: StreamState | None, path: str, now: int) -> StreamState:
    if state is None:
        raise _missing(path)
    availability = state.availability(now)
    if availability is Availability.MISSING:
        raise _missing(path)
    if availability is Availability.GONE:
        raise _gone(path)
    return state


class StreamStore:
    def __init__(self, write_engine: AsyncEngine, read_engine: AsyncEngine, hub: LiveHub) -> None:
        self._write_engine = write_engine
        self._read_engine = read_engine
        self._hub = hub
        self._dialect = write_engine.dialect.name
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.appends_committed = 0
        self.batches_committed = 0

    @property
    def is_postgres(self) -> bool:
        return self._dialect == "postgresql"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="ds-writer")

    async def stop(self) -> None:
        if self._writer is None:
            return
        # Let queued work finish: everything already accepted gets its answer.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout=10)
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self._writer = None

    # ------------------------------------------------------------------ public API

    async def append(self, path: str, request: AppendRequest) -> AppendOutcome:
        future: asyncio.Future[AppendOutcome] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_AppendOp(path, request, future))
        return await future

    async def create(self, path: str, request: CreateRequest) -> CreateOutcome:
        outcome: CreateOutcome = await self._control(
            lambda conn, now: self._create(conn, path, request, now)
        )
        return outcome

    async def delete(self, path: str) -> None:
        await self._control(lambda conn, now: self._delete(conn, path, now))

    async def sweep(self) -> int:
        """Remove expired streams (or soft-delete those that forks still read). Returns how many."""
        count: int = await self._control(self._sweep)
        return count

    def touch(self, state: StreamState) -> None:
        """Renew a sliding TTL after a read; fire-and-forget, folded into the next batch."""
        if state.ttl_seconds is not None:
            self._queue.put_nowait(_TouchOp(state.id, now_ms()))

    async def head(self, path: str) -> StreamState:
        async with self._read_engine.connect() as conn:
            state = await self._load(conn, path)
        return _check_live(state, path, now_ms())

    async def read(self, path: str, from_pos: int, max_bytes: int) -> ReadResult:
        """Messages after `from_pos`, up to about `max_bytes` (always at least one message)."""
        now = now_ms()
        async with self._read_engine.connect() as conn:
            state = _check_live(await self._load(conn, path), path, now)
            if from_pos >= state.tail:
                return ReadResult(state=state, next_pos=state.tail, up_to_date=True)
            segments = await self._segments(conn, state, from_pos)
            upper = from_pos + max_bytes
            chunks = await self._fetch(conn, segments, from_pos, upper, limit=None)
            if not chunks:
                # The next message alone is bigger than the budget: send it whole.
                chunks = await self._fetch(conn, segments, from_pos, None, limit=1)
        next_pos = chunks[-1][0] if chunks else state.tail
        return ReadResult(
            state=state, chunks=chunks, next_pos=next_pos, up_to_date=next_pos >= state.tail
        )

    # ------------------------------------------------------------------ reads

    async def _load(
        self, conn: AsyncConnection, path: str, *, for_update: bool = False
    ) -> StreamState | None:
        stmt = select(streams).where(streams.c.path == path)
        if for_update:
            stmt = stmt.with_for_update()
        row = (await conn.execute(stmt)).first()
        return StreamState.from_row(row) if row is not None else None

    async def _load_id(
        self, conn: AsyncConnection, stream_id: int, *, for_update: bool = False
    ) -> StreamState | None:
        stmt = select(streams).where(streams.c.id == stream_id)
        if for_update:
            stmt = stmt.with_for_update()
        row = (await conn.execute(stmt)).first()
        return StreamState.from_row(row) if row is not None else None

    async def _segments(
        self, conn: AsyncConnection, state: StreamState, from_pos: int
    ) -> list[tuple[int, int | None]]:
        """(stream id, highest position) pairs whose messages make up this stream's view.

        A fork shares its source's offset space: it shows the source's messages up to the fork
        position, then its own. Chains of forks cap each ancestor at the lowest fork position.
        """
        segments: list[tuple[int, int | None]] = [(state.id, None)]
        cap = state.fork_pos
        parent_id = state.forked_from_id
        while parent_id is not None and cap is not None and from_pos < cap:
            parent = await self._load_id(conn, parent_id)
            if parent is None:
                break
            segments.append((parent.id, cap))
            if parent.fork_pos is not None:
                cap = min(cap, parent.fork_pos)
            parent_id = parent.forked_from_id
        return segments

    async def _fetch(
        self,
        conn: AsyncConnection,
        segments: Sequence[tuple[int, int | None]],
        from_pos: int,
        upper: int | None,
        limit: int | None,
    ) -> list[tuple[int, bytes]]:
        clauses = []
        for stream_id, cap in segments:
            conds = [messages.c.stream_id == stream_id, messages.c.end_pos > from_pos]
            bound = cap if upper is None else (upper if cap is None else min(cap, upper))
            if bound is not None:
                conds.append(messages.c.end_pos <= bound)
            clauses.append(and_(*conds))
        where = clauses[0] if len(clauses) == 1 else or_(*clauses)
        stmt = select(messages.c.end_pos, messages.c.data).where(where).order_by(messages.c.end_pos)
        if limit is not None:
            stmt = stmt.limit(limit)
        result = await conn.execute(stmt)
        return [(row[0], bytes(row[1])) for row in result]

    # ------------------------------------------------------------------ writer

    async def _control(self, fn: Callable[[AsyncConnection, int], Awaitable[T]]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_ControlOp(fn, future))
        return await future

    async def _write_loop(self) -> None:
        while True:
            first = await self._queue.get()
            if isinstance(first, _ControlOp):
                await self._run_control(first)
                self._queue.task_done()
                continue
            batch: list[_AppendOp | _TouchOp] = [first]
            size = _op_size(first)
            # Group commit: everything that queued while the last transaction ran goes together.
            while (
                not self._queue.empty()
                and len(batch) < MAX_BATCH
                and size < MAX_BATCH_BYTES
                and not isinstance(self._queue._queue[0], _ControlOp)  # type: ignore[attr-defined]
            ):
                op = self._queue.get_nowait()
                assert not isinstance(op, _ControlOp)
                batch.append(op)
                size += _op_size(op)
            await self._run_batch(batch)
            for _ in batch:
                self._queue.task_done()

    async def _run_control(self, op: _ControlOp) -> None:
        if op.future.cancelled():
            return
        try:
            async with self._write_engine.begin() as conn:
                result = await op.fn(conn, now_ms())
                if self.is_postgres:
                    await self._pg_notify(conn, op.wakes)
        except AppError as exc:
            _settle(op.future, exc=exc)
            return
        except IntegrityError:
            # Another process created the same path first; the retry sees its row.
            try:
                async with self._write_engine.begin() as conn:
                    result = await op.fn(conn, now_ms())
            except Exception as exc:
                _settle(op.future, exc=_storage_error(exc))
                return
        except Exception as exc:
            _settle(op.future, exc=_storage_error(exc))
            return
        self._hub.notify(op.wakes)
        _settle(op.future, result=result)

    async def _run_batch(self, batch: list[_AppendOp | _TouchOp]) -> None:
        for attempt in (1, 2):
            try:
                outcomes, woken = await self._commit_batch(batch)
                break
            except DBAPIError as exc:
                # A dropped connection or a deadlock with another process: the transaction rolled
                # back as a whole, so one retry is safe.
                if attempt == 2 or not _retryable(exc):
                    failure = _storage_error(exc)
                    for op in batch:
                        if isinstance(op, _AppendOp):
                            _settle(op.future, exc=failure)
                    return
            except Exception as exc:
                failure = _storage_error(exc)
                for op in batch:
                    if isinstance(op, _AppendOp):
                        _settle(op.future, exc=failure)
                return
        self.batches_committed += 1
        self._hub.notify(woken)
        for op, outcome in outcomes:
            if isinstance(outcome, AppError):
                _settle(op.future, exc=outcome)
            else:
                self.appends_committed += 1
                _settle(op.future, result=outcome)

    async def _commit_batch(
        self, batch: list[_AppendOp | _TouchOp]
    ) -> tuple[list[tuple[_AppendOp, AppendOutcome | AppError]], set[int]]:
        now = now_ms()
        appends = [op for op in batch if isinstance(op, _AppendOp)]
        touches = [op for op in batch if isinstance(op, _TouchOp)]
        outcomes: list[tuple[_AppendOp, AppendOutcome | AppError]] = []
        woken: set[int] = set()
        async with self._write_engine.begin() as conn:
            states: dict[str, StreamState] = {}
            paths = sorted({op.path for op in appends})
            if paths:
                stmt = (
                    select(streams)
                    .where(streams.c.path.in_(paths))
                    .order_by(streams.c.id)
                    .with_for_update()
                )
                for row in await conn.execute(stmt):
                    states[row.path] = StreamState.from_row(row)
            producer_state = await self._load_producers(conn, appends, states)
            new_messages: list[dict[str, Any]] = []
            dirty: dict[int, StreamState] = {}
            dirty_producers: set[tuple[int, str]] = set()
            for op in appends:
                if op.future.cancelled():
                    continue
                try:
                    outcome = _apply_append(
                        op, states.get(op.path), producer_state, now, new_messages, dirty_producers
                    )
                except AppError as exc:
                    outcomes.append((op, exc))
                    continue
                state = states[op.path]
                dirty[state.id] = state
                outcomes.append((op, outcome))
            if new_messages:
                await conn.execute(insert(messages), new_messages)
            if dirty:
                await conn.execute(
                    update(streams)
                    .where(streams.c.id == bindparam("b_id"))
                    .values(
                        tail=bindparam("b_tail"),
                        closed=bindparam("b_closed"),
                        closed_by_producer=bindparam("b_cbp"),
                        closed_by_epoch=bindparam("b_cbe"),
                        closed_by_seq=bindparam("b_cbs"),
                        last_stream_seq=bindparam("b_seq"),
                        accessed_ms=bindparam("b_acc"),
                        expiry_ms=bindparam("b_exp"),
                    ),
                    [_stream_update_params(s) for s in dirty.values()],
                )
                woken.update(dirty)
            if dirty_producers:
                await self._upsert_producers(conn, producer_state, dirty_producers, now)
            if touches:
                await self._apply_touches(conn, touches)
            if self.is_postgres and woken:
                await self._pg_notify(conn, woken)
        return outcomes, woken

    async def _load_producers(
        self,
        conn: AsyncConnection,
        appends: list[_AppendOp],
        states: dict[str, StreamState],
    ) -> dict[tuple[int, str], tuple[int, int]]:
        wanted = {
            (states[op.path].id, op.request.producer.id)
            for op in appends
            if op.request.producer is not None and op.path in states
        }
        if not wanted:
            return {}
        stmt = select(
            producers.c.stream_id, producers.c.producer_id, producers.c.epoch, producers.c.last_seq
        ).where(
            producers.c.stream_id.in_({sid for sid, _ in wanted}),
            producers.c.producer_id.in_({pid for _, pid in wanted}),
        )
        return {(r[0], r[1]): (r[2], r[3]) for r in await conn.execute(stmt)}

    async def _upsert_producers(
        self,
        conn: AsyncConnection,
        state: dict[tuple[int, str], tuple[int, int]],
        dirty: set[tuple[int, str]],
        now: int,
    ) -> None:
        rows = [
            {
                "stream_id": sid,
                "producer_id": pid,
                "epoch": state[(sid, pid)][0],
                "last_seq": state[(sid, pid)][1],
                "updated_ms": now,
            }
            for sid, pid in sorted(dirty)
        ]
        dialect_insert = postgresql.insert if self.is_postgres else sqlite.insert
        stmt = dialect_insert(producers)
        stmt = stmt.on_conflict_do_update(
            index_elements=[producers.c.stream_id, producers.c.producer_id],
            set_={
                "epoch": stmt.excluded.epoch,
                "last_seq": stmt.excluded.last_seq,
                "updated_ms": stmt.excluded.updated_ms,
            },
        )
        await conn.execute(stmt, rows)

    async def _apply_touches(self, conn: AsyncConnection, touches: list[_TouchOp]) -> None:
        latest: dict[int, int] = {}
        for t in touches:
            latest[t.stream_id] = max(latest.get(t.stream_id, 0), t.at_ms)
        for stream_id, at in latest.items():
            state = await self._load_id(conn, stream_id, for_update=True)
            if state is None or state.availability(at) is not Availability.LIVE:
                continue
            state.touch(at)
            await conn.execute(
                update(streams)
                .where(streams.c.id == stream_id)
                .values(accessed_ms=state.accessed_ms, expiry_ms=state.expiry_ms())
            )

    async def _pg_notify(self, conn: AsyncConnection, stream_ids: Sequence[int] | set[int]) -> None:
        for payload in self._hub.payloads(sorted(stream_ids)):
            await conn.execute(text("SELECT pg_notify('ds_append', :p)"), {"p": payload})

    # ------------------------------------------------------------------ control operations

    async def _create(
        self, conn: AsyncConnection, path: str, req: CreateRequest, now: int
    ) -> CreateOutcome:
        existing = await self._load(conn, path, for_update=True)
        if existing is not None:
            availability = existing.availability(now)
            if availability is Availability.MISSING:
                # Expired: the path is free again.
                await self._delete_cascade(conn, existing)
            elif availability is Availability.GONE:
                raise Conflict(
                    "the stream at this path was deleted but still has forks; "
                    "the path cannot be reused until they are removed"
                )
            elif _same_config(existing, req):
                return CreateOutcome(created=False, state=existing)
            else:
                raise Conflict("stream already exists with a different configuration")

        content_type = req.content_type
        ttl, expires_raw, expires_ms = req.ttl_seconds, req.expires_at_raw, req.expires_at_ms
        tail = 0
        fork_prefix = b""
        source: StreamState | None = None
        if req.forked_from is not None:
            source = await self._load(conn, req.forked_from, for_update=True)
            if source is None:
                raise NotFound(f"fork source {req.forked_from!r} does not exist")
            if source.soft_deleted:
                raise Conflict(f"fork source {req.forked_from!r} was deleted")
            if source.expired(now):
                raise NotFound(f"fork source {req.forked_from!r} does not exist")
            if content_type and media_type(content_type) != media_type(source.content_type):
                raise Conflict("a fork must have its source's content type")
            content_type = content_type or source.content_type
            tail = source.tail if req.fork_pos is None else req.fork_pos
            if tail > source.tail:
                raise BadRequest("Stream-Fork-Offset is beyond the source stream's tail")
            if req.fork_sub_offset:
                fork_prefix = await self._fork_prefix(conn, source, tail, req.fork_sub_offset)
            if ttl is None and expires_raw is None:
                # A fork without its own expiry inherits its source's.
                ttl, expires_raw, expires_ms = (
                    source.ttl_seconds,
                    source.expires_at_raw,
                    source.expires_at_ms,
                )
            await conn.execute(
                update(streams)
                .where(streams.c.id == source.id)
                .values(ref_count=streams.c.ref_count + 1)
            )

        content_type = content_type or DEFAULT_CONTENT_TYPE
        body = req.body
        if body and is_json(content_type):
            body = encode_json_append(body, allow_empty=True)
        fork_pos = tail if source is not None else None
        pending: list[tuple[int, bytes]] = []
        for chunk in (fork_prefix, body):
            if chunk:
                tail += len(chunk)
                pending.append((tail, chunk))
        state = StreamState(
            id=0,
            path=path,
            content_type=content_type,
            tail=tail,
            closed=req.closed,
            closed_by=None,
            last_stream_seq=None,
            ttl_seconds=ttl,
            expires_at_raw=expires_raw,
            expires_at_ms=expires_ms,
            created_ms=now,
            accessed_ms=now,
            forked_from_id=source.id if source is not None else None,
            forked_from_path=source.path if source is not None else None,
            fork_pos=fork_pos,
            fork_sub_offset=req.fork_sub_offset or None,
            ref_count=0,
            soft_deleted=False,
        )
        result = await conn.execute(
            insert(streams).values(**state.row_values()).returning(streams.c.id)
        )
        state.id = int(result.scalar_one())
        if pending:
            await conn.execute(
                insert(messages),
                [{"stream_id": state.id, "end_pos": pos, "data": data} for pos, data in pending],
            )
        return CreateOutcome(created=True, state=state)

    async def _fork_prefix(
        self, conn: AsyncConnection, source: StreamState, fork_pos: int, sub_offset: int
    ) -> bytes:
        """The first `sub_offset` bytes (or JSON values) of the source message after the fork
        position, materialised as the fork's first own message."""
        segments = await self._segments(conn, source, fork_pos)
        first = await self._fetch(conn, segments, fork_pos, None, limit=1)
        if not first:
            raise BadRequest("Stream-Fork-Sub-Offset: the source has no message after the offset")
        data = first[0][1]
        if is_json(source.content_type):
            if sub_offset > len(json_items(data)):
                raise BadRequest("Stream-Fork-Sub-Offset is beyond the message's values")
            return json_prefix(data, sub_offset)
        if sub_offset > len(data):
            raise BadRequest("Stream-Fork-Sub-Offset is beyond the message's length")
        return data[:sub_offset]

    async def _delete(self, conn: AsyncConnection, path: str, now: int) -> None:
        state = await self._load(conn, path, for_update=True)
        if state is None:
            raise _missing(path)
        availability = state.availability(now)
        if availability is Availability.MISSING:
            await self._delete_cascade(conn, state)
            raise _missing(path)
        if availability is Availability.GONE:
            raise _gone(path)
        if state.ref_count > 0:
            # Forks still read through this stream: hide it, keep its data.
            await conn.execute(
                update(streams).where(streams.c.id == state.id).values(soft_deleted=True)
            )
        else:
            await self._delete_cascade(conn, state)

    async def _delete_cascade(self, conn: AsyncConnection, state: StreamState) -> None:
        """Delete a stream, release its source, and remove a soft-deleted source left forkless."""
        current: StreamState | None = state
        while current is not None:
            await conn.execute(delete(messages).where(messages.c.stream_id == current.id))
            await conn.execute(delete(producers).where(producers.c.stream_id == current.id))
            await conn.execute(delete(streams).where(streams.c.id == current.id))
            if current.forked_from_id is None:
                return
            parent = await self._load_id(conn, current.forked_from_id, for_update=True)
            if parent is None:
                return
            remaining = max(0, parent.ref_count - 1)
            if remaining == 0 and parent.soft_deleted:
                current = parent
                continue
            await conn.execute(
                update(streams).where(streams.c.id == parent.id).values(ref_count=remaining)
            )
            return

    async def _sweep(self, conn: AsyncConnection, now: int) -> int:
        rows = await conn.execute(
            select(streams).where(streams.c.expiry_ms <= now).order_by(streams.c.id).limit(500)
        )
        expired = [StreamState.from_row(r) for r in rows]
        count = 0
        for state in expired:
            fresh = await self._load_id(conn, state.id, for_update=True)
            if fresh is None or not fresh.expired(now):
                continue
            if fresh.ref_count > 0:
                if not fresh.soft_deleted:
                    await conn.execute(
                        update(streams).where(streams.c.id == fresh.id).values(soft_deleted=True)
                    )
                    count += 1
            else:
                await self._delete_cascade(conn, fresh)
                count += 1
        await conn.execute(
            delete(producers).where(producers.c.updated_ms < now - PRODUCER_STATE_TTL_MS)
        )
        return count

    async def count_streams(self) -> int:
        async with self._read_engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(streams))).scalar_one())


def _op_size(op: _AppendOp | _TouchOp) -> int:
    if isinstance(op, _AppendOp) and op.request.body is not None:
        return len(op.request.body)
    return 0


def _same_config(existing: StreamState, req: CreateRequest) -> bool:
    """Idempotent create: the same content type, expiry, closed state and fork parameters."""
    requested_type = media_type(req.content_type) or (
        media_type(existing.content_type) if req.forked_from else DEFAULT_CONTENT_TYPE
    )
    return (
        requested_type == (media_type(existing.content_type) or DEFAULT_CONTENT_TYPE)
        and req.ttl_seconds == existing.ttl_seconds
        and req.expires_at_raw == existing.expires_at_raw
        and req.closed == existing.closed
        and req.forked_from == existing.forked_from_path
        and (req.fork_pos is None or req.fork_pos == existing.fork_pos)
        and (req.fork_sub_offset or 0) == (existing.fork_sub_offset or 0)
    )


def _apply_append(
    op: _AppendOp,
    state: StreamState | None,
    producer_state: dict[tuple[int, str], tuple[int, int]],
    now: int,
    new_messages: list[dict[str, Any]],
    dirty_producers: set[tuple[int, str]],
) -> AppendOutcome:
    """Validate one append against the (locked) stream and stage its writes. Nothing is staged
    unless every check passes, so a rejected request leaves no trace."""
    req = op.request
    state = _check_live(state, op.path, now)
    producer = req.producer
    closed_headers = {"Stream-Closed": "true", "Stream-Next-Offset": format_offset(state.tail)}
    if state.closed:
        if producer is not None and state.closed_by == (producer.id, producer.epoch, producer.seq):
            # A retry of the request that closed the stream.
            return AppendOutcome(
                204,
                state.tail,
                closed=True,
                producer_epoch=producer.epoch,
                producer_seq=producer.seq,
            )
        if req.body is None and producer is None:
            state.touch(now)
            return AppendOutcome(204, state.tail, closed=True)
        raise Conflict("stream is closed", headers=closed_headers)
    if (
        req.body is not None
        and req.content_type is not None
        and media_type(req.content_type) != media_type(state.content_type)
    ):
        raise Conflict(
            f"Content-Type {media_type(req.content_type)!r} does not match the stream's "
            f"{media_type(state.content_type)!r}"
        )
    proposed: tuple[int, int] | None = None
    key = (state.id, producer.id) if producer is not None else None
    if producer is not None and key is not None:
        current = producer_state.get(key)
        if current is None:
            if producer.seq != 0:
                raise Conflict(
                    "producer sequence gap",
                    headers={
                        "Producer-Expected-Seq": "0",
                        "Producer-Received-Seq": str(producer.seq),
                    },
                )
            proposed = (producer.epoch, 0)
        else:
            epoch, last_seq = current
            if producer.epoch < epoch:
                raise Forbidden("stale producer epoch", headers={"Producer-Epoch": str(epoch)})
            if producer.epoch > epoch:
                if producer.seq != 0:
                    raise BadRequest("a new producer epoch must start at Producer-Seq 0")
                proposed = (producer.epoch, 0)
            elif producer.seq <= last_seq:
                return AppendOutcome(
                    204, state.tail, producer_epoch=producer.epoch, producer_seq=last_seq
                )
            elif producer.seq == last_seq + 1:
                proposed = (producer.epoch, producer.seq)
            else:
                raise Conflict(
                    "producer sequence gap",
                    headers={
                        "Producer-Expected-Seq": str(last_seq + 1),
                        "Producer-Received-Seq": str(producer.seq),
                    },
                )
    if (
        req.stream_seq is not None
        and state.last_stream_seq is not None
        and req.stream_seq <= state.last_stream_seq
    ):
        raise Conflict(
            f"Stream-Seq {req.stream_seq!r} is not after the last one ({state.last_stream_seq!r})"
        )
    data: bytes | None = None
    if req.body is not None:
        data = (
            encode_json_append(req.body, allow_empty=False)
            if is_json(state.content_type)
            else req.body
        )
    # Every check passed: stage the writes.
    if data is not None:
        state.tail += len(data)
        new_messages.append({"stream_id": state.id, "end_pos": state.tail, "data": data})
    if proposed is not None and key is not None:
        producer_state[key] = proposed
        dirty_producers.add(key)
    if req.stream_seq is not None:
        state.last_stream_seq = req.stream_seq
    if req.close:
        state.closed = True
        state.closed_by = (producer.id, producer.epoch, producer.seq) if producer else None
    state.touch(now)
    return AppendOutcome(
        # A producer's accepted append is 200; a close-only request has nothing to show: 204.
        200 if producer is not None and data is not None else 204,
        state.tail,
        closed=req.close,
        producer_epoch=producer.epoch if producer else None,
        producer_seq=producer.seq if producer else None,
    )


def _stream_update_params(state: StreamState) -> dict[str, Any]:
    return {
        "b_id": state.id,
        "b_tail": state.tail,
        "b_closed": state.closed,
        "b_cbp": state.closed_by[0] if state.closed_by else None,
        "b_cbe": state.closed_by[1] if state.closed_by else None,
        "b_cbs": state.closed_by[2] if state.closed_by else None,
        "b_seq": state.last_stream_seq,
        "b_acc": state.accessed_ms,
        "b_exp": state.expiry_ms(),
    }


def _settle(
    future: asyncio.Future[Any], *, result: Any = None, exc: BaseException | None = None
) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _retryable(exc: DBAPIError) -> bool:
    return bool(exc.connection_invalidated) or "deadlock" in str(exc.orig).lower()


def _storage_error(exc: BaseException) -> AppError:
    if isinstance(exc, AppError):
        return exc
    log.error("storage_error", error=type(exc).__name__, message=str(exc)[:300])
    return ServiceUnavailable(
        "the stream store is unavailable; nothing was written, retry the request",
        headers={"Retry-After": "1"},
    )
