"""SQL of the ops read routes other than usage: error events, the audit log, rate-limit
rejections and the latest upstream rate-limit headroom. Callers own the session."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Text, and_, cast, func, literal_column, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.elements import ColumnElement

from db.models import AuditEntry, ErrorEvent, Generation, RateLimitEvent
from streams_service.ops.params import TimeRange

_SQLITE_BINS = {"day": "'%Y-%m-%dT00:00:00'", "hour": "'%Y-%m-%dT%H:00:00'"}


def _older_than(
    at: InstrumentedAttribute[datetime],
    row_id: InstrumentedAttribute[int],
    cursor: tuple[datetime, int],
) -> ColumnElement[bool]:
    """Rows after the cursor in newest-first order (the expanded form uses the `at` index)."""
    cursor_at, cursor_id = cursor
    return or_(at < cursor_at, and_(at == cursor_at, row_id < cursor_id))


async def error_events(
    db: AsyncSession,
    window: TimeRange,
    *,
    type_: str | None,
    session_id: str | None,
    cursor: tuple[datetime, int] | None,
    limit: int,
) -> list[ErrorEvent]:
    """Newest first; one row more than `limit` tells the caller there is a next page."""
    E = ErrorEvent
    stmt = select(E).where(E.at >= window.start, E.at < window.end)
    if type_ is not None:
        stmt = stmt.where(E.type == type_)
    if session_id is not None:
        stmt = stmt.where(E.session_id == session_id)
    if cursor is not None:
        stmt = stmt.where(_older_than(E.at, E.id, cursor))
    stmt = stmt.order_by(E.at.desc(), E.id.desc()).limit(limit + 1)
    return list((await db.execute(stmt)).scalars())


async def error_counts(
    db: AsyncSession, window: TimeRange, *, session_id: str | None
) -> dict[str, int]:
    """Events per type over the range (the chart keeps every type whatever `type` filters)."""
    E = ErrorEvent
    stmt = select(E.type, func.count()).where(E.at >= window.start, E.at < window.end)
    if session_id is not None:
        stmt = stmt.where(E.session_id == session_id)
    rows = await db.execute(stmt.group_by(E.type))
    return {str(kind): int(count) for kind, count in sorted(rows, key=lambda r: str(r[0]))}


async def audit_entries(
    db: AsyncSession,
    window: TimeRange,
    *,
    action: str | None,
    cursor: tuple[datetime, int] | None,
    limit: int,
) -> list[AuditEntry]:
    A = AuditEntry
    stmt = select(A).where(A.at >= window.start, A.at < window.end)
    if action is not None:
        stmt = stmt.where(A.action == action)
    if cursor is not None:
        stmt = stmt.where(_older_than(A.at, A.id, cursor))
    stmt = stmt.order_by(A.at.desc(), A.id.desc()).limit(limit + 1)
    return list((await db.execute(stmt)).scalars())


def _bucket(dialect: str, bucket: str) -> ColumnElement[Any]:
    R = RateLimitEvent
    if dialect == "postgresql":
        return func.date_bin(
            literal_column(f"INTERVAL '1 {bucket}'"),
            R.at,
            literal_column("TIMESTAMPTZ '2000-01-01 00:00:00+00'"),
        )
    return func.strftime(literal_column(_SQLITE_BINS[bucket]), R.at)


async def rejections(
    db: AsyncSession, dialect: str, window: TimeRange, bucket: str
) -> list[dict[str, Any]]:
    """Rejected requests per time bucket and limit, oldest bucket first."""
    R = RateLimitEvent
    key = _bucket(dialect, bucket).label("bucket")
    stmt = (
        select(key, R.limit_name, func.count().label("n"))
        .where(R.at >= window.start, R.at < window.end)
        .group_by(key, R.limit_name)
    )
    out = [
        {"bucket": _as_utc(row.bucket), "limit_name": row.limit_name, "count": int(row.n)}
        for row in await db.execute(stmt)
    ]
    out.sort(key=lambda r: (r["bucket"], r["limit_name"]))
    return out


async def recent_rejections(
    db: AsyncSession, window: TimeRange, limit: int
) -> list[RateLimitEvent]:
    R = RateLimitEvent
    stmt = (
        select(R)
        .where(R.at >= window.start, R.at < window.end)
        .order_by(R.at.desc(), R.id.desc())
        .limit(limit)
    )
    return list((await db.execute(stmt)).scalars())


async def latest_upstream_headroom(db: AsyncSession) -> dict[str, Any] | None:
    """The `anthropic-ratelimit-*` headers of the most recent generation that received some.

    Walks the started_at index backwards; generations without headers (titles, failures before
    the response) store SQL NULL, JSON `null` or `{}`, all skipped in SQL."""
    G = Generation
    as_text = cast(G.ratelimit, Text)
    stmt = (
        select(G.id, G.model, G.started_at, G.finished_at, G.ratelimit)
        .where(G.ratelimit.is_not(None), as_text.not_in(["null", "{}"]))
        .order_by(G.started_at.desc())
        .limit(1)
    )
    row = (await db.execute(stmt)).first()
    if row is None or not isinstance(row.ratelimit, dict):
        return None
    return {
        "at": row.finished_at or row.started_at,
        "generation_id": row.id,
        "model": row.model,
        "headers": dict(sorted(row.ratelimit.items())),
    }


def _as_utc(raw: Any) -> datetime:
    if isinstance(raw, str):  # SQLite: UTC text
        return datetime.fromisoformat(raw).replace(tzinfo=UTC)
    assert isinstance(raw, datetime)
    return raw.astimezone(UTC)
