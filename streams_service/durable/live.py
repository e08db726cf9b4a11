"""Live wake-ups for long-poll and SSE readers.

Readers wait on an in-process future per stream; the writer resolves it right after a commit, so a
reader never polls the database. On Postgres, each batch also sends `NOTIFY ds_append` with the
stream ids it touched; every process LISTENs and wakes its own readers for writes made elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import psycopg
import structlog
from sqlalchemy.engine import make_url

from streams_service.durable.model import ReadResult, StreamState

log = structlog.get_logger(__name__)

CHANNEL = "ds_append"
# NOTIFY payloads are capped at 8000 bytes; stay well under.
_MAX_PAYLOAD = 7000


@dataclass(frozen=True, slots=True)
class TailUpdate:
    """What one commit appended to a stream, handed to the readers it wakes: a reader waiting at
    the start of it is answered from memory instead of going back to the database."""

    state: StreamState
    chunks: list[tuple[int, bytes]]  # (end position, stored bytes), in order

    def read_from(self, position: int, max_bytes: int) -> ReadResult | None:
        if not self.chunks:
            return None
        first_end, first_data = self.chunks[0]
        if position < first_end - len(first_data) or position >= self.chunks[-1][0]:
            return None
        chunks = [c for c in self.chunks if c[0] > position]
        if sum(len(data) for _, data in chunks) > max_bytes:
            return None
        next_pos = chunks[-1][0]
        return ReadResult(
            state=self.state,
            chunks=chunks,
            next_pos=next_pos,
            up_to_date=next_pos >= self.state.tail,
        )


# Commits a channel remembers. A reader woken by one commit may only get its loop turn after
# the next ones (a busy loop at hundreds of generations): up to this many behind, it is still
# answered from memory instead of going to the database, which would add to the load that made
# it late.
RECENT_UPDATES = 4


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Channel:
    """One stream's wake-ups inside this process. `version` counts changes seen since the
    channel opened; `recent` holds what the latest changes appended (oldest first; None for a
    change this process did not make, or that appended nothing)."""

    __slots__ = ("_waiters", "readers", "recent", "version")

    def __init__(self) -> None:
        self.version = 0
        # A tuple, not a deque: the empty one is shared, so an idle reader's channel costs none.
        self.recent: tuple[TailUpdate | None, ...] = ()
        self.readers = 0
        self._waiters: set[asyncio.Future[None]] | None = None  # made by the first wait

    async def wait(self, seen: int, max_wait_s: float) -> None:
        """Until the version passes `seen`, or `max_wait_s` passes."""
        if self.version != seen:
            return
        # A future and a timer of its own per wait. asyncio.wait() on one shared future made a
        # second future, a timer and two callbacks per wait: thousands a second at hundreds of
        # live generations, each followed by an SSE reader.
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        if self._waiters is None:
            self._waiters = set()
        self._waiters.add(waiter)
        timer = loop.call_later(max_wait_s, _release, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if self._waiters is not None:
                self._waiters.discard(waiter)

    def changed(self, update: TailUpdate | None) -> None:
        self.version += 1
        self.recent = (*self.recent[1 - RECENT_UPDATES :], update)
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            _release(waiter)

    @property
    def waiting(self) -> int:
        """Readers inside wait() right now."""
        return len(self._waiters) if self._waiters else 0

    def cached_read(self, seen: int, position: int, max_bytes: int) -> ReadResult | None:
        """The next read answered from memory: every change since `seen` is remembered, was
        made here, and together they append one unbroken run from where the reader stands."""
        behind = self.version - seen
        if not 0 < behind <= len(self.recent):
            return None
        updates = self.recent[-behind:]
        if behind == 1:
            return updates[0].read_from(position, max_bytes) if updates[0] is not None else None
        chunks: list[tuple[int, bytes]] = []
        state: StreamState | None = None
        for update in updates:
            if update is None or not update.chunks:
                return None
            end, data = update.chunks[0]
            if chunks and end - len(data) != chunks[-1][0]:
                return None  # a gap: another process appended in between (its NOTIFY is late)
            chunks.extend(update.chunks)
            state = update.state
        assert state is not None
        return TailUpdate(state, chunks).read_from(position, max_bytes)


class LiveHub:
    def __init__(self) -> None:
        self._channels: dict[int, Channel] = {}
        # Identifies this process's own NOTIFYs, which it has already delivered locally.
        self.instance = f"{os.getpid()}-{secrets.token_hex(4)}"

    @contextlib.contextmanager
    def subscribe(self, stream_id: int) -> Iterator[Channel]:
        """A reader's channel for one stream, kept while any reader of that stream is live."""
        channel = self._channels.get(stream_id)
        if channel is None:
            channel = self._channels[stream_id] = Channel()
        channel.readers += 1
        try:
            yield channel
        finally:
            channel.readers -= 1
            if channel.readers == 0 and self._channels.get(stream_id) is channel:
                del self._channels[stream_id]

    def notify(
        self, stream_ids: Iterable[int], updates: Mapping[int, TailUpdate] | None = None
    ) -> None:
        for sid in stream_ids:
            channel = self._channels.get(sid)
            if channel is not None:
                channel.changed(updates.get(sid) if updates else None)

    def notify_all(self) -> None:
        self.notify(list(self._channels))

    @property
    def waiting_streams(self) -> int:
        return len(self._channels)

    @property
    def live_readers(self) -> int:
        """Long-poll and SSE readers waiting in this process (summed when metrics are scraped,
        so readers cost nothing extra)."""
        return sum(channel.readers for channel in self._channels.values())

    def payloads(self, stream_ids: Iterable[int]) -> list[str]:
        """NOTIFY payloads `<instance>:<id>,<id>...`, split to respect the size cap."""
        out: list[str] = []
        current: list[str] = []
        size = len(self.instance) + 1
        for sid in stream_ids:
            text = str(sid)
            if current and size + len(text) + 1 > _MAX_PAYLOAD:
                out.append(f"{self.instance}:{','.join(current)}")
                current, size = [], len(self.instance) + 1
            current.append(text)
            size += len(text) + 1
        if current:
            out.append(f"{self.instance}:{','.join(current)}")
        return out

    def on_payload(self, payload: str) -> None:
        instance, _, ids = payload.partition(":")
        if instance == self.instance or not ids:
            return
        with contextlib.suppress(ValueError):
            self.notify(int(part) for part in ids.split(",") if part)


