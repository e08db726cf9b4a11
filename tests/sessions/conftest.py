"""Session tests run the service in-process with its built-in simulator (real SDK, real HTTP to
the simulator), on real SQLite and Postgres."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from streams_service.access.principal import Principal, current_principal
from streams_service.app import Services, create_app
from streams_service.config import Settings
from tests.support import GENEROUS_LIMITS

# Fast by default: no pacing, short flush interval; tests that need time pass overrides.
FAST = {
    "simulator_ttft_ms": 0,
    "simulator_tokens_per_s": 0,
    "stream_flush_interval_ms": 5,
    "generation_stall_timeout_s": 10,
    "approval_timeout_s": 10,
    "streams_long_poll_timeout_ms": 2000,
    **{name.lower(): value for name, value in GENEROUS_LIMITS.items()},
}

# A real 1x1 PNG (attachments are checked to be the image type they claim).
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201e5274f"
        "b70000000049454e44ae426082"
    )
).decode()

AppFactory = Callable[..., AbstractAsyncContextManager[tuple[FastAPI, httpx.AsyncClient]]]


@pytest.fixture
def make_app(database_url: str) -> AppFactory:
    @asynccontextmanager
    async def factory(**overrides: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
        settings = Settings(database_url=database_url, **{**FAST, **overrides})
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                yield app, client

    return factory


@pytest.fixture
async def api(make_app: AppFactory) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with make_app() as pair:
        yield pair


@pytest.fixture
def client(api: tuple[FastAPI, httpx.AsyncClient]) -> httpx.AsyncClient:
    return api[1]


def services(app: FastAPI) -> Services:
    result: Services = app.state.services
    return result


async def new_session(client: httpx.AsyncClient, **body: Any) -> str:
    response = await client.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    session_id: str = response.json()["id"]
    return session_id


async def wait_idle(
    client: httpx.AsyncClient, session_id: str, timeout_s: float = 20
) -> dict[str, Any]:
    """The session once no generation runs (polls; bounded so a hang fails instead)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        body: dict[str, Any] = (await client.get(f"/v1/sessions/{session_id}")).json()
        if body["active_generation_id"] is None:
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"generation still running after {timeout_s}s")
        await asyncio.sleep(0.02)


async def stream_records(client: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    offset = "-1"
    while True:
        response = await client.get(f"/v1/stream/sessions/{session_id}", params={"offset": offset})
        assert response.status_code == 200, response.text
        records.extend(response.json())
        offset = response.headers["stream-next-offset"]
        if response.headers.get("stream-up-to-date") == "true":
            return records


def events_of(records: list[dict[str, Any]], message_id: str) -> list[dict[str, Any]]:
    """The AG-UI events of one assistant message, in seq order."""
    rows = [
        r["value"]
        for r in records
        if r.get("type") == "chunk" and r["value"]["messageId"] == message_id
    ]
    seqs = [row["seq"] for row in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"chunk seqs out of order: {seqs}"
    return [json.loads(row["chunk"]) for row in rows]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT")


async def send(
    client: httpx.AsyncClient, session_id: str, content: str, **extra: Any
) -> dict[str, Any]:
    response = await client.post(
        f"/v1/sessions/{session_id}/messages", json={"content": content, **extra}
    )
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def person(role: str = "member") -> Principal:
    """A caller of the given role who owns nothing yet (no users row needed in dev mode)."""
    uid = f"u-{uuid.uuid4().hex[:12]}"
    return Principal(user_id=uid, email=f"{uid}@example.com", role=role)  # type: ignore[arg-type]


@contextmanager
def acting_as(app: FastAPI, who: Principal) -> Iterator[None]:
    """Requests to `app` act for `who` until the block ends."""
    previous = app.dependency_overrides.get(current_principal)
    app.dependency_overrides[current_principal] = lambda: who
    try:
        yield
    finally:
        if previous is None:
            app.dependency_overrides.pop(current_principal, None)
        else:
            app.dependency_overrides[current_principal] = previous
