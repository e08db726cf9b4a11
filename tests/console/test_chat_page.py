"""The Chat page (AppTest) against a real service on the simulator: new and continued sessions,
the streamed answer materialized exactly as the service stores it, approvals, stop, regenerate,
fork, attachments, cost and budget."""

from __future__ import annotations

import base64
from typing import Any

import httpx
from streamlit.testing.v1 import AppTest

from tests.console.conftest import AppFactory, chat, new_session, run_until, texts, wait_idle
from tests.sessions.conftest import PNG


def session_of(at: AppTest) -> str:
    value: Any = at.query_params["session"]
    return str(value[0] if isinstance(value, list) else value)


def answered(count: int) -> Any:
    """Done when `count` assistant bubbles exist and none is still streaming."""

    def check(at: AppTest) -> bool:
        bubbles = texts(at, "assistant")
        return len(bubbles) >= count and not any(b.endswith("▌") for b in bubbles)

    return check


def stored_text(api: httpx.Client, session_id: str) -> list[str]:
    body = wait_idle(api, session_id)
    return [
        "".join(p["content"] for p in m["parts"] if p["type"] == "text")
        for m in body["messages"]
        if m["role"] == "assistant" and m["status"] != "superseded"
    ]


def test_new_chat_streams_the_answer_the_service_stores(app: AppFactory, api: httpx.Client) -> None:
    at = app()
    at.run()
    assert not at.exception
    assert at.title[0].value == "New chat"
    at.chat_input[0].set_value("Hello there [[tokens:25]]").run()
    session_id = session_of(at)
    run_until(at, answered(1))
    assert texts(at, "user") == ["Hello there [[tokens:25]]"]
    stored = stored_text(api, session_id)
    at.run()
    # The transcript rebuilt from stream records equals the materialized message, exactly.
    assert texts(at, "assistant")[0].startswith(stored[0][:40])
    follower = at.session_state["chat_followers"][session_id]
    assert [m.text for m in follower.transcript.visible if m.role == "assistant"] == stored
    assert at.sidebar.metric[0].label == "This session cost"
    assert at.sidebar.metric[0].value != "$0.0000"


def test_opening_a_session_by_url_rebuilds_it_from_the_stream(
    app: AppFactory, api: httpx.Client
) -> None:
    session_id = new_session(api, budget_usd="2")
    body = chat(api, session_id, "First question [[tokens:12]]")
    body = chat(api, session_id, "Second question [[tokens:12]]")
    at = app(session=session_id)
    at.run()
    assert not at.exception
    assert texts(at, "user") == ["First question [[tokens:12]]", "Second question [[tokens:12]]"]
    follower = at.session_state["chat_followers"][session_id]
    visible = follower.transcript.visible
    # Same ids, roles and parts as the service's own materialized messages.
    assert [(m.id, m.role, m.parts) for m in visible] == [
        (m["id"], m["role"], m["parts"]) for m in body["messages"]
    ]
    assert not follower.live
    metrics = {m.label: m.value for m in at.sidebar.metric}
    cost = float(body["cost_usd"])
    assert metrics["This session cost"] == f"${cost:,.4f}"
    assert metrics["Session budget left"] == f"${2 - cost:,.4f}"
    # A rerun reads only the new tail: nothing new, so the offset and transcript stay.
    offset, reads = follower.offset, follower.reads
    at.run()
    assert follower.offset == offset and follower.reads == reads + 1
    assert len(follower.transcript.visible) == len(visible)


def test_tool_call_waits_for_approval_then_runs(app: AppFactory, api: httpx.Client) -> None:
    at = app()
    at.run()
    at.chat_input[0].set_value(
        'Look it up [[tool:search_my_history {"query": "zebra"}]] [[tokens:10]]'
    ).run()
    session_id = session_of(at)
    run_until(at, lambda a: any(b.label == "Approve" for b in a.button))
    assert any(e.label.endswith("waiting for your approval") for e in at.expander)
    next(b for b in at.button if b.label == "Approve").click().run()
    run_until(at, answered(1))
    assert not any(b.label == "Approve" for b in at.button)
    body = wait_idle(api, session_id)
    call = next(p for p in body["messages"][-1]["parts"] if p["type"] == "tool-call")
    assert call["approval"]["approved"] is True
    assert any(e.label == "search_my_history · done" for e in at.expander)


def test_denied_tool_call_is_shown_as_denied(app: AppFactory, api: httpx.Client) -> None:
    at = app()
    at.run()
    at.chat_input[0].set_value('[[tool:search_my_history {"query": "q"}]]').run()
    session_id = session_of(at)
    run_until(at, lambda a: any(b.label == "Deny" for b in a.button))
    next(b for b in at.button if b.label == "Deny").click().run()
    run_until(at, answered(1))
    assert any(e.label == "search_my_history · denied" for e in at.expander)
    body = wait_idle(api, session_id)
    call = next(p for p in body["messages"][-1]["parts"] if p["type"] == "tool-call")
    assert call["approval"]["approved"] is False


def test_stop_keeps_the_partial_answer(app: AppFactory, api: httpx.Client) -> None:
    at = app()
    at.run()
    at.chat_input[0].set_value("Tell me a long story [[tokens:3000]]").run()
    session_id = session_of(at)
    run_until(
        at, lambda a: any(b.label == "Stop" for b in a.button) and bool(texts(a, "assistant"))
    )
    next(b for b in at.button if b.label == "Stop").click().run()
    run_until(at, lambda a: any("Answer ended early: stopped." in c.value for c in a.caption))
    body = wait_idle(api, session_id)
    assert body["messages"][-1]["status"] == "stopped"
    assert not any(b.label == "Stop" for b in at.button)
    assert not at.chat_input[0].proto.disabled


