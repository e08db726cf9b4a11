"""PostHog against a local capture server speaking its ingestion protocol (gzipped JSON batches
posted to /batch/): the exact events and properties of a chat, and no message text."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from streams_service.config import Settings
from streams_service.observability.analytics import Analytics
from tests.observability.capture import CaptureServer, posthog_events
from tests.sessions.conftest import AppFactory, new_session, send, wait_idle

API_KEY = "phc_test_" + "k" * 24


def ours(properties: dict[str, Any]) -> dict[str, Any]:
    """The properties we send (the SDK adds `$lib`, `$geoip_disable` and such)."""
    return {k: v for k, v in properties.items() if not k.startswith("$")}


async def test_a_chat_sends_exactly_its_events_without_text(make_app: AppFactory) -> None:
    words = secrets.token_hex(6)
    text_1 = f"Draft the layoff memo for team kestrel-{words}-amber"
    text_2 = f"Also the budget of project marmot-{words}-slate"
    with CaptureServer(reply=b'{"status": 1}').running() as server:
        async with make_app(
            posthog_api_key=API_KEY, posthog_host=server.base_url, approval_timeout_s=0.3
        ) as (_app, client):
            sid = await new_session(client)
            # Two tools: one runs at once, the other needs an approval nobody gives (denied).
            content_1 = (
                f'{text_1} [[tool:calculator {{"expression": "6*7"}}]] '
                f'[[tool:search_my_history {{"query": "memo"}}]]'
            )
            await send(client, sid, content_1)
            await wait_idle(client, sid)
            content_2 = f"[[fault:invalid_request]] {text_2}"
            await send(client, sid, content_2)
            await wait_idle(client, sid)
            ended = await client.post(f"/v1/sessions/{sid}/end")
            assert ended.status_code == 200
            session = (await client.get(f"/v1/sessions/{sid}")).json()
            # Nothing is sent while requests run: the SDK batches in its own thread, and the
            # lifespan's exit flushes what is queued.
        events = posthog_events(server, API_KEY)
        everything = server.all_bytes()

    assert {e["distinct_id"] for e in events} == {"local"}
    assert all(e["properties"]["$geoip_disable"] is True for e in events)
    answer = next(m for m in session["messages"] if m["role"] == "assistant")
    answer_text = "".join(p["content"] for p in answer["parts"] if p["type"] == "text")
    created = datetime.fromisoformat(session["created_at"])
    ended_at = datetime.fromisoformat(session["ended_at"])
    assert [(e["event"], ours(e["properties"])) for e in events] == [
        (
            "chat_session_started",
            {"sessionId": sid, "model": session["model"], "userId": "local"},
        ),
        ("chat_message_sent", {"sessionId": sid, "role": "user", "messageLength": len(content_1)}),
        ("chat_tool_executed", {"sessionId": sid, "toolName": "calculator", "approved": True}),
        (
            "chat_tool_executed",
            {"sessionId": sid, "toolName": "search_my_history", "approved": False},
        ),
        (
            "chat_message_sent",
            {"sessionId": sid, "role": "assistant", "messageLength": len(answer_text)},
        ),
        ("chat_message_sent", {"sessionId": sid, "role": "user", "messageLength": len(content_2)}),
        (
            "chat_error",
            {
                "sessionId": sid,
                "errorType": "invalid_request",
                "errorMessage": "Claude rejected the request.",
            },
        ),
        (
            "chat_session_ended",
            {
                "sessionId": sid,
                "messageCount": session["message_count"],
                "durationMs": int((ended_at - created).total_seconds() * 1000),
            },
        ),
    ]
    assert answer_text and session["message_count"] == 4
    for leaked in (text_1, text_2, words, answer_text):
        assert leaked.encode() not in everything, leaked


def test_without_a_key_nothing_is_captured() -> None:
    analytics = Analytics.from_settings(Settings())
    assert not analytics.enabled
    analytics.session_started("s", "m", "u")  # a no-op, not an error


async def test_a_fork_is_a_session_started(make_app: AppFactory) -> None:
    with CaptureServer(reply=b'{"status": 1}').running() as server:
        async with make_app(posthog_api_key=API_KEY, posthog_host=server.base_url) as (
            _app,
            client,
        ):
            sid = await new_session(client)
            await send(client, sid, "hello [[tokens:3]]")
            session = await wait_idle(client, sid)
            forked = await client.post(
                f"/v1/sessions/{sid}/fork", json={"at_message_id": session["messages"][-1]["id"]}
            )
            assert forked.status_code in (200, 201), forked.text
            fork_id = forked.json()["id"]
        events = posthog_events(server, API_KEY)
    started = [ours(e["properties"]) for e in events if e["event"] == "chat_session_started"]
    assert started == [
        {"sessionId": sid, "model": session["model"], "userId": "local"},
        {"sessionId": fork_id, "model": session["model"], "userId": "local"},
    ]
