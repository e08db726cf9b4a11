"""A live reader subscribes to its stream's wake-ups before the read it then waits after, so a
commit is never missed; an SSE open, which has just read the stream's head, reads it once more
(not twice), and a stream created again under the same path is followed under its new id."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.responses import StreamingResponse

from streams_service.config import Settings
from streams_service.durable.model import ReadResult
from streams_service.durable.routes import PREFIX, StreamRoutes

JSON = {"Content-Type": "application/json"}


def _routes(app: FastAPI) -> StreamRoutes:
    services = app.state.services
    return StreamRoutes(
        services.store,
        services.hub,
        long_poll_timeout_s=10.0,
        sse_max_duration_s=30.0,
        max_append_bytes=1 << 20,
        max_read_bytes=1 << 20,
        draining=lambda: False,
    )


def _count_reads(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch, before: Callable[[int], Awaitable[None]]
) -> list[int]:
    """Wrap the store's read: `before(n)` runs ahead of the n-th read; returns the counter."""
    store = app.state.services.store
    real = store.read
    calls = [0]

    async def read(path: str, from_pos: int, max_bytes: int) -> ReadResult:
        calls[0] += 1
        await before(calls[0])
        result: ReadResult = await real(path, from_pos, max_bytes)
        return result

    monkeypatch.setattr(store, "read", read)
    return calls


async def _open(app: FastAPI, stream_url: str) -> AsyncGenerator[Any, None]:
    """The SSE response's body, as the server would send it, without HTTP in between."""
    response = await _routes(app)._sse(stream_url.removeprefix(PREFIX), "-1", None)
    assert isinstance(response, StreamingResponse)
    body = response.body_iterator
    assert isinstance(body, AsyncGenerator)  # _sse_events
    return body


async def _next(events: AsyncIterator[Any]) -> bytes:
    chunk = await asyncio.wait_for(events.__anext__(), 10)
    return chunk if isinstance(chunk, bytes) else str(chunk).encode()


async def test_an_sse_open_reads_once_and_wakes_on_the_next_append(
    app: FastAPI, client: httpx.AsyncClient, stream_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await client.put(stream_url, headers=JSON, content=b'[{"n":1}]')).status_code == 201

    async def nothing(_n: int) -> None:
        return None

    reads = _count_reads(app, monkeypatch, nothing)
    events = await _open(app, stream_url)
    try:
        first = await _next(events)
        assert b'{"n":1}' in first
        assert reads[0] == 1  # the head, then one read after subscribing (it was two)
        appended = await client.post(stream_url, headers=JSON, content=b'{"n":2}')
        assert appended.status_code in (200, 204)
        assert b'{"n":2}' in await _next(events)
    finally:
        await events.aclose()


async def test_a_stream_created_again_under_its_path_is_followed_under_its_new_id(
    app: FastAPI,
    client: httpx.AsyncClient,
    stream_url: str,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
) -> None:
    """Deleted and created again between the SSE open's head and its first read: the reader
    follows the new stream, and an append to it wakes the reader."""
    assert (await client.put(stream_url, headers=JSON, content=b'[{"old":1}]')).status_code == 201

    async def recreate(n: int) -> None:
        if n == 1:
            assert (await client.delete(stream_url)).status_code in (200, 204)
            created = await client.put(stream_url, headers=JSON, content=b'[{"new":1}]')
            assert created.status_code == 201

    reads = _count_reads(app, monkeypatch, recreate)
    events = await _open(app, stream_url)
    try:
        first = await _next(events)
        assert b'{"new":1}' in first and b"old" not in first
        # Postgres gives the new stream a new id: the read that found it, then one after
        # subscribing to it. SQLite may hand the deleted row's id out again, and the reader's
        # channel is then already the right one.
        if settings.database_url.startswith("postgresql"):
            assert reads[0] == 2
        appended = await client.post(stream_url, headers=JSON, content=b'{"new":2}')
        assert appended.status_code in (200, 204)
        assert b'{"new":2}' in await _next(events)
    finally:
        await events.aclose()
