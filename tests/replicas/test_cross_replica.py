"""Two `chatops serve` processes on one Postgres database (issue 6, item 6).

A generation runs as a task in the process that accepted the message (A). A reader on the other
replica (B) follows it live; a stop or an approval sent to B reaches A through Postgres NOTIFY
and answers as it would on A; a replica that dies mid-generation is cleaned up by the others;
sessions idle past SESSION_IDLE_TIMEOUT are ended once, although both replicas sweep for them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.replicas.helpers import (
    BASE_ENV,
    RawSseReader,
    assistant_ids,
    events_of,
    generations,
    persisted_text,
    read_all,
    run_ended,
    text_of,
    wait_idle,
)
from tests.support import ServerProcess, migrate, postgres_database

IDLE_TIMEOUT_S = 4
ENV = {
    **BASE_ENV,
    "SIMULATOR_TOKENS_PER_S": "50",
    "SESSION_IDLE_TIMEOUT": str(IDLE_TIMEOUT_S),
    "APPROVAL_TIMEOUT_S": "120",
    # Heartbeats every 0.75 s; a replica silent for 3 s is taken for dead by the others.
    "GENERATION_STALE_AFTER_S": "3",
}
GUARD_S = 60.0  # hang guard for anything awaited below
SEARCH = '[[tool:search_my_history {"query": "x"}]]'


@dataclass
class Pair:
    a: ServerProcess
    b: ServerProcess
    database_url: str


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    log_dir: Path = tmp_path_factory.mktemp("replicas")
    with postgres_database("chatops_replicas") as url:
        migrate(url)
        with (
            ServerProcess(url, log_dir, "A", **ENV) as a,
            ServerProcess(url, log_dir, "B", **ENV) as b,
        ):
            yield Pair(a, b, url)


@pytest.fixture
async def client() -> Any:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None)) as c:
        yield c


async def new_session(client: httpx.AsyncClient, server: ServerProcess) -> str:
    response = await client.post(f"{server.base_url}/v1/sessions", json={})
    assert response.status_code == 201, response.text
    sid: str = response.json()["id"]
    return sid


async def send(
    client: httpx.AsyncClient, server: ServerProcess, sid: str, content: str
) -> dict[str, Any]:
    response = await client.post(
        f"{server.base_url}/v1/sessions/{sid}/messages", json={"content": content}
    )
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


async def poll_stream(
    client: httpx.AsyncClient, server: ServerProcess, sid: str, condition: Any, what: str
) -> list[dict[str, Any]]:
    """Catch-up reads on `server` until `condition(records)` holds (bounded)."""
    deadline = time.monotonic() + GUARD_S
    while True:
        records, _ = await read_all(client, server.base_url, sid)
        if condition(records):
            return records
        if time.monotonic() > deadline:
            pytest.fail(f"never saw {what} on {server.name}")
        await asyncio.sleep(0.05)


def approval_requests(records: list[dict[str, Any]]) -> list[str]:
    return [
        e["data"]["toolCallId"]
        for mid in assistant_ids(records)
        for e in events_of(records, mid)
        if e["type"] == "CUSTOM" and e["name"] == "approval-requested"
    ]


async def test_a_generation_on_a_is_followed_live_from_b(
    pair: Pair, client: httpx.AsyncClient
) -> None:
    sid = await new_session(client, pair.a)
    stream_b = f"{pair.b.base_url}/v1/stream/sessions/{sid}"
    tail = (await client.head(stream_b)).headers["stream-next-offset"]
    reader = RawSseReader()
    follow = asyncio.create_task(reader.follow(client, stream_b, tail))
    try:
        sent = await send(client, pair.a, sid, "tell me [[tokens:200]]")  # 4 s of output

        async def first_text() -> None:
            while not (ids := assistant_ids(reader.records)) or not text_of(
                events_of(reader.records, ids[0])
            ):
                await asyncio.sleep(0.01)

        await asyncio.wait_for(first_text(), GUARD_S)
        # B delivered part of the answer while A was still writing it: a live read.
        during = (await client.get(f"{pair.a.base_url}/v1/sessions/{sid}")).json()
        assert during["active_generation_id"] == sent["generation_id"]
        message_id = assistant_ids(reader.records)[0]

        async def run_end() -> None:
            while not run_ended(reader.records, message_id):
                await asyncio.sleep(0.01)

        await asyncio.wait_for(run_end(), GUARD_S)
    finally:
        follow.cancel()
    session = await wait_idle(client, pair.a.base_url, sid)
    assistant = session["messages"][-1]
    events = events_of(reader.records, message_id)
    assert events[-1]["type"] == "RUN_FINISHED" and events[-1]["finishReason"] == "stop"
    assert text_of(events) == persisted_text(assistant)
    assert len(persisted_text(assistant).split()) == 200
    # Exactly the stream as A wrote it: no gap, no duplicate.
    full, _ = await read_all(client, pair.a.base_url, sid, tail)
    assert reader.records == full[: len(reader.records)]
    assert run_ended(full[: len(reader.records)], message_id)


async def test_stop_sent_to_b_ends_the_generation_running_on_a(
    pair: Pair, client: httpx.AsyncClient
) -> None:
    sid = await new_session(client, pair.a)
    sent = await send(client, pair.a, sid, "go on [[tokens:3000]]")  # a minute of output
    await poll_stream(
        client,
        pair.b,
        sid,
        lambda records: (
            len(
                [
                    e
                    for mid in assistant_ids(records)
                    for e in events_of(records, mid)
                    if e["type"] == "TEXT_MESSAGE_CONTENT"
                ]
            )
            >= 3
        ),
        "three deltas",
    )
    stopped = await client.post(f"{pair.b.base_url}/v1/sessions/{sid}/stop")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json() == {"generation_id": sent["generation_id"], "stopped": True}

    # Answered once the generation had ended, as a local stop is: nothing is left running.
    session = (await client.get(f"{pair.b.base_url}/v1/sessions/{sid}")).json()
    assert session["active_generation_id"] is None
    assistant = session["messages"][-1]
    assert assistant["role"] == "assistant" and assistant["status"] == "stopped"
    records, _ = await read_all(client, pair.b.base_url, sid)
    events = events_of(records, assistant["id"])
    assert events[-1]["type"] == "RUN_FINISHED" and events[-1]["finishReason"] == "stopped"
    kept = persisted_text(assistant)
    assert kept and kept == text_of(events)
    assert len(kept.split()) < 3000
    status, _ = generations(pair.database_url, [sent["generation_id"]])[sent["generation_id"]]
    assert status == "stopped"

    again = await client.post(f"{pair.b.base_url}/v1/sessions/{sid}/stop")
    assert again.status_code == 409 and again.json()["error"] == "conflict"
    # The session goes on, on either replica.
    await send(client, pair.b, sid, "short now [[tokens:3]]")
    session = await wait_idle(client, pair.a.base_url, sid)
    assert session["messages"][-1]["status"] == "complete"


async def test_approvals_sent_to_b_reach_the_generation_on_a(
    pair: Pair, client: httpx.AsyncClient
) -> None:
    yes, no = await new_session(client, pair.a), await new_session(client, pair.a)
    for sid in (yes, no):
        await send(client, pair.a, sid, f"search {SEARCH}")
    calls = {}
    for sid in (yes, no):
        records = await poll_stream(client, pair.b, sid, approval_requests, "an approval request")
        calls[sid] = approval_requests(records)[0]

    # A tool call nobody is waiting for: a clear 404, from the owner's answer.
    unknown = await client.post(
        f"{pair.b.base_url}/v1/sessions/{yes}/approvals/toolu_unknown", json={"approved": True}
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "not_found" and unknown.json()["detail"]

    for sid, approved in ((yes, True), (no, False)):
        answered = await client.post(
            f"{pair.b.base_url}/v1/sessions/{sid}/approvals/{calls[sid]}",
            json={"approved": approved},
        )
        assert answered.status_code == 200, answered.text
        assert answered.json() == {"tool_call_id": calls[sid], "approved": approved}

    for sid, approved in ((yes, True), (no, False)):
        session = await wait_idle(client, pair.b.base_url, sid)
        assistant = session["messages"][-1]
        assert assistant["status"] == "complete"
        records, _ = await read_all(client, pair.b.base_url, sid)
        events = events_of(records, assistant["id"])
        responded = [
            e for e in events if e["type"] == "CUSTOM" and e["name"] == "approval-responded"
        ]
        assert [(r["data"]["toolCallId"], r["data"]["approved"]) for r in responded] == [
            (calls[sid], approved)
        ]
        result = next(p for p in assistant["parts"] if p["type"] == "tool-result")
        if approved:
            assert result["state"] == "complete"
        else:
            assert result["state"] == "error" and "denied" in result["content"]
        assert events[-1]["type"] == "RUN_FINISHED"
        # Answered already, and nothing runs: 404 again.
        late = await client.post(
            f"{pair.b.base_url}/v1/sessions/{sid}/approvals/{calls[sid]}",
            json={"approved": True},
        )
        assert late.status_code == 404


@pytest.mark.timeout(180)
async def test_idle_sessions_are_ended_once_by_one_of_the_replicas(
    pair: Pair, client: httpx.AsyncClient
) -> None:
    idle = [await new_session(client, server) for server in (pair.a, pair.b) * 4]
    # Idle just as long, but a generation is waiting for an approval: it must stay open.
    busy = await new_session(client, pair.a)
    await send(client, pair.a, busy, f"search {SEARCH}")
    busy_records = await poll_stream(client, pair.a, busy, approval_requests, "an approval request")

    deadline = time.monotonic() + GUARD_S
    for sid in idle:
        while (await client.get(f"{pair.b.base_url}/v1/sessions/{sid}")).json()["ended_at"] is None:
            if time.monotonic() > deadline:
                pytest.fail(f"session {sid} was not ended after {IDLE_TIMEOUT_S}s idle")
            await asyncio.sleep(0.1)

    still = (await client.get(f"{pair.a.base_url}/v1/sessions/{busy}")).json()
    assert still["ended_at"] is None and still["active_generation_id"] is not None

    for sid in idle:
        stream = f"{pair.a.base_url}/v1/stream/sessions/{sid}"
        assert (await client.head(stream)).headers.get("stream-closed") == "true"
        records, _ = await read_all(client, pair.a.base_url, sid)
        ends = [r for r in records if r.get("type") == "session" and r["value"]["endedAt"]]
        assert len(ends) == 1, f"session {sid} was ended {len(ends)} times"
        refused = await client.post(
            f"{pair.b.base_url}/v1/sessions/{sid}/messages", json={"content": "hello?"}
        )
        assert refused.status_code == 409 and "fork" in refused.json()["detail"]
    # An explicit end of an ended session answers as before and ends nothing twice.
    repeat = await client.post(f"{pair.a.base_url}/v1/sessions/{idle[0]}/end")
    assert repeat.status_code == 200 and repeat.json()["ended_at"] is not None
    records, _ = await read_all(client, pair.a.base_url, idle[0])
    assert len([r for r in records if r.get("type") == "session" and r["value"]["endedAt"]]) == 1

    call = approval_requests(busy_records)[0]
    denied = await client.post(
        f"{pair.b.base_url}/v1/sessions/{busy}/approvals/{call}", json={"approved": False}
    )
    assert denied.status_code == 200
    await wait_idle(client, pair.a.base_url, busy)


@pytest.mark.timeout(120)
async def test_a_replica_that_dies_is_cleaned_up_by_the_others(
    pair: Pair, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """C dies (SIGKILL) mid-generation and never comes back. A and B close its generation as
    interrupted once its heartbeat is stale, and a stop sent to B meanwhile answers as soon as
    the generation has ended, rather than hanging or failing."""
    c = ServerProcess(pair.database_url, tmp_path, "C", **ENV).start()
    try:
        sid = await new_session(client, c)
        sent = await send(client, c, sid, "go on [[tokens:3000]]")
        await poll_stream(
            client,
            pair.b,
            sid,
            lambda records: any(
                e["type"] == "TEXT_MESSAGE_CONTENT"
                for mid in assistant_ids(records)
                for e in events_of(records, mid)
            ),
            "a delta",
        )
        c.kill()
    finally:
        c.stop()
    stopped = await client.post(f"{pair.b.base_url}/v1/sessions/{sid}/stop")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json() == {"generation_id": sent["generation_id"], "stopped": True}
    session = (await client.get(f"{pair.a.base_url}/v1/sessions/{sid}")).json()
    assert session["active_generation_id"] is None
    assistant = session["messages"][-1]
    assert assistant["status"] == "interrupted"
    records, _ = await read_all(client, pair.a.base_url, sid)
    events = events_of(records, assistant["id"])
    terminals = [e for e in events if e["type"] in ("RUN_FINISHED", "RUN_ERROR")]
    assert [t["type"] for t in terminals] == ["RUN_ERROR"], "closed more than once, or never"
    assert terminals[0]["error"]["code"] == "interrupted"
    assert persisted_text(assistant) == text_of(events) != ""
    await send(client, pair.a, sid, "anyone? [[tokens:3]]")
    assert (await wait_idle(client, pair.b.base_url, sid))["messages"][-1]["status"] == "complete"
