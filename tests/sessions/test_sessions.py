"""Sessions end to end in-process: routes, generation through the SDK and the simulator, the
records on the stream, and what is persisted."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from db.models import ChatMessage, ChatSession, Generation
from streams_service.llm.models import Usage, cost_usd, load_catalog, round_usd
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


async def _generation(app: FastAPI, generation_id: str) -> Generation:
    async with services(app).sessions.sessionmaker() as db:
        row = await db.get(Generation, generation_id)
    assert row is not None
    return row


async def _counts(app: FastAPI, session_id: str) -> tuple[int, int]:
    async with services(app).sessions.sessionmaker() as db:
        messages = await db.scalar(
            select(func.count())
            .select_from(ChatMessage)
            .where(ChatMessage.session_id == session_id)
        )
        generations = await db.scalar(
            select(func.count())
            .select_from(Generation)
            .where(
                Generation.session_id == session_id,
                Generation.finish_reason.is_distinct_from("title"),
            )
        )
    return int(messages or 0), int(generations or 0)


def _assistant(session: dict[str, Any], generation_id: str) -> dict[str, Any]:
    found = [
        m
        for m in session["messages"]
        if m["role"] == "assistant" and m["generation_id"] == generation_id
    ]
    assert len(found) == 1, session["messages"]
    return found[0]


async def test_create_is_idempotent_with_put(client: httpx.AsyncClient) -> None:
    sid = str(uuid.uuid4())
    first = await client.put(f"/v1/sessions/{sid}", json={"title": "Plans"})
    assert first.status_code == 201
    body = first.json()
    assert body["id"] == sid and body["streamUrl"] == f"/v1/stream/sessions/{sid}"
    assert body["model"] == load_catalog().default_model.id and body["simulated"] is True
    again = await client.put(f"/v1/sessions/{sid}", json={"title": "Plans"})
    assert again.status_code == 200 and again.json()["created_at"] == body["created_at"]
    # The stream exists and carries the session row.
    records = await stream_records(client, sid)
    assert records[0]["type"] == "session" and records[0]["value"]["title"] == "Plans"


async def test_a_message_streams_and_is_persisted(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = api
    sid = await new_session(client)
    accepted = await send(client, sid, "Tell me something [[tokens:40]]")
    session = await wait_idle(client, sid)
    user, assistant = session["messages"]
    assert user["id"] == accepted["message_id"] and user["role"] == "user"
    assert user["parts"] == [{"type": "text", "content": "Tell me something [[tokens:40]]"}]
    assert assistant["generation_id"] == accepted["generation_id"]
    assert assistant["status"] == "complete"

    records = await stream_records(client, sid)
    whole = [
        r for r in records if r.get("type") == "chunk" and r["value"]["messageId"] == user["id"]
    ]
    assert len(whole) == 1 and whole[0]["value"]["role"] == "user"
    events = events_of(records, assistant["id"])
    kinds = [e["type"] for e in events]
    assert kinds[0] == "RUN_STARTED" and kinds[-1] == "RUN_FINISHED"
    assert "TEXT_MESSAGE_START" in kinds and kinds[-2] == "TEXT_MESSAGE_END"
    assert all("timestamp" in e for e in events)
    # The text's end and the run's end are one append (one write, one wake-up per reader).
    read = await services(app).store.read(f"sessions/{sid}", 0, 10_000_000)
    ends = [data for _, data in read.chunks if b"TEXT_MESSAGE_END" in data]
    assert len(ends) == 1 and b"RUN_FINISHED" in ends[0]
    # What the stream says is what was persisted, word for word.
    text = text_of(events)
    persisted = "".join(p["content"] for p in assistant["parts"] if p["type"] == "text")
    assert text == persisted and len(text.split()) == 40
    # Usage: what the SDK reported (40 text tokens plus the model's thinking tokens) is stored,
    # priced by the one cost function, and added to the session.
    generation = await _generation(app, accepted["generation_id"])
    finished = events[-1]
    assert finished["finishReason"] == "stop"
    assert generation.output_tokens == finished["usage"]["completionTokens"]
    thinking = [e for e in events if e["type"] == "STEP_FINISHED"]
    assert generation.output_tokens == 40 + (24 if thinking else 0)
    usage = Usage(
        input_tokens=generation.input_tokens,
        output_tokens=generation.output_tokens,
        cache_read_tokens=generation.cache_read_tokens,
        cache_write_5m_tokens=generation.cache_write_5m_tokens,
        cache_write_1h_tokens=generation.cache_write_1h_tokens,
    )
    model = load_catalog().get(generation.model)
    assert model is not None
    assert generation.cost_usd == round_usd(cost_usd(model, usage)) > 0
    # The session's cost is the sum of its generations' (this one, and the title's once done).
    session = await _wait_title(client, sid)
    async with services(app).sessions.sessionmaker() as db:
        total = await db.scalar(
            select(func.sum(Generation.cost_usd)).where(Generation.session_id == sid)
        )
    assert Decimal(session["cost_usd"]) == total
    assert generation.status == "completed" and generation.ttft_ms is not None
    assert generation.ratelimit and any(
        k.startswith("anthropic-ratelimit-") for k in generation.ratelimit
    )
    assert session["message_count"] == 2


async def test_client_message_id_makes_a_send_idempotent(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = api
    sid = await new_session(client)
    first = await send(client, sid, "hello", client_message_id="c-1")
    await wait_idle(client, sid)
    again = await send(client, sid, "hello", client_message_id="c-1")
    assert again == first
    assert await _counts(app, sid) == (2, 1)
    records = await stream_records(client, sid)
    users = [r for r in records if r.get("type") == "chunk" and r["value"]["role"] == "user"]
    assert len(users) == 1


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"content": ""}, 400, "bad_request"),
        ({"content": "   \n"}, 400, "bad_request"),
        ({"content": "x" * (100 * 1024 + 1)}, 413, "payload_too_large"),
        ({"content": "hi", "model": "gpt-4"}, 400, "bad_request"),
        ({"content": "hi", "surprise": 1}, 422, "validation_error"),
        ({}, 422, "validation_error"),
    ],
    ids=["empty", "blank", "oversized", "unknown-model", "extra-field", "missing-content"],
)
async def test_bad_sends_are_rejected_and_persist_nothing(
    api: tuple[FastAPI, httpx.AsyncClient], body: dict[str, Any], status: int, error: str
) -> None:
    app, client = api
    sid = await new_session(client)
    before = await stream_records(client, sid)
    response = await client.post(f"/v1/sessions/{sid}/messages", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error and response.json()["detail"]
    assert await _counts(app, sid) == (0, 0)
    assert await stream_records(client, sid) == before
    assert (await client.get(f"/v1/sessions/{sid}")).json()["active_generation_id"] is None


async def test_malformed_and_unknown_session_ids(client: httpx.AsyncClient) -> None:
    calls = [("GET", "", None), ("POST", "/messages", {"content": "x"}), ("POST", "/stop", None)]
    calls.append(("PUT", "", {}))
    for method, path, body in calls:
        response = await client.request(method, f"/v1/sessions/not-a-uuid{path}", json=body)
        assert response.status_code == 400 and response.json()["error"] == "bad_request"
    missing = str(uuid.uuid4())
    response = await client.get(f"/v1/sessions/{missing}")
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    response = await client.post(f"/v1/sessions/{missing}/messages", json={"content": "x"})
    assert response.status_code == 404


async def test_one_generation_at_a_time_and_stop_keeps_the_partial_answer(
    make_app: AppFactory,
) -> None:
    async with make_app(simulator_tokens_per_s=60) as (app, client):
        sid = await new_session(client)
        accepted = await send(client, sid, "a long answer please [[tokens:600]]")
        # Wait until some of the answer is on the stream.
        for _ in range(500):
            records = await stream_records(client, sid)
            if any(
                "TEXT_MESSAGE_CONTENT" in r["value"]["chunk"]
                for r in records
                if r.get("type") == "chunk"
            ):
                break
            await asyncio.sleep(0.01)
        second = await client.post(f"/v1/sessions/{sid}/messages", json={"content": "and another"})
        assert second.status_code == 409 and "running" in second.json()["detail"]
        assert await _counts(app, sid) == (1, 1)

        started = asyncio.get_running_loop().time()
        stopped = await client.post(f"/v1/sessions/{sid}/stop")
        elapsed = asyncio.get_running_loop().time() - started
        assert stopped.status_code == 200 and stopped.json()["stopped"] is True
        assert elapsed < 1.0, f"stop took {elapsed:.2f}s"

        session = await wait_idle(client, sid)
        assistant = _assistant(session, accepted["generation_id"])
        assert assistant["status"] == "stopped"
        events = events_of(await stream_records(client, sid), assistant["id"])
        assert events[-1]["type"] == "RUN_FINISHED" and events[-1]["finishReason"] == "stopped"
        partial = text_of(events)
        assert partial and len(partial.split()) < 600
        assert partial == "".join(p["content"] for p in assistant["parts"] if p["type"] == "text")
        generation = await _generation(app, accepted["generation_id"])
        assert generation.status == "stopped" and generation.finish_reason == "stopped"
        # Nothing runs now: stop again is a clear 409, and the session takes a new message.
        assert (await client.post(f"/v1/sessions/{sid}/stop")).status_code == 409
        await send(client, sid, "short [[tokens:3]]")
        await wait_idle(client, sid)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_claim_lost_after_the_generation_started_refuses_and_leaves_nothing(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Postgres the claim is sent with the inserts, after the generation has started,
    because the locked session row says it cannot lose. Should it lose anyway, the send is
    refused as any second send is, its generation is abandoned and nothing of it is kept."""
    from streams_service.sessions import repository

    async with make_app(simulator_tokens_per_s=60) as (app, client):
        sid = await new_session(client)
        running = await send(client, sid, "a long answer please [[tokens:600]]")
        read = repository.send_row_and_history

        async def stale_read(*args: Any, **kwargs: Any) -> Any:
            row, history = await read(*args, **kwargs)
            # As if the row lock had not held: the running generation is not seen.
            return row._replace(active_generation_id=None), history

        monkeypatch.setattr(repository, "send_row_and_history", stale_read)
        refused = await client.post(f"/v1/sessions/{sid}/messages", json={"content": "another"})
        assert refused.status_code == 409 and "running" in refused.json()["detail"]
        monkeypatch.undo()
        assert await _counts(app, sid) == (1, 1)
        assert (
            services(app).sessions.generations.running[sid].spec.generation_id
            == (running["generation_id"])
        )
        assert (await client.post(f"/v1/sessions/{sid}/stop")).status_code == 200
        await wait_idle(client, sid)
        runs = [
            json.loads(r["value"]["chunk"])
            for r in await stream_records(client, sid)
            if r.get("type") == "chunk"
        ]
        started = [e["runId"] for e in runs if e["type"] == "RUN_STARTED"]
        assert started == [running["generation_id"]]
        assert await _counts(app, sid) == (2, 1)  # the question and its (stopped) answer


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("rate_limit", "rate_limited"),
        ("overloaded", "overloaded"),
        ("server_error", "overloaded"),
        ("invalid_request", "invalid_request"),
        ("auth", "auth"),
        ("midstream_error", "overloaded"),
        ("cut", "upstream_cut"),
        ("truncate", "upstream_cut"),
    ],
)
async def test_upstream_faults_end_in_run_error_and_an_error_state(
    api: tuple[FastAPI, httpx.AsyncClient], fault: str, code: str
) -> None:
    app, client = api
    sid = await new_session(client)
    accepted = await send(client, sid, f"please fail [[fault:{fault}]]")
    session = await wait_idle(client, sid)
    assistant = _assistant(session, accepted["generation_id"])
    assert assistant["status"] == "error"
    events = events_of(await stream_records(client, sid), assistant["id"])
    assert events[-1]["type"] == "RUN_ERROR", events[-1]
    assert events[-1]["error"]["code"] == code and events[-1]["error"]["message"]
    generation = await _generation(app, accepted["generation_id"])
    assert generation.status == "error" and generation.error_code == code
    # The session is usable again.
    await send(client, sid, "fine now [[tokens:3]]")
    assert len((await wait_idle(client, sid))["messages"]) == 4