class PostgresListener:
    """LISTENs on its own connection; reconnects with backoff. After a reconnect it wakes every
    waiter once, since notifications sent while it was away are lost."""

    def __init__(
        self,
        database_url: str,
        hub: LiveHub,
        channels: Mapping[str, Callable[[str], None]] | None = None,
    ) -> None:
        """`channels`: more channels to LISTEN to on the same connection, each with the
        callback its payloads go to (e.g. the sessions' cross-replica control messages)."""
        url = make_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._hub = hub
        self._channels: dict[str, Callable[[str], None]] = {
            CHANNEL: hub.on_payload,
            **(channels or {}),
        }
        self._task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        self._attempted = asyncio.Event()

    async def start(self) -> None:
        """Start listening; returns once the first connection attempt has succeeded or failed
        (a database that is down at boot must not hang start-up; readiness reports it)."""
        self._task = asyncio.create_task(self._run(), name="ds-listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        backoff = 0.2
        first = True
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True
                ) as conn:
                    for channel in self._channels:
                        await conn.execute(f"LISTEN {channel}")
                    self.ready.set()
                    self._attempted.set()
                    if not first:
                        self._hub.notify_all()
                    first = False
                    backoff = 0.2
                    async for note in conn.notifies():
                        self._dispatch(note.channel, note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.ready.clear()
                self._attempted.set()
                log.warning("listener_disconnected", error=type(exc).__name__, retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _dispatch(self, channel: str, payload: str) -> None:
        callback = self._channels.get(channel)
        if callback is None:
            return
        try:
            callback(payload)
        except Exception as exc:
            # One bad message must not drop the connection every wake-up depends on.
            log.warning("listener_callback_failed", channel=channel, error=type(exc).__name__)
