"""`GET /v1/usage`: aggregates equal the sums of the generation rows, on both databases."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from db.models import Generation
from streams_service.access.principal import Principal
from tests.ops.conftest import (
    acting_as,
    assert_bad_request,
    assert_forbidden,
    db_of,
    iso,
    person,
)
from tests.sessions.conftest import events_of, new_session, send, stream_records, wait_idle

MODELS = ("claude-sonnet-5-5", "claude-haiku-5-5")


def _generation(
    rng: random.Random, at: datetime, user: str | None, session: str, model: str
) -> Generation:
    failed = rng.random() < 0.2
    return Generation(
        id=str(uuid.uuid4()),
        session_id=session,
        user_id=user,
        message_id="m",
        model=model,
        status="error" if failed else "completed",
        error_code="overloaded" if failed else None,
        input_tokens=rng.randrange(0, 5000),
        output_tokens=rng.randrange(0, 3000),
        cache_read_tokens=rng.randrange(0, 4000),
        cache_write_5m_tokens=rng.randrange(0, 900),
        cache_write_1h_tokens=rng.randrange(0, 700),
        cost_usd=Decimal(rng.randrange(0, 2_000_000)) / 1_000_000,
        # Some generations never got a first token.
        ttft_ms=None if rng.random() < 0.15 else rng.randrange(80, 5000),
        started_at=at,
    )


async def _seed(app: FastAPI, slot: datetime, users: list[str | None]) -> list[Generation]:
    """Rows over three UTC days of the slot, with times on both sides of each midnight."""
    rng = random.Random(slot.toordinal())
    sessions = [str(uuid.uuid4()) for _ in range(4)]
    times = [slot + timedelta(seconds=rng.randrange(0, 3 * 86400)) for _ in range(70)]
    times += [
        slot + timedelta(days=1) - timedelta(microseconds=1),
        slot + timedelta(days=1),
        slot + timedelta(days=2, hours=13, minutes=59, seconds=59, microseconds=999_999),
        slot + timedelta(days=2, hours=14),
    ]
    rows = [
        _generation(rng, at, rng.choice(users), rng.choice(sessions), rng.choice(MODELS))
        for at in times
    ]
    async with db_of(app).begin() as db:
        db.add_all(rows)
    return rows


def _bucket(at: datetime, unit: str) -> str:
    at = at.astimezone(UTC)
    start = (
        at.replace(hour=0, minute=0, second=0, microsecond=0)
        if unit == "day"
        else at.replace(minute=0, second=0, microsecond=0)
    )
    return iso(start)


KEYS: dict[str, Callable[[Generation], Any]] = {
    "day": lambda g: _bucket(g.started_at, "day"),
    "hour": lambda g: _bucket(g.started_at, "hour"),
    "model": lambda g: g.model,
    "user": lambda g: g.user_id,
    "session": lambda g: g.session_id,
}


def _pct(values: list[int], q: float) -> float | None:
    # numpy's default ("linear") is the definition of SQL's percentile_cont.
    return None if not values else round(float(np.percentile(values, q)), 2)


def expected_rows(rows: list[Generation], groups: list[str]) -> list[dict[str, Any]]:
    """The usage rows computed here from the generation rows themselves."""
    grouped: dict[tuple[Any, ...], list[Generation]] = defaultdict(list)
    for g in rows:
        grouped[tuple(KEYS[name](g) for name in groups)].append(g)
    out = []
    for key in sorted(grouped, key=lambda k: tuple((v is None, v or "") for v in k)):
        members = grouped[key]
        ttfts = sorted(g.ttft_ms for g in members if g.ttft_ms is not None)
        row: dict[str, Any] = dict(zip(groups, key, strict=True))
        row.update(
            input_tokens=sum(g.input_tokens for g in members),
            output_tokens=sum(g.output_tokens for g in members),
            cache_read_tokens=sum(g.cache_read_tokens for g in members),
            cache_write_tokens=sum(
                g.cache_write_5m_tokens + g.cache_write_1h_tokens for g in members
            ),
            cost_usd=sum((g.cost_usd for g in members), Decimal(0)),
            generations=len(members),
            errors=sum(1 for g in members if g.error_code is not None),
            ttft_p50_ms=_pct(ttfts, 50),
            ttft_p95_ms=_pct(ttfts, 95),
        )
        out.append(row)
    return out


def _comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Money is a decimal string; compare its value.
    return [{**r, "cost_usd": Decimal(r["cost_usd"])} for r in rows]


async def _usage(client: httpx.AsyncClient, **params: str) -> dict[str, Any]:
    response = await client.get("/v1/usage", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


GROUPINGS = ["day", "hour", "model", "user", "session", "day,model", "model,user", "hour,session"]


async def test_usage_aggregates_equal_the_sums_of_the_generation_rows(
    api: tuple[FastAPI, httpx.AsyncClient], slot: datetime
) -> None:
    app, client = api
    users: list[str | None] = [person().user_id, person().user_id, None]
    rows = await _seed(app, slot, users)
    window = {"from": iso(slot), "to": iso(slot + timedelta(days=3))}
    for grouping in GROUPINGS:
        body = await _usage(client, group_by=grouping, **window)
        expected = expected_rows(rows, grouping.split(","))
        assert _comparable(body["rows"]) == expected, grouping
        assert body["from"] == window["from"] and body["to"] == window["to"]
        assert body["group_by"] == grouping.split(",") and body["truncated"] is False
    # Every row carries exactly its group keys and the measures, money as a decimal string.
    row = (await _usage(client, group_by="day,model", **window))["rows"][0]
    assert set(row) == {"day", "model", *expected_rows(rows, [])[0]}
    assert isinstance(row["cost_usd"], str) and isinstance(row["input_tokens"], int)


async def test_the_range_is_half_open_and_buckets_are_utc(
    api: tuple[FastAPI, httpx.AsyncClient], slot: datetime
) -> None:
    app, client = api
    rows = await _seed(app, slot, [person().user_id])
    # `to` is exclusive: the row at exactly midnight of day 2 belongs to the next window.
    first_day = await _usage(
        client, group_by="day", **{"from": iso(slot), "to": iso(slot + timedelta(days=1))}
    )
    assert [r["day"] for r in first_day["rows"]] == [iso(slot)]
    assert first_day["rows"][0]["generations"] == sum(
        1 for g in rows if g.started_at < slot + timedelta(days=1)
    )
    # A date-only `to` takes in that whole day; a time with an offset is converted to UTC.
    whole = await _usage(
        client,
        group_by="day",
        **{"from": slot.date().isoformat(), "to": (slot + timedelta(days=2)).date().isoformat()},
    )
    assert [r["day"] for r in whole["rows"]] == [iso(slot + timedelta(days=d)) for d in range(3)]
    assert whole["to"] == iso(slot + timedelta(days=3))
    one_am_in_paris = (slot + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S+01:00")
    shifted = await _usage(
        client, group_by="hour", **{"from": one_am_in_paris, "to": iso(slot + timedelta(hours=6))}
    )
    assert shifted["from"] == iso(slot)
    assert _comparable(shifted["rows"]) == expected_rows(
        [g for g in rows if g.started_at < slot + timedelta(hours=6)], ["hour"]
    )


async def test_a_member_sees_only_their_own_usage(
    api: tuple[FastAPI, httpx.AsyncClient], slot: datetime
) -> None:
    app, client = api
    alice, bob = person(), person()
    rows = await _seed(app, slot, [alice.user_id, bob.user_id])
    window = {"from": iso(slot), "to": iso(slot + timedelta(days=3))}
    alices = [g for g in rows if g.user_id == alice.user_id]
    with acting_as(app, alice):
        body = await _usage(client, group_by="user", **window)
        assert _comparable(body["rows"]) == expected_rows(alices, ["user"])
        by_day = await _usage(client, group_by="day,model", **window)
        assert _comparable(by_day["rows"]) == expected_rows(alices, ["day", "model"])
        # Naming herself is fine; naming anyone else is refused.
        mine = await _usage(client, group_by="model", user=str(alice.user_id), **window)
        assert _comparable(mine["rows"]) == expected_rows(alices, ["model"])
        assert_forbidden(await client.get("/v1/usage", params={"user": str(bob.user_id), **window}))
    # Ops see everyone, and can narrow to one user.
    with acting_as(app, person("ops")):
        everyone = await _usage(client, group_by="user", **window)
        assert _comparable(everyone["rows"]) == expected_rows(rows, ["user"])
        bobs = await _usage(client, group_by="model", user=str(bob.user_id), **window)
        assert _comparable(bobs["rows"]) == expected_rows(
            [g for g in rows if g.user_id == bob.user_id], ["model"]
        )


async def test_defaults_and_bad_parameters(api: tuple[FastAPI, httpx.AsyncClient]) -> None:
    _app, client = api
    before = datetime.now(UTC)
    body = await _usage(client)
    to = datetime.fromisoformat(body["to"])
    assert before <= to <= datetime.now(UTC) + timedelta(seconds=1)
    assert to - datetime.fromisoformat(body["from"]) == timedelta(days=30)
    assert body["group_by"] == ["day"]
    cases: list[tuple[dict[str, str], str]] = [
        ({"from": "yesterday"}, "`from`"),
        ({"to": "2026-13-40"}, "`to`"),
        ({"group_by": "week"}, "group_by"),
        ({"group_by": "day,,model"}, "group_by"),
        ({"group_by": "model,model"}, "twice"),
        ({"group_by": "day,hour"}, "not both"),
        ({"from": "2026-03-02", "to": "2026-03-01"}, "before"),
        ({"from": "2026-03-02T10:00:00Z", "to": "2026-03-02T10:00:00Z"}, "before"),
        ({"from": "2020-01-01", "to": "2026-01-01"}, "400 days"),
        ({"user": "x" * 65}, "`user`"),
    ]
    for params, word in cases:
        assert_bad_request(await client.get("/v1/usage", params=params), word)


async def _wait_title(client: httpx.AsyncClient, sid: str) -> None:
    """The title is a generation of its own, written after the first exchange."""
    for _ in range(500):
        if (await client.get(f"/v1/sessions/{sid}")).json()["title"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no title was set")


@pytest.mark.timeout(90)
async def test_usage_matches_what_the_simulator_reported(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = api
    member: Principal = person()
    with acting_as(app, member):
        sid = await new_session(client)
        finished: list[dict[str, Any]] = []
        for text in ("first [[tokens:12]]", "second [[tokens:30]]", "third [[tokens:7]]"):
            accepted = await send(client, sid, text)
            session = await wait_idle(client, sid)
            if len(finished) == 0:
                await _wait_title(client, sid)
            assistant = next(
                m
                for m in session["messages"]
                if m["role"] == "assistant" and m["generation_id"] == accepted["generation_id"]
            )
            events = events_of(await stream_records(client, sid), assistant["id"])
            assert events[-1]["type"] == "RUN_FINISHED"
            finished.append(events[-1]["usage"])
        session = (await client.get(f"/v1/sessions/{sid}")).json()
        by_model = {r["model"]: r for r in (await _usage(client, group_by="model"))["rows"]}
        by_session = (await _usage(client, group_by="session"))["rows"]

    chat = by_model[session["model"]]
    assert chat["generations"] == 3 and chat["errors"] == 0
    assert chat["output_tokens"] == sum(u["completionTokens"] for u in finished)
    prompt = chat["input_tokens"] + chat["cache_read_tokens"] + chat["cache_write_tokens"]
    assert prompt == sum(u["promptTokens"] for u in finished)
    assert chat["ttft_p50_ms"] is not None and chat["ttft_p95_ms"] >= chat["ttft_p50_ms"]
    # The title is the one other generation; together they cost what the session did.
    assert sum(r["generations"] for r in by_model.values()) == 4
    assert [r["session"] for r in by_session] == [sid]
    assert Decimal(by_session[0]["cost_usd"]) == Decimal(session["cost_usd"]) > 0
    async with db_of(app)() as db:
        stored = (
            await db.execute(select(Generation).where(Generation.session_id == sid))
        ).scalars()
        assert sum(g.output_tokens for g in stored) == sum(
            r["output_tokens"] for r in by_model.values()
        )
