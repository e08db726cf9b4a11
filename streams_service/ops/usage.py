"""SQL of `GET /v1/usage`: tokens, cost, counts and TTFT percentiles of generation rows, grouped.

Two statements per request, both index-only scans of `ix_generations_started_model_ttft` on
Postgres: the sums (a hash aggregate, parallel) and the TTFT percentiles (`percentile_cont` over
each group's TTFTs). On Postgres they run at once on two connections. SQLite has no
`percentile_cont`: it returns the TTFTs in order and `percentile_cont` below interpolates exactly
as Postgres does, so both databases give the same numbers.

Buckets are UTC: Postgres bins with `date_bin` (Postgres 14+; integer arithmetic, no time-zone
lookups per row; migration 0005 keeps planner statistics on exactly these expressions); SQLite
stores UTC text, so `strftime` cuts it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from sqlalchemy import (
    Integer,
    Select,
    bindparam,
    case,
    cast,
    func,
    literal_column,
    select,
    true,
)
from sqlalchemy.sql.elements import ColumnElement

from db.models import Generation
from streams_service.ops.params import TimeRange

G = Generation
Key = tuple[Any, ...]
# TTFTs are whole milliseconds, so the exact p50 and p95 are multiples of 0.05 ms: rounding to
# 0.01 ms removes the float noise of the interpolation and nothing else, and both databases
# (and any exact computation) give the same number.
PERCENTILE_DIGITS: Final = 2
_PG_BINS: Final = {"day": "INTERVAL '1 day'", "hour": "INTERVAL '1 hour'"}
_SQLITE_BINS: Final = {"day": "'%Y-%m-%dT00:00:00'", "hour": "'%Y-%m-%dT%H:00:00'"}
_COLUMNS: Final = {"model": G.model, "user": G.user_id, "session": G.session_id}
USD_SCALE: Final = 10**6  # cost_usd is NUMERIC(14, 6)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    range: TimeRange
    groups: tuple[str, ...]
    user_id: str | None  # only this user's rows; None: everyone's


def _key(dialect: str, name: str) -> ColumnElement[Any]:
    """The grouping expression of one group name, labelled `k_<name>`."""
    if name in _COLUMNS:
        return _COLUMNS[name].label(f"k_{name}")
    if dialect == "postgresql":
        origin: ColumnElement[Any] = literal_column("TIMESTAMPTZ '2000-01-01 00:00:00+00'")
        expr = func.date_bin(literal_column(_PG_BINS[name]), G.started_at, origin)
    else:
        expr = func.strftime(literal_column(_SQLITE_BINS[name]), G.started_at)
    return expr.label(f"k_{name}")


def _where(stmt: Select[Any], q: UsageQuery) -> Select[Any]:
    # The bounds are written into the SQL, not bound: psycopg prepares a statement it has run
    # five times, and Postgres then plans it once for any range, guessing a tiny one (no
    # parallel workers, a sort instead of a hash). With literal bounds every range is planned
    # for what it is.
    start = bindparam("start", q.range.start, type_=G.started_at.type, literal_execute=True)
    end = bindparam("end", q.range.end, type_=G.started_at.type, literal_execute=True)
    stmt = stmt.where(G.started_at >= start, G.started_at < end)
    if q.user_id is not None:
        stmt = stmt.where(G.user_id == q.user_id)
    return stmt


def sums_statement(dialect: str, q: UsageQuery) -> Select[Any]:
    keys = [_key(dialect, name) for name in q.groups]
    if dialect == "postgresql":
        cost: ColumnElement[Any] = func.sum(G.cost_usd)
    else:
        # SQLite keeps NUMERIC as a float; summing whole micro-dollars keeps the total exact.
        cost = func.sum(cast(func.round(G.cost_usd * USD_SCALE), Integer))
    stmt = select(
        *keys,
        func.sum(G.input_tokens).label("input_tokens"),
        func.sum(G.output_tokens).label("output_tokens"),
        func.sum(G.cache_read_tokens).label("cache_read_tokens"),
        func.sum(G.cache_write_5m_tokens + G.cache_write_1h_tokens).label("cache_write_tokens"),
        cost.label("cost"),
        func.count().label("generations"),
        # A generation that ended with RUN_ERROR carries its error code (interrupted included).
        func.sum(case((G.error_code.is_not(None), 1), else_=0)).label("errors"),
    )
    return _where(stmt, q).group_by(*keys)


def percentile_statement(dialect: str, q: UsageQuery) -> Select[Any]:
    keys = [_key(dialect, name) for name in q.groups]
    if dialect != "postgresql":
        stmt = select(*keys, G.ttft_ms).order_by(*keys, G.ttft_ms)
        return _where(stmt, q).where(G.ttft_ms.is_not(None))
    # `percentile_cont ... GROUP BY` would sort every row by group first; collecting each
    # group's TTFTs in a hash aggregate and sorting only within groups is about twice as fast.
    groups = (
        _where(select(*keys, func.array_agg(G.ttft_ms).label("ttfts")), q)
        .where(G.ttft_ms.is_not(None))
        .group_by(*keys)
        .subquery("g")
    )
    value = func.unnest(groups.c.ttfts).column_valued("v")
    pct = select(
        func.percentile_cont(0.5).within_group(value).label("p50"),
        func.percentile_cont(0.95).within_group(value).label("p95"),
    ).lateral("p")
    return select(*(groups.c[f"k_{name}"] for name in q.groups), pct.c.p50, pct.c.p95).select_from(
        groups.join(pct, true())
    )


def _key_value(name: str, raw: Any) -> Any:
    if name not in ("day", "hour") or raw is None:
        return raw
    if isinstance(raw, str):  # SQLite: UTC text
        return datetime.fromisoformat(raw).replace(tzinfo=UTC)
    assert isinstance(raw, datetime)
    return raw.astimezone(UTC)


def _row_key(groups: Sequence[str], row: Any) -> Key:
    return tuple(_key_value(name, getattr(row, f"k_{name}")) for name in groups)


def shape_sums(
    dialect: str, groups: Sequence[str], rows: Iterable[Any]
) -> dict[Key, dict[str, Any]]:
    out: dict[Key, dict[str, Any]] = {}
    for row in rows:
        cost = row.cost or 0
        out[_row_key(groups, row)] = {
            "input_tokens": int(row.input_tokens or 0),
            "output_tokens": int(row.output_tokens or 0),
            "cache_read_tokens": int(row.cache_read_tokens or 0),
            "cache_write_tokens": int(row.cache_write_tokens or 0),
            "cost_usd": Decimal(cost) if dialect == "postgresql" else Decimal(cost) / USD_SCALE,
            "generations": int(row.generations),
            "errors": int(row.errors or 0),
        }
    return out


def shape_percentiles(
    dialect: str, groups: Sequence[str], rows: Iterable[Any]
) -> dict[Key, tuple[float | None, float | None]]:
    out: dict[Key, tuple[float | None, float | None]] = {}
    if dialect == "postgresql":
        for row in rows:
            out[_row_key(groups, row)] = (_round(row.p50), _round(row.p95))
        return out
    # SQLite: rows arrive ordered by key, then TTFT; each run of one key is a sorted sample.
    current: Key | None = None
    values: list[float] = []
    for row in rows:
        key = _row_key(groups, row)
        if key != current:
            if current is not None:
                out[current] = _pair(values)
            current, values = key, []
        values.append(float(row.ttft_ms))
    if current is not None:
        out[current] = _pair(values)
    return out


def _pair(values: Sequence[float]) -> tuple[float | None, float | None]:
    return _round(percentile_cont(values, 0.5)), _round(percentile_cont(values, 0.95))


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), PERCENTILE_DIGITS)


def percentile_cont(ordered: Sequence[float], fraction: float) -> float | None:
    """Postgres' `percentile_cont`: linear interpolation between the two nearest ranks of an
    ascending sample (rank = fraction * (n - 1))."""
    if not ordered:
        return None
    position = fraction * (len(ordered) - 1)
    lower = math.floor(position)
    upper = math.ceil(position)
    first = ordered[lower]
    return first + (ordered[upper] - first) * (position - lower)


def sort_key(key: Key) -> tuple[Any, ...]:
    """Ascending by each group value; a missing value (no user: the system) sorts last."""
    return tuple((value is None, "" if value is None else value) for value in key)
