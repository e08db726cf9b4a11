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
from collections.abc import Iterable

import psycopg
import structlog
from sqlalchemy.engine import make_url

log = structlog.get_logger(__name__)

CHANNEL = "ds_append"
# NOTIFY payloads are capped at 8000 bytes; stay well under.
_MAX_PAYLOAD = 7000


class LiveHub:
    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[None]] = {}
        # Identifies this process's own NOTIFYs, which it has already delivered locally.
        self.instance = f"{os.getpid()}-{secrets.token_hex(4)}"

    def waiter(self, stream_id: int) -> asyncio.Future[None]:
        """A future resolved at the next change to the stream. Take it *before* reading, so a write
        that commits between the read and the wait still wakes the reader."""
        fut = self._waiters.get(stream_id)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self._waiters[stream_id] = fut
        return fut

    def notify(self, stream_ids: Iterable[int]) -> None:
        for sid in stream_ids:
            fut = self._waiters.pop(sid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def notify_all(self) -> None:
        self.notify(list(self._waiters))

    @property
    def waiting_streams(self) -> int:
        return len(self._waiters)

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

    def __init__(self, database_url: str, hub: LiveHub) -> None:
        url = make_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._hub = hub
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
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.ready.set()
                    self._attempted.set()
                    if not first:
                        self._hub.notify_all()
                    first = False
                    backoff = 0.2
                    async for note in conn.notifies():
                        self._hub.on_payload(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.ready.clear()
                self._attempted.set()
                log.warning("listener_disconnected", error=type(exc).__name__, retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
