"""The console's stream follower: followed in many short reads or in long-polls, a live answer
materializes to exactly what the service stores (no gap, no double), and any split of the
records into pages gives the same transcript."""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from console.client import ServiceClient, StreamPage
from console.stream import SessionFollower, Transcript
from tests.console.conftest import chat, new_session, wait_idle
from tests.support import ServerProcess


def client_for(service: ServerProcess) -> ServiceClient:
    return ServiceClient(service.base_url, http=httpx.Client(timeout=30))


def shape(follower: SessionFollower) -> list[tuple[str, str, str, list[dict[str, Any]]]]:
    return [(m.id, m.role, m.status, m.parts) for m in follower.transcript.visible]


def stored(body: dict[str, Any]) -> list[tuple[str, str, str, list[dict[str, Any]]]]:
    return [(m["id"], m["role"], m["status"], m["parts"]) for m in body["messages"]]


def test_short_reads_during_a_live_answer_equal_one_read_after_it(
    service: ServerProcess, api: httpx.Client
) -> None:
    client = client_for(service)
    session_id = new_session(api)
    accepted = api.post(
        f"/v1/sessions/{session_id}/messages",
        json={"content": 'Go [[tokens:120]] [[tool:calculator {"expression": "6*7"}]]'},
    )
    accepted.raise_for_status()
    follower = SessionFollower(session_id)
    # Live from the accepted send on, before its RUN_STARTED is on the stream (as the page does).
    follower.expect(accepted.json()["generation_id"])
    pages_with_records = 0
    deadline = time.monotonic() + 30
    while True:
        if follower.catch_up(client) > 0:
            pages_with_records += 1
        if not follower.live:
            break
        assert time.monotonic() < deadline, "the answer did not finish"
        time.sleep(0.03)
    assert pages_with_records >= 3  # it really followed the answer as it grew
    body = wait_idle(api, session_id)
    whole = SessionFollower(session_id)
    whole.catch_up(client)
    assert shape(follower) == shape(whole) == stored(body)
    text = follower.transcript.visible[-1].text
    assert "The tool returned: 42" in text and text.count("The tool returned") == 1


def test_long_poll_follow_equals_the_stored_messages(
    service: ServerProcess, api: httpx.Client
) -> None:
    client = client_for(service)
    session_id = new_session(api)
    chat(api, session_id, "Warm up [[tokens:5]]")
    follower = SessionFollower(session_id)
    follower.catch_up(client)
    api.post(
        f"/v1/sessions/{session_id}/messages", json={"content": "Now [[tokens:60]]"}
    ).raise_for_status()
    for _ in follower.follow(client, timeout=30):
        if len(follower.transcript.visible) == 4 and not follower.transcript.running:
            break
    assert shape(follower) == stored(wait_idle(api, session_id))
    # After the session ends its stream closes, and following stops by itself.
    api.post(f"/v1/sessions/{session_id}/end").raise_for_status()
    assert sum(follower.follow(client, timeout=30)) >= 1
    assert follower.closed and follower.transcript.session["endedAt"]


def test_following_at_the_tail_ends_when_the_stream_closes_later(
    service: ServerProcess, api: httpx.Client
) -> None:
    """The close comes in its own write after the last record: the follower, waiting at the
    tail, gets the record, then a 204 that says closed. It must stop there, not ask again at
    once forever (the protocol client's own live loop does, hiding 204s)."""
    client = client_for(service)
    session_id = new_session(api)
    tail = api.head(f"/v1/stream/sessions/{session_id}").headers["stream-next-offset"]
    pages: list[StreamPage] = []
    done = threading.Event()

    def follow() -> None:
        for page in client.follow_stream(session_id, tail, timeout=10):
            pages.append(page)
        done.set()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    time.sleep(0.5)  # the follower is waiting at the tail
    api.post(f"/v1/sessions/{session_id}/end").raise_for_status()
    assert done.wait(15), "following did not stop after the stream closed"
    assert pages[-1].closed
    records = [r for p in pages for r in p.records]
    assert any(r.get("type") == "session" for r in records)  # the ended session's record


# ---------------------------------------------------------------------------------- pure


def chunk(message_id: str, seq: int, event: dict[str, Any], role: str = "assistant") -> Any:
    return {
        "type": "chunk",
        "key": f"{message_id}:{seq}",
        "value": {
            "messageId": message_id,
            "actorId": "claude",
            "role": role,
            "chunk": json.dumps(event),
            "seq": seq,
            "createdAt": "2026-11-26T00:00:00Z",
        },
        "headers": {"operation": "insert"},
    }


