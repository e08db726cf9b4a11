"""Retention (DESIGN §2): streams of ended and deleted sessions expire after
STREAM_RETENTION_DAYS, and the trash empties after TRASH_RETENTION_DAYS.

Expiring a stream deletes it through the stream store (a stream that forks still read is kept
for them, hidden); the session's messages stay in the history. Emptying the trash is a purge:
messages, session row and stream go, generations (usage and cost) stay. A background task runs
`sweep` every RETENTION_SWEEP_INTERVAL_S; tests call `sweep` directly with a fixed `now`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog

from streams_service.access.principal import Principal
from streams_service.config import Settings
from streams_service.errors import AppError
from streams_service.sessions import history_repo as hrepo
from streams_service.sessions.history import HistoryService
from streams_service.sessions.service import SessionService

log = structlog.get_logger(__name__)

# Who the audit trail names for purges the sweeper makes.
SWEEPER = Principal(user_id=None, email="retention-sweeper", role="system")
BATCH = 200
# Bounds one sweep; whatever is left waits for the next one.
MAX_BATCHES = 50


@dataclass(frozen=True)
class SweepResult:
    streams_expired: int = 0
    sessions_purged: int = 0


async def sweep(history: HistoryService, settings: Settings, now: datetime) -> SweepResult:
    expired = purged = 0
    if settings.stream_retention_days > 0:
        cutoff = now - timedelta(days=settings.stream_retention_days)
        for _ in range(MAX_BATCHES):
            async with history.sessionmaker() as db:
                due = await hrepo.streams_past_retention(db, cutoff, BATCH)
            removed = [sid for sid in due if await history.delete_stream(sid)]
            expired += len(removed)
            if len(due) < BATCH or not removed:
                break
    if settings.trash_retention_days > 0:
        cutoff = now - timedelta(days=settings.trash_retention_days)
        for _ in range(MAX_BATCHES):
            async with history.sessionmaker() as db:
                due = await hrepo.trash_past_retention(db, cutoff, BATCH)
            progress = 0
            for sid in due:
                try:
                    done = await history.purge_now(sid, SWEEPER, {"reason": "trash_retention"})
                except AppError as exc:  # e.g. a generation still running: next sweep
                    log.info("retention_purge_skipped", session_id=sid, error=exc.code)
                    continue
                progress += done
            purged += progress
            if len(due) < BATCH or not progress:
                break
    return SweepResult(expired, purged)


async def sweep_forever(sessions: SessionService, settings: Settings) -> None:
    history = HistoryService(sessions)
    while True:
        await asyncio.sleep(settings.retention_sweep_interval_s)
        try:
            result = await sweep(history, settings, datetime.now(UTC))
            if result.streams_expired or result.sessions_purged:
                log.info(
                    "retention_swept",
                    streams_expired=result.streams_expired,
                    sessions_purged=result.sessions_purged,
                )
        except Exception as exc:
            log.warning("retention_sweep_failed", error=type(exc).__name__)
