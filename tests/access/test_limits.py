"""Rate limits: moving windows in memory and in real Redis, shared by replicas through Redis."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import redis
from limits import parse
from sqlalchemy import select

from db.models import RateLimitEvent
from streams_service.access import limits as limits_module
from streams_service.access.limits import InProcessWindows
from tests.access.conftest import AuthApp, bearer, services
from tests.support import ServerProcess, migrate, postgres_database

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _redis_up() -> None:
    # A clear failure beats a confusing one: these tests need the real Redis.
    redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()


async def _limited_session_creates(
    client: httpx.AsyncClient, token: str, tries: int
) -> list[httpx.Response]:
    return [await client.post("/v1/sessions", json={}, headers=bearer(token)) for _ in range(tries)]


async def _check_429(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 429
    body = response.json()
    assert body["error"] == "rate_limited" and "per user" in body["detail"]
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["ratelimit-limit"] == str(limit)
    assert response.headers["ratelimit-remaining"] == "0"
    assert int(response.headers["ratelimit-reset"]) >= 1


async def test_session_create_limit_in_memory(auth_app: AuthApp) -> None:
    async with auth_app(rate_limit_session_create="3/minute") as (app, client, people):
        responses = await _limited_session_creates(client, people.other, 4)
        assert [r.status_code for r in responses] == [201, 201, 201, 429]
        await _check_429(responses[3], 3)
        # Another user has a window of their own.
        assert (
            await client.post("/v1/sessions", json={}, headers=bearer(people.ops))
        ).status_code == 201
        # An idempotent PUT of an existing session is not a creation and is not counted.
        sid = responses[0].json()["id"]
        again = await client.put(f"/v1/sessions/{sid}", json={}, headers=bearer(people.other))
        assert again.status_code == 200
        # The rejection is recorded for the dashboard.
        async with services(app).sessions.sessionmaker() as db:
            events = (
                await db.scalars(
                    select(RateLimitEvent).where(RateLimitEvent.user_id == people.other_id)
                )
            ).all()
        assert [(e.limit_name, e.key) for e in events] == [("session_create", people.other_id)]
        # Ops see the live window use next to the configured limits.
        board = (await client.get("/v1/ratelimits", headers=bearer(people.ops))).json()
        assert {"name": "session_create", "limit": "3/minute", "scope": "user"} in board["limits"]
        use = [c for c in board["current"] if c["key"] == people.other_id]
        assert [(c["limit_name"], c["used"], c["limit"]) for c in use] == [("session_create", 3, 3)]
        assert people.other_id in [r["key"] for r in board["recent"]]


async def test_message_limit_is_per_session(auth_app: AuthApp) -> None:
    async with auth_app(rate_limit_messages="2/minute") as (_app, client, people):
        headers = bearer(people.other)
        sid = (await client.post("/v1/sessions", json={}, headers=headers)).json()["id"]
        statuses = []
        for i in range(3):
            sent = await client.post(
                f"/v1/sessions/{sid}/messages",
                json={"content": f"m{i} [[tokens:1]]", "client_message_id": f"c{i}"},
                headers=headers,
            )
            statuses.append(sent.status_code)
            for _ in range(200):
                if (await client.get(f"/v1/sessions/{sid}", headers=headers)).json()[
                    "active_generation_id"
                ] is None:
                    break
        assert statuses == [202, 202, 429]
        # Recorded for the dashboard, although the send's own transaction rolled back.
        board = (await client.get("/v1/ratelimits", headers=bearer(people.ops))).json()
        mine = [r["limit_name"] for r in board["recent"] if r["session_id"] == sid]
        assert mine == ["message_send"]
        # A retry of an accepted message (same client_message_id) is not a new message.
        retry = await client.post(
            f"/v1/sessions/{sid}/messages",
            json={"content": "m0 [[tokens:1]]", "client_message_id": "c0"},
            headers=headers,
        )
        assert retry.status_code == 202
        # Another session of the same user is not limited.
        other = (await client.post("/v1/sessions", json={}, headers=headers)).json()["id"]
        sent = await client.post(
            f"/v1/sessions/{other}/messages", json={"content": "x [[tokens:1]]"}, headers=headers
        )
        assert sent.status_code == 202


async def test_failed_auth_limit_blocks_guessing_from_one_address(auth_app: AuthApp) -> None:
    async with auth_app(rate_limit_auth_failures="3/minute") as (_app, client, people):
        statuses = [
            (await client.get("/v1/me", headers=bearer(f"cho_guess{i}"))).status_code
            for i in range(4)
        ]
        assert statuses == [401, 401, 401, 429]
        # While blocked, even a valid but not yet seen credential is not checked.
        blocked = await client.get("/v1/me", headers=bearer(people.admin))
        assert blocked.status_code == 429 and "retry-after" in blocked.headers


async def test_limits_in_real_redis(auth_app: AuthApp) -> None:
    _redis_up()
    async with auth_app(rate_limit_session_create="2/minute", redis_url=REDIS_URL) as (
        _app,
        client,
        people,
    ):
        assert services(_app).limiter.shared
        responses = await _limited_session_creates(client, people.other, 3)
        assert [r.status_code for r in responses] == [201, 201, 429]
    # The window lives in Redis: a new process (here: a new app) sees the same count.
    async with auth_app(rate_limit_session_create="2/minute", redis_url=REDIS_URL) as (
        _app2,
        client2,
        people2,
    ):
        # Fresh people (new user ids) have fresh windows...
        assert (
            await client2.post("/v1/sessions", json={}, headers=bearer(people2.other))
        ).status_code == 201
        # ...and the first app's user is still over its limit in this process.
        limiter = services(_app2).limiter
        assert await limiter.blocked("session_create", people.other_id) is not None


def test_two_processes_share_one_limit_through_redis(tmp_path: Path) -> None:
    _redis_up()
    secret = "s-" + uuid.uuid4().hex
    with postgres_database() as url:
        migrate(url)
        env = {
            "STREAMS_SECRET": secret,
            "REDIS_URL": REDIS_URL,
            "RATE_LIMIT_SESSION_CREATE": "4/minute",
        }
        a = ServerProcess(url, tmp_path, "a", **env).start()
        b = ServerProcess(url, tmp_path, "b", **env).start()
        try:
            email = f"shared-{uuid.uuid4().hex[:8]}@example.com"
            created = httpx.post(
                f"{a.base_url}/v1/users", json={"email": email}, headers=bearer(secret)
            )
            assert created.status_code == 201, created.text
            uid = created.json()["id"]
            token = httpx.post(
                f"{a.base_url}/v1/users/{uid}/tokens", json={}, headers=bearer(secret)
            ).json()["token"]
            statuses = [
                httpx.post(
                    f"{server.base_url}/v1/sessions", json={}, headers=bearer(token)
                ).status_code
                for server in (a, b, a, b, a, b)
            ]
            # One limit of 4 across both replicas, not 4 each.
            assert statuses == [201, 201, 201, 201, 429, 429]
        finally:
            a.stop()
            b.stop()


async def test_an_import_counts_as_a_session_create(auth_app: AuthApp) -> None:
    async with auth_app(rate_limit_session_create="2/minute") as (_app, client, people):
        made = await _limited_session_creates(client, people.other, 1)
        assert made[0].status_code == 201
        sid = made[0].json()["id"]
        exported = await client.get(
            f"/v1/sessions/{sid}/export", params={"format": "json"}, headers=bearer(people.other)
        )
        assert exported.status_code == 200
        doc = exported.json()
        first = await client.post("/v1/sessions/import", json=doc, headers=bearer(people.other))
        assert first.status_code == 201  # the second session of the window
        refused = await client.post("/v1/sessions/import", json=doc, headers=bearer(people.other))
        await _check_429(refused, 2)
        listed = await client.get("/v1/sessions", headers=bearer(people.other))
        assert len(listed.json()["items"]) == 2  # the refused import made nothing


async def test_in_process_windows_start_no_thread_per_hit() -> None:
    """limits' MemoryStorage starts a timer thread on a hit whenever its last one has run;
    ours must not (Thread.start blocks the event loop). If a limits release renames the hook
    we override, the base class starts its timer again and this fails."""
    windows = InProcessWindows()
    storage = windows.storage
    item = parse("100/minute")
    first_timer = storage.timer
    first_timer.join(timeout=5)  # the one sweep the constructor starts
    for i in range(5):
        assert await windows.hit(item, "message_send", f"session-{i}")
        await asyncio.sleep(0.02)  # past the base class's 10 ms timer: it would start another
        assert storage.timer is first_timer and not first_timer.is_alive()
    # The windows still count: the 101st hit of one key in the minute is refused.
    for _ in range(99):
        assert await windows.hit(item, "message_send", "session-0")
    assert not await windows.hit(item, "message_send", "session-0")


async def test_in_process_windows_sweep_expired_keys_from_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Entries that have left their window are dropped by the sweep a later hit runs once it is
    due (memory only: a window never counts them either way)."""
    windows = InProcessWindows()
    item = parse("2/second")
    assert await windows.hit(item, "message_send", "old")
    assert await windows.hit(item, "message_send", "old")
    assert not await windows.hit(item, "message_send", "old")  # the window is full
    await asyncio.sleep(1.1)  # both entries have left the 1 s window
    old_key = item.key_for("message_send", "old")
    assert windows.storage.events[old_key]  # not swept yet: the sweep is not due
    later = time.monotonic() + limits_module.SWEEP_INTERVAL_S + 1
    clock = SimpleNamespace(monotonic=lambda: later, time=time.time)
    monkeypatch.setattr(limits_module, "time", clock)
    assert await windows.hit(item, "message_send", "new")  # runs the due sweep first
    assert not windows.storage.events.get(old_key)
    assert windows.storage.events[item.key_for("message_send", "new")]
    assert await windows.hit(item, "message_send", "old")  # a fresh window for the old key
