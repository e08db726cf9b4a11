"""`GET /v1/errors`, `/v1/audit` and `/v1/ratelimits`: who may read them, what they return,
and a failed generation recorded as an error event."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from db.models import AuditEntry, ErrorEvent, Generation, RateLimitEvent
from streams_service.access.principal import SYSTEM
from streams_service.sessions.recovery import recover_interrupted
from tests.ops.conftest import (
    acting_as,
    assert_bad_request,
    assert_forbidden,
    db_of,
    iso,
    person,
)
from tests.sessions.conftest import (
    AppFactory,
    events_of,
    new_session,
    send,
    services,
    stream_records,
    wait_idle,
)


async def _get(client: httpx.AsyncClient, path: str, **params: str) -> dict[str, Any]:
    response = await client.get(path, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _all_pages(client: httpx.AsyncClient, path: str, **params: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        body = await _get(client, path, **params, **({"cursor": cursor} if cursor else {}))
        assert len(body["items"]) <= int(params["limit"])
        items.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return items


async def test_a_failed_generation_is_recorded_as_an_error_event(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = api
    member = person()
    with acting_as(app, member):
        sid = await new_session(client)
        accepted = await send(client, sid, "my secret plan [[fault:overloaded]]")
        session = await wait_idle(client, sid)
        assistant = next(
            m
            for m in session["messages"]
            if m["role"] == "assistant" and m["generation_id"] == accepted["generation_id"]
        )
        run_error = events_of(await stream_records(client, sid), assistant["id"])[-1]
        assert run_error["type"] == "RUN_ERROR"
        # The member's usage counts the failure; the error list is not theirs to read.
        usage = await _get(client, "/v1/usage", group_by="session")
        assert [(r["session"], r["generations"], r["errors"]) for r in usage["rows"]] == [
            (sid, 1, 1)
        ]
        assert_forbidden(await client.get("/v1/errors"))

    with acting_as(app, person("ops")):
        body = await _get(client, "/v1/errors", session_id=sid)
    assert body["items"] == [
        {
            "id": body["items"][0]["id"],
            "at": body["items"][0]["at"],
            "type": "overloaded",
            "session_id": sid,
            "generation_id": accepted["generation_id"],
            "user_id": member.user_id,
            "model": session["model"],
            "message": run_error["error"]["message"],
        }
    ]
    assert "secret" not in body["items"][0]["message"]
    assert body["counts"] == {"overloaded": 1} and body["next_cursor"] is None
    # Recorded with the generation's final state, in the same transaction.
    async with db_of(app)() as db:
        generation = await db.get(Generation, accepted["generation_id"])
        event = (
            await db.execute(select(ErrorEvent).where(ErrorEvent.session_id == sid))
        ).scalar_one()
    assert generation is not None and generation.error_code == event.type == "overloaded"
    assert generation.finished_at == event.at


async def test_error_events_page_newest_first_with_filters(
    api: tuple[FastAPI, httpx.AsyncClient], slot: datetime
) -> None:
    app, client = api
    sid = "5f0c8a52-0000-4000-8000-000000000001"
    same_moment = slot + timedelta(hours=5)
    events = [
        ErrorEvent(
            at=same_moment if i in (3, 4, 5) else slot + timedelta(hours=i),
            type="overloaded" if i % 3 else "rate_limited",
            session_id=sid if i < 6 else None,
            generation_id=f"g{i}",
            message=f"event {i}",
        )
        for i in range(8)
    ]
    async with db_of(app).begin() as db:
        db.add_all(events)
    window = {"from": iso(slot), "to": iso(slot + timedelta(days=1))}
    newest_first = sorted(events, key=lambda e: (e.at, e.id), reverse=True)

    items = await _all_pages(client, "/v1/errors", limit="3", **window)
    assert [i["generation_id"] for i in items] == [e.generation_id for e in newest_first]
    assert [i["at"] for i in items] == [iso(e.at) for e in newest_first]
    first = await _get(client, "/v1/errors", limit="3", **window)
    assert first["counts"] == {"overloaded": 5, "rate_limited": 3}

    typed = await _all_pages(client, "/v1/errors", limit="2", type="rate_limited", **window)
    assert [i["generation_id"] for i in typed] == [
        e.generation_id for e in newest_first if e.type == "rate_limited"
    ]
    by_session = await _get(client, "/v1/errors", session_id=sid, type="overloaded", **window)
    assert [i["generation_id"] for i in by_session["items"]] == [
        e.generation_id for e in newest_first if e.session_id == sid and e.type == "overloaded"
    ]
    # The chart's counts cover every type in the range, whatever `type` says.
    assert by_session["counts"] == {"overloaded": 4, "rate_limited": 2}
    # The range is half-open: nothing before `from` or at `to`.
    later = await _get(
        client, "/v1/errors", **{"from": iso(slot + timedelta(hours=6)), "to": window["to"]}
    )
    assert [i["generation_id"] for i in later["items"]] == ["g7", "g6"]


async def test_audit_entries_newest_first_for_admins(
    api: tuple[FastAPI, httpx.AsyncClient], slot: datetime
) -> None:
    app, client = api
    entries = [
        AuditEntry(
            at=slot + timedelta(minutes=i),
            actor_id="u-admin",
            actor_email="admin@example.com",
            action=("session.rename", "session.delete", "user.role")[i % 3],
            target_type="session" if i % 3 < 2 else "user",
            target_id=f"t{i}",
            detail={"before": f"old {i}", "after": f"new {i}"},
        )
        for i in range(5)
    ]
    async with db_of(app).begin() as db:
        db.add_all(entries)
    window = {"from": iso(slot), "to": iso(slot + timedelta(days=1))}
    with acting_as(app, person("admin")):
        items = await _all_pages(client, "/v1/audit", limit="2", **window)
        renames = await _get(client, "/v1/audit", action="session.rename", **window)
    assert [i["target_id"] for i in items] == ["t4", "t3", "t2", "t1", "t0"]
    assert items[0] == {
        "id": items[0]["id"],
        "at": iso(slot + timedelta(minutes=4)),
        "actor_id": "u-admin",
        "actor_email": "admin@example.com",
        "action": "session.delete",
        "target_type": "session",
        "target_id": "t4",
        "detail": {"before": "old 4", "after": "new 4"},
    }
    assert [i["target_id"] for i in renames["items"]] == ["t3", "t0"]
    with acting_as(app, SYSTEM):
        assert len((await _get(client, "/v1/audit", **window))["items"]) == 5


async def test_ratelimits_show_limits_rejections_and_upstream_headroom(
    make_app: AppFactory, slot: datetime
) -> None:
    async with make_app(rate_limit_messages="7/minute", rate_limit_session_create="3/hour") as (
        app,
        client,
    ):
        times = [slot + timedelta(minutes=m) for m in (5, 10, 70, 75, 80)]
        names = ["message_send", "message_send", "message_send", "session_create", "auth_failure"]
        async with db_of(app).begin() as db:
            db.add_all(
                RateLimitEvent(at=at, limit_name=name, key=f"k{i}", user_id=f"u{i}")
                for i, (at, name) in enumerate(zip(times, names, strict=True))
            )
        # A real generation leaves the simulator's rate-limit headers behind.
        sid = await new_session(client)
        accepted = await send(client, sid, "hello [[tokens:3]]")
        await wait_idle(client, sid)

        window = {"from": iso(slot), "to": iso(slot + timedelta(hours=3))}
        with acting_as(app, person("ops")):
            hourly = await _get(client, "/v1/ratelimits", **window)
            daily = await _get(client, "/v1/ratelimits", bucket="day", **window)

    assert hourly["limits"] == [
        {"name": "session_create", "limit": "3/hour", "scope": "user"},
        {"name": "message_send", "limit": "7/minute", "scope": "session"},
        {"name": "auth_failure", "limit": "20/minute", "scope": "client address"},
    ]
    hour0, hour1 = iso(slot), iso(slot + timedelta(hours=1))
    assert hourly["rejections"] == [
        {"bucket": hour0, "limit_name": "message_send", "count": 2},
        {"bucket": hour1, "limit_name": "auth_failure", "count": 1},
        {"bucket": hour1, "limit_name": "message_send", "count": 1},
        {"bucket": hour1, "limit_name": "session_create", "count": 1},
    ]
    assert daily["bucket"] == "day" and daily["rejections"] == [
        {"bucket": hour0, "limit_name": name, "count": count}
        for name, count in (("auth_failure", 1), ("message_send", 3), ("session_create", 1))
    ]
    assert [(r["key"], r["limit_name"]) for r in hourly["recent"]] == [
        (f"k{i}", names[i]) for i in reversed(range(5))
    ]
    assert hourly["recent"][0]["at"] == iso(times[-1])
    upstream = hourly["upstream"]
    assert upstream["generation_id"] == accepted["generation_id"]
    assert upstream["headers"] and all(
        k.startswith("anthropic-ratelimit-") for k in upstream["headers"]
    )
    assert isinstance(hourly["current"], list)


async def test_roles_on_the_ops_routes(api: tuple[FastAPI, httpx.AsyncClient]) -> None:
    app, client = api
    with acting_as(app, person("member")):
        for path in ("/v1/errors", "/v1/ratelimits", "/v1/audit"):
            assert_forbidden(await client.get(path))
        assert (await client.get("/v1/usage")).status_code == 200
    with acting_as(app, person("ops")):
        assert (await client.get("/v1/errors")).status_code == 200
        assert (await client.get("/v1/ratelimits")).status_code == 200
        assert_forbidden(await client.get("/v1/audit"))
    for who in (person("admin"), SYSTEM):
        with acting_as(app, who):
            for path in ("/v1/errors", "/v1/ratelimits", "/v1/audit", "/v1/usage"):
                assert (await client.get(path)).status_code == 200, (who.role, path)


async def test_bad_parameters_are_400(api: tuple[FastAPI, httpx.AsyncClient]) -> None:
    _app, client = api
    cases: list[tuple[str, dict[str, str], str]] = [
        ("/v1/errors", {"limit": "0"}, "`limit`"),
        ("/v1/errors", {"limit": "201"}, "`limit`"),
        ("/v1/errors", {"limit": "ten"}, "`limit`"),
        ("/v1/errors", {"cursor": "not-a-cursor"}, "`cursor`"),
        ("/v1/errors", {"from": "last week"}, "`from`"),
        ("/v1/errors", {"type": "x" * 33}, "`type`"),
        ("/v1/audit", {"cursor": "bm9wZQ"}, "`cursor`"),
        ("/v1/audit", {"to": "2026-02-30"}, "`to`"),
        ("/v1/ratelimits", {"bucket": "week"}, "`bucket`"),
        ("/v1/ratelimits", {"from": "2020-01-01", "to": "2026-01-01"}, "400 days"),
    ]
    for path, params, word in cases:
        assert_bad_request(await client.get(path, params=params), word)


async def test_a_generation_closed_by_recovery_is_an_error_event(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    """A generation left running by a dead process is closed as interrupted: that is an error
    event too (the real crash is in tests/sessions/test_recovery.py)."""
    app, client = api
    member = person()
    with acting_as(app, member):
        sid = await new_session(client)
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    generation_id = str(uuid.uuid4())
    async with db_of(app).begin() as db:
        db.add(
            Generation(
                id=generation_id,
                session_id=sid,
                user_id=member.user_id,
                message_id=f"msg-{generation_id}",
                model="claude-sonnet-5-5",
                status="running",
                owner="a-process-that-died",
                started_at=long_ago,
                heartbeat_at=long_ago,
            )
        )
    svc = services(app)
    # (The service's own periodic recovery may get there first; either way it is closed once.)
    await recover_interrupted(db_of(app), svc.store, svc.generations)
    body = await _get(client, "/v1/errors", session_id=sid)
    assert [(i["type"], i["generation_id"], i["user_id"]) for i in body["items"]] == [
        ("interrupted", generation_id, member.user_id)
    ]
