"""SQL of `GET /v1/usage`: tokens, cost, counts and TTFT percentiles of generation rows, grouped.

Two ways to the same numbers:

- From the generation rows (any grouping, any filter). Two statements, both index-only scans
  of `ix_generations_started_model_ttft` on Postgres: the sums (a hash aggregate, parallel)
  and the TTFT percentiles (`percentile_cont` over each group's TTFTs). On Postgres they run
  at once on two connections. SQLite has no `percentile_cont`: it returns the TTFTs in order
  and `percentile_cont` below interpolates exactly as Postgres does.
- Through the hourly rollup (everyone's usage grouped by day, hour and/or model: the ops
  dashboard). Closed hours come from `usage_rollup` (sums, and every TTFT of the hour sorted
  and packed, so percentiles stay exact); the partial hours at either end of the range and
  hours marked dirty (changed since they were rolled up, or still open) come from the
  generation rows; the two are merged here. streams_service/ops/rollup.py maintains it.

Buckets are UTC: Postgres bins with `date_bin` (Postgres 14+; integer arithmetic, no time-zone
lookups per row; migration 0005 keeps planner statistics on exactly these expressions); SQLite
stores UTC text, so `strftime` cuts it.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
    or_,
    select,
    true,
)
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.elements import ColumnElement

from db.models import Generation, UsageRollup, UsageRollupDirty
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


HOUR: Final = timedelta(hours=1)
# Groupings the rollup can answer: it is kept per hour and model, for everyone.
ROLLUP_GROUPS: Final = frozenset(("day", "hour", "model"))


@dataclass(frozen=True, slots=True)
class UsageQuery:
    ranges: tuple[TimeRange, ...]  # disjoint; rows in any of them
    groups: tuple[str, ...]
    user_id: str | None  # only this user's rows; None: everyone's

    @classmethod
    def over(cls, window: TimeRange, groups: tuple[str, ...], user_id: str | None) -> UsageQuery:
        return cls((window,), groups, user_id)


def _key(
    dialect: str, name: str, at: InstrumentedAttribute[datetime] = G.started_at
) -> ColumnElement[Any]:
    """The grouping expression of one group name, labelled `k_<name>` (`at`: the time column;
    the rollup's is its hour)."""
    if name in _COLUMNS:
        return _COLUMNS[name].label(f"k_{name}")
    if dialect == "postgresql":
        origin: ColumnElement[Any] = literal_column("TIMESTAMPTZ '2000-01-01 00:00:00+00'")
        expr = func.date_bin(literal_column(_PG_BINS[name]), at, origin)
    else:
        expr = func.strftime(literal_column(_SQLITE_BINS[name]), at)
    return expr.label(f"k_{name}")


def _where(stmt: Select[Any], q: UsageQuery) -> Select[Any]:
    # The bounds are written into the SQL, not bound: psycopg prepares a statement it has run
    # five times, and Postgres then plans it once for any range, guessing a tiny one (no
    # parallel workers, a sort instead of a hash). With literal bounds every range is planned
    # for what it is.
    spans = []
    for i, span in enumerate(q.ranges):
        start = bindparam(f"start{i}", span.start, type_=G.started_at.type, literal_execute=True)
        end = bindparam(f"end{i}", span.end, type_=G.started_at.type, literal_execute=True)
        spans.append((G.started_at >= start) & (G.started_at < end))
    stmt = stmt.where(or_(*spans))
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


def values_statement(dialect: str, q: UsageQuery) -> Select[Any]:
    """Every TTFT, ordered by group and then TTFT (see `shape_values`)."""
    keys = [_key(dialect, name) for name in q.groups]
    stmt = select(*keys, G.ttft_ms).order_by(*keys, G.ttft_ms)
    return _where(stmt, q).where(G.ttft_ms.is_not(None))


def percentile_statement(dialect: str, q: UsageQuery) -> Select[Any]:
    if dialect != "postgresql":
        return values_statement(dialect, q)
    keys = [_key(dialect, name) for name in q.groups]
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
    return {key: _pair(values) for key, values in shape_values(groups, rows).items()}


def shape_values(groups: Sequence[str], rows: Iterable[Any]) -> dict[Key, list[int]]:
    """Rows of `values_statement` (ordered by key, then TTFT): each key's sorted TTFTs."""
    out: dict[Key, list[int]] = {}
    current: Key | None = None
    values: list[int] = []
    for row in rows:
        key = _row_key(groups, row)
        if key != current:
            current = key
            values = out.setdefault(key, [])
        values.append(int(row.ttft_ms))
    return out


def _pair(values: Sequence[float] | Sequence[int]) -> tuple[float | None, float | None]:
    return _round(percentile_cont(values, 0.5)), _round(percentile_cont(values, 0.95))


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), PERCENTILE_DIGITS)


def percentile_cont(ordered: Sequence[float] | Sequence[int], fraction: float) -> float | None:
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


# ---------------------------------------------------------------------------- the hourly rollup

# TTFTs of a rollup hour: sorted 32-bit integers (the column is an INTEGER), little-endian.
_TTFT_TYPECODE: Final = "i"


def pack_ttfts(ordered: Sequence[int]) -> bytes:
    values = array(_TTFT_TYPECODE, ordered)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def unpack_ttfts(packed: bytes) -> array[int]:
    """The values of packed runs (one or more concatenated: each run sorted, not the whole)."""
    values = array(_TTFT_TYPECODE)
    values.frombytes(packed)
    if sys.byteorder == "big":
        values.byteswap()
    return values


