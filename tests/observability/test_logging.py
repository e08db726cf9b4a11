"""Structured logs: request ids on every response, ids bound in every line, JSON in production,
stdlib loggers through the same output, and no secret, token or message text in any line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from streams_service.config import Settings
from streams_service.llm import tools as tool_registry
from streams_service.observability.logging import Redactor, configure_logging
from tests.access.conftest import SECRET, AuthApp, bearer
from tests.sessions.conftest import AppFactory
from tests.support import ServerProcess

HEX32 = re.compile(r"[0-9a-f]{32}")


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of the output, each of which must be one JSON object."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
        assert isinstance(value, dict) and {"event", "level", "timestamp"} <= set(value), line
        out.append(value)
    return out


# ---------------------------------------------------------------------- request ids


async def test_every_response_carries_a_request_id(make_app: AppFactory) -> None:
    async with make_app() as (app, client):
        # Generated when the client sends none, on the framework path and the lean stream path.
        health = await client.get("/health")
        assert HEX32.fullmatch(health.headers["x-request-id"])
        created = await client.put("/v1/stream/ids-demo", headers={"Content-Type": "text/plain"})
        assert created.status_code == 201 and HEX32.fullmatch(created.headers["x-request-id"])
        assert health.headers["x-request-id"] != created.headers["x-request-id"]

        # A sane incoming id is kept, on both paths and on errors.
        for method, url in [
            ("GET", "/v1/stream/ids-demo?offset=-1"),
            ("POST", "/v1/sessions"),
            ("GET", "/nope"),
            ("GET", "/v1/stream/missing-stream?offset=-1"),
        ]:
            response = await client.request(method, url, headers={"X-Request-ID": "edge-7f3a.b_9"})
            assert response.headers["x-request-id"] == "edge-7f3a.b_9", (method, url)

        # Anything that could smuggle text into a log line is replaced.
        for bad in ["two words", "x" * 200, "a\u00e9b".encode(), "<script>", ""]:
            response = await client.get("/health", headers={"X-Request-ID": bad})
            assert HEX32.fullmatch(response.headers["x-request-id"]), bad

        # Even an unhandled error's 500 (answered by Starlette's outermost error middleware).
        @app.get("/explode")
        async def explode() -> None:
            raise RuntimeError("boom")

        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as raw:
            failed = await raw.get("/explode", headers={"X-Request-ID": "err-1"})
        assert failed.status_code == 500
        assert failed.headers["x-request-id"] == "err-1"


# ---------------------------------------------------------------------- a production chat


async def test_production_logs_are_json_with_ids_and_never_secrets_or_text(
    auth_app: AuthApp, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    words = secrets.token_hex(6)
    text_1 = f"Please remember the codeword zebra-{words}-quartz for me"
    text_2 = f"And now the second codeword walrus-{words}-ember please"
    async with auth_app(env="production", log_level="DEBUG") as (_app, client, people):
        owner = bearer(people.owner)  # the console's JWT, signed with STREAMS_SECRET
        me = (await client.get("/v1/me", headers=owner)).json()
        created = await client.post(
            "/v1/sessions", json={}, headers={**owner, "X-Request-ID": "create-1"}
        )
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        first = await client.post(
            f"/v1/sessions/{sid}/messages",
            json={"content": f'{text_1} [[tool:calculator {{"expression": "6*7"}}]]'},
            headers={**owner, "X-Request-ID": "send-1"},
        )
        assert first.status_code == 202, first.text
        await wait_idle_as(client, sid, owner)
        # A generation that fails for a reason of our own: the log line comes from the
        # generation task, after the request that started it has answered.

        def broken_specs() -> list[dict[str, Any]]:
            raise RuntimeError(f"could not build tools for {text_2}")

        monkeypatch.setattr(tool_registry, "tool_specs", broken_specs)
        second = await client.post(
            f"/v1/sessions/{sid}/messages",
            json={"content": text_2},
            headers={**owner, "X-Request-ID": "send-2"},
        )
        assert second.status_code == 202
        await wait_idle_as(client, sid, owner)
        read = await client.get(
            f"/v1/stream/sessions/{sid}",
            params={"offset": "-1"},
            headers={**owner, "X-Request-ID": "read-1"},
        )
        assert read.status_code == 200 and read.headers["x-request-id"] == "read-1"
        # A credential that fails still must not be written down.
        refused = await client.get("/v1/me", headers=bearer(people.revoked))
        assert refused.status_code == 401
        logging.getLogger("uvicorn.error").info("stdlib line from %s", "uvicorn")
        monkeypatch.undo()

    captured = capsys.readouterr()
    lines = json_lines(captured.err)
    everything = captured.err + captured.out
    for secret in (SECRET, people.owner, people.revoked, people.other, text_1, text_2, words):
        assert secret not in everything, f"leaked into the log: {secret[:20]}..."

    def one(**match: Any) -> dict[str, Any]:
        found = [line for line in lines if all(line.get(k) == v for k, v in match.items())]
        assert len(found) == 1, (match, found)
        return found[0]

    create = one(event="request", request_id="create-1")
    assert (create["method"], create["path"], create["status"], create["level"]) == (
        "POST",
        "/v1/sessions",
        201,
        "info",
    )
    # The new session's id is bound as soon as it exists; the user's once authenticated.
    assert (create["session_id"], create["user_id"]) == (sid, me["id"])
    sent = one(event="request", request_id="send-1")
    assert sent["path"] == f"/v1/sessions/{sid}/messages" and sent["status"] == 202
    assert sent["session_id"] == sid and sent["user_id"] == me["id"]
    failed = one(event="generation_failed")
    assert failed["level"] == "error" and failed["error"] == "RuntimeError"
    # Bound by the request that started the generation, inherited by its task.
    assert (failed["request_id"], failed["session_id"], failed["user_id"]) == (
        "send-2",
        sid,
        me["id"],
    )
    # The hot path logs its requests at DEBUG only, with the same ids.
    stream_read = one(event="request", request_id="read-1")
    assert stream_read["level"] == "debug" and stream_read["session_id"] == sid
    # Standard-library loggers go through the same JSON output.
    stdlib = one(event="stdlib line from uvicorn")
    assert stdlib["logger"] == "uvicorn.error" and stdlib["level"] == "info"
    # Even at DEBUG, SQLAlchemy never writes its statements and their parameters.
    assert not [line for line in lines if str(line.get("logger", "")).startswith("sqlalchemy")]


async def wait_idle_as(client: httpx.AsyncClient, sid: str, headers: dict[str, str]) -> None:
    for _ in range(1000):
        body = (await client.get(f"/v1/sessions/{sid}", headers=headers)).json()
        if body["active_generation_id"] is None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("generation still running")


# ---------------------------------------------------------------------- the redactor


def test_the_redactor_withholds_credentials_text_and_exception_messages() -> None:
    stream = io.StringIO()
    secret = "streams-secret-" + secrets.token_hex(8)
    anthropic_key = "sk-ant-api03-" + secrets.token_hex(16)
    settings = Settings(
        streams_secret=secret,
        anthropic_api_key=anthropic_key,
        database_url="postgresql://app:pg-pass-5d2e@db.internal:5432/chatops",
        log_format="json",
        log_level="DEBUG",
    )
    configure_logging(settings, stream)
    log = structlog.get_logger("tests.redactor")
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhQGIuYyJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    api_token = "cho_" + secrets.token_urlsafe(24)
    text = "my private question about salaries"
    log.info(
        "chat",
        authorization=f"Bearer {api_token}",
        content=text,
        delta=text,
        query=text,
        api_key=anthropic_key,
        nested={"password": "hunter2hunter2", "note": f"token {jwt} inside", "count": 3},
        input_tokens=12,
    )
    log.warning(f"calling with Bearer {api_token} and {secret} at ?token=abc123def&x=1")
    logging.getLogger("some.library").warning(
        "connecting to %s", "postgresql://app:pg-pass-5d2e@db.internal:5432/chatops"
    )
    try:
        raise ValueError(f"cannot parse {text}")
    except ValueError:
        log.exception("parse_failed", error=ValueError(text))
    output = stream.getvalue()
    for leaked in (secret, anthropic_key, jwt, api_token, text, "hunter2hunter2", "pg-pass-5d2e"):
        assert leaked not in output, leaked
    assert "abc123def" not in output
    lines = json_lines(output)
    chat = lines[0]
    assert chat["content"] == chat["delta"] == chat["query"] == "[redacted]"
    assert chat["authorization"] == chat["api_key"] == "[redacted]"
    assert chat["nested"] == {
        "password": "[redacted]",
        "note": "token [redacted] inside",
        "count": 3,
    }
    assert chat["input_tokens"] == 12  # counts are not credentials
    assert lines[1]["event"] == (
        "calling with Bearer [redacted] and [redacted] at ?token=[redacted]&x=1"
    )
    assert lines[2]["event"] == "connecting to postgresql://app:[redacted]@db.internal:5432/chatops"
    failed = lines[3]
    assert failed["error"] == "ValueError"
    assert "Traceback (most recent call last)" in failed["exception"]
    assert "ValueError (message withheld)" in failed["exception"]
    assert "test_logging.py" in failed["exception"]


def test_development_logs_are_readable_lines() -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_level="INFO"), stream)
    structlog.get_logger("tests.console").info("session_created", count=2)
    logging.getLogger("tests.console").debug("below the level")
    line = stream.getvalue().strip()
    assert "session_created" in line and "count=2" in line
    assert not line.startswith("{")
    assert "below the level" not in stream.getvalue()


# ---------------------------------------------------------------------- a real server


def test_a_served_process_writes_only_json_lines_without_secrets(
    fresh_database_url: str, tmp_path: Path
) -> None:
    words = secrets.token_hex(6)
    text = f"Tell me about the project heron-{words}-violet"
    token = "cho_" + secrets.token_urlsafe(24)
    with (
        ServerProcess(
            fresh_database_url,
            tmp_path,
            LOG_FORMAT="json",
            LOG_LEVEL="DEBUG",
            SIMULATOR_TTFT_MS="0",
            SIMULATOR_TOKENS_PER_S="0",
        ) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as http,
    ):
        # Dev mode ignores the credential, but it is on the wire and must stay off the log.
        headers = {"Authorization": f"Bearer {token}", "X-Request-ID": "served-1"}
        created = http.post("/v1/sessions", json={}, headers=headers)
        assert created.status_code == 201
        sid = created.json()["id"]
        sent = http.post(f"/v1/sessions/{sid}/messages", json={"content": text}, headers=headers)
        assert sent.status_code == 202 and sent.headers["x-request-id"] == "served-1"
        for _ in range(1000):
            if http.get(f"/v1/sessions/{sid}").json()["active_generation_id"] is None:
                break
            time.sleep(0.02)
    err = server.stderr_path.read_text()
    lines = json_lines(err)
    for leaked in (token, text, words):
        assert leaked not in err + server.stdout_path.read_text()
    # uvicorn's own lines, from its first, are JSON through the same pipeline.
    uvicorn_events = [line["event"] for line in lines if line.get("logger") == "uvicorn.error"]
    assert any("Uvicorn running on" in event for event in uvicorn_events), uvicorn_events
    assert any("Application startup complete" in event for event in uvicorn_events)
    sends = [
        line
        for line in lines
        if line["event"] == "request" and line.get("path") == f"/v1/sessions/{sid}/messages"
    ]
    assert [(s["request_id"], s["session_id"], s["user_id"]) for s in sends] == [
        ("served-1", sid, "local")
    ]


def test_a_served_process_logs_each_request_once(fresh_database_url: str, tmp_path: Path) -> None:
    """With an API key (production: no built-in simulator, whose own server setup happened to
    silence it), uvicorn's access log would repeat every request our `request` line records."""
    with (
        ServerProcess(
            fresh_database_url,
            tmp_path,
            LOG_FORMAT="json",
            ANTHROPIC_API_KEY="sk-ant-test",
            ANTHROPIC_BASE_URL="http://127.0.0.1:9",  # never called: no message is sent
        ) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as http,
    ):
        for i in range(3):
            assert http.get("/v1/models", headers={"X-Request-ID": f"once-{i}"}).status_code == 200
    lines = json_lines(server.stderr_path.read_text())
    assert not [line for line in lines if line.get("logger") == "uvicorn.access"]
    logged = [line["request_id"] for line in lines if line["event"] == "request"]
    assert [logged.count(f"once-{i}") for i in range(3)] == [1, 1, 1]


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        ("Authorization: BEARER abcdefghijkl", "Authorization: BEARER "),
        ("Basic dXNlcjpwYXNzd29yZA==", "Basic "),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln here", "jwt "),
        ("key sk-ant-api03-ABCDEFGHIJKLMNOP", "key "),
        ("token cho_ABCDEFGHIJKLMNOPQR", "token "),
        ("phc_ABCDEFGHIJKLMNOPQR", ""),
        ("redis://:hunter22@cache:6379/0", "redis://:"),
        ("/v1/x?Key=abcdef&y=2", "/v1/x?Key="),
    ],
)
def test_every_credential_shape_is_scrubbed_whatever_its_case(raw: str, kept: str) -> None:
    # The patterns run only when a marker fragment is present: none of them may slip past it.
    out = Redactor().text(raw)
    assert "[redacted]" in out
    assert out.startswith(kept)


def test_plain_strings_pass_through_unchanged() -> None:
    for plain in ("GET /v1/sessions/3f2c HTTP/1.1", "200", "generation_finished", ""):
        assert Redactor().text(plain) == plain
