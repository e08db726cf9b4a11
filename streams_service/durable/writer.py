"""The stream writer: one thread per process that owns every write transaction.

It takes whatever requests queued up while its previous transaction ran and commits them
together — concurrent appends share one transaction and one fsync — and each request is answered
only after that commit (group commit). Requests that create, delete or sweep streams run alone in
their own transaction, in queue order.

Why a thread with blocking I/O rather than a task on the event loop: under load the loop is busy
parsing requests, and every `await` inside a transaction would wait its turn behind them,
stretching each transaction (and so every acknowledgement) by the depth of the loop's backlog.
On its own thread the transaction's round trips proceed while the loop keeps accepting requests.

Across processes, offsets stay strictly increasing whoever writes: on SQLite, BEGIN IMMEDIATE
serialises writers; on Postgres a batch either locks the stream rows it writes (`SELECT ... FOR
UPDATE`) or, when this writer remembers their state from its own last commit, writes them on
condition that they are still in that state (durable/pg_batch.py), and takes the locked way
when they are not.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import Connection, Engine, bindparam, delete, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError

from streams_service.durable import sql
from streams_service.durable.live import LiveHub, TailUpdate
from streams_service.durable.model import (
    DEFAULT_CONTENT_TYPE,
    Availability,
    CreateOutcome,
    CreateRequest,
    StreamState,
    encode_json_append,
    gone,
    is_json,
    json_items,
    json_prefix,
    media_type,
    missing,
    now_ms,
)
from streams_service.durable.pg_batch import PgBatches
from streams_service.durable.sql import messages, producers, streams
from streams_service.durable.staging import AppendOp, BatchResult, stage_appends
from streams_service.errors import (
    AppError,
    BadRequest,
    Conflict,
    NotFound,
    ServiceUnavailable,
)

log = structlog.get_logger(__name__)

# Producer state older than this is forgotten (the protocol suggests about 7 days).
PRODUCER_STATE_TTL_MS = 7 * 24 * 3600 * 1000
# Requests one transaction takes at most.
MAX_BATCH = 512
# Bytes of append payload one transaction carries at most (big appends commit in smaller groups).
MAX_BATCH_BYTES = 16 * 1024 * 1024


@dataclass(slots=True)
class ControlOp:
    fn: Callable[[Connection, int], Any]
    future: asyncio.Future[Any]
    wakes: list[int] = field(default_factory=list)


@dataclass(slots=True)
class TouchOp:
    stream_id: int
    at_ms: int


_STOP = object()
Op = AppendOp | ControlOp | TouchOp


class StreamWriter:
    def __init__(self, engine: Engine, hub: LiveHub, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._hub = hub
        self._loop = loop
        self._queue: queue.SimpleQueue[Op | object] = queue.SimpleQueue()
        self._pending: deque[Op] = deque()
        self._thread = threading.Thread(target=self._run, name="ds-writer", daemon=True)
        self.is_postgres = engine.dialect.name == "postgresql"
        self._pg = PgBatches(hub)
        self.appends_committed = 0
        self.batches_committed = 0

    @property
    def known_commits(self) -> int:
        """Batches committed in one round trip against remembered state (durable/pg_batch.py)."""
        return self._pg.known_commits

    # ------------------------------------------------------------------ called from the loop

    def start(self) -> None:
        self._thread.start()

    def submit(self, op: Op) -> None:
        self._queue.put(op)

    async def stop(self) -> None:
        """Finish everything already queued, then end the thread."""
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join, 30)
        self._engine.dispose()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            if not self._pending:
                first = self._queue.get()
                if first is _STOP:
                    return
                assert isinstance(first, AppendOp | ControlOp | TouchOp)
                self._pending.append(first)
            stop = self._drain()
            while self._pending:
                head = self._pending.popleft()
                if isinstance(head, ControlOp):
                    self._run_control(head)
                    continue
                batch: list[AppendOp | TouchOp] = [head]
                size = _op_size(head)
                # Group commit: everything that queued during the last transaction goes together.
                while (
                    self._pending
                    and not isinstance(self._pending[0], ControlOp)
                    and len(batch) < MAX_BATCH
                    and size < MAX_BATCH_BYTES
                ):
                    op = self._pending.popleft()
                    assert not isinstance(op, ControlOp)
                    batch.append(op)
                    size += _op_size(op)
                self._run_batch(batch)
            if stop:
                return

    def _drain(self) -> bool:
        """Move everything queued into `_pending`; True when a stop request was among it."""
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return False
            if op is _STOP:
                return True
            assert isinstance(op, AppendOp | ControlOp | TouchOp)
            self._pending.append(op)

    def _deliver(
        self,
        settlements: list[tuple[asyncio.Future[Any], Any]],
        woken: set[int],
        updates: dict[int, TailUpdate] | None = None,
    ) -> None:
        """Runs on the event loop: wake live readers (before answering the writers: a reader
        should not learn of an append later than its writer does), then answer the requests."""
        self._hub.notify(woken, updates)
        for future, outcome in settlements:
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _run_control(self, op: ControlOp) -> None:
        if op.future.cancelled():
            return
        outcome: Any
        for attempt in (1, 2):
            try:
                with self._engine.begin() as conn:
                    outcome = op.fn(conn, now_ms())
                    if self.is_postgres and op.wakes:
                        self._pg_notify(conn, op.wakes)
                break
            except AppError as exc:
                outcome = exc
                break
            except IntegrityError as exc:
                # Another process created the same path first; the retry sees its row.
                outcome = _storage_error(exc)
                if attempt == 2:
                    break
            except Exception as exc:
                outcome = _storage_error(exc)
                break
        self._loop.call_soon_threadsafe(self._deliver, [(op.future, outcome)], set(op.wakes))

    def _run_batch(self, batch: list[AppendOp | TouchOp]) -> None:
        appends = [op for op in batch if isinstance(op, AppendOp)]
        for attempt in (1, 2):
            try:
                outcomes, woken, updates = self._commit_batch(batch)
                break
            except Exception as exc:
                # A deadlock or serialization failure rolled the transaction back as a whole, so
                # one retry is safe. A dropped connection is not retried: the COMMIT may have
                # landed, and a plain append retried would be written twice; the client gets
                # a 503 and retries (idempotent producers make that safe).
                if attempt == 1 and _retryable(exc):
                    continue
                failure = _storage_error(exc)
                self._loop.call_soon_threadsafe(
                    self._deliver, [(op.future, failure) for op in appends], set()
                )
                return
        self.batches_committed += 1
        self.appends_committed += sum(1 for _, o in outcomes if not isinstance(o, AppError))
        self._loop.call_soon_threadsafe(
            self._deliver, [(op.future, outcome) for op, outcome in outcomes], woken, updates
        )

    def _commit_batch(self, batch: list[AppendOp | TouchOp]) -> BatchResult:
        now = now_ms()
        appends = [op for op in batch if isinstance(op, AppendOp) and not op.future.cancelled()]
        touches = [op for op in batch if isinstance(op, TouchOp)]
        if self.is_postgres and not touches:
            return self._commit_batch_pg(appends, now)
        with self._engine.begin() as conn:
            states: dict[str, StreamState] = {}
            paths = sorted({op.path for op in appends})
            if paths:
                stmt = (
                    select(streams)
                    .where(streams.c.path.in_(paths))
                    .order_by(streams.c.id)
                    .with_for_update()
                )
                for row in conn.execute(stmt):
                    states[row.path] = StreamState.from_row(row)
            producer_state = self._load_producers(conn, appends, states)
            staged = stage_appends(appends, states, producer_state, now)
            if staged.messages:
                conn.execute(insert(messages), staged.messages)
            if staged.dirty:
                conn.execute(
                    _UPDATE_STREAM, [_stream_update_params(s) for s in staged.dirty.values()]
                )
            if staged.dirty_producers:
                self._upsert_producers(conn, producer_state, staged.dirty_producers, now)
            if touches:
                self._apply_touches(conn, touches)
            if self.is_postgres and staged.dirty:
                self._pg_notify(conn, set(staged.dirty))
        return staged.result()

    def _commit_batch_pg(self, appends: list[AppendOp], now: int) -> BatchResult:
        raw = self._engine.raw_connection()
        try:
            pg = raw.driver_connection
            assert pg is not None
            return self._pg.commit(pg, appends, now)
        except BaseException:
            with contextlib.suppress(Exception):
                raw.driver_connection.rollback()  # type: ignore[union-attr]
            raw.invalidate()
            raise
        finally:
            raw.close()

    def _load_producers(
        self, conn: Connection, appends: list[AppendOp], states: dict[str, StreamState]
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
        return {(r[0], r[1]): (r[2], r[3]) for r in conn.execute(stmt)}

    def _upsert_producers(
        self,
        conn: Connection,
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
        conn.execute(stmt, rows)

    def _apply_touches(self, conn: Connection, touches: list[TouchOp]) -> None:
        latest: dict[int, int] = {}
        for t in touches:
            latest[t.stream_id] = max(latest.get(t.stream_id, 0), t.at_ms)
        for stream_id, at in latest.items():
            state = _load_id(conn, stream_id, for_update=True)
            if state is None or state.availability(at) is not Availability.LIVE:
                continue
            state.touch(at)
            conn.execute(
                update(streams)
                .where(streams.c.id == stream_id)
                .values(accessed_ms=state.accessed_ms, expiry_ms=state.expiry_ms())
            )

    def _pg_notify(self, conn: Connection, stream_ids: list[int] | set[int]) -> None:
        for payload in self._hub.payloads(sorted(stream_ids)):
            conn.execute(text("SELECT pg_notify('ds_append', :p)"), {"p": payload})


# ---------------------------------------------------------------------- control operations


def create_stream(conn: Connection, path: str, req: CreateRequest, now: int) -> CreateOutcome:
    existing = _load(conn, path, for_update=True)
    if existing is not None:
        availability = existing.availability(now)
        if availability is Availability.MISSING:
            # Expired: the path is free again.
            delete_cascade(conn, existing)
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
        source = _load(conn, req.forked_from, for_update=True)
        if source is None or (source.expired(now) and not source.soft_deleted):
            raise NotFound(f"fork source {req.forked_from!r} does not exist")
        if source.soft_deleted:
            raise Conflict(f"fork source {req.forked_from!r} was deleted")
        if content_type and media_type(content_type) != media_type(source.content_type):
            raise Conflict("a fork must have its source's content type")
        content_type = content_type or source.content_type
        tail = source.tail if req.fork_pos is None else req.fork_pos
        if tail > source.tail:
            raise BadRequest("Stream-Fork-Offset is beyond the source stream's tail")
        if req.fork_sub_offset:
            fork_prefix = _fork_prefix(conn, source, tail, req.fork_sub_offset)
        if ttl is None and expires_raw is None:
            # A fork without its own expiry inherits its source's.
            ttl, expires_raw, expires_ms = (
                source.ttl_seconds,
                source.expires_at_raw,
                source.expires_at_ms,
            )
        conn.execute(
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
    result = conn.execute(insert(streams).values(**state.row_values()).returning(streams.c.id))
    state.id = int(result.scalar_one())
    if pending:
        conn.execute(
            insert(messages),
            [{"stream_id": state.id, "end_pos": pos, "data": data} for pos, data in pending],
        )
    return CreateOutcome(created=True, state=state)


def _fork_prefix(conn: Connection, source: StreamState, fork_pos: int, sub_offset: int) -> bytes:
    """The first `sub_offset` bytes (or JSON values) of the source message after the fork
    position, materialised as the fork's first own message."""
    segments: sql.Segments = [(source.id, None)]
    if sql.needs_chain(source, fork_pos):
        segments = sql.segments_from_chain(conn.execute(sql.fork_chain(source.id)).all(), fork_pos)
    first = conn.execute(sql.messages_in(segments, fork_pos, None, limit=1)).first()
    if first is None:
        raise BadRequest("Stream-Fork-Sub-Offset: the source has no message after the offset")
    data = bytes(first[1])
    if is_json(source.content_type):
        if sub_offset > len(json_items(data)):
            raise BadRequest("Stream-Fork-Sub-Offset is beyond the message's values")
        return json_prefix(data, sub_offset)
    if sub_offset > len(data):
        raise BadRequest("Stream-Fork-Sub-Offset is beyond the message's length")
    return data[:sub_offset]


