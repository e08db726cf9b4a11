"""Periodic work every replica does; each item is safe to run on all of them at once.

- Sessions untouched for SESSION_IDLE_TIMEOUT end by themselves, exactly as POST /end ends them
  (same service method: stream closed, `session` record published). The end is a conditional
  UPDATE, so when two replicas pick the same session only one of them ends it.
- Generations left `running` by a process that died (no heartbeat for GENERATION_STALE_AFTER_S)
  are closed as interrupted. A process does this at start too, but with many replicas a dead one
  may never restart; any live replica cleans up after it, so its sessions accept messages again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import structlog

from streams_service.sessions import repository as repo
from streams_service.sessions.recovery import recover_interrupted
from streams_service.sessions.service import SessionService

log = structlog.get_logger(__name__)

# Sessions looked at per idle sweep; the next sweep takes the rest.
IDLE_BATCH = 200


def idle_sweep_interval_s(timeout_s: float) -> float:
    """A tenth of the timeout (a session ends at most 10% late), between 0.25 s and a minute."""
    return min(60.0, max(0.25, timeout_s / 10))


async def end_idle_sessions(
    service: SessionService, timeout_s: float, *, now: datetime | None = None
) -> int:
    """End every open session idle for longer than `timeout_s`; how many this call ended."""
    idle_before = (now or datetime.now(UTC)) - timedelta(seconds=timeout_s)
    async with service.sessionmaker() as db:
        candidates = await repo.idle_sessions(db, idle_before, IDLE_BATCH)
    ended = 0
    for session_id in candidates:
        # Re-checked in the UPDATE itself: activity since the query, or another replica that
        # got there first, leaves the session alone.
        try:
            if await service.close_session(session_id, idle_before=idle_before) is not None:
                ended += 1
        except Exception as exc:
            log.warning("idle_end_failed", session_id=session_id, error=type(exc).__name__)
    if ended:
        log.info("idle_sessions_ended", count=ended)
    return ended


async def run_upkeep(service: SessionService) -> None:
    """Run until cancelled (the lifespan cancels it at shutdown)."""
    settings = service.settings
    jobs: list[asyncio.Task[None]] = []
    if settings.session_idle_timeout > 0:
        timeout = settings.session_idle_timeout
        jobs.append(
            asyncio.create_task(
                _every(
                    idle_sweep_interval_s(timeout),
                    "idle_sweep",
                    lambda: end_idle_sessions(service, timeout),
                )
            )
        )
    jobs.append(
        asyncio.create_task(
            _every(
                settings.generation_stale_after_s / 2,
                "recovery",
                lambda: recover_interrupted(
                    service.sessionmaker, service.store, service.generations
                ),
            )
        )
    )
    try:
        await asyncio.gather(*jobs)
    finally:
        for job in jobs:
            job.cancel()


async def _every(interval_s: float, name: str, work: Callable[[], Awaitable[int]]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await work()
        except Exception as exc:
            # A database hiccup must not end the loop; the next round tries again.
            log.warning("upkeep_failed", job=name, error=type(exc).__name__)