def floor_hour(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def rolled_span(window: TimeRange) -> TimeRange | None:
    """The whole UTC hours inside the window (None if there is not one)."""
    first = floor_hour(window.start)
    last = floor_hour(window.end)
    if first < window.start:
        if first >= last:
            return None  # (and no overflow in the last hour datetime can hold)
        first += HOUR
    return TimeRange(first, last) if first < last else None


def uses_rollup(q: UsageQuery) -> bool:
    return q.user_id is None and set(q.groups) <= ROLLUP_GROUPS


def dirty_hours_statement(span: TimeRange) -> Select[Any]:
    D = UsageRollupDirty
    return select(D.hour).where(D.hour >= span.start, D.hour < span.end).distinct().order_by(D.hour)


def rollup_statement(
    dialect: str, groups: Sequence[str], span: TimeRange, dirty: Iterable[datetime]
) -> Select[Any]:
    """The rollup hours of the span, but the dirty ones, summed per group in SQL; each group's
    packed TTFT runs concatenated (`runs` of them, each sorted)."""
    R = UsageRollup
    keys = [
        R.model.label("k_model") if name == "model" else _key(dialect, name, R.hour)
        for name in groups
    ]
    if dialect == "postgresql":
        ttfts: ColumnElement[Any] = func.string_agg(R.ttfts, literal_column("''::bytea"))
    else:
        # SQLite's group_concat works on text: hex keeps every byte of the runs.
        ttfts = func.group_concat(func.hex(R.ttfts), "")
    stmt = select(
        *keys,
        func.sum(R.input_tokens).label("input_tokens"),
        func.sum(R.output_tokens).label("output_tokens"),
        func.sum(R.cache_read_tokens).label("cache_read_tokens"),
        func.sum(R.cache_write_tokens).label("cache_write_tokens"),
        func.sum(R.cost_micro_usd).label("cost_micro_usd"),
        func.sum(R.generations).label("generations"),
        func.sum(R.errors).label("errors"),
        ttfts.label("ttfts"),
        func.count().label("runs"),
    ).where(R.hour >= span.start, R.hour < span.end)
    skipped = list(dirty)
    if skipped:
        stmt = stmt.where(R.hour.not_in(skipped))
    return stmt.group_by(*keys)


def merge_spans(spans: Iterable[TimeRange]) -> tuple[TimeRange, ...]:
    """Ordered, with touching or overlapping spans joined (fewer ranges in the WHERE)."""
    out: list[TimeRange] = []
    for span in sorted(spans, key=lambda s: s.start):
        if out and span.start <= out[-1].end:
            if span.end > out[-1].end:
                out[-1] = TimeRange(out[-1].start, span.end)
        else:
            out.append(span)
    return tuple(out)


def raw_spans(
    window: TimeRange, rolled: TimeRange, dirty: Iterable[datetime]
) -> tuple[TimeRange, ...]:
    """What the rollup does not answer: the partial hours at each end, and the dirty hours."""
    spans = [TimeRange(hour, hour + HOUR) for hour in dirty]
    if window.start < rolled.start:
        spans.append(TimeRange(window.start, rolled.start))
    if rolled.end < window.end:
        spans.append(TimeRange(rolled.end, window.end))
    return merge_spans(spans)


@dataclass(slots=True)
class Totals:
    """One group's measures while the rollup hours and the generation rows are merged."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_micro_usd: int = 0
    generations: int = 0
    errors: int = 0
    packed: bytes = b""  # runs of packed TTFTs, each sorted
    runs: int = 0
    values: list[int] = field(default_factory=list)  # sorted

    def ttfts(self) -> Sequence[int]:
        """Every TTFT of the group, ascending."""
        if self.runs == 0:
            return self.values
        merged = unpack_ttfts(self.packed)
        if self.runs == 1 and not self.values:
            return merged  # one hour: stored sorted
        merged.extend(self.values)
        # Timsort finds the sorted runs and merges them rather than sorting from scratch.
        return sorted(merged)

    def measures(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "cost_usd": Decimal(self.cost_micro_usd).scaleb(-6),
            "generations": self.generations,
            "errors": self.errors,
        }


def micro_usd(cost: Decimal) -> int:
    """Whole micro-dollars of a cost_usd value or sum (NUMERIC(14, 6): exact)."""
    return int((cost * USD_SCALE).to_integral_value())


def merge(
    groups: Sequence[str],
    rolled: Iterable[Any],
    sums: dict[Key, dict[str, Any]],
    values: dict[Key, list[int]],
) -> dict[Key, tuple[dict[str, Any], tuple[float | None, float | None]]]:
    """The rows of `rollup_statement` plus the sums and TTFTs read from the generation rows for
    the rest of the range: each group's measures, and its TTFT p50 and p95."""
    totals: dict[Key, Totals] = {}
    for row in rolled:
        packed = row.ttfts or b""
        totals[_row_key(groups, row)] = Totals(
            input_tokens=int(row.input_tokens),
            output_tokens=int(row.output_tokens),
            cache_read_tokens=int(row.cache_read_tokens),
            cache_write_tokens=int(row.cache_write_tokens),
            cost_micro_usd=int(row.cost_micro_usd),
            generations=int(row.generations),
            errors=int(row.errors),
            packed=bytes.fromhex(packed) if isinstance(packed, str) else bytes(packed),
            runs=int(row.runs),
        )
    for key, measures in sums.items():
        group = totals.get(key)
        if group is None:
            group = totals[key] = Totals()
        group.input_tokens += measures["input_tokens"]
        group.output_tokens += measures["output_tokens"]
        group.cache_read_tokens += measures["cache_read_tokens"]
        group.cache_write_tokens += measures["cache_write_tokens"]
        group.cost_micro_usd += micro_usd(measures["cost_usd"])
        group.generations += measures["generations"]
        group.errors += measures["errors"]
        group.values = values.get(key, [])
    return {key: (group.measures(), _pair(group.ttfts())) for key, group in totals.items()}