def delete_stream(conn: Connection, path: str, now: int) -> None:
    state = _load(conn, path, for_update=True)
    if state is None:
        raise missing(path)
    availability = state.availability(now)
    if availability is Availability.MISSING:
        delete_cascade(conn, state)
        raise missing(path)
    if availability is Availability.GONE:
        raise gone(path)
    if state.ref_count > 0:
        # Forks still read through this stream: hide it, keep its data.
        conn.execute(update(streams).where(streams.c.id == state.id).values(soft_deleted=True))
    else:
        delete_cascade(conn, state)


def revive_stream(conn: Connection, path: str, now: int) -> bool:
    """Show again a stream that was deleted while forks still read it (so it was only hidden,
    its messages kept). False if there is none to revive: it is live, gone for good, or its
    own TTL or expiry has passed."""
    state = _load(conn, path, for_update=True)
    if state is None or not state.soft_deleted or state.expired(now):
        return False
    conn.execute(update(streams).where(streams.c.id == state.id).values(soft_deleted=False))
    return True


def delete_cascade(conn: Connection, state: StreamState) -> None:
    """Delete a stream, release its source, and remove a soft-deleted source left forkless."""
    current: StreamState | None = state
    while current is not None:
        conn.execute(delete(messages).where(messages.c.stream_id == current.id))
        conn.execute(delete(producers).where(producers.c.stream_id == current.id))
        conn.execute(delete(streams).where(streams.c.id == current.id))
        if current.forked_from_id is None:
            return
        parent = _load_id(conn, current.forked_from_id, for_update=True)
        if parent is None:
            return
        remaining = max(0, parent.ref_count - 1)
        if remaining == 0 and parent.soft_deleted:
            current = parent
            continue
        conn.execute(update(streams).where(streams.c.id == parent.id).values(ref_count=remaining))
        return