def conversation() -> list[dict[str, Any]]:
    user = {
        "type": "whole-message",
        "message": {"id": "u1", "role": "user", "parts": [{"type": "text", "content": "hi"}]},
    }
    events = [
        {"type": "RUN_STARTED", "runId": "g1"},
        {"type": "STEP_STARTED", "stepId": "thinking-1", "stepType": "thinking"},
        {"type": "STEP_FINISHED", "stepId": "thinking-1", "delta": "Let me "},
        {"type": "STEP_FINISHED", "stepId": "thinking-1", "delta": "see."},
        {"type": "TEXT_MESSAGE_START", "messageId": "a1", "role": "assistant"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "a1", "delta": "Checking"},
        {"type": "TOOL_CALL_START", "toolCallId": "t1", "toolName": "calculator"},
        {"type": "TOOL_CALL_ARGS", "toolCallId": "t1", "delta": '{"expression": '},
        {"type": "TOOL_CALL_ARGS", "toolCallId": "t1", "delta": '"1+1"}'},
        {"type": "TOOL_CALL_END", "toolCallId": "t1", "input": {"expression": "1+1"}},
        {"type": "TOOL_CALL_END", "toolCallId": "t1", "result": "2"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "a1", "delta": "\n\nIt is 2."},
        {"type": "TEXT_MESSAGE_END", "messageId": "a1"},
        {"type": "RUN_FINISHED", "runId": "g1", "finishReason": "stop", "usage": {}},
    ]
    session = {"type": "session", "key": "s", "value": {"sessionId": "s", "title": "Sums"}}
    return [
        session,
        chunk("u1", 0, user, "user"),
        *(chunk("a1", i, e) for i, e in enumerate(events)),
    ]


def transcript_of(pages: list[list[dict[str, Any]]]) -> SessionFollower:
    follower = SessionFollower("s")
    follower.expect("g1")
    for n, page in enumerate(pages):
        follower.apply(StreamPage(page, f"offset-{n}", True, False))
    return follower


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=16), max_size=8))
def test_any_split_into_pages_gives_the_same_transcript(cuts: list[int]) -> None:
    records = conversation()
    bounds = sorted({0, len(records), *(min(c, len(records)) for c in cuts)})
    pages = [records[a:b] for a, b in itertools.pairwise(bounds)]
    split, whole = transcript_of(pages), transcript_of([records])
    assert shape(split) == shape(whole)
    assert not split.live and split.offset == f"offset-{len(pages) - 1}"


def test_materialized_parts_match_the_service_shapes() -> None:
    follower = transcript_of([conversation()])
    user, answer = follower.transcript.visible
    assert user.parts == [{"type": "text", "content": "hi"}]
    assert answer.status == "complete" and follower.transcript.session["title"] == "Sums"
    assert answer.parts == [
        {"type": "thinking", "content": "Let me see."},
        {"type": "text", "content": "Checking"},
        {
            "type": "tool-call",
            "id": "t1",
            "name": "calculator",
            "arguments": '{"expression": "1+1"}',
            "state": "input-complete",
            "output": "2",
        },
        {"type": "tool-result", "toolCallId": "t1", "content": "2", "state": "complete"},
        {"type": "text", "content": "\n\nIt is 2."},
    ]


def test_superseded_and_interrupted_answers() -> None:
    t = Transcript()
    for record in conversation():
        t.apply(record)
    t.apply(
        chunk("a1", 10**9, {"type": "CUSTOM", "name": "message-superseded",
                            "data": {"messageId": "a1", "by": "a2"}})
    )  # fmt: skip
    t.apply(chunk("a2", 0, {"type": "RUN_STARTED", "runId": "g2"}))
    assert [m.id for m in t.visible] == ["u1", "a2"] and t.running
    error = {"message": "The service restarted", "code": "interrupted"}
    t.apply(chunk("a2", 10**9, {"type": "RUN_ERROR", "runId": "g2", "error": error}))
    assert t.visible[-1].status == "interrupted" and not t.running
    # Records that are not ours, or broken, are skipped without losing the offset.
    follower = SessionFollower("s")
    follower.apply(
        StreamPage([{"type": "chunk", "value": {"chunk": "{"}}, 7, "x"], "o1", True, False)
    )
    assert follower.offset == "o1" and follower.transcript.messages == []
