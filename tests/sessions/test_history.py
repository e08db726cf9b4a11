"""Session history: list, search, filters, rename, trash, purge, export/import, access.

On real SQLite and Postgres, through the HTTP API, with the simulator as Claude. Callers are
set per request by overriding the `current_principal` dependency.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, update

from db.models import AuditEntry, ChatMessage, ChatSession, DsStream, Generation
from streams_service.sessions import history_export, history_repo
from tests.sessions.conftest import (
    PNG,
    AppFactory,
    acting_as,
    person,
    send,
    services,
    stream_records,
    wait_idle,
)

# Tests create many sessions per user; the per-user create limit is not what they test.
MANY = {"rate_limit_session_create": "10000/minute", "rate_limit_messages": "10000/minute"}


async def create(client: httpx.AsyncClient, **body: Any) -> str:
    response = await client.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    sid: str = response.json()["id"]
    return sid


async def listing(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await client.get("/v1/sessions", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def all_pages(client: httpx.AsyncClient, **params: Any) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        page = await listing(client, **params, **({"cursor": cursor} if cursor else {}))
        ids += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


async def audit_of(app: FastAPI, sid: str) -> list[AuditEntry]:
    async with services(app).sessions.sessionmaker() as db:
        stmt = select(AuditEntry).where(AuditEntry.target_id == sid).order_by(AuditEntry.id)
        return list((await db.execute(stmt)).scalars())


async def set_created(app: FastAPI, sids: list[str], when: datetime) -> None:
    async with services(app).sessions.sessionmaker.begin() as db:
        await db.execute(
            update(ChatSession).where(ChatSession.id.in_(sids)).values(created_at=when)
        )


# ---------------------------------------------------------------------- list and search


async def test_pages_never_skip_or_repeat_while_sessions_are_created(
    make_app: AppFactory,
) -> None:
    async with make_app(**MANY) as (app, client):
        owner = person()
        with acting_as(app, owner):
            existing = [await create(client, title=f"s{i}") for i in range(9)]
            newest_first = list(reversed(existing))
            seen: list[str] = []
            cursor = None
            created_meanwhile: list[str] = []
            while True:
                params: dict[str, Any] = {"limit": 2}
                if cursor:
                    params["cursor"] = cursor
                # New sessions arrive between (and during) page requests.
                page, fresh = await asyncio.gather(
                    listing(client, **params), create(client, title="new")
                )
                created_meanwhile.append(fresh)
                seen += [item["id"] for item in page["items"]]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert len(seen) == len(set(seen)), "a session was listed twice"
            older = [sid for sid in seen if sid in existing]
            assert older == newest_first, "an existing session was skipped or out of order"
            # A fresh listing starts with everything created meanwhile, newest first.
            first = await listing(client, limit=len(created_meanwhile))
            assert [i["id"] for i in first["items"]] == list(reversed(created_meanwhile))


async def test_equal_timestamps_page_by_id(make_app: AppFactory) -> None:
    async with make_app(**MANY) as (app, client):
        owner = person()
        with acting_as(app, owner):
            sids = [await create(client) for _ in range(5)]
            await set_created(app, sids, datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC))
            assert await all_pages(client, limit=2) == sorted(sids, reverse=True)


async def test_list_items_have_the_documented_fields(make_app: AppFactory) -> None:
    async with make_app(**MANY) as (app, client):
        owner = person()
        with acting_as(app, owner):
            sid = await create(client, title="Fields")
            await send(client, sid, "hello [[tokens:3]]")
            await wait_idle(client, sid)
            page = await listing(client)
        assert page["next_cursor"] is None
        (item,) = page["items"]
        assert set(item) == {
            "id",
            "title",
            "model",
            "message_count",
            "cost_usd",
            "created_at",
            "updated_at",
            "ended_at",
            "deleted_at",
            "user",
        }
        assert item["id"] == sid and item["title"] == "Fields" and item["message_count"] == 2
        assert float(item["cost_usd"]) > 0
        assert item["user"] == {"id": owner.user_id, "email": None, "name": None}


async def test_search_finds_a_word_only_in_a_message_body(make_app: AppFactory) -> None:
    word = f"quokka{uuid.uuid4().hex[:8]}"
    async with make_app(**MANY) as (app, client):
        owner, other = person(), person()
        with acting_as(app, owner):
            target = await create(client, title="Plain title")
            decoy = await create(client, title="Another")
            await send(client, target, f"Tell me about the {word}, please [[tokens:3]]")
            await send(client, decoy, "Something else entirely [[tokens:3]]")
            await wait_idle(client, target)
            await wait_idle(client, decoy)
            found = await listing(client, q=word)
            assert [i["id"] for i in found["items"]] == [target]
            assert found["items"][0]["title"] == "Plain title"  # not in the title
            # Words are case-insensitive and several words must all match.
            assert [i["id"] for i in (await listing(client, q=f"TELL {word}"))["items"]] == [target]
            assert (await listing(client, q=f"{word} absentword"))["items"] == []
            # Titles are searched too.
            renamed = await client.patch(f"/v1/sessions/{decoy}", json={"title": f"About {word}"})
            assert renamed.status_code == 200
            hits = {i["id"] for i in (await listing(client, q=word))["items"]}
            assert hits == {target, decoy}
        with acting_as(app, other):
            assert (await listing(client, q=word))["items"] == []


async def test_search_pages_through_every_match_in_order(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Windows of one and two sessions: Postgres searches the newest first, then falls back
    # to the whole index when the windows hold too few matches; pages must still be exact.
    monkeypatch.setattr(history_repo, "SEARCH_WINDOWS", (1, 2))
    word = f"wombat{uuid.uuid4().hex[:8]}"
    async with make_app(**MANY) as (app, client):
        with acting_as(app, person()):
            sids = [await create(client, title=f"t{i}") for i in range(7)]
            matching = [sids[i] for i in (0, 2, 3, 6)]
            for sid in sids:
                text = f"about the {word}" if sid in matching else "about nothing"
                await send(client, sid, f"{text} [[tokens:3]]")
                await wait_idle(client, sid)
            for limit in (1, 2, 3, 10):
                assert await all_pages(client, q=word, limit=limit) == matching[::-1], limit


async def test_search_stems_english_words(make_app: AppFactory) -> None:
    token = uuid.uuid4().hex[:6]
    async with make_app(**MANY) as (app, client):
        with acting_as(app, person()):
            sid = await create(client, title=f"t{token}")
            await send(client, sid, f"the deployments of {token} failed [[tokens:3]]")
            await wait_idle(client, sid)
            assert [i["id"] for i in (await listing(client, q=f"deployment {token}"))["items"]] == [
                sid
            ]


async def test_filters_model_dates_and_trash(make_app: AppFactory) -> None:
    async with make_app(**MANY) as (app, client):
        models = [m["id"] for m in (await client.get("/v1/models")).json()["models"]]
        assert len(models) >= 2
        with acting_as(app, person()):
            a = await create(client, model=models[0])
            b = await create(client, model=models[1])
            c = await create(client, model=models[1])
            await set_created(app, [a], datetime(2026, 3, 1, 12, tzinfo=UTC))
            await set_created(app, [b], datetime(2026, 3, 2, 23, 59, tzinfo=UTC))
            await set_created(app, [c], datetime(2026, 3, 5, tzinfo=UTC))
            assert set(await all_pages(client, model=models[1])) == {b, c}
            assert await all_pages(client, **{"from": "2026-03-01", "to": "2026-03-02"}) == [b, a]
            assert await all_pages(client, **{"from": "2026-03-02T00:00:00Z"}) == [c, b]
            assert await all_pages(client, to="2026-03-01T12:00:00+00:00") == []
            assert await all_pages(client, to="2026-03-01T12:00:01") == [a]
            assert (await client.delete(f"/v1/sessions/{b}")).status_code == 200
            assert await all_pages(client) == [c, a]
            assert await all_pages(client, trash="true") == [b]


async def test_bad_list_inputs_are_4xx(make_app: AppFactory) -> None:
    async with make_app() as (_app, client):
        cases: list[tuple[dict[str, Any], int]] = [
            ({"cursor": "not-a-cursor"}, 400),
            ({"cursor": "eyJ2IjoyfQ"}, 400),  # valid base64 JSON, wrong version
            ({"limit": 0}, 422),
            ({"limit": 201}, 422),
            ({"limit": "many"}, 422),
            ({"from": "yesterday"}, 400),
            ({"from": "2026-03-05", "to": "2026-03-01"}, 400),
            ({"q": "!!! ???"}, 400),
            ({"trash": "maybe"}, 422),
        ]
        for params, status in cases:
            response = await client.get("/v1/sessions", params=params)
            assert response.status_code == status, (params, response.text)
            assert set(response.json()) == {"error", "detail"}


# ---------------------------------------------------------------------- who sees what


async def test_members_never_see_or_change_another_users_sessions(make_app: AppFactory) -> None:
    async with make_app(**MANY) as (app, client):
        alice, bob, ops, admin = person(), person(), person("ops"), person("admin")
        with acting_as(app, alice):
            mine = await create(client, title="alice's")
        with acting_as(app, bob):
            assert (await listing(client))["items"] == []
            for params in ({"user": alice.user_id}, {"user": "all"}):
                response = await client.get("/v1/sessions", params=params)
                assert response.status_code == 403, response.text
            for method, url, body in [
                ("GET", f"/v1/sessions/{mine}/export", None),
                ("PATCH", f"/v1/sessions/{mine}", {"title": "mine now"}),
                ("DELETE", f"/v1/sessions/{mine}", None),
                ("POST", f"/v1/sessions/{mine}/restore", None),
                ("DELETE", f"/v1/sessions/{mine}?purge=true", None),
            ]:
                response = await client.request(method, url, json=body)
                assert response.status_code == 404, (method, url, response.text)
        with acting_as(app, ops):
            assert (await listing(client))["items"] == []  # default: own sessions
            assert [i["id"] for i in (await listing(client, user=alice.user_id))["items"]] == [mine]
            assert mine in await all_pages(client, user="all")
            # Ops can read it, so changing it is forbidden rather than hidden.
            response = await client.patch(f"/v1/sessions/{mine}", json={"title": "ops"})
            assert response.status_code == 403
            assert (await client.get(f"/v1/sessions/{mine}/export")).status_code == 200
        with acting_as(app, alice):
            # Members may not purge, not even their own sessions.
            response = await client.delete(f"/v1/sessions/{mine}", params={"purge": "true"})
            assert response.status_code == 403
        with acting_as(app, admin):
            response = await client.patch(f"/v1/sessions/{mine}", json={"title": "by admin"})
            assert response.status_code == 200 and response.json()["title"] == "by admin"
        with acting_as(app, alice):
            assert (await client.get(f"/v1/sessions/{mine}")).json()["title"] == "by admin"


# ---------------------------------------------------------------------- rename, trash, purge


async def test_rename_and_model_change_reach_the_stream_and_the_audit_trail(
    make_app: AppFactory,
) -> None:
    async with make_app(**MANY) as (app, client):
        models = [m["id"] for m in (await client.get("/v1/models")).json()["models"]]
        owner = person()
        with acting_as(app, owner):
            sid = await create(client, title="Before", model=models[0])
            response = await client.patch(f"/v1/sessions/{sid}", json={"title": "  After  it "})
            assert response.status_code == 200 and response.json()["title"] == "After it"
            response = await client.patch(f"/v1/sessions/{sid}", json={"model": models[1]})
            assert response.status_code == 200 and response.json()["model"] == models[1]
            # The same title again changes nothing and writes no audit entry.
            assert (
                await client.patch(f"/v1/sessions/{sid}", json={"title": "After it"})
            ).status_code == 200
            sessions_rows = [
                r["value"] for r in await stream_records(client, sid) if r["type"] == "session"
            ]
            assert sessions_rows[-1]["title"] == "After it"
            assert sessions_rows[-1]["model"] == models[1]
            assert any(r["title"] == "After it" and r["model"] == models[0] for r in sessions_rows)
            for body, status in [
                ({}, 400),
                ({"title": "   "}, 400),
                ({"model": "gpt-5"}, 400),
                ({"title": "x" * 201}, 422),
                ({"title": "ok", "owner": "me"}, 422),
            ]:
                response = await client.patch(f"/v1/sessions/{sid}", json=body)
                assert response.status_code == status, (body, response.text)
            assert (await client.patch("/v1/sessions/nope", json={"title": "a"})).status_code == 400
            missing = f"/v1/sessions/{uuid.uuid4()}"
            assert (await client.patch(missing, json={"title": "a"})).status_code == 404
        entries = await audit_of(app, sid)
        assert [e.action for e in entries] == ["session.rename", "session.set_model"]
        assert entries[0].detail == {"title": {"from": "Before", "to": "After it"}}
        assert entries[0].actor_id == owner.user_id and entries[0].actor_email == owner.email
        assert entries[1].detail == {"model": {"from": models[0], "to": models[1]}}


async def test_delete_moves_to_the_trash_and_restore_brings_it_back(make_app: AppFactory) -> None:
    async with make_app(**MANY) as (app, client):
        with acting_as(app, person()):
            sid = await create(client, title="Trash me")
            await send(client, sid, "hi [[tokens:3]]")
            await wait_idle(client, sid)
            response = await client.delete(f"/v1/sessions/{sid}")
            assert response.status_code == 200 and response.json()["deleted_at"] is not None
            assert (await client.get(f"/v1/sessions/{sid}")).status_code == 404
            assert (
                await client.post(f"/v1/sessions/{sid}/messages", json={"content": "x"})
            ).status_code == 404
            assert (await client.delete(f"/v1/sessions/{sid}")).status_code == 404
            assert await all_pages(client) == []
            assert await all_pages(client, trash="true") == [sid]
            last_session_row = [
                r for r in await stream_records(client, sid) if r["type"] == "session"
            ][-1]
            assert last_session_row["value"]["deletedAt"] is not None

            restored = await client.post(f"/v1/sessions/{sid}/restore")
            assert restored.status_code == 200 and restored.json()["deleted_at"] is None
            again = await client.post(f"/v1/sessions/{sid}/restore")
            assert again.status_code == 409
            body = (await client.get(f"/v1/sessions/{sid}")).json()
            assert len(body["messages"]) == 2
            assert await all_pages(client) == [sid]
            await send(client, sid, "back again [[tokens:3]]")
            await wait_idle(client, sid)
        assert [e.action for e in await audit_of(app, sid)] == [
            "session.delete",
            "session.restore",
        ]


async def _running(client: httpx.AsyncClient, sid: str) -> None:
    """Until the answer has started streaming text."""
    for _ in range(1000):
        for r in await stream_records(client, sid):
            if r.get("type") == "chunk" and "TEXT_MESSAGE_CONTENT" in r["value"]["chunk"]:
                return
        await asyncio.sleep(0.01)
    raise AssertionError("the answer never started")


async def test_delete_stops_a_running_generation_and_keeps_its_usage(
    make_app: AppFactory,
) -> None:
    async with make_app(simulator_tokens_per_s=40, **MANY) as (app, client):
        with acting_as(app, person()):
            sid = await create(client, title="Busy")
            accepted = await send(client, sid, "a long one [[tokens:2000]]")
            await _running(client, sid)
            response = await client.delete(f"/v1/sessions/{sid}")
            assert response.status_code == 200
            assert response.json()["active_generation_id"] is None
        async with services(app).sessions.sessionmaker() as db:
            generation = await db.get(Generation, accepted["generation_id"])
            assert generation is not None and generation.status == "stopped"
            row = await db.get(ChatSession, sid)
            assert row is not None and row.deleted_at is not None
            assert row.active_generation_id is None
            messages = (
                await db.execute(select(ChatMessage).where(ChatMessage.session_id == sid))
            ).scalars()
            statuses = sorted(m.status for m in messages)
        assert statuses == ["complete", "stopped"]


async def _count(app: FastAPI, model: Any, *where: Any) -> int:
    async with services(app).sessions.sessionmaker() as db:
        return int(await db.scalar(select(func.count()).select_from(model).where(*where)) or 0)


async def test_purge_removes_messages_and_stream_but_keeps_usage(make_app: AppFactory) -> None:
    async with make_app(simulator_tokens_per_s=40, **MANY) as (app, client):
        owner, admin = person(), person("admin")
        with acting_as(app, owner):
            done = await create(client, title="Finished")
            first = await send(client, done, "one [[tokens:3]]")
            await wait_idle(client, done)
            busy = await create(client, title="Still going")
            running = await send(client, busy, "long [[tokens:2000]]")
            await _running(client, busy)
            trashed = await create(client, title="Already in the trash")
            assert (await client.delete(f"/v1/sessions/{trashed}")).status_code == 200
        with acting_as(app, admin):
            for sid in (done, busy, trashed):
                response = await client.delete(f"/v1/sessions/{sid}", params={"purge": "true"})
                assert response.status_code == 200, response.text
                assert response.json() == {"id": sid, "purged": True}
                assert (await client.get(f"/v1/stream/sessions/{sid}")).status_code == 404
                assert await _count(app, ChatSession, ChatSession.id == sid) == 0
                assert await _count(app, ChatMessage, ChatMessage.session_id == sid) == 0
                assert await _count(app, DsStream, DsStream.path == f"sessions/{sid}") == 0
                again = await client.delete(f"/v1/sessions/{sid}", params={"purge": "true"})
                assert again.status_code == 404
                assert [e.action for e in await audit_of(app, sid)][-1] == "session.purge"
        async with services(app).sessions.sessionmaker() as db:
            kept = await db.get(Generation, first["generation_id"])
            stopped = await db.get(Generation, running["generation_id"])
        assert kept is not None and kept.session_id == done and kept.cost_usd > 0
        assert stopped is not None and stopped.session_id == busy and stopped.status == "stopped"
        purge = (await audit_of(app, done))[-1]
        assert purge.actor_id == admin.user_id and purge.detail == {"messages": 2}


# ---------------------------------------------------------------------- export / import


def _comparable(messages: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(m["id"], m["role"], m["status"], m["parts"]) for m in messages]


async def test_export_import_round_trip_keeps_messages_and_parts(make_app: AppFactory) -> None:
    async with make_app(**MANY) as (app, client):
        alice, bob = person(), person()
        with acting_as(app, alice):
            sid = await create(client, title="Round trip: tools & thinking")
            await send(
                client,
                sid,
                'add [[tool:calculator {"expression": "2+3"}]]',
                attachments=[{"type": "image", "name": "dot.png", "media_type": "image/png",
                              "data": PNG}],
            )  # fmt: skip
            await wait_idle(client, sid)
            await send(client, sid, "and again [[tokens:5]]")
            await wait_idle(client, sid)
            assert (await client.post(f"/v1/sessions/{sid}/regenerate")).status_code == 202
            original = await wait_idle(client, sid)
            kinds = {p["type"] for m in original["messages"] for p in m["parts"]}
            assert {"text", "image", "tool-call", "tool-result"} <= kinds
            assert "superseded" in {m["status"] for m in original["messages"]}

            exported = await client.get(f"/v1/sessions/{sid}/export", params={"format": "json"})
            assert exported.status_code == 200
            assert exported.headers["content-type"].startswith("application/json")
            assert exported.headers["content-disposition"] == (
                f'attachment; filename="chatops-round-trip-tools-thinking-{sid[:8]}.json"'
            )
            doc = exported.json()
            assert doc["format"] == "chatops.session" and doc["version"] == 1
            assert doc["session"]["id"] == sid

            md = await client.get(f"/v1/sessions/{sid}/export", params={"format": "md"})
            assert md.status_code == 200 and md.headers["content-type"].startswith("text/markdown")
            assert md.headers["content-disposition"].endswith('.md"')
            assert md.text.startswith("# Round trip: tools & thinking\n")
            assert "and again [[tokens:5]]" in md.text and "**Tool call** `calculator`" in md.text
            assert "_[image: dot.png]_" in md.text and PNG not in md.text

        with acting_as(app, bob):
            imported = await client.post("/v1/sessions/import", json=doc)
            assert imported.status_code == 201, imported.text
            copy = imported.json()
            assert copy["id"] != sid and copy["title"] == original["title"]
            assert copy["model"] == original["model"]
            assert copy["message_count"] == original["message_count"]
            got = (await client.get(f"/v1/sessions/{copy['id']}")).json()
            assert _comparable(got["messages"]) == _comparable(original["messages"])
            # The stream holds the transcript too: one whole message per message.
            whole = [
                json.loads(r["value"]["chunk"])["message"]
                for r in await stream_records(client, copy["id"])
                if r["type"] == "chunk" and '"whole-message"' in r["value"]["chunk"]
            ]
            assert [(m["id"], m["role"], m["parts"]) for m in whole] == [
                (m["id"], m["role"], m["parts"]) for m in original["messages"]
            ]
            # Exporting the copy gives the same messages back.
            again = (await client.get(f"/v1/sessions/{copy['id']}/export")).json()
            assert again["messages"] == doc["messages"]
            # The copy is a live session of bob's: it continues, and it forks.
            await send(client, copy["id"], "continue [[tokens:3]]")
            after = await wait_idle(client, copy["id"])
            assert len(after["messages"]) == len(original["messages"]) + 2
            fork = await client.post(
                f"/v1/sessions/{copy['id']}/fork",
                json={"at_message_id": original["messages"][0]["id"]},
            )
            assert fork.status_code == 201, fork.text
        with acting_as(app, alice):
            assert (await client.get(f"/v1/sessions/{copy['id']}")).status_code == 404
        (entry,) = await audit_of(app, copy["id"])
        assert entry.action == "session.import" and entry.actor_id == bob.user_id
        assert entry.detail == {"source_session_id": sid, "messages": len(doc["messages"])}


def _doc(**changes: Any) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    doc: dict[str, Any] = {
        "format": "chatops.session",
        "version": 1,
        "exported_at": now,
        "session": {
            "id": str(uuid.uuid4()),
            "title": "Imported",
            "model": "claude-sonnet-5-5",
            "message_count": 2,
            "cost_usd": "0.01",
            "created_at": now,
            "updated_at": now,
            "ended_at": None,
        },
        "messages": [
            {
                "id": "msg_1",
                "role": "user",
                "status": "complete",
                "created_at": now,
                "parts": [{"type": "text", "content": "hello"}],
            },
            {
                "id": "msg_2",
                "role": "assistant",
                "status": "complete",
                "created_at": now,
                "parts": [{"type": "text", "content": "hi"}],
            },
        ],
    }
    doc.update(changes)
    return doc


def _image(data: str | None = None) -> dict[str, Any]:
    return {"type": "image", "name": "dot.png", "mediaType": "image/png", "data": data or PNG}


def _user(**changes: Any) -> dict[str, Any]:
    message: dict[str, Any] = {**_doc()["messages"][0], **changes}
    return message


def _message(**changes: Any) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = _doc()["messages"]
    messages[1] = {**messages[1], **changes}
    return messages


async def test_bad_import_documents_are_refused_and_leave_nothing(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_app(**MANY) as (app, client):
        who = person()
        streams_before = await _count(app, DsStream)
        session = _doc()["session"]
        bad: list[tuple[Any, int]] = [
            (b"", 400),
            (b"not json", 422),
            (b"[]", 422),
            (_doc(version=2), 422),
            (_doc(format="other"), 422),
            (_doc(extra="field"), 422),
            (_doc(session={**session, "model": "gpt-5"}), 400),
            (_doc(session={**session, "created_at": "2026-01-01T00:00:00"}), 422),
            (_doc(messages=_message(role="system")), 422),
            (_doc(messages=_message(status="weird")), 422),
            (_doc(messages=_message(id="msg_1")), 400),
            (_doc(messages=_message(id="bad id!")), 422),
            (_doc(messages=_message(parts=[{"type": "video", "url": "x"}])), 422),
            (_doc(messages=_message(parts=[{"type": "image", "url": "x"}])), 422),
            (_doc(messages=_message(parts=[_image()])), 400),  # images are the user's
            (_doc(messages=[_user(parts=[_image(data="bm90IGFuIGltYWdl")])]), 400),
            (_doc(messages=[_user(parts=[_image(data="%%%")])]), 400),
            (_doc(messages=_message(parts=[{"type": "text", "content": 5}])), 422),
            (_doc(messages=_message(parts=[{"type": "text", "content": "a", "x": 1}])), 422),
            (
                _doc(
                    messages=[
                        {
                            **_doc()["messages"][0],
                            "parts": [{"type": "thinking", "content": "not for users"}],
                        }
                    ]
                ),
                400,
            ),
            (
                _doc(
                    messages=[
                        {
                            **_doc()["messages"][0],
                            "parts": [{"type": "text", "content": "x" * 200_000}],
                        }
                    ]
                ),
                413,
            ),
        ]
        with acting_as(app, who):
            for body, status in bad:
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                response = await client.post(
                    "/v1/sessions/import",
                    content=content,
                    headers={"Content-Type": "application/json"},
                )
                assert response.status_code == status, (body, response.text)
                assert set(response.json()) == {"error", "detail"}

            # A failure after the stream was written takes the stream back, and no row stays.
            async def broken(*_args: Any, **_kwargs: Any) -> None:
                raise RuntimeError("database went away")

            monkeypatch.setattr(history_export.audit, "record", broken)
            with pytest.raises(RuntimeError):
                await client.post("/v1/sessions/import", json=_doc())
            monkeypatch.undo()
            assert await all_pages(client) == []
        assert await _count(app, ChatSession, ChatSession.user_id == who.user_id) == 0
        assert await _count(app, DsStream) == streams_before

        with acting_as(app, who):
            response = await client.post("/v1/sessions/import", json=_doc())
            assert response.status_code == 201
            assert await all_pages(client) == [response.json()["id"]]