def test_regenerate_replaces_the_answer(app: AppFactory, api: httpx.Client) -> None:
    session_id = new_session(api)
    first = chat(api, session_id, "Pick a word [[tokens:8]]")["messages"][-1]["id"]
    at = app(session=session_id)
    at.run()
    next(b for b in at.button if b.label == "Regenerate").click().run()
    run_until(at, lambda a: a.session_state["chat_followers"][session_id].transcript.get(first)
              .status == "superseded" and answered(1)(a))  # fmt: skip
    body = wait_idle(api, session_id)
    live = [m for m in body["messages"] if m["status"] != "superseded"]
    at.run()
    assert len(texts(at, "assistant")) == 1
    follower = at.session_state["chat_followers"][session_id]
    assert [m.id for m in follower.transcript.visible] == [m["id"] for m in live]


def test_fork_opens_a_new_session_with_the_history(app: AppFactory, api: httpx.Client) -> None:
    session_id = new_session(api)
    chat(api, session_id, "One [[tokens:5]]")
    chat(api, session_id, "Two [[tokens:5]]")
    at = app(session=session_id)
    at.run()
    forks = [b for b in at.button if b.label == "Fork from here"]
    assert len(forks) == 2
    forks[0].click().run()
    fork_id = session_of(at)
    assert fork_id != session_id
    assert texts(at, "user") == ["One [[tokens:5]]"]
    assert any("Forked" in s.value for s in at.success)
    assert api.get(f"/v1/sessions/{fork_id}").json()["message_count"] == 2


def test_text_file_is_sent_inline(app: AppFactory, api: httpx.Client) -> None:
    at = app()
    at.run()
    at.chat_input[0].set_value("Summarize [[tokens:5]]").upload(
        "notes.md", b"# Notes\n\nship it `now`", "text/markdown"
    ).run()
    session_id = session_of(at)
    run_until(at, answered(1))
    content = wait_idle(api, session_id)["messages"][0]["parts"][0]["content"]
    assert content.startswith("Summarize [[tokens:5]]\n\nAttached file `notes.md`:")
    assert "```md\n# Notes\n\nship it `now`\n```" in content


def test_an_image_is_sent_and_shown(app: AppFactory, api: httpx.Client) -> None:
    at = app()
    at.run()
    png = base64.b64decode(PNG)
    at.chat_input[0].set_value("What is this? [[tokens:3]]").upload(
        "shot.png", png, "image/png"
    ).run()
    session_id = session_of(at)
    run_until(at, answered(1))
    user = wait_idle(api, session_id)["messages"][0]
    assert [p["type"] for p in user["parts"]] == ["text", "image"]
    assert user["parts"][1]["name"] == "shot.png" and user["parts"][1]["data"] == PNG
    # The transcript draws the image (as an image element, never as HTML).
    user_bubble = at.chat_message[0]
    assert [type(c).__name__ for c in user_bubble.children.values()] == ["Markdown", "Image"]
    # Something that only claims to be an image is refused by the service, with its reason.
    at.run()
    at.chat_input[0].set_value("and this?").upload("fake.png", b"GIF89a....", "image/png").run()
    assert any("not a image/png" in e.value for e in at.error)


def test_html_in_a_message_is_neutralized(app: AppFactory, api: httpx.Client) -> None:
    payload = '<img src=x onerror="alert(1)"> <script>alert(2)</script> costs $5 [[tokens:3]]'
    session_id = new_session(api)
    chat(api, session_id, payload)
    at = app(session=session_id)
    at.run()
    shown = texts(at, "user")[0]
    assert "\\<img" in shown and "\\<script>" in shown and "\\$5" in shown


def test_unknown_and_malformed_sessions_get_a_clear_message(app: AppFactory) -> None:
    at = app(session="00000000-0000-4000-8000-000000000000")
    at.run()
    assert not at.exception
    assert "does not exist" in at.error[0].value
    at = app(session="not-a-uuid")
    at.run()
    assert "is not a session id" in at.error[0].value
    assert at.title[0].value == "New chat"


def test_an_ended_session_whose_stream_expired_shows_its_saved_messages(
    app: AppFactory, api: httpx.Client
) -> None:
    session_id = new_session(api)
    body = chat(api, session_id, "Keep this [[tokens:8]]")
    assert api.post(f"/v1/sessions/{session_id}/end").status_code == 200
    # What retention does to an ended session's stream after STREAM_RETENTION_DAYS.
    assert api.delete(f"/v1/stream/sessions/{session_id}").status_code == 204
    at = app(session=session_id)
    at.run()
    assert not at.exception and not at.error
    assert any("its stream has expired" in c.value for c in at.caption)
    follower = at.session_state["chat_followers"][session_id]
    assert [(m.id, m.role, m.parts, m.status) for m in follower.transcript.visible] == [
        (m["id"], m["role"], m["parts"], m["status"]) for m in body["messages"]
    ]
    assert texts(at, "user") == ["Keep this [[tokens:8]]"]
    # Read-only, and a rerun does not ask for the missing stream again.
    assert at.chat_input[0].disabled and at.chat_input[0].placeholder == "This session has ended"
    reads = follower.reads
    at.run()
    assert not at.error and follower.reads == reads
