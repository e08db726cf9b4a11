"""Retention: the sweeper expires streams of ended and deleted sessions and empties the trash.

The sweep is called directly with a fixed `now`; sessions are back-dated to just before and
just after the cut-offs (STREAM_RETENTION_DAYS and TRASH_RETENTION_DAYS, 30 days each here).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import func, select, update

from console.stream import Transcript
from db.models import AuditEntry, ChatMessage, ChatSession, Generation
from streams_service.sessions.history import HistoryService
from streams_service.sessions.retention import SweepResult, sweep
from tests.sessions.conftest import (
    AppFactory,
    new_session,
    send,
    services,
    stream_records,
    wait_idle,
)

# Long before anything else in the test database, so no other test's session is due.
NOW = datetime(2021, 6, 1, 12, tzinfo=UTC)
DUE = NOW - timedelta(days=30, seconds=1)
NOT_YET = NOW - timedelta(days=29, hours=23)


async def test_sweep_expires_old_streams_and_empties_old_trash(make_app: AppFactory) -> None:
    async with make_app(
        stream_retention_days=30,
        trash_retention_days=30,
        rate_limit_session_create="1000/minute",
    ) as (app, client):
        ids = {}
        generations = {}
        for name in ("ended_old", "ended_new", "deleted_old", "deleted_new", "live"):
            sid = await new_session(client, title=name)
            generations[name] = (await send(client, sid, "hi [[tokens:3]]"))["generation_id"]
            await wait_idle(client, sid)
            ids[name] = sid
        for name in ("ended_old", "ended_new"):
            assert (await client.post(f"/v1/sessions/{ids[name]}/end")).status_code == 200
        for name in ("deleted_old", "deleted_new"):
            assert (await client.delete(f"/v1/sessions/{ids[name]}")).status_code == 200
        async with services(app).sessions.sessionmaker.begin() as db:
            for name, column, when in [
                ("ended_old", "ended_at", DUE),
                ("ended_new", "ended_at", NOT_YET),
                ("deleted_old", "deleted_at", DUE),
                ("deleted_new", "deleted_at", NOT_YET),
            ]:
                await db.execute(
                    update(ChatSession).where(ChatSession.id == ids[name]).values({column: when})
                )
            # An old session that never ended keeps its stream whatever its age.
            await db.execute(
                update(ChatSession)
                .where(ChatSession.id == ids["live"])
                .values(created_at=NOW - timedelta(days=400), updated_at=NOW - timedelta(days=400))
            )

        history = HistoryService(services(app).sessions)
        settings = services(app).settings
        result = await sweep(history, settings, NOW)
        assert result == SweepResult(streams_expired=2, sessions_purged=1)

        async def stream_status(name: str) -> int:
            return (await client.get(f"/v1/stream/sessions/{ids[name]}")).status_code

        # The ended session's stream is gone; its history is still there.
        assert await stream_status("ended_old") == 404
        kept = await client.get(f"/v1/sessions/{ids['ended_old']}")
        assert kept.status_code == 200 and len(kept.json()["messages"]) == 2
        assert (await client.get(f"/v1/sessions/{ids['ended_old']}/export")).status_code == 200
        # The old trash is purged for good; its usage row stays.
        assert await stream_status("deleted_old") == 404
        async with services(app).sessions.sessionmaker() as db:
            assert await db.get(ChatSession, ids["deleted_old"]) is None
            left = await db.scalar(
                select(func.count())
                .select_from(ChatMessage)
                .where(ChatMessage.session_id == ids["deleted_old"])
            )
            assert left == 0
            usage = await db.get(Generation, generations["deleted_old"])
            assert usage is not None and usage.session_id == ids["deleted_old"]
            entry = (
                (
                    await db.execute(
                        select(AuditEntry).where(AuditEntry.target_id == ids["deleted_old"])
                    )
                )
                .scalars()
                .all()[-1]
            )
            assert entry.action == "session.purge" and entry.actor_email == "retention-sweeper"
            assert entry.detail == {"messages": 2, "reason": "trash_retention"}
            assert await db.get(ChatSession, ids["deleted_new"]) is not None
        # Everything not yet due is untouched.
        for name in ("ended_new", "deleted_new", "live"):
            assert await stream_status(name) == 200, name
        restored = await client.post(f"/v1/sessions/{ids['deleted_new']}/restore")
        assert restored.status_code == 200

        # Nothing left to do: a second sweep at the same time changes nothing.
        assert await sweep(history, settings, NOW) == SweepResult(0, 0)


def transcript(records: list[dict[str, Any]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """What the console shows of a stream's records: each visible message's id, role, parts."""
    t = Transcript()
    for record in records:
        t.apply(record)
    return [(m.id, m.role, m.parts) for m in t.visible]


async def expire_in_trash(app: FastAPI, client: httpx.AsyncClient, sid: str) -> None:
    """Delete the session and let retention remove its stream while it is in the trash."""
    assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 200
    async with services(app).sessions.sessionmaker.begin() as db:
        await db.execute(update(ChatSession).where(ChatSession.id == sid).values(deleted_at=DUE))
    history = HistoryService(services(app).sessions)
    assert await sweep(history, services(app).settings, NOW) == SweepResult(1, 0)


async def test_restoring_a_session_whose_stream_expired_rebuilds_it_from_the_history(
    make_app: AppFactory,
) -> None:
    async with make_app(stream_retention_days=30, trash_retention_days=60) as (app, client):
        sid = await new_session(client, title="comes back")
        await send(client, sid, "hi [[tokens:3]]")
        await wait_idle(client, sid)
        await send(client, sid, "and again [[tokens:4]]")
        await wait_idle(client, sid)
        before = transcript(await stream_records(client, sid))
        assert [role for _, role, _ in before] == ["user", "assistant"] * 2

        await expire_in_trash(app, client, sid)
        assert (await client.get(f"/v1/stream/sessions/{sid}")).status_code == 404
        assert (await client.post(f"/v1/sessions/{sid}/restore")).status_code == 200

        # The chat reads as it did: every message whole, with the same parts, and the title.
        records = await stream_records(client, sid)
        assert transcript(records) == before
        sessions = [r["value"] for r in records if r.get("type") == "session"]
        assert sessions and sessions[-1]["title"] == "comes back"
        # Each message's stored offset points just past it on the new stream.
        async with services(app).sessions.sessionmaker() as db:
            offsets = (
                await db.execute(
                    select(ChatMessage.id, ChatMessage.stream_offset)
                    .where(ChatMessage.session_id == sid)
                    .order_by(ChatMessage.ordinal)
                )
            ).all()
        for (_, offset), (next_id, _, _) in zip(offsets, before[1:], strict=False):
            after = await client.get(f"/v1/stream/sessions/{sid}", params={"offset": offset})
            assert after.status_code == 200
            assert after.json()[0]["value"]["messageId"] == next_id
        # Usable again: new messages go on after the history.
        await send(client, sid, "still there? [[tokens:3]]")
        body = await wait_idle(client, sid)
        assert len(body["messages"]) == 6
        assert transcript(await stream_records(client, sid))[:4] == before


async def test_restoring_an_ended_session_rebuilds_its_stream_closed(
    make_app: AppFactory,
) -> None:
    async with make_app(stream_retention_days=30, trash_retention_days=60) as (app, client):
        sid = await new_session(client)
        await send(client, sid, "hi [[tokens:3]]")
        await wait_idle(client, sid)
        before = transcript(await stream_records(client, sid))
        assert (await client.post(f"/v1/sessions/{sid}/end")).status_code == 200
        await expire_in_trash(app, client, sid)
        assert (await client.post(f"/v1/sessions/{sid}/restore")).status_code == 200
        assert transcript(await stream_records(client, sid)) == before
        tail = await client.get(f"/v1/stream/sessions/{sid}", params={"offset": "now"})
        assert tail.headers.get("stream-closed") == "true"
        # Still read-only, as ending it made it.
        again = await client.post(f"/v1/sessions/{sid}/messages", json={"content": "hello?"})
        assert again.status_code == 409


async def test_restoring_a_session_whose_stream_forks_still_read_shows_it_again_whole(
    make_app: AppFactory,
) -> None:
    async with make_app(stream_retention_days=30, trash_retention_days=60) as (app, client):
        # Titled, so no generated title lands on the stream at some later moment: every
        # session row after the snapshot below is the delete's or the restore's.
        sid = await new_session(client, title="forked, then restored")
        await send(client, sid, "hi [[tokens:3]]")
        body = await wait_idle(client, sid)
        forked = await client.post(
            f"/v1/sessions/{sid}/fork", json={"at_message_id": body["messages"][-1]["id"]}
        )
        assert forked.status_code == 201, forked.text
        records = await stream_records(client, sid)
        # The fork reads through this stream, so retention only hides it.
        await expire_in_trash(app, client, sid)
        assert (await client.get(f"/v1/stream/sessions/{sid}")).status_code == 410
        assert (await client.post(f"/v1/sessions/{sid}/restore")).status_code == 200
        # Shown again as it was, live events and all, not rebuilt; after it only the session
        # rows that the delete and the restore published.
        after = await stream_records(client, sid)
        assert after[: len(records)] == records
        assert [r["type"] for r in after[len(records) :]] == ["session", "session"]
        await send(client, sid, "more [[tokens:3]]")
        assert len((await wait_idle(client, sid))["messages"]) == 4
        fork = (await client.get(f"/v1/sessions/{forked.json()['id']}")).json()
        assert len(fork["messages"]) == 2
