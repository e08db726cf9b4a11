"""Retention: the sweeper expires streams of ended and deleted sessions and empties the trash.

The sweep is called directly with a fixed `now`; sessions are back-dated to just before and
just after the cut-offs (STREAM_RETENTION_DAYS and TRASH_RETENTION_DAYS, 30 days each here).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update

from db.models import AuditEntry, ChatMessage, ChatSession, Generation
from streams_service.sessions.history import HistoryService
from streams_service.sessions.retention import SweepResult, sweep
from tests.sessions.conftest import AppFactory, new_session, send, services, wait_idle

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


async def test_restoring_a_session_whose_stream_expired_gives_it_a_new_stream(
    make_app: AppFactory,
) -> None:
    async with make_app(stream_retention_days=30, trash_retention_days=60) as (app, client):
        sid = await new_session(client, title="comes back")
        await send(client, sid, "hi [[tokens:3]]")
        await wait_idle(client, sid)
        assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 200
        async with services(app).sessions.sessionmaker.begin() as db:
            await db.execute(
                update(ChatSession).where(ChatSession.id == sid).values(deleted_at=DUE)
            )
        history = HistoryService(services(app).sessions)
        assert await sweep(history, services(app).settings, NOW) == SweepResult(1, 0)
        assert (await client.get(f"/v1/stream/sessions/{sid}")).status_code == 404
        assert (await client.post(f"/v1/sessions/{sid}/restore")).status_code == 200
        assert (await client.get(f"/v1/stream/sessions/{sid}")).status_code == 200
        # Usable again: the history is in the database, new messages go to the new stream.
        await send(client, sid, "still there? [[tokens:3]]")
        body = await wait_idle(client, sid)
        assert len(body["messages"]) == 4