def sweep(conn: Connection, now: int) -> int:
    """Remove expired streams (soft-delete those that forks still read); forget old producers."""
    rows = conn.execute(
        select(streams.c.id).where(streams.c.expiry_ms <= now).order_by(streams.c.id).limit(500)
    )
    count = 0
    for (stream_id,) in rows.all():
        state = _load_id(conn, stream_id, for_update=True)
        if state is None or not state.expired(now):
            continue
        if state.ref_count > 0:
            if not state.soft_deleted:
                conn.execute(
                    update(streams).where(streams.c.id == state.id).values(soft_deleted=True)
                )
                count += 1
        else:
            delete_cascade(conn, state)
            count += 1
    conn.execute(delete(producers).where(producers.c.updated_ms < now - PRODUCER_STATE_TTL_MS))
    return count


# ---------------------------------------------------------------------- appends


_UPDATE_STREAM = (
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
    )
)


def _stream_update_params(state: StreamState) -> dict[str, Any]:
    closed_by = state.closed_by
    return {
        "b_id": state.id,
        "b_tail": state.tail,
        "b_closed": state.closed,
        "b_cbp": closed_by[0] if closed_by else None,
        "b_cbe": closed_by[1] if closed_by else None,
        "b_cbs": closed_by[2] if closed_by else None,
        "b_seq": state.last_stream_seq,
        "b_acc": state.accessed_ms,
        "b_exp": state.expiry_ms(),
    }