async def test_a_transient_overload_is_retried_by_the_sdk(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = api
    sid = await new_session(client)
    accepted = await send(client, sid, "retry me [[fault:overloaded*1]] [[tokens:5]]")
    await wait_idle(client, sid)
    generation = await _generation(app, accepted["generation_id"])
    assert generation.status == "completed" and generation.finish_reason == "stop"


@pytest.mark.parametrize(
    "fault",
    [
        "stall",  # the stream opens, then nothing more comes
        "slow",  # no response headers for 10 s (the HTTP client's read timeout is off)
    ],
)
async def test_the_watchdog_ends_a_stalled_generation(make_app: AppFactory, fault: str) -> None:
    async with make_app(generation_stall_timeout_s=0.3) as (app, client):
        sid = await new_session(client)
        accepted = await send(client, sid, f"hang [[fault:{fault}]]")
        session = await wait_idle(client, sid, timeout_s=10)
        generation = await _generation(app, accepted["generation_id"])
        assert generation.error_code == "upstream_cut"
        assistant = _assistant(session, accepted["generation_id"])
        events = events_of(await stream_records(client, sid), assistant["id"])
        assert events[-1]["type"] == "RUN_ERROR"


async def test_tool_loop_runs_the_calculator_over_several_turns(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = api
    sid = await new_session(client)
    accepted = await send(
        client,
        sid,
        'compute [[tool:calculator {"expression": "2+3*4"}]] '
        '[[tool:calculator {"expression": "2**10"}]]',
    )
    session = await wait_idle(client, sid)
    assistant = _assistant(session, accepted["generation_id"])
    results = [p["content"] for p in assistant["parts"] if p["type"] == "tool-result"]
    assert results == ["14", "1024"]
    calls = [p for p in assistant["parts"] if p["type"] == "tool-call"]
    assert [c["name"] for c in calls] == ["calculator", "calculator"]
    generation = await _generation(app, accepted["generation_id"])
    assert generation.upstream_calls == 3 and generation.finish_reason == "stop"
    events = events_of(await stream_records(client, sid), assistant["id"])
    ends = [e for e in events if e["type"] == "TOOL_CALL_END" and "result" in e]
    assert [e["result"] for e in ends] == ["14", "1024"]
    assert "14" in text_of(events) and "1024" in text_of(events)


async def _approval_request(client: httpx.AsyncClient, sid: str) -> dict[str, Any]:
    for _ in range(1000):
        for r in await stream_records(client, sid):
            if r.get("type") == "chunk" and "approval-requested" in r["value"]["chunk"]:
                import json

                event: dict[str, Any] = json.loads(r["value"]["chunk"])
                return event
        await asyncio.sleep(0.01)
    raise AssertionError("no approval request appeared")


@pytest.mark.parametrize("answer", [True, False])
async def test_tools_needing_approval_wait_for_an_answer(
    api: tuple[FastAPI, httpx.AsyncClient], answer: bool
) -> None:
    _app, client = api
    sid = await new_session(client)
    # Something to find, from an earlier session of the same user.
    other = await new_session(client)
    await send(client, other, "the launch codename is bluebird")
    await wait_idle(client, other)
    accepted = await send(client, sid, 'find it [[tool:search_my_history {"query": "bluebird"}]]')
    request = await _approval_request(client, sid)
    call_id = request["data"]["toolCallId"]
    assert request["data"]["toolName"] == "search_my_history"
    assert request["data"]["approval"] == {"id": call_id, "needsApproval": True}
    response = await client.post(
        f"/v1/sessions/{sid}/approvals/{call_id}", json={"approved": answer}
    )
    assert response.status_code == 200
    session = await wait_idle(client, sid)
    assistant = _assistant(session, accepted["generation_id"])
    result = next(p for p in assistant["parts"] if p["type"] == "tool-result")
    call = next(p for p in assistant["parts"] if p["type"] == "tool-call")
    assert call["approval"]["approved"] is answer
    if answer:
        assert result["state"] == "complete" and "bluebird" in result["content"]
    else:
        assert result["state"] == "error" and "denied" in result["content"]
    # Live readers learn the same from the stream: the end event says whether it failed.
    events = events_of(await stream_records(client, sid), assistant["id"])
    end = next(e for e in events if e["type"] == "TOOL_CALL_END" and "result" in e)
    assert end["isError"] is (not answer)
    # Answering again: nothing waits under that id any more.
    again = await client.post(f"/v1/sessions/{sid}/approvals/{call_id}", json={"approved": True})
    assert again.status_code == 404


async def test_an_unanswered_approval_times_out_as_denied(make_app: AppFactory) -> None:
    async with make_app(approval_timeout_s=0.3) as (_app, client):
        sid = await new_session(client)
        accepted = await send(client, sid, 'look [[tool:search_my_history {"query": "x"}]]')
        session = await wait_idle(client, sid)
        assistant = _assistant(session, accepted["generation_id"])
        result = next(p for p in assistant["parts"] if p["type"] == "tool-result")
        assert result["state"] == "error" and "denied" in result["content"]
        events = events_of(await stream_records(client, sid), assistant["id"])
        responded = [e for e in events if e.get("name") == "approval-responded"]
        assert responded and responded[0]["data"]["reason"] == "timeout"


async def test_the_session_budget_stops_a_generation_and_then_refuses(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = api
    sid = await new_session(client, budget_usd="0.0005")
    accepted = await send(client, sid, "spend [[tokens:2000]]")
    session = await wait_idle(client, sid)
    generation = await _generation(app, accepted["generation_id"])
    assert generation.finish_reason == "budget"
    assistant = _assistant(session, accepted["generation_id"])
    events = events_of(await stream_records(client, sid), assistant["id"])
    assert events[-1]["type"] == "RUN_FINISHED" and events[-1]["finishReason"] == "budget"
    refused = await client.post(f"/v1/sessions/{sid}/messages", json={"content": "more"})
    assert refused.status_code == 402 and refused.json()["error"] == "budget_exhausted"
    async with services(app).sessions.sessionmaker() as db:
        row = await db.get(ChatSession, sid)
    assert row is not None and row.reserved_usd == 0


async def test_fork_copies_history_up_to_a_message_and_end_closes(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    _app, client = api
    sid = await new_session(client, title="Original")
    await send(client, sid, "one [[tokens:3]]")
    first = await wait_idle(client, sid)
    await send(client, sid, "two [[tokens:3]]")
    await wait_idle(client, sid)
    at = first["messages"][1]["id"]  # the first answer
    forked = await client.post(f"/v1/sessions/{sid}/fork", json={"at_message_id": at})
    assert forked.status_code == 201, forked.text
    fork_id = forked.json()["id"]
    fork = (await client.get(f"/v1/sessions/{fork_id}")).json()
    assert [m["id"] for m in fork["messages"]] == [m["id"] for m in first["messages"]]
    fork_records = await stream_records(client, fork_id)
    ids = {r["value"]["messageId"] for r in fork_records if r.get("type") == "chunk"}
    assert ids == {m["id"] for m in first["messages"]}
    # The fork continues on its own.
    await send(client, fork_id, "three [[tokens:3]]")
    assert len((await wait_idle(client, fork_id))["messages"]) == 4
    missing = await client.post(f"/v1/sessions/{sid}/fork", json={"at_message_id": "nope"})
    assert missing.status_code == 404

    ended = await client.post(f"/v1/sessions/{sid}/end")
    assert ended.status_code == 200 and ended.json()["ended_at"] is not None
    head = await client.head(f"/v1/stream/sessions/{sid}")
    assert head.headers.get("stream-closed") == "true"
    refused = await client.post(f"/v1/sessions/{sid}/messages", json={"content": "more"})
    assert refused.status_code == 409 and "fork" in refused.json()["detail"]


async def test_models_lists_the_allowlist_with_prices(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    ids = [m["id"] for m in body["models"]]
    assert ids[0] == "claude-sonnet-5-5" or "claude-sonnet-5-5" in ids
    assert {"claude-opus-5-5", "claude-haiku-5-5", "claude-sonnet-4-6", "claude-haiku-4-5"} <= set(
        ids
    )
    default = [m for m in body["models"] if m["default"]]
    assert [m["id"] for m in default] == ["claude-sonnet-5-5"]
    assert body["simulated"] is True
    assert all(m["prices"]["bands"] for m in body["models"])


async def _wait_title(client: httpx.AsyncClient, sid: str) -> dict[str, Any]:
    for _ in range(500):
        session: dict[str, Any] = (await client.get(f"/v1/sessions/{sid}")).json()
        if session["title"]:
            return session
        await asyncio.sleep(0.01)
    raise AssertionError("no title was set")


async def test_the_first_exchange_gets_a_title_from_the_cheap_model(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = api
    sid = await new_session(client)
    await send(client, sid, "How do I rotate the staging database password? [[tokens:5]]")
    await wait_idle(client, sid)
    session = await _wait_title(client, sid)
    title = session["title"]
    assert 0 < len(title) <= 80 and "\n" not in title
    async with services(app).sessions.sessionmaker() as db:
        rows = (
            (
                await db.execute(
                    select(Generation).where(
                        Generation.session_id == sid, Generation.finish_reason == "title"
                    )
                )
            )
            .scalars()
            .all()
        )
        total = await db.scalar(
            select(func.sum(Generation.cost_usd)).where(Generation.session_id == sid)
        )
    assert len(rows) == 1 and rows[0].model == load_catalog().title_model.id
    assert rows[0].output_tokens > 0 and Decimal(session["cost_usd"]) == total
    # The title is committed first and then published on the stream: wait (bounded) for the
    # session record that carries it.
    for _ in range(500):
        upserts = [r for r in await stream_records(client, sid) if r.get("type") == "session"]
        if upserts and upserts[-1]["value"]["title"] is not None:
            break
        await asyncio.sleep(0.01)
    assert upserts[-1]["value"]["title"] == title
    # Only the first exchange is titled.
    await send(client, sid, "and another thing [[tokens:3]]")
    await wait_idle(client, sid)
    await asyncio.sleep(0.1)
    assert (await client.get(f"/v1/sessions/{sid}")).json()["title"] == title


async def test_fallback_title_uses_the_first_words(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    import anthropic

    app, client = api
    generations = services(app).generations
    working = generations.client
    sid = await new_session(client)
    generations.client = anthropic.AsyncAnthropic(
        base_url="http://127.0.0.1:1", api_key="x", max_retries=0
    )
    try:
        await services(app).sessions.generate_title(
            sid, "Quarterly   report for the   platform team please, with numbers and charts"
        )
    finally:
        generations.client = working
    session = (await client.get(f"/v1/sessions/{sid}")).json()
    assert session["title"] == "Quarterly report for the platform team please, with"


async def test_regenerate_replaces_the_last_answer(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = api
    sid = await new_session(client)
    nothing = await client.post(f"/v1/sessions/{sid}/regenerate")
    assert nothing.status_code == 409
    first = await send(client, sid, "an answer please [[tokens:4]]")
    before = await wait_idle(client, sid)
    old_answer = before["messages"][-1]
    again = await client.post(f"/v1/sessions/{sid}/regenerate")
    assert again.status_code == 202, again.text
    body = again.json()
    assert (
        body["message_id"] == first["message_id"]
        and body["generation_id"] != first["generation_id"]
    )
    after = await wait_idle(client, sid)
    statuses = [(m["role"], m["status"]) for m in after["messages"]]
    assert statuses == [
        ("user", "complete"),
        ("assistant", "superseded"),
        ("assistant", "complete"),
    ]
    assert after["messages"][1]["id"] == old_answer["id"]
    assert after["message_count"] == 2
    records = await stream_records(client, sid)
    notices = [
        e for e in events_of(records, old_answer["id"]) if e.get("name") == "message-superseded"
    ]
    assert len(notices) == 1
    generation = await _generation(app, body["generation_id"])
    assert generation.user_message_id == first["message_id"] and generation.status == "completed"


async def test_a_send_whose_message_cannot_reach_the_stream_is_taken_back(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = api
    sid = await new_session(client)
    # The session's stream disappears underneath it (a raw protocol delete).
    assert (await client.delete(f"/v1/stream/sessions/{sid}")).status_code == 204
    response = await client.post(f"/v1/sessions/{sid}/messages", json={"content": "hello"})
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    # The generation, started before the append, was abandoned with it.
    assert sid not in services(app).generations.running
    # Nothing half-written: no message, no generation, the session is free and unchanged.
    assert await _counts(app, sid) == (0, 0)
    session = (await client.get(f"/v1/sessions/{sid}")).json()
    assert session["active_generation_id"] is None and session["message_count"] == 0
    async with services(app).sessions.sessionmaker() as db:
        row = await db.get(ChatSession, sid)
    assert row is not None and row.reserved_usd == 0


async def test_a_send_that_fails_after_its_generation_started_leaves_nothing(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstream call goes out as soon as the session is claimed, before the send's
    transaction commits; if the transaction then fails, that generation is abandoned: it
    writes nothing to the stream, saves nothing, and the session is free again."""
    from streams_service.errors import ServiceUnavailable
    from streams_service.sessions import repository

    real_insert = repository.insert_generation
    started: list[bool] = []

    async def failing_insert(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(0.1)  # the generation runs meanwhile: its upstream call is out
        started.append(sid in services(app).generations.running)
        raise ServiceUnavailable("the database went away")

    async with make_app(simulator_ttft_ms=50) as (app, client):
        sid = await new_session(client)
        monkeypatch.setattr(repository, "insert_generation", failing_insert)
        response = await client.post(f"/v1/sessions/{sid}/messages", json={"content": "hi"})
        assert response.status_code == 503 and response.json()["error"] == "unavailable"
        assert started == [True]
        assert sid not in services(app).generations.running
        await asyncio.sleep(0.3)  # long enough for an orphaned answer to have streamed
        assert await _counts(app, sid) == (0, 0)
        assert [r for r in await stream_records(client, sid) if r.get("type") == "chunk"] == []
        session = (await client.get(f"/v1/sessions/{sid}")).json()
        assert session["active_generation_id"] is None and session["message_count"] == 0
        # The session works normally afterwards.
        monkeypatch.setattr(repository, "insert_generation", real_insert)
        accepted = await send(client, sid, "hello again")
        answer = _assistant(await wait_idle(client, sid), accepted["generation_id"])
        assert await _counts(app, sid) == (2, 1)
        streamed = text_of(events_of(await stream_records(client, sid), answer["id"]))
        assert streamed and streamed == answer["parts"][-1]["content"]
        assert (await _generation(app, accepted["generation_id"])).status == "completed"


async def test_the_user_message_records_its_stream_offset(
    api: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    """Saved with the answer: the offset the 202 gave, where a client resumes after it."""
    app, client = api
    sid = await new_session(client)
    accepted = await send(client, sid, "where am I on the stream?")
    await wait_idle(client, sid)
    async with services(app).sessions.sessionmaker() as db:
        question = await db.get(ChatMessage, (sid, accepted["message_id"]))
    assert question is not None and question.stream_offset == accepted["offset"]
