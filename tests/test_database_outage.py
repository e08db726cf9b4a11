"""A Postgres outage mid-life: requests answer 503 with Retry-After (never a 500), then recover.

The outage is real: the test's own database stops accepting connections and every backend
serving it is terminated, as when the server restarts or fails over.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import psycopg
import pytest
from psycopg import sql

from db.migrate import upgrade
from streams_service.app import create_app
from streams_service.config import Settings
from tests.support import PG_ADMIN_URL, postgres_database


def _set_outage(name: str, down: bool) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(
                sql.Identifier(name), sql.SQL("false" if down else "true")
            )
        )
        if down:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )


@pytest.fixture
async def outage_client() -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    with postgres_database("chatops_outage") as url:
        upgrade(Settings(database_url=url).database_url)
        app = create_app(Settings(database_url=url, streams_sweep_interval_s=3600))
        name = url.rsplit("/", 1)[1]
        try:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    yield client, name
        finally:
            _set_outage(name, down=False)  # so that the database can be dropped


async def test_requests_during_an_outage_get_503_and_the_service_recovers(
    outage_client: tuple[httpx.AsyncClient, str],
) -> None:
    client, name = outage_client
    created = await client.post("/v1/sessions", json={})
    assert created.status_code == 201
    sid = created.json()["id"]

    _set_outage(name, down=True)
    for method, path in (
        ("GET", f"/v1/sessions/{sid}"),
        ("GET", "/v1/sessions"),
        ("POST", "/v1/sessions"),
        ("GET", "/v1/usage"),
    ):
        response = await client.request(method, path, json={} if method == "POST" else None)
        assert response.status_code == 503, (method, path, response.status_code, response.text)
        assert response.json()["error"] == "unavailable"
        assert response.headers["retry-after"] == "1"
    ready = await client.get("/health/ready")
    assert ready.status_code == 503

    _set_outage(name, down=False)
    status = 0
    for _ in range(50):  # bounded: the pool replaces its dead connections on the next checkout
        status = (await client.get(f"/v1/sessions/{sid}")).status_code
        if status == 200:
            break
        assert status == 503
        await asyncio.sleep(0.1)
    assert status == 200
    # What was acknowledged before the outage is all there; nothing half-written after it.
    listed = (await client.get("/v1/sessions")).json()["items"]
    assert [item["id"] for item in listed] == [sid]


async def test_a_generation_rides_out_a_short_outage(tmp_path: object) -> None:
    """The answer keeps streaming from upstream while the database is away, and ends while it is
    still away: its writes (the terminal event, the saved message) are retried under the same
    producer seq, so it ends complete, exactly once."""
    with postgres_database("chatops_outage") as url:
        upgrade(Settings(database_url=url).database_url)
        settings = Settings(
            database_url=url,
            streams_sweep_interval_s=3600,
            simulator_ttft_ms=0,
            simulator_tokens_per_s=40,
            stream_flush_interval_ms=20,
        )
        app = create_app(settings)
        name = url.rsplit("/", 1)[1]
        try:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    sid = (await client.post("/v1/sessions", json={})).json()["id"]
                    sent = await client.post(
                        f"/v1/sessions/{sid}/messages", json={"content": "go [[tokens:50]]"}
                    )
                    assert sent.status_code == 202
                    await asyncio.sleep(0.6)  # mid-answer (about 1.25 s long)
                    _set_outage(name, down=True)
                    await asyncio.sleep(1.5)  # the answer ends while the database is away
                    _set_outage(name, down=False)
                    session: dict[str, object] = {}
                    for _ in range(300):  # bounded wait for the answer to be saved
                        response = await client.get(f"/v1/sessions/{sid}")
                        if response.status_code == 200:
                            session = response.json()
                            if session["active_generation_id"] is None:
                                break
                        await asyncio.sleep(0.05)
                    assert session.get("active_generation_id") is None
                    messages = session["messages"]
                    assert isinstance(messages, list)
                    answer = messages[-1]
                    assert answer["status"] == "complete"
                    records = (
                        await client.get(f"/v1/stream/sessions/{sid}", params={"offset": "-1"})
                    ).json()
                    events = [
                        json.loads(r["value"]["chunk"])
                        for r in records
                        if r.get("type") == "chunk" and r["value"]["messageId"] == answer["id"]
                    ]
                    text = "".join(
                        e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT"
                    )
                    assert text == answer["parts"][-1]["content"]
                    assert [e["type"] for e in events if e["type"].startswith("RUN_")] == [
                        "RUN_STARTED",
                        "RUN_FINISHED",
                    ]
        finally:
            _set_outage(name, down=False)
