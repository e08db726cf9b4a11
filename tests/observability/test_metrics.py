"""Prometheus metrics at /metrics: access by role, and every series moving by what happened."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams_service.observability.metrics import Metrics, observe_rate_limited
from tests.access.conftest import AuthApp, bearer
from tests.sessions.conftest import AppFactory, new_session, send, services, stream_records

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: httpx.AsyncClient, **headers: str) -> Samples:
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def wait_for_metric(
    client: httpx.AsyncClient, name: str, expected: float, **labels: str
) -> None:
    for _ in range(500):
        if value(await scrape(client), name, **labels) == expected:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name}{labels} never became {expected}")


async def test_a_chat_moves_generation_token_and_cost_series(make_app: AppFactory) -> None:
    async with make_app() as (_app, client):
        # Titled, so no title generation runs beside the answer.
        sid = await new_session(client, title="metrics")
        before = await scrape(client)
        accepted = await send(client, sid, "Count to a few [[tokens:40]]")
        session = await _wait_idle(client, sid)
        after = await scrape(client)
        finished = next(
            json.loads(r["value"]["chunk"])
            for r in await stream_records(client, sid)
            if r.get("type") == "chunk" and "RUN_FINISHED" in r["value"]["chunk"]
        )
    assert accepted["generation_id"]
    model = session["model"]

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("chatops_generations_total", model=model, status="completed") == 1
    assert delta("chatops_generation_ttft_seconds_count", model=model) == 1
    assert delta("chatops_generation_duration_seconds_count", model=model) == 1
    assert delta("chatops_generation_duration_seconds_sum", model=model) > 0
    usage = finished["usage"]
    assert delta("chatops_tokens_total", model=model, kind="output") == usage["completionTokens"]
    inputs = sum(
        delta("chatops_tokens_total", model=model, kind=kind)
        for kind in ("input", "cache_read", "cache_write_5m", "cache_write_1h")
    )
    assert inputs == usage["promptTokens"] > 0
    cost = Decimal(str(delta("chatops_cost_usd_total", model=model)))
    assert abs(cost - Decimal(str(session["cost_usd"]))) < Decimal("0.000001")
    assert cost > 0
    # The user message, the session row and the answer's coalesced writes were appends.
    assert delta("chatops_stream_appends_total") >= 2


async def test_appends_readers_generations_and_pools_are_counted(make_app: AppFactory) -> None:
    async with make_app() as (app, client):
        stream = "/v1/stream/metrics-demo"
        put = await client.put(stream, headers={"Content-Type": "application/json"})
        assert put.status_code == 201
        before = await scrape(client)
        for i in range(5):
            appended = await client.post(
                stream, content=json.dumps({"n": i}), headers={"Content-Type": "application/json"}
            )
            assert appended.status_code in (200, 204)
        after = await scrape(client)
        assert (
            value(after, "chatops_stream_appends_total")
            - value(before, "chatops_stream_appends_total")
            == 5
        )

        # A long-poll reader waiting at the tail is a live reader until data arrives.
        tail = appended.headers["stream-next-offset"]
        reader = asyncio.create_task(
            client.get(stream, params={"offset": tail, "live": "long-poll"})
        )
        await wait_for_metric(client, "chatops_live_readers", 1)
        await client.post(stream, content=b'{"n": 5}', headers={"Content-Type": "application/json"})
        assert (await reader).status_code == 200
        await wait_for_metric(client, "chatops_live_readers", 0)

        # A generation waiting for an approval is running until it is answered.
        sid = await new_session(client, title="waiting")
        await send(client, sid, '[[tool:search_my_history {"query": "x"}]]')
        call_id = await _approval_requested(client, sid)
        assert value(await scrape(client), "chatops_active_generations") == 1
        answered = await client.post(
            f"/v1/sessions/{sid}/approvals/{call_id}", json={"approved": False}
        )
        assert answered.status_code == 200
        await _wait_idle(client, sid)
        # The session reads idle once the answer is saved; the generation's task ends a moment
        # later, and with it the gauge's count.
        await wait_for_metric(client, "chatops_active_generations", 0)

        # Pool use: a connection held is a connection checked out.
        settings = services(app).settings
        async with services(app).read_engine.connect():
            held = await scrape(client)
        released = await scrape(client)
        assert value(held, "chatops_db_pool_size", pool="read") == settings.db_pool_size
        assert value(held, "chatops_db_pool_size", pool="app") == settings.db_pool_size
        assert value(held, "chatops_db_pool_checked_out", pool="read") == 1
        assert value(released, "chatops_db_pool_checked_out", pool="read") == 0


async def test_rate_limit_rejections_are_counted_by_limit(make_app: AppFactory) -> None:
    async with make_app(rate_limit_messages="1/minute") as (_app, client):
        sid = await new_session(client, title="limited")
        await send(client, sid, "one")
        await _wait_idle(client, sid)
        refused = await client.post(f"/v1/sessions/{sid}/messages", json={"content": "two"})
        assert refused.status_code == 429
        samples = await scrape(client)
        assert value(samples, "chatops_rate_limited_total", limit="message_send") == 1
        # The hook the limiter calls, usable by anything that refuses with 429.
        observe_rate_limited("session_create")
        observe_rate_limited("session_create")
        samples = await scrape(client)
        assert value(samples, "chatops_rate_limited_total", limit="session_create") == 2


async def test_metrics_are_for_ops_admins_and_the_system(auth_app: AuthApp) -> None:
    async with auth_app() as (_app, client, people):
        anonymous = await client.get("/metrics")
        assert anonymous.status_code == 401
        member = await client.get("/metrics", headers=bearer(people.other))
        assert member.status_code == 403
        assert member.json() == {
            "error": "forbidden",
            "detail": "metrics are for ops, admins and the system token",
        }
        for token in (people.ops, people.admin, people.system):
            samples = await scrape(client, **bearer(token))
            assert ("chatops_active_generations", ()) in samples


def test_each_app_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.observe_rate_limited("message_send")
    assert b'chatops_rate_limited_total{limit="message_send"} 1.0' in first.render()
    assert b"message_send" not in second.render()


async def _wait_idle(client: httpx.AsyncClient, sid: str) -> dict[str, Any]:
    for _ in range(1000):
        body: dict[str, Any] = (await client.get(f"/v1/sessions/{sid}")).json()
        if body["active_generation_id"] is None:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError("generation still running")


async def _approval_requested(client: httpx.AsyncClient, sid: str) -> str:
    for _ in range(500):
        for r in await stream_records(client, sid):
            if r.get("type") == "chunk" and "approval-requested" in r["value"]["chunk"]:
                call_id: str = json.loads(r["value"]["chunk"])["data"]["toolCallId"]
                return call_id
        await asyncio.sleep(0.02)
    raise AssertionError("no approval request appeared")


async def test_loop_lag_records_how_late_each_timer_fired() -> None:
    """A clock the test drives: each sleep returns this much later than it was asked to."""
    metrics = Metrics()
    late_by = [0.0, 0.002, 0.6, 0.0]
    now = 100.0

    async def sleep(seconds: float) -> None:
        nonlocal now
        if not late_by:
            raise asyncio.CancelledError  # every planned sample taken
        now += seconds + late_by.pop(0)

    with pytest.raises(asyncio.CancelledError):
        await metrics.sample_loop_lag(0.5, clock=lambda: now, sleep=sleep)
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
    assert samples[("chatops_event_loop_lag_seconds_count", None)] == 4
    assert samples[("chatops_event_loop_lag_seconds_bucket", "0.001")] == 2
    assert samples[("chatops_event_loop_lag_seconds_bucket", "0.0025")] == 3
    assert samples[("chatops_event_loop_lag_seconds_bucket", "0.5")] == 3
    assert samples[("chatops_event_loop_lag_seconds_bucket", "1.0")] == 4
    assert samples[("chatops_event_loop_lag_seconds_sum", None)] == pytest.approx(0.602)


async def test_the_service_samples_its_loop_lag(make_app: AppFactory) -> None:
    async with make_app() as (_app, client):
        # The service samples every 0.5 s; wait (bounded) until two samples are in.
        for _ in range(100):
            samples = await scrape(client)
            if value(samples, "chatops_event_loop_lag_seconds_count") >= 2:
                break
            await asyncio.sleep(0.1)
    assert value(samples, "chatops_event_loop_lag_seconds_count") >= 2