def _load(conn: Connection, path: str, *, for_update: bool = False) -> StreamState | None:
    row = conn.execute(sql.stream_by_path(path, for_update=for_update)).first()
    return StreamState.from_row(row) if row is not None else None


def _load_id(conn: Connection, stream_id: int, *, for_update: bool = False) -> StreamState | None:
    row = conn.execute(sql.stream_by_id(stream_id, for_update=for_update)).first()
    return StreamState.from_row(row) if row is not None else None


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


def _op_size(op: AppendOp | TouchOp) -> int:
    if isinstance(op, AppendOp) and op.request.body is not None:
        return len(op.request.body)
    return 0


def _retryable(exc: BaseException) -> bool:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    return getattr(orig, "sqlstate", None) in ("40P01", "40001")


def _storage_error(exc: BaseException) -> AppError:
    if isinstance(exc, AppError):
        return exc
    # Only the error's type and SQLSTATE: a driver message can quote the statement's parameters,
    # which hold message text.
    orig = getattr(exc, "orig", None)
    log.error(
        "storage_error",
        error=type(orig or exc).__name__,
        sqlstate=getattr(orig, "sqlstate", None),
    )
    return ServiceUnavailable(
        "the stream store is unavailable; nothing was written, retry the request",
        headers={"Retry-After": "1"},
    )
