"""The hourly usage rollup's sweeper: rebuilds the closed hours that triggers marked dirty.

Triggers on `generations` (migration 0006) add a `usage_rollup_dirty` row for the UTC hour of
every inserted, deleted or usage-changing row, in the writer's own transaction. A sweep takes
the dirty hours that have ended, oldest first, a batch per transaction: it notes the dirty
rows it sees, recomputes those hours' `usage_rollup` rows from the generation rows (the same
statements `GET /v1/usage` runs on them), and deletes exactly the dirty rows it noted.

Why that is enough for exact reads (streams_service/ops/usage.py takes an hour from the rollup
only while no dirty row names it):
- A change committed before the sweep read the dirty rows is seen by the recomputation, which
  runs after that read. A change committed later has a dirty row the sweep never saw, so it
  survives the sweep and the hour is read from the generation rows until the next sweep.
  (Deleting "every dirty row of the hour" or "ids up to N" instead would lose such a row: ids
  are handed out at insert, not in commit order.) On Postgres the recomputation's statements
  may also see changes committed after that read, even between its two statements; their dirty
  rows survive too, so such an hour is read from the rows and rebuilt again.
- Sweeps run one at a time: a transaction-scoped advisory lock on Postgres (replicas wait
  their turn, then find little left), the write lock (BEGIN IMMEDIATE) on SQLite. Two sweeps
  of the same hour at once could otherwise commit an older recomputation last.
- Open hours are left alone: they change with every generation and are read from the rows.

Every replica runs `sweep_forever`; tests call `sweep` with a fixed `now`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

import structlog
from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import UsageRollup, UsageRollupDirty
from streams_service.ops import usage
from streams_service.ops.params import TimeRange

log = structlog.get_logger(__name__)

SWEEP_INTERVAL_S: Final = 15.0
# Hours rebuilt per transaction (their TTFTs pass through Python: a day of a busy history).
HOURS_PER_BATCH: Final = 24
# Bounds one sweep (a first build of a long history spans several); the next one goes on.
MAX_BATCHES: Final = 200
# Dirty ids deleted per statement (SQLite and psycopg cap the parameters of one statement).
DELETE_CHUNK: Final = 5000
# pg_advisory_xact_lock key of the sweep (any constant no other code uses): "usage" in ASCII.
LOCK_KEY: Final = 0x7573616765
GROUPS: Final = ("hour", "model")


async def sweep(
    sessionmaker: async_sessionmaker[AsyncSession], *, now: datetime | None = None
) -> int:
    """Rebuild every dirty hour that ended before `now`; returns how many hours were rebuilt."""
    cutoff = usage.floor_hour(now or datetime.now(UTC))
    rebuilt = 0
    for _ in range(MAX_BATCHES):
        async with sessionmaker.begin() as db:
            done = await _sweep_batch(db, cutoff)
        rebuilt += done
        if done < HOURS_PER_BATCH:
            break
    return rebuilt


async def _sweep_batch(db: AsyncSession, cutoff: datetime) -> int:
    D = UsageRollupDirty
    dialect = db.get_bind().dialect.name
    if dialect == "postgresql":
        await db.execute(select(func.pg_advisory_xact_lock(LOCK_KEY)))
    hours = list(
        (
            await db.execute(
                select(D.hour)
                .where(D.hour < cutoff)
                .distinct()
                .order_by(D.hour)
                .limit(HOURS_PER_BATCH)
            )
        ).scalars()
    )
    if not hours:
        return 0
    seen = list((await db.execute(select(D.id).where(D.hour.in_(hours)))).scalars())
    await rebuild(db, dialect, hours)
    for i in range(0, len(seen), DELETE_CHUNK):
        await db.execute(delete(D).where(D.id.in_(seen[i : i + DELETE_CHUNK])))
    return len(hours)


async def rebuild(db: AsyncSession, dialect: str, hours: Sequence[datetime]) -> None:
    """Replace the rollup rows of `hours` with what their generation rows add up to now."""
    spans = usage.merge_spans(TimeRange(hour, hour + usage.HOUR) for hour in hours)
    query = usage.UsageQuery(spans, GROUPS, None)
    sums = usage.shape_sums(dialect, GROUPS, await db.execute(usage.sums_statement(dialect, query)))
    values = usage.shape_values(GROUPS, await db.execute(usage.values_statement(dialect, query)))
    await db.execute(delete(UsageRollup).where(UsageRollup.hour.in_(hours)))
    rows = [
        {
            "hour": hour,
            "model": model,
            "generations": s["generations"],
            "errors": s["errors"],
            "input_tokens": s["input_tokens"],
            "output_tokens": s["output_tokens"],
            "cache_read_tokens": s["cache_read_tokens"],
            "cache_write_tokens": s["cache_write_tokens"],
            "cost_micro_usd": usage.micro_usd(s["cost_usd"]),
            "ttfts": usage.pack_ttfts(values.get((hour, model), [])),
        }
        for (hour, model), s in sums.items()
    ]
    if rows:
        await db.execute(insert(UsageRollup), rows)


async def sweep_forever(sessionmaker: async_sessionmaker[AsyncSession]) -> None:
    """Run until cancelled (the lifespan cancels it at shutdown)."""
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        try:
            rebuilt = await sweep(sessionmaker)
        except Exception as exc:
            # A database hiccup must not end the loop; the dirty rows wait for the next round.
            log.warning("usage_rollup_sweep_failed", error=type(exc).__name__)
            continue
        if rebuilt:
            log.info("usage_rollup_swept", hours=rebuilt)
