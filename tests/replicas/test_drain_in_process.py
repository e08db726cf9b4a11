"""The drain and the idle-session end, in-process on real SQLite and Postgres.

The real-process tests (test_drain.py, test_cross_replica.py) show the signal path and several
replicas; these show the same rules on both databases: what a draining service refuses and
still serves, how live readers end, which generations finish, and that an idle session is
ended exactly once however many sweeps race for it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import update

from db.models import ChatSession
from streams_service.sessions.upkeep import end_idle_sessions
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

GUARD_S = 20.0  # hang guard; the live reads below would otherwise wait a minute


async def _approval_waiting(client: httpx.AsyncClient, sid: str) -> dict[str, Any]:
    accepted = await send(client, sid, 'look [[tool:search_my_history {"query": "x"}]]')
    for _ in range(2000):
        records = await stream_records(client, sid)
        chunks = [json.loads(r["value"]["chunk"]) for r in records if r.get("type") == "chunk"]
        if any(c.get("name") == "approval-requested" for c in chunks):
            return accepted
        await asyncio.sleep(0.01)
    raise AssertionError("no approval request on the stream")


async def test_a_draining_service_refuses_new_work_and_serves_the_rest(
    make_app: AppFactory,
) -> None:
    async with make_app() as (app, client):
        sid = await new_session(client)
        await send(client, sid, "hello [[tokens:3]]")
        before = await wait_idle(client, sid)
        assert (await client.get("/health/ready")).status_code == 200

        services(app).drain.begin()

        ready = await client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert ready.headers["retry-after"].isdigit()
        fresh_id = str(uuid.uuid4())
        new_work = [
            client.post("/v1/sessions", json={}),
            client.put(f"/v1/sessions/{fresh_id}", json={}),
            client.post(f"/v1/sessions/{sid}/messages", json={"content": "more"}),
            client.post(f"/v1/sessions/{sid}/regenerate"),
            client.post(
                f"/v1/sessions/{sid}/fork", json={"at_message_id": before["messages"][-1]["id"]}
            ),
        ]
        for response in await asyncio.gather(*new_work):
            assert response.status_code == 503, response.text
            assert response.json()["error"] == "draining" and response.json()["detail"]
            assert response.headers["retry-after"].isdigit()
        # Nothing was written by the refused requests.
        after = (await client.get(f"/v1/sessions/{sid}")).json()
        assert after["messages"] == before["messages"]
        assert (await client.get(f"/v1/sessions/{fresh_id}")).status_code == 404
        # Reads and the end of a session still work.
        assert (await client.get(f"/v1/stream/sessions/{sid}", params={"offset": "-1"})).is_success
        assert (await client.post(f"/v1/sessions/{sid}/end")).status_code == 200


async def test_live_readers_end_when_the_drain_begins(make_app: AppFactory) -> None:
    async with make_app(streams_long_poll_timeout_ms=60_000, streams_sse_max_duration_s=120) as (
        app,
        client,
    ):
        sid = await new_session(client)
        url = f"/v1/stream/sessions/{sid}"
        tail = (await client.head(url)).headers["stream-next-offset"]
        poll = asyncio.create_task(client.get(url, params={"offset": tail, "live": "long-poll"}))
        sse = asyncio.create_task(client.get(url, params={"offset": "-1", "live": "sse"}))
        await asyncio.sleep(0.3)  # ordering help only: the outcome is the same either way
        assert not poll.done() and not sse.done()

        services(app).drain.begin()

        polled = await asyncio.wait_for(poll, GUARD_S)
        assert polled.status_code == 204
        assert polled.headers["stream-next-offset"] == tail
        events = (await asyncio.wait_for(sse, GUARD_S)).text.strip().split("\n\n")
        # The event stream ends on a control event: the client knows where to resume.
        assert events[-1].startswith("event: control")
        control = json.loads(events[-1].split("data:", 1)[1])
        assert control["streamNextOffset"] == tail
        # A live read that arrives during the drain answers at once.
        late = await asyncio.wait_for(
            client.get(url, params={"offset": tail, "live": "long-poll"}), GUARD_S
        )
        assert late.status_code == 204


async def test_the_drain_finishes_what_fits_and_interrupts_the_rest(
    make_app: AppFactory,
) -> None:
    paced = {"simulator_tokens_per_s": 20, "drain_timeout_s": 3}
    async with make_app(**paced) as (_app, client):
        short, long, waiting = [await new_session(client) for _ in range(3)]
        sent_short = await send(client, short, "brief [[tokens:10]]")  # half a second
        sent_long = await send(client, long, "long [[tokens:2000]]")  # far past the drain
        await _approval_waiting(client, waiting)  # nobody answers
        for _ in range(2000):
            records = await stream_records(client, long)
            if "TEXT_MESSAGE_CONTENT" in json.dumps(records):
                break
            await asyncio.sleep(0.01)
    # Leaving the block is the lifespan exit: it drains.
    async with make_app() as (_app, client):
        done = await wait_idle(client, short, timeout_s=1)
        assert done["messages"][-1]["status"] == "complete"
        assert done["messages"][-1]["generation_id"] == sent_short["generation_id"]
        events = events_of(await stream_records(client, short), done["messages"][-1]["id"])
        assert events[-1]["type"] == "RUN_FINISHED"
        for sid in (long, waiting):
            session = await wait_idle(client, sid, timeout_s=1)
            assistant = session["messages"][-1]
            assert assistant["status"] == "interrupted"
            events = events_of(await stream_records(client, sid), assistant["id"])
            assert events[-1]["type"] == "RUN_ERROR"
            assert events[-1]["error"]["code"] == "interrupted"
            text = "".join(p["content"] for p in assistant["parts"] if p["type"] == "text")
            assert text == text_of(events)
        assert session["messages"][-2]["role"] == "user"
        long_answer = (await client.get(f"/v1/sessions/{long}")).json()["messages"][-1]
        assert long_answer["generation_id"] == sent_long["generation_id"]
        assert long_answer["parts"], "the partial answer was not kept"


async def _backdate(app: FastAPI, sid: str, **values: Any) -> None:
    async with services(app).sessions.sessionmaker.begin() as db:
        await db.execute(update(ChatSession).where(ChatSession.id == sid).values(**values))


async def test_idle_sessions_are_ended_once_however_many_sweeps_race(
    make_app: AppFactory,
) -> None:
    async with make_app(approval_timeout_s=60, drain_timeout_s=0) as (app, client):
        service = services(app).sessions
        # The database is shared with earlier tests: end their idle leftovers first, so that
        # the counts below are this test's sessions alone.
        await end_idle_sessions(service, 3600)
        long_ago = datetime.now(UTC) - timedelta(hours=2)
        idle = [await new_session(client) for _ in range(4)]
        recent, busy, deleted = [await new_session(client) for _ in range(3)]
        await _approval_waiting(client, busy)
        for sid in [*idle, busy]:
            await _backdate(app, sid, updated_at=long_ago)
        await _backdate(app, deleted, updated_at=long_ago, deleted_at=long_ago)

        counts = await asyncio.gather(*(end_idle_sessions(service, 3600) for _ in range(3)))
        assert sum(counts) == len(idle)
        assert await end_idle_sessions(service, 3600) == 0

        for sid in idle:
            session = (await client.get(f"/v1/sessions/{sid}")).json()
            assert session["ended_at"] is not None
            head = await client.head(f"/v1/stream/sessions/{sid}")
            assert head.headers.get("stream-closed") == "true"
            ends = [
                r
                for r in await stream_records(client, sid)
                if r.get("type") == "session" and r["value"]["endedAt"]
            ]
            assert len(ends) == 1
        for sid in (recent, busy):
            assert (await client.get(f"/v1/sessions/{sid}")).json()["ended_at"] is None
        async with service.sessionmaker() as db:
            row = await db.get(ChatSession, deleted)
            assert row is not None and row.ended_at is None
