"""Ops reads (DESIGN §3, §4): who may see what, and the shape of each answer.

Members see only their own usage; ops, admins and the system principal see everyone's usage,
errors and rate limits; the audit trail is for admins and the system principal. Reads run on
the autocommit read pool: aggregates need no transaction, and on SQLite the transactional pool
would take the write lock (BEGIN IMMEDIATE) for a read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any, Final

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from streams_service.access.limits import (
    AUTH_FAILURE,
    MESSAGE_SEND,
    SCOPES,
    SESSION_CREATE,
    RateLimiter,
)
from streams_service.access.principal import Principal
from streams_service.config import Settings
from streams_service.errors import Forbidden
from streams_service.ops import queries, usage
from streams_service.ops.params import (
    TimeRange,
    decode_cursor,
    encode_cursor,
    parse_choice,
    parse_group_by,
    parse_limit,
    parse_range,
    parse_text,
)
from streams_service.ops.usage import UsageQuery

USAGE_DEFAULT_RANGE: Final = timedelta(days=30)
EVENTS_DEFAULT_RANGE: Final = timedelta(days=7)
RATELIMITS_DEFAULT_RANGE: Final = timedelta(days=1)
# More groups than a dashboard can draw (a year by session, say) is cut here and flagged.
MAX_USAGE_ROWS: Final = 10_000
# Past this many dirty hours in a range (a rollup still being built after the migration or a
# bulk load), usage is read from the generation rows alone: Postgres' own percentile sort
# then beats shipping the dirty hours' TTFTs to be merged here.
MAX_DIRTY_HOURS: Final = 48
# Each group's measures and its TTFT p50 and p95.
UsageGroups = dict[usage.Key, tuple[dict[str, Any], tuple[float | None, float | None]]]
PAGE_DEFAULT, PAGE_MAX = 50, 200
RECENT_REJECTIONS: Final = 50


class OpsService:
    def __init__(
        self, settings: Settings, read_engine: AsyncEngine, limiter: RateLimiter | None = None
    ) -> None:
        self.settings = settings
        self.read_engine = read_engine
        self.dialect = read_engine.dialect.name
        self.limiter = limiter

    @asynccontextmanager
    async def _reader(self) -> AsyncIterator[AsyncSession]:
        async with AsyncSession(self.read_engine) as db:
            yield db

    # ------------------------------------------------------------------ usage

    async def usage(
        self,
        who: Principal,
        *,
        raw_from: str | None,
        raw_to: str | None,
        raw_group_by: str | None,
        raw_user: str | None,
    ) -> dict[str, Any]:
        window = parse_range(raw_from, raw_to, USAGE_DEFAULT_RANGE)
        groups = parse_group_by(raw_group_by)
        user = parse_text("user", raw_user, 64)
        if not who.reads_all:
            if who.user_id is None or (user is not None and user != who.user_id):
                raise Forbidden("members see only their own usage; leave out `user`")
            user = who.user_id
        query = UsageQuery.over(window, groups, user)
        span = usage.rolled_span(window) if usage.uses_rollup(query) else None
        found = None
        if span is not None:
            found = await self._usage_from_rollup(query, window, span)
        if found is None:
            found = await self._usage_from_rows(query)
        keys = sorted(found, key=usage.sort_key)
        rows = []
        for key in keys[:MAX_USAGE_ROWS]:
            measures, (p50, p95) = found[key]
            row = dict(zip(groups, key, strict=True))
            row.update(measures, ttft_p50_ms=p50, ttft_p95_ms=p95)
            rows.append(row)
        return {
            "rows": rows,
            "from": window.start,
            "to": window.end,
            "group_by": list(groups),
            "truncated": len(keys) > MAX_USAGE_ROWS,
        }

    async def _usage_from_rows(self, query: UsageQuery) -> UsageGroups:
        groups = query.groups
        sums_stmt = usage.sums_statement(self.dialect, query)
        pct_stmt = usage.percentile_statement(self.dialect, query)
        if self.dialect == "postgresql":
            # The sums and the percentile sort are independent: one connection each, at once.
            async with self._reader() as a, self._reader() as b:
                sums_rows, pct_rows = await asyncio.gather(
                    a.execute(sums_stmt), b.execute(pct_stmt)
                )
                sums = usage.shape_sums(self.dialect, groups, sums_rows)
                pcts = usage.shape_percentiles(self.dialect, groups, pct_rows)
        else:
            async with self._reader() as db:
                sums = usage.shape_sums(self.dialect, groups, await db.execute(sums_stmt))
                pcts = usage.shape_percentiles(self.dialect, groups, await db.execute(pct_stmt))
        return {key: (measures, pcts.get(key, (None, None))) for key, measures in sums.items()}

    async def _usage_from_rollup(
        self, query: UsageQuery, window: TimeRange, span: TimeRange
    ) -> UsageGroups | None:
        """Whole hours from the rollup, the rest from the generation rows (usage.py). None when
        too many hours are dirty (a rollup still being built): the rows alone are then faster."""
        groups = query.groups
        # One connection, a snapshot per statement: which hours come from the rollup and which
        # from the rows is decided once, from `dirty`, so no hour is counted twice or missed,
        # and each is exact as of when it was read (a sweep replaces an hour atomically).
        async with self._reader() as db:
            dirty = list((await db.execute(usage.dirty_hours_statement(span))).scalars())
            if len(dirty) > MAX_DIRTY_HOURS:
                return None
            rollup_stmt = usage.rollup_statement(self.dialect, groups, span, dirty)
            rolled = (await db.execute(rollup_stmt)).all()
            sums: dict[usage.Key, dict[str, Any]] = {}
            values: dict[usage.Key, list[int]] = {}
            rest = usage.raw_spans(window, span, dirty)
            if rest:
                raw = UsageQuery(rest, groups, None)
                sums_rows = await db.execute(usage.sums_statement(self.dialect, raw))
                sums = usage.shape_sums(self.dialect, groups, sums_rows)
                values_rows = await db.execute(usage.values_statement(self.dialect, raw))
                values = usage.shape_values(groups, values_rows)
        return usage.merge(groups, rolled, sums, values)

    # ------------------------------------------------------------------ errors

    async def errors(
        self,
        who: Principal,
        *,
        raw_from: str | None,
        raw_to: str | None,
        raw_type: str | None,
        raw_session_id: str | None,
        raw_limit: str | None,
        raw_cursor: str | None,
    ) -> dict[str, Any]:
        if not who.reads_all:
            raise Forbidden("error events are for ops and admins")
        window = parse_range(raw_from, raw_to, EVENTS_DEFAULT_RANGE)
        type_ = parse_text("type", raw_type, 32)
        session_id = parse_text("session_id", raw_session_id, 36)
        limit = parse_limit(raw_limit, PAGE_DEFAULT, PAGE_MAX)
        cursor = decode_cursor(raw_cursor)
        async with self._reader() as db:
            events = await queries.error_events(
                db, window, type_=type_, session_id=session_id, cursor=cursor, limit=limit
            )
            counts = await queries.error_counts(db, window, session_id=session_id)
        page, next_cursor = _page(events, limit)
        return {
            "items": [
                {
                    "id": e.id,
                    "at": e.at,
                    "type": e.type,
                    "session_id": e.session_id,
                    "generation_id": e.generation_id,
                    "user_id": e.user_id,
                    "model": e.model,
                    "message": e.message,
                }
                for e in page
            ],
            "next_cursor": next_cursor,
            "counts": counts,
            "from": window.start,
            "to": window.end,
        }

    # ------------------------------------------------------------------ audit

    async def audit(
        self,
        who: Principal,
        *,
        raw_from: str | None,
        raw_to: str | None,
        raw_action: str | None,
        raw_limit: str | None,
        raw_cursor: str | None,
    ) -> dict[str, Any]:
        if not who.is_admin:
            raise Forbidden("the audit trail is for admins")
        window = parse_range(raw_from, raw_to, EVENTS_DEFAULT_RANGE)
        action = parse_text("action", raw_action, 64)
        limit = parse_limit(raw_limit, PAGE_DEFAULT, PAGE_MAX)
        cursor = decode_cursor(raw_cursor)
        async with self._reader() as db:
            entries = await queries.audit_entries(
                db, window, action=action, cursor=cursor, limit=limit
            )
        page, next_cursor = _page(entries, limit)
        return {
            "items": [
                {
                    "id": a.id,
                    "at": a.at,
                    "actor_id": a.actor_id,
                    "actor_email": a.actor_email,
                    "action": a.action,
                    "target_type": a.target_type,
                    "target_id": a.target_id,
                    "detail": a.detail,
                }
                for a in page
            ],
            "next_cursor": next_cursor,
            "from": window.start,
            "to": window.end,
        }

    # ------------------------------------------------------------------ rate limits

    def configured_limits(self) -> list[dict[str, str]]:
        s = self.settings
        configured = (
            (SESSION_CREATE, s.rate_limit_session_create),
            (MESSAGE_SEND, s.rate_limit_messages),
            (AUTH_FAILURE, s.rate_limit_auth_failures),
        )
        # Names as the rate limiter records them in rate_limit_events.limit_name.
        return [{"name": n, "limit": limit, "scope": SCOPES[n]} for n, limit in configured]

    async def ratelimits(
        self,
        who: Principal,
        *,
        raw_from: str | None,
        raw_to: str | None,
        raw_bucket: str | None,
    ) -> dict[str, Any]:
        if not who.reads_all:
            raise Forbidden("rate limits are for ops and admins")
        window = parse_range(raw_from, raw_to, RATELIMITS_DEFAULT_RANGE)
        bucket = parse_choice("bucket", raw_bucket, ("hour", "day"), "hour")
        async with self._reader() as db:
            buckets = await queries.rejections(db, self.dialect, window, bucket)
            recent = await queries.recent_rejections(db, window, RECENT_REJECTIONS)
            upstream = await queries.latest_upstream_headroom(db)
        return {
            "limits": self.configured_limits(),
            "rejections": buckets,
            "recent": [
                {
                    "at": r.at,
                    "limit_name": r.limit_name,
                    "key": r.key,
                    "user_id": r.user_id,
                    "session_id": r.session_id,
                }
                for r in recent
            ],
            "upstream": upstream,
            # Live window use, from the rate limiter itself (Redis: every replica's hits).
            "current": await self.limiter.current() if self.limiter is not None else [],
            "bucket": bucket,
            "from": window.start,
            "to": window.end,
        }


def _page(rows: list[Any], limit: int) -> tuple[list[Any], str | None]:
    """The page and the cursor after it (None on the last page); rows holds limit + 1 at most."""
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    last = page[-1]
    return page, encode_cursor(last.at, last.id)
