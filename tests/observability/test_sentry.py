"""Sentry against a local capture server speaking its ingestion protocol (envelopes posted to
/api/<project>/envelope/): the exact events, their tags and environment, and no message text."""

from __future__ import annotations

import asyncio
import gc
import secrets
from typing import Any

import pytest
import sentry_sdk
from fastapi import Request

from streams_service.llm import tools as tool_registry
from tests.observability.capture import CaptureServer, sentry_events, sentry_items
from tests.sessions.conftest import AppFactory, new_session, wait_idle


def exception_type(event: dict[str, Any]) -> str:
    return str(event["exception"]["values"][-1]["type"])


async def test_failures_reach_sentry_tagged_and_without_text(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    words = secrets.token_hex(6)
    text = f"confidential merger notes osprey-{words}-cobalt"
    token = "cho_" + secrets.token_urlsafe(24)
    private = {
        "Authorization": f"Bearer {token}",
        "Cookie": f"console_session={token}",
    }
    with CaptureServer().running() as server:
        dsn = f"http://public@127.0.0.1:{server.port}/1"
        async with make_app(env="test", sentry_dsn_streams=dsn, sentry_traces_sample_rate=1.0) as (
            app,
            client,
        ):
            sid = await new_session(client)

            # A generation failing for a reason of our own, with the user's words in the error.
            def broken_specs() -> list[dict[str, Any]]:
                raise RuntimeError(f"could not build tools for {text}")

            monkeypatch.setattr(tool_registry, "tool_specs", broken_specs)
            sent = await client.post(
                f"/v1/sessions/{sid}/messages",
                json={"content": text},
                headers={**private, "X-Request-ID": "gen-fail-1"},
            )
            assert sent.status_code == 202
            await wait_idle(client, sid)
            monkeypatch.undo()

            # An unhandled error in a route, with text in the body, the query and the error.
            @app.post("/v1/explode")
            async def explode(request: Request) -> None:
                body = await request.json()
                raise LookupError(f"no entry for {body['content']}")

            with pytest.raises(LookupError):
                await client.post(
                    "/v1/explode",
                    params={"q": text},
                    json={"content": text},
                    headers={**private, "X-Request-ID": "explode-1"},
                )

            # A task that fails with nobody awaiting it: asyncio reports it when the task is
            # collected ("Task exception was never retrieved").
            async def orphan() -> None:
                raise KeyError(text)

            task = asyncio.create_task(orphan())
            await asyncio.wait({task})
            del task
            gc.collect()

            sentry_sdk.flush()
            server.wait_for(lambda _: len(sentry_events(server)) >= 3)
        # The lifespan's exit flushed and stopped the SDK.
        assert not sentry_sdk.get_client().is_active()

    events = sentry_events(server)
    # Exactly these: a generation's upstream call that failed inside its task is not reported
    # twice (the asyncio integration's eager report is dropped; the runner's report stays).
    assert sorted(exception_type(e) for e in events) == ["KeyError", "LookupError", "RuntimeError"]
    failed = next(e for e in events if exception_type(e) == "RuntimeError")
    assert failed["environment"] == "test"
    assert failed["tags"]["session_id"] == sid
    assert failed["tags"]["error_code"] == "internal"
    assert failed["tags"]["request_id"] == "gen-fail-1"  # the request that started it
    assert failed["exception"]["values"][-1]["value"] == "(message withheld)"
    frames = failed["exception"]["values"][-1]["stacktrace"]["frames"]
    assert frames and not any("vars" in frame for frame in frames)

    unhandled = next(e for e in events if exception_type(e) == "LookupError")
    assert unhandled["environment"] == "test"
    assert unhandled["tags"]["request_id"] == "explode-1"
    request = unhandled["request"]
    assert request["method"] == "POST" and request["url"].endswith("/v1/explode")
    assert not {"data", "cookies", "query_string"} & set(request)
    headers = {k.lower() for k in request.get("headers", {})}
    assert not {"authorization", "cookie"} & headers

    orphaned = next(e for e in events if exception_type(e) == "KeyError")
    assert orphaned["tags"]["logger"] == "asyncio"

    # Traces were sampled (rate 1.0) and went through the same scrubbing.
    assert any(item.type == "transaction" for item in sentry_items(server))
    everything = server.all_bytes()
    for leaked in (text, words, token):
        assert leaked.encode() not in everything, leaked
    logs = capsys.readouterr()
    assert "Task exception was never retrieved" in logs.err
    for leaked in (text, words, token):
        assert leaked not in logs.err + logs.out


async def test_without_a_dsn_sentry_stays_off(make_app: AppFactory) -> None:
    async with make_app() as (_app, client):
        assert (await client.get("/health")).status_code == 200
        assert not sentry_sdk.get_client().is_active()


def test_the_sdk_is_loaded_only_when_a_dsn_is_set(tmp_path: Any) -> None:
    """Unconfigured, Sentry costs no memory: the service runs without importing it (it and its
    HTTP stack are ~4 MB of every process). Configured, the lifespan imports and starts it."""
    import subprocess
    import sys

    probe = """
import asyncio, sys
from streams_service.app import create_app
from streams_service.config import Settings

async def main(dsn):
    settings = Settings(database_url="sqlite+aiosqlite:///%s/%s.db" % (sys.argv[1], bool(dsn)),
                        sentry_dsn_streams=dsn)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        print("sentry_sdk" in sys.modules, end=" ")

asyncio.run(main(None))
asyncio.run(main("http://public@127.0.0.1:9/1"))
"""
    result = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "True"]
