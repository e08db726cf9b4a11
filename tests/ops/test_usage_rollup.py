"""The hourly usage rollup: maintained by triggers and the sweeper, and `GET /v1/usage` read
through it gives exactly what the generation rows give, on both databases."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from sqlalchemy import delete, insert, select, update

from db.models import Generation, UsageRollup, UsageRollupDirty
from streams_service.ops import rollup, service, usage
from streams_service.ops.params import TimeRange
from tests.ops.conftest import acting_as, db_of, iso, person
from tests.ops.test_usage import GROUPINGS, MODELS, _comparable, _generation, _seed, expected_rows
from tests.sessions.conftest import AppFactory

HOUR = timedelta(hours=1)


@pytest.fixture
async def api(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    # The tests sweep when they mean to; the background sweeper must not do it behind them.
    monkeypatch.setattr(rollup, "SWEEP_INTERVAL_S", 3600.0)
    async with make_app() as pair:
        yield pair


async def _usage(client: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    response = await client.get("/v1/usage", params=params)
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()["rows"]
    return _comparable(rows)


async def _sweep(app: FastAPI) -> int:
    return await rollup.sweep(db_of(app))


async def _dirty(app: FastAPI, slot: datetime, days: int = 10) -> set[datetime]:
    D = UsageRollupDirty
    async with db_of(app)() as db:
        rows = await db.execute(
            select(D.hour).where(D.hour >= slot, D.hour < slot + timedelta(days=days))
        )
        return set(rows.scalars())


async def _rollup(app: FastAPI, slot: datetime) -> dict[tuple[datetime, str], Any]:
    R = UsageRollup
    async with db_of(app)() as db:
        rows = await db.execute(select(R).where(R.hour >= slot, R.hour < slot + timedelta(days=10)))
        return {(r.hour, r.model): r for r in rows.scalars()}


def _hour_of(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def _hours(rows: list[Generation]) -> set[datetime]:
    return {_hour_of(g.started_at) for g in rows}


class Spy:
    """Counts the calls of a function of `usage` (which statements a request ran)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.calls = 0
        real: Callable[..., Any] = getattr(usage, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(usage, name, counted)


async def test_the_sweep_builds_exact_hours_and_reads_through_them_agree(
    api: tuple[FastAPI, httpx.AsyncClient], slot: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client = api
    users: list[str | None] = [person().user_id, person().user_id, None]
    rows = await _seed(app, slot, users)
    window = {"from": iso(slot), "to": iso(slot + timedelta(days=3))}
    # Every hour written to is marked, in the writer's transaction.
    assert await _dirty(app, slot) == _hours(rows)
    before = {g: await _usage(client, group_by=g, **window) for g in GROUPINGS}

    assert await _sweep(app) >= len(_hours(rows))
    assert await _dirty(app, slot) == set()
    stored = await _rollup(app, slot)
    by_hour: dict[tuple[datetime, str], list[Generation]] = defaultdict(list)
    for g in rows:
        by_hour[(_hour_of(g.started_at), g.model)].append(g)
    assert set(stored) == set(by_hour)
    for key, members in by_hour.items():
        r = stored[key]
        assert r.generations == len(members)
        assert r.errors == sum(1 for g in members if g.error_code is not None)
        assert r.input_tokens == sum(g.input_tokens for g in members)
        assert r.cache_write_tokens == sum(
            g.cache_write_5m_tokens + g.cache_write_1h_tokens for g in members
        )
        assert Decimal(r.cost_micro_usd) / 10**6 == sum((g.cost_usd for g in members), Decimal(0))
        assert list(usage.unpack_ttfts(r.ttfts)) == sorted(
            g.ttft_ms for g in members if g.ttft_ms is not None
        )

    # Whole hours, nothing dirty: the rollup alone answers (no generation row is summed), and
    # says what the rows say, for every grouping (user and session still read the rows).
    sums = Spy(monkeypatch, "sums_statement")
    for grouping in ("day", "hour", "model", "day,model", "hour,model", "model,day"):
        body = await _usage(client, group_by=grouping, **window)
        assert body == expected_rows(rows, grouping.split(",")), grouping
    assert sums.calls == 0
    for grouping in GROUPINGS:
        body = await _usage(client, group_by=grouping, **window)
        assert body == before[grouping] == expected_rows(rows, grouping.split(",")), grouping


async def test_partial_hours_and_day_boundaries_mix_rollup_and_rows(
    api: tuple[FastAPI, httpx.AsyncClient], slot: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client = api
    rows = await _seed(app, slot, [person().user_id])
    await _sweep(app)
    rollup_reads = Spy(monkeypatch, "rollup_statement")
    # Ends inside hours, one of them the hour before a midnight with rows either side of it.
    windows = [
        (slot + timedelta(minutes=30), slot + timedelta(days=2, hours=14, minutes=30)),
        (slot + timedelta(hours=23, minutes=59, seconds=59), slot + timedelta(days=1, seconds=1)),
        (slot + timedelta(hours=2, minutes=1), slot + timedelta(days=1, hours=23, minutes=59)),
        (
            slot + timedelta(days=2, hours=13, seconds=1),
            slot + timedelta(days=2, hours=14, seconds=1),
        ),
    ]
    for start, end in windows:
        inside = [g for g in rows if start <= g.started_at < end]
        for grouping in ("day", "hour", "day,model", "model"):
            body = await _usage(client, group_by=grouping, **{"from": iso(start), "to": iso(end)})
            assert body == expected_rows(inside, grouping.split(",")), (start, end, grouping)
    # The second and the last window hold no whole hour: the rows alone answer them.
    assert rollup_reads.calls == 2 * 4
    # The ends of time: no bucket arithmetic overflows.
    for start, end in (
        ("9999-12-31T23:30:00Z", "9999-12-31T23:59:00Z"),
        ("0001-01-01T00:30:00Z", "0001-01-01T05:00:00Z"),
    ):
        assert await _usage(client, group_by="day,model", **{"from": start, "to": end}) == []
    # The row a microsecond before midnight is in the last hour of its day, the one at
    # midnight in the first hour of the next.
    stored = await _rollup(app, slot)
    late = [g for g in rows if g.started_at == slot + timedelta(days=1) - timedelta(microseconds=1)]
    midnight = [g for g in rows if g.started_at == slot + timedelta(days=1)]
    assert (slot + timedelta(hours=23), late[0].model) in stored
    assert (slot + timedelta(days=1), midnight[0].model) in stored


async def test_late_updated_and_deleted_rows_make_their_hours_dirty_until_swept(
    api: tuple[FastAPI, httpx.AsyncClient], slot: datetime
) -> None:
    app, client = api
    rng = random.Random(7)
    rows = await _seed(app, slot, [person().user_id])
    running = _generation(rng, slot + timedelta(hours=30, minutes=5), None, "s", MODELS[0])
    running.status, running.ttft_ms, running.error_code = "running", None, None
    running.input_tokens = running.output_tokens = 0
    running.cost_usd = Decimal(0)
    async with db_of(app).begin() as db:
        db.add(running)
    rows.append(running)
    await _sweep(app)
    window = {"from": iso(slot), "to": iso(slot + timedelta(days=4))}
    assert await _dirty(app, slot) == set()

    # A heartbeat (or any column the rollup does not add up) marks nothing.
    async with db_of(app).begin() as db:
        await db.execute(
            update(Generation)
            .where(Generation.id == running.id)
            .values(heartbeat_at=datetime.now(UTC), owner="another-replica")
        )
    assert await _dirty(app, slot) == set()

    moved, gone = rows[3], rows[4]
    late = _generation(rng, slot + timedelta(days=3, hours=5), None, "s", MODELS[1])
    new_start = slot + timedelta(days=3, hours=7, minutes=1)
    async with db_of(app).begin() as db:
        # A generation finishing long after its hour was rolled up.
        await db.execute(
            update(Generation)
            .where(Generation.id == running.id)
            .values(status="completed", input_tokens=900, cost_usd=Decimal("0.123457"), ttft_ms=77)
        )
        # A row arriving late, into an hour that had none.
        db.add(late)
        # A row moved to another day; a row deleted.
        await db.execute(
            update(Generation).where(Generation.id == moved.id).values(started_at=new_start)
        )
        await db.execute(delete(Generation).where(Generation.id == gone.id))
    running.status, running.input_tokens, running.ttft_ms = "completed", 900, 77
    running.cost_usd = Decimal("0.123457")
    moved_from = _hour_of(moved.started_at)
    moved.started_at = new_start
    rows = [g for g in rows if g is not gone] + [late]
    assert await _dirty(app, slot) == {
        _hour_of(running.started_at),
        _hour_of(late.started_at),
        moved_from,
        _hour_of(new_start),
        _hour_of(gone.started_at),
    }
    # Dirty hours are read from the rows: the answer is current before the sweep...
    for grouping in ("day,model", "hour", "model"):
        assert await _usage(client, group_by=grouping, **window) == expected_rows(
            rows, grouping.split(",")
        )
    # ... and after it, from the rebuilt hours (the deleted row's hour may be empty now).
    await _sweep(app)
    assert await _dirty(app, slot) == set()
    stored = await _rollup(app, slot)
    assert stored[(_hour_of(running.started_at), running.model)].input_tokens >= 900
    assert (_hour_of(late.started_at), late.model) in stored
    for grouping in ("day,model", "hour", "model", "day"):
        assert await _usage(client, group_by=grouping, **window) == expected_rows(
            rows, grouping.split(",")
        )


async def test_a_change_the_sweep_did_not_see_keeps_its_hour_dirty(
    api: tuple[FastAPI, httpx.AsyncClient], slot: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A marker written after the sweep read the markers (a writer committing during the sweep,
    on Postgres) must survive it: only the markers the sweep saw are deleted."""
    app, client = api
    rows = await _seed(app, slot, [person().user_id])
    target = _hour_of(rows[0].started_at)
    real_rebuild = rollup.rebuild

    async def rebuild_with_a_concurrent_writer(db: Any, dialect: str, hours: Any) -> None:
        if target in hours:
            await db.execute(insert(UsageRollupDirty).values(hour=target))
        await real_rebuild(db, dialect, hours)

    monkeypatch.setattr(rollup, "rebuild", rebuild_with_a_concurrent_writer)
    await _sweep(app)
    assert await _dirty(app, slot) == {target}
    monkeypatch.setattr(rollup, "rebuild", real_rebuild)
    window = {"from": iso(slot), "to": iso(slot + timedelta(days=3))}
    assert await _usage(client, group_by="hour", **window) == expected_rows(rows, ["hour"])
    await _sweep(app)
    assert await _dirty(app, slot) == set()


async def test_open_hours_are_not_swept(
    api: tuple[FastAPI, httpx.AsyncClient], slot: datetime
) -> None:
    app, client = api
    rows = await _seed(app, slot, [person().user_id])
    now = slot + timedelta(days=1, hours=2, minutes=30)
    await rollup.sweep(db_of(app), now=now)
    # Hours up to the one `now` is in are rolled up; that one and later ones are still dirty.
    assert await _dirty(app, slot) == {h for h in _hours(rows) if h >= _hour_of(now)}
    window = {"from": iso(slot), "to": iso(slot + timedelta(days=3))}
    assert await _usage(client, group_by="day,model", **window) == expected_rows(
        rows, ["day", "model"]
    )


async def test_members_read_their_own_rows_and_ops_the_rollup(
    api: tuple[FastAPI, httpx.AsyncClient], slot: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client = api
    alice, bob = person(), person()
    rows = await _seed(app, slot, [alice.user_id, bob.user_id])
    await _sweep(app)
    window = {"from": iso(slot), "to": iso(slot + timedelta(days=3))}
    alices = [g for g in rows if g.user_id == alice.user_id]
    rollup_reads = Spy(monkeypatch, "rollup_statement")
    with acting_as(app, alice):
        # The rollup is everyone's: a member's usage never comes from it.
        assert await _usage(client, group_by="day,model", **window) == expected_rows(
            alices, ["day", "model"]
        )
        assert await _usage(client, group_by="hour", **window) == expected_rows(alices, ["hour"])
    assert rollup_reads.calls == 0
    with acting_as(app, person("ops")):
        assert await _usage(client, group_by="day,model", **window) == expected_rows(
            rows, ["day", "model"]
        )
        assert rollup_reads.calls == 1
        bobs = await _usage(client, group_by="model", user=str(bob.user_id), **window)
        assert bobs == expected_rows([g for g in rows if g.user_id == bob.user_id], ["model"])
        assert rollup_reads.calls == 1


async def test_a_rollup_still_being_built_is_bypassed(
    api: tuple[FastAPI, httpx.AsyncClient], slot: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, client = api
    rows = await _seed(app, slot, [person().user_id])
    assert len(_hours(rows)) > 3
    monkeypatch.setattr(service, "MAX_DIRTY_HOURS", 3)
    rollup_reads = Spy(monkeypatch, "rollup_statement")
    percentiles = Spy(monkeypatch, "percentile_statement")
    window = {"from": iso(slot), "to": iso(slot + timedelta(days=3))}
    assert await _usage(client, group_by="day,model", **window) == expected_rows(
        rows, ["day", "model"]
    )
    assert (rollup_reads.calls, percentiles.calls) == (0, 1)


def test_packed_runs_merge_into_exact_percentiles() -> None:
    rng = random.Random(3)
    runs = [sorted(rng.randrange(0, 3000) for _ in range(rng.randrange(0, 40))) for _ in range(9)]
    runs.append([5, 5, 5, 2_147_483_647])  # duplicates and the largest INTEGER
    extra = sorted(rng.randrange(0, 3000) for _ in range(17))
    for packed_runs, values in ((runs, extra), (runs[:1], []), ([], extra), ([], [])):
        packed = b"".join(usage.pack_ttfts(r) for r in packed_runs)
        assert len(packed) == 4 * sum(len(r) for r in packed_runs)
        totals = usage.Totals(packed=packed, runs=len(packed_runs), values=values)
        everything = sorted([v for r in packed_runs for v in r] + values)
        assert list(totals.ttfts()) == everything
        p50, p95 = usage._pair(totals.ttfts())
        if everything:
            assert p50 == round(float(np.percentile(everything, 50)), 2)
            assert p95 == round(float(np.percentile(everything, 95)), 2)
        else:
            assert (p50, p95) == (None, None)


def test_only_whole_hours_are_read_from_the_rollup() -> None:
    at = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    assert usage.rolled_span(TimeRange(at, at + HOUR)) == TimeRange(at, at + HOUR)
    assert usage.rolled_span(TimeRange(at + timedelta(minutes=1), at + 2 * HOUR)) == TimeRange(
        at + HOUR, at + 2 * HOUR
    )
    assert usage.rolled_span(TimeRange(at + timedelta(seconds=1), at + HOUR)) is None
    last = datetime.max.replace(tzinfo=UTC)
    assert usage.rolled_span(TimeRange(last - timedelta(minutes=30), last)) is None
    window = TimeRange(at - timedelta(minutes=5), at + 5 * HOUR + timedelta(minutes=5))
    span = TimeRange(at, at + 5 * HOUR)
    # Touching spans join: the dirty last hour and the partial hour after it are one range.
    assert usage.raw_spans(window, span, [at + HOUR, at + 4 * HOUR]) == (
        TimeRange(window.start, at),
        TimeRange(at + HOUR, at + 2 * HOUR),
        TimeRange(at + 4 * HOUR, window.end),
    )
    assert usage.raw_spans(span, span, []) == ()
