"""Recovery of a generation whose process died after its terminal event reached the stream but
before the answer was saved (found by `make chaos`, Postgres restart): the record must say what
readers already saw, and no second terminal event may follow."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
from fastapi import FastAPI
from sqlalchemy import delete, select, update

from db.models import ChatMessage, ChatSession, Generation
from streams_service.sessions.recovery import recover_interrupted
from tests.sessions.conftest import (
    AppFactory,
    events_of,
    new_session,
    send,
    services,
    stream_records,
    text_of,
    wait_idle,
)


async def _unsave(app: FastAPI, sid: str, generation_id: str) -> str:
    """Put the database back to where it was just before the answer was saved: the generation
    running (with a stale heartbeat), the session busy, no assistant message. Returns its id."""
    svc = services(app)
    maker = svc.sessions.sessionmaker
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    async with maker.begin() as db:
        gen = await db.get(Generation, generation_id)
        assert gen is not None
        await db.execute(delete(ChatMessage).where(ChatMessage.id == gen.message_id))
        await db.execute(
            update(Generation)
            .where(Generation.id == generation_id)
            .values(
                status="running",
                finish_reason=None,
                started_at=long_ago,
                heartbeat_at=long_ago,
                finished_at=None,
            )
        )
        await db.execute(
            update(ChatSession)
            .where(ChatSession.id == sid)
            .values(active_generation_id=generation_id, message_count=ChatSession.message_count - 1)
        )
        return gen.message_id


async def test_a_run_that_finished_on_the_stream_is_closed_as_finished(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = api
    sid = await new_session(client)
    accepted = await send(client, sid, "hello [[tokens:12]]")
    before = await wait_idle(client, sid)
    answer = before["messages"][-1]
    assert answer["status"] == "complete"

    message_id = await _unsave(app, sid, accepted["generation_id"])
    svc = services(app)
    closed = await recover_interrupted(svc.sessions.sessionmaker, svc.store, svc.generations)
    assert closed == 1

    after = await wait_idle(client, sid)
    saved = after["messages"][-1]
    assert saved["id"] == message_id
    assert saved["status"] == "complete"
    assert saved["parts"][-1]["content"] == answer["parts"][-1]["content"]
    events = events_of(await stream_records(client, sid), message_id)
    terminals = [e["type"] for e in events if e["type"] in ("RUN_FINISHED", "RUN_ERROR")]
    assert terminals == ["RUN_FINISHED"]  # nothing appended after the run's own end
    assert text_of(events) == saved["parts"][-1]["content"]
    async with svc.sessions.sessionmaker() as db:
        gen = await db.get(Generation, accepted["generation_id"])
        assert gen is not None
        assert (gen.status, gen.finish_reason, gen.error_code) == ("completed", "stop", None)
    # The session takes messages again.
    await send(client, sid, "again [[tokens:3]]")
    assert (await wait_idle(client, sid))["messages"][-1]["status"] == "complete"


async def test_a_run_without_an_end_on_the_stream_is_closed_as_interrupted(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = api
    sid = await new_session(client)
    accepted = await send(client, sid, "hello [[tokens:12]]")
    await wait_idle(client, sid)
    svc = services(app)
    # A run with no terminal event: its events are rewritten under a message id with nothing
    # on the stream, as if the process died before it began writing.
    message_id = await _unsave(app, sid, accepted["generation_id"])
    async with svc.sessions.sessionmaker.begin() as db:
        await db.execute(
            update(Generation)
            .where(Generation.id == accepted["generation_id"])
            .values(message_id="msg_never_written")
        )
    closed = await recover_interrupted(svc.sessions.sessionmaker, svc.store, svc.generations)
    assert closed == 1
    after = await wait_idle(client, sid)
    assert after["messages"][-1]["id"] == "msg_never_written"
    assert after["messages"][-1]["status"] == "interrupted"
    events = events_of(await stream_records(client, sid), "msg_never_written")
    assert [(e["type"], e["error"]["code"]) for e in events] == [("RUN_ERROR", "interrupted")]
    async with svc.sessions.sessionmaker() as db:
        gen = await db.get(Generation, accepted["generation_id"])
        assert gen is not None
        # The same status a drain gives a run it could not wait for.
        assert (gen.status, gen.error_code) == ("interrupted", "interrupted")
    assert message_id != "msg_never_written"


async def test_one_heartbeat_keeps_every_running_generation_fresh_while_any_runs(
    make_app: AppFactory,
) -> None:
    """Every generation running here is refreshed four times per staleness window (by one
    statement for all of them), and the beats stop once none runs."""
    async with make_app(generation_stale_after_s=1, simulator_tokens_per_s=20) as (app, client):
        generations = services(app).generations
        maker = services(app).sessions.sessionmaker

        async def beats(ids: list[str]) -> dict[str, datetime]:
            async with maker() as db:
                rows = await db.execute(
                    select(Generation.id, Generation.heartbeat_at).where(Generation.id.in_(ids))
                )
                return {gid: at for gid, at in rows.all()}

        async def refreshed(since: dict[str, datetime]) -> bool:
            for _ in range(100):  # a beat is due every 0.25 s
                now = await beats(list(since))
                if all(now[gid] > at for gid, at in since.items()):
                    return True
                await asyncio.sleep(0.05)
            return False

        sids = [await new_session(client) for _ in range(2)]
        accepted = [await send(client, sid, "slowly [[tokens:80]]") for sid in sids]
        ids = [a["generation_id"] for a in accepted]
        assert sorted(generations.generation_ids()) == sorted(ids)
        assert await refreshed(await beats(ids))
        for sid in sids:
            await wait_idle(client, sid)
        for _ in range(100):  # the next beat finds nothing running and ends
            if generations._heartbeat is None:
                break
            await asyncio.sleep(0.05)
        assert generations._heartbeat is None
        settled = await beats(ids)
        await asyncio.sleep(0.6)
        assert await beats(ids) == settled
        # The next generation starts the beats again.
        again = await send(client, sids[0], "once more [[tokens:80]]")
        assert generations._heartbeat is not None
        assert await refreshed(await beats([again["generation_id"]]))
        await wait_idle(client, sids[0])
