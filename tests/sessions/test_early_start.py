"""A send that calls Claude before reading the session, from what this process knows of the
conversation (sessions/memo.py): the read confirms it, or it is abandoned before any token and
the send goes on as without it. Real SDK, the built-in simulator, SQLite and Postgres."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psycopg
from fastapi import FastAPI
from sqlalchemy.engine import make_url

from streams_service.sessions import repository as repo
from streams_service.sessions.conversation import build_history
from streams_service.sessions.generation_types import GenerationSpec, Handle
from tests.observability.test_metrics import scrape, value
from tests.sessions.conftest import (
    AppFactory,
    acting_as,
    new_session,
    person,
    send,
    services,
    stream_records,
    wait_idle,
)

EARLY = "chatops_send_early_starts_total"


async def _upstream_requests(app: FastAPI) -> int:
    """Messages API requests the built-in simulator has received."""
    base = str(services(app).generations.client.base_url).rstrip("/")
    async with httpx.AsyncClient() as raw:
        stats = (await raw.get(f"{base}/_simulator/stats")).json()
    count: int = stats["requests_total"]
    return count


async def _until(check: Callable[[], Any], what: str) -> None:
    """Bounded poll: a hang fails instead."""
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


@asynccontextmanager
async def _session_locked(database_url: str, session_id: str) -> AsyncIterator[None]:
    """Hold what a send's read must wait for: the session's row lock (Postgres) or the
    database's write lock (SQLite, whose transactions begin IMMEDIATE)."""
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            await conn.execute(
                "SELECT 1 FROM chat_sessions WHERE id = %s FOR UPDATE", (session_id,)
            )
            yield
            await conn.rollback()
        return
    assert url.database is not None
    conn = sqlite3.connect(url.database, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def _record_starts(app: FastAPI) -> list[Handle]:
    """Every generation the app starts, in order (the real start runs)."""
    generations = services(app).generations
    started: list[Handle] = []
    real_start = generations.start

    def start(spec: GenerationSpec) -> Handle:
        handle = real_start(spec)
        started.append(handle)
        return handle

    generations.start = start  # type: ignore[method-assign]
    return started


async def _history_before_send(app: FastAPI, sid: str, content: str) -> list[Any]:
    """The upstream `messages` a send of `content` must carry, from the saved conversation."""
    async with services(app).sessions.sessionmaker() as db:
        _row, messages = await repo.send_row_and_history(db, sid, None)
    history = build_history(messages)
    return [*history, {"role": "user", "content": [{"type": "text", "text": content}]}]


async def test_a_send_calls_claude_while_it_waits_to_read_a_session_this_process_knows(
    make_app: AppFactory, database_url: str
) -> None:
    async with make_app() as (app, client):
        sid = await new_session(client, title="early")  # titled: no title call upstream
        first = await send(client, sid, "first [[tokens:6]]")
        await wait_idle(client, sid)
        started = _record_starts(app)
        expected = await _history_before_send(app, sid, "second [[tokens:6]]")
        before = await _upstream_requests(app)
        async with _session_locked(database_url, sid):
            posting = asyncio.create_task(
                client.post(f"/v1/sessions/{sid}/messages", json={"content": "second [[tokens:6]]"})
            )

            async def called() -> bool:
                return await _upstream_requests(app) == before + 1

            await _until(called, "the upstream request went out")
            assert not posting.done()  # the send itself still waits for the session
        response = await asyncio.wait_for(posting, 20)
        assert response.status_code == 202, response.text
        accepted = response.json()
        session = await wait_idle(client, sid)
        metrics = await scrape(client)
        records = await stream_records(client, sid)
        assert await _upstream_requests(app) == before + 1  # that request was the answer's
    assert [s.spec.generation_id for s in started] == [accepted["generation_id"]]
    assert started[0].spec.history == expected
    assert [m["role"] for m in session["messages"]] == ["user", "assistant"] * 2
    answer = session["messages"][-1]
    assert answer["status"] == "complete" and answer["parts"][-1]["content"]
    runs = [r["value"]["chunk"] for r in records if r.get("type") == "chunk"]
    assert sum('"RUN_STARTED"' in c for c in runs) == 2
    assert sum(accepted["generation_id"] in c and '"RUN_FINISHED"' in c for c in runs) == 1
    assert first["generation_id"] != accepted["generation_id"]
    assert value(metrics, EARLY, outcome="confirmed") == 1
    assert value(metrics, EARLY, outcome="abandoned") == 0


async def test_an_early_start_the_session_read_contradicts_is_abandoned_for_the_right_one(
    make_app: AppFactory,
) -> None:
    async with make_app() as (app_a, client_a), make_app() as (_app_b, client_b):
        models = [m["id"] for m in (await client_a.get("/v1/models")).json()["models"]]
        sid = await new_session(client_a, title="two replicas", model=models[0])
        await send(client_a, sid, "on a [[tokens:5]]")
        await wait_idle(client_a, sid)
        # Another replica answers in between: A's memo of the conversation is one exchange
        # behind.
        await send(client_b, sid, "on b [[tokens:5]]")
        await wait_idle(client_b, sid)
        started = _record_starts(app_a)
        expected = await _history_before_send(app_a, sid, "on a again [[tokens:5]]")
        before = await _upstream_requests(app_a)
        accepted = await send(client_a, sid, "on a again [[tokens:5]]")
        session = await wait_idle(client_a, sid)
        # And a model changed between two sends on A: the memo's model is the old one.
        assert (
            await client_a.patch(f"/v1/sessions/{sid}", json={"model": models[1]})
        ).status_code == 200
        started_again = len(started)
        changed = await send(client_a, sid, "new model [[tokens:5]]")
        session = await wait_idle(client_a, sid)
        metrics = await scrape(client_a)
        records = await stream_records(client_a, sid)
        after = await _upstream_requests(app_a)
    # Each send started a guess, abandoned, then the generation the read called for.
    stale, right = started[0].spec, started[1].spec
    assert stale.history != expected and right.history == expected
    assert right.generation_id == accepted["generation_id"] == stale.generation_id
    old_model, new_model = started[started_again].spec, started[started_again + 1].spec
    assert (old_model.model.id, new_model.model.id) == (models[0], models[1])
    assert new_model.generation_id == changed["generation_id"]
    assert len(started) == started_again + 2
    assert after == before + 4  # the abandoned requests went out, and were all there was
    assert value(metrics, EARLY, outcome="abandoned") == 2
    assert value(metrics, EARLY, outcome="confirmed") == 0
    # Nothing of an abandoned guess reached the stream or the history.
    runs = [r["value"]["chunk"] for r in records if r.get("type") == "chunk"]
    for generation_id in (accepted["generation_id"], changed["generation_id"]):
        assert sum(generation_id in c and '"RUN_STARTED"' in c for c in runs) == 1
        assert sum(generation_id in c and '"RUN_FINISHED"' in c for c in runs) == 1
    assert [m["role"] for m in session["messages"]] == ["user", "assistant"] * 4
    assert all(m["status"] == "complete" for m in session["messages"])


async def test_no_early_start_reaches_claude_for_a_refused_send(make_app: AppFactory) -> None:
    async with make_app(rate_limit_messages="2/minute") as (app, client):
        owner = person()
        with acting_as(app, owner):
            sid = await new_session(client, title="refusals")
            await send(client, sid, "one [[tokens:4]]")
            await wait_idle(client, sid)
        before = await _upstream_requests(app)
        # Another user: the session is not theirs (404), and this process's memo of it is
        # the owner's.
        with acting_as(app, person()):
            response = await client.post(f"/v1/sessions/{sid}/messages", json={"content": "x"})
        assert response.status_code == 404
        assert await _upstream_requests(app) == before
        with acting_as(app, owner):
            await send(client, sid, "two [[tokens:4]]")  # the limit's second send: early
            await wait_idle(client, sid)
            assert await _upstream_requests(app) == before + 1
            # The third is over the limit: refused before any upstream request.
            response = await client.post(f"/v1/sessions/{sid}/messages", json={"content": "3"})
            assert response.status_code == 429, response.text
            assert response.json()["error"] == "rate_limited"
            assert await _upstream_requests(app) == before + 1
            session = await wait_idle(client, sid)
        metrics = await scrape(client)
    assert [m["role"] for m in session["messages"]] == ["user", "assistant"] * 2
    assert value(metrics, EARLY, outcome="confirmed") == 1
    assert value(metrics, EARLY, outcome="abandoned") == 0


async def test_a_session_near_its_budget_is_not_started_early(make_app: AppFactory) -> None:
    async with make_app() as (app, client):
        # $0.03: less than one answer's full reservation (~$0.04), so each send reserves all
        # that is left, and what an answer leaves never covers that again.
        sid = await new_session(client, title="budget", budget_usd="0.03")
        await send(client, sid, "one [[tokens:4]]")
        await wait_idle(client, sid)
        assert len(services(app).generations.memos) == 0
        await send(client, sid, "two [[tokens:4]]")
        session = await wait_idle(client, sid)
        # Without a cap the same exchange leaves a memo, and the next send starts early.
        free = await new_session(client, title="no cap")
        await send(client, free, "one [[tokens:4]]")
        await wait_idle(client, free)
        assert len(services(app).generations.memos) == 1
        await send(client, free, "two [[tokens:4]]")
        await wait_idle(client, free)
        metrics = await scrape(client)
    assert [m["role"] for m in session["messages"]] == ["user", "assistant"] * 2
    assert value(metrics, EARLY, outcome="confirmed") == 1
    assert value(metrics, EARLY, outcome="abandoned") == 0


async def test_an_early_start_for_an_ended_or_deleted_session_is_refused_and_counted(
    make_app: AppFactory,
) -> None:
    async with make_app() as (app, client):
        ended = await new_session(client, title="ended")
        deleted = await new_session(client, title="deleted")
        for sid in (ended, deleted):
            await send(client, sid, "one [[tokens:4]]")
            await wait_idle(client, sid)
        assert len(services(app).generations.memos) == 2
        assert (await client.post(f"/v1/sessions/{ended}/end")).status_code == 200
        assert (await client.delete(f"/v1/sessions/{deleted}")).status_code == 200
        refused = await client.post(f"/v1/sessions/{ended}/messages", json={"content": "two"})
        gone = await client.post(f"/v1/sessions/{deleted}/messages", json={"content": "two"})
        metrics = await scrape(client)
        records = await stream_records(client, ended)
    assert refused.status_code == 409 and gone.status_code == 404
    # Each was started early (the memo knew them) and abandoned when the read refused it:
    # nothing of it reached the stream.
    assert value(metrics, EARLY, outcome="abandoned") == 2
    assert value(metrics, EARLY, outcome="confirmed") == 0
    runs = [r["value"]["chunk"] for r in records if r.get("type") == "chunk"]
    assert sum('"RUN_STARTED"' in c for c in runs) == 1
