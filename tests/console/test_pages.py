"""History, Usage & cost, Rate limits, Errors and Admin (AppTest) against a real service on the
simulator: each page shows the service's data and its actions reach the service."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from streamlit.testing.v1 import AppTest

from tests.console.conftest import AppFactory, chat, new_session

Row = dict[str, Any]


def open_page(app: AppFactory, page: str) -> AppTest:
    at = app()
    at.run()
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def select_row(at: AppTest, prefix: str, row: int) -> AppTest:
    nonce = at.session_state[f"{prefix}_browser"]["nonce"]
    at.session_state[f"{prefix}_table_{nonce}"] = {"selection": {"rows": [row], "columns": []}}
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def button(at: AppTest, label: str) -> Any:
    return next(b for b in at.button if b.label == label)


def test_history_search_rename_delete_restore_export(app: AppFactory, api: httpx.Client) -> None:
    word = f"zanzibar{uuid.uuid4().hex[:8]}"
    session_id = new_session(api)
    chat(api, session_id, f"Plans for {word} [[tokens:5]]")
    at = open_page(app, "history")
    at.text_input(key="history_q").set_value(word).run()
    table = at.dataframe[0].value
    assert len(table) == 1  # found by a word that is only in a message body
    select_row(at, "history", 0)
    assert at.subheader[0].value  # the session's details are open

    at.text_input(key=f"history_title_{session_id}").set_value(f"Trip {word}").run()
    button(at, "Rename").click().run()
    assert api.get(f"/v1/sessions/{session_id}").json()["title"] == f"Trip {word}"
    assert any("Renamed" in s.value for s in at.success)

    select_row(at, "history", 0)
    button(at, "Markdown").click().run()
    download = at.session_state[f"history_export_{session_id}_md"]
    assert f"Trip {word}".encode() in download.data and download.filename.endswith(".md")

    button(at, "Delete").click().run()
    assert api.get(f"/v1/sessions/{session_id}").status_code == 404
    assert at.info[0].value == "No sessions match."
    at.toggle(key="history_trash").set_value(True).run()
    assert len(at.dataframe[0].value) == 1
    select_row(at, "history", 0)
    button(at, "Restore").click().run()
    assert api.get(f"/v1/sessions/{session_id}").status_code == 200
    assert any("Restored" in s.value for s in at.success)


def test_history_continue_in_chat_opens_the_session(app: AppFactory, api: httpx.Client) -> None:
    word = f"quokka{uuid.uuid4().hex[:8]}"
    session_id = new_session(api)
    chat(api, session_id, f"About {word} [[tokens:4]]")
    at = open_page(app, "history")
    at.text_input(key="history_q").set_value(word).run()
    select_row(at, "history", 0)
    button(at, "Continue in Chat").click().run()
    assert at.query_params["session"] in (session_id, [session_id])
    assert any(word in m.value for m in at.markdown)


def test_usage_dashboard_shows_the_generations(app: AppFactory, api: httpx.Client) -> None:
    chat(api, new_session(api), "Count me [[tokens:6]]")
    at = open_page(app, "usage")
    assert len(at.get("plotly_chart")) == 4
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["Generations"].replace(",", "")) >= 1
    assert metrics["Cost"].startswith("$")
    assert len(at.get("download_button")) == 1  # the CSV


def test_errors_page_links_each_event_to_its_session(app: AppFactory, api: httpx.Client) -> None:
    session_id = new_session(api)
    chat(api, session_id, "Fail please [[fault:invalid_request]]")
    at = open_page(app, "errors")
    table = at.dataframe[0].value
    assert f"/?session={session_id}" in list(table["Session"])
    assert len(at.get("plotly_chart")) == 1


def test_rate_limits_page_shows_limits_and_headroom(app: AppFactory, api: httpx.Client) -> None:
    chat(api, new_session(api), "Headroom [[tokens:3]]")
    at = open_page(app, "limits")
    limits = at.dataframe[0].value
    assert {"session_create", "message_send"} <= set(limits["name"])
    assert any("left" in str(p.proto.text) for p in at.get("progress"))


def test_admin_users_tokens_sessions_and_audit(app: AppFactory, api: httpx.Client) -> None:
    email = f"new-{uuid.uuid4().hex[:6]}@example.com"
    at = open_page(app, "admin")
    at.text_input(key="admin_add_email").set_value(email)
    button(at, "Add").click().run()
    assert not at.exception
    users = api.get("/v1/users").json()["items"]
    added = next(u for u in users if u["email"] == email)
    assert email in [str(v) for v in at.dataframe[0].value["Email"]]

    picker = at.selectbox(key="admin_token_user")
    picker.select_index(next(i for i, o in enumerate(picker.options) if email in o)).run()
    owner = at.selectbox(key="admin_token_user").value
    assert owner["email"] == email
    at.text_input(key="admin_token_name").set_value("ci")
    button(at, "Create token").click().run()
    secret = at.code[0].value
    assert secret and any("shown only once" in s.value for s in at.success)
    tokens = api.get(f"/v1/users/{added['id']}/tokens").json()["items"]
    assert [t["name"] for t in tokens] == ["ci"] and secret.startswith(tokens[0]["prefix"])
    at.run()
    assert not any(c.value == secret for c in at.code)  # shown once, gone on the next run

    session_id = new_session(api, title=f"Audit me {uuid.uuid4().hex[:6]}")
    api.delete(f"/v1/sessions/{session_id}").raise_for_status()
    at.run()
    audit = at.dataframe[-1].value
    assert any(session_id in str(target) for target in audit["Target"])
