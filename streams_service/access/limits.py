"""Rate limits (DESIGN §4) with the `limits` library: moving windows, in Redis when REDIS_URL is
set (so every replica counts against one limit), in memory otherwise.

Redis down fails OPEN: a request is let through and a warning logged. Limits protect the service
from abuse; refusing every staff member because a cache is down would be the bigger outage.
A Redis that stops answering (a partition, a frozen host) costs at most one short timeout every
few seconds, not one per request: after a failure the limits are skipped for a moment
(`make chaos`, scenario `redis`, measures both; docs/RELIABILITY.md).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from limits import RateLimitItem, WindowStats, parse, strategies
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import MemoryStorage, storage_from_string
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from db.models import RateLimitEvent
from streams_service.config import Settings
from streams_service.errors import TooManyRequests

log = structlog.get_logger(__name__)

SESSION_CREATE = "session_create"
MESSAGE_SEND = "message_send"
AUTH_FAILURE = "auth_failure"
# What each limit is keyed on, for the dashboard.
SCOPES = {SESSION_CREATE: "user", MESSAGE_SEND: "session", AUTH_FAILURE: "client address"}
# Keys remembered per limit for "current window use" (the busiest recent ones matter).
RECENT_KEYS = 200
# redis-py waits 5 s per command by default: with a Redis that does not answer, every send and
# session create would take 5 s longer. A remote Redis (Upstash) answers in milliseconds.
STORAGE_TIMEOUT_S = 0.5
# After a storage failure the limits fail open without asking Redis for this long, so an outage
# costs one timeout per period rather than one per request.
STORAGE_RETRY_AFTER_S = 2.0


class RateLimited(TooManyRequests):
    """A 429 from a rate limit; `event` is the rejection still to be recorded, if any."""

    event: RateLimitEvent | None = None


@dataclass(frozen=True)
class LimitInfo:
    name: str
    limit: str
    scope: str
    item: RateLimitItem


def storage_uri(redis_url: str) -> str:
    # limits names its async Redis backends async+redis:// and async+rediss:// (TLS, Upstash).
    return "async+" + redis_url


# How often the in-process windows drop entries that have left every window (memory only: a
# window never counts an expired entry, swept or not).
SWEEP_INTERVAL_S = 5.0


class _LoopSweptMemory(MemoryStorage):
    """limits' MemoryStorage without its per-hit timer thread.

    MemoryStorage sweeps expired entries from a `threading.Timer` of 10 ms that it starts again
    on every hit once the last one has run: at a few sends a second that is a new OS thread per
    send, and `Thread.start()` blocks the event loop until the thread is running, 0.4 ms on an
    idle machine and 5-16 ms (p99, max) with the cores busy, on the way to every send's
    upstream call. Here the owner sweeps instead (`sweep_if_due`, from the loop, at most every
    SWEEP_INTERVAL_S). Overrides limits' private hook (`__schedule_expiry`, name-mangled);
    tests/access/test_limits.py fails if a limits release renames it."""

    def __init__(self) -> None:
        super().__init__()  # starts the base class's one timer: a single sweep, then gone
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL_S

    def _MemoryStorage__schedule_expiry(self) -> None:
        """The base class's per-hit timer start: nothing here, see sweep_if_due."""

    def sweep_if_due(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            self._MemoryStorage__expire_events()  # type: ignore[attr-defined]


class InProcessWindows:
    """limits' in-memory moving windows (`memory://`) behind the async strategy's interface.

    Not `async+memory://`: on every hit that storage sweeps every key it holds (one per session
    that sent in the last window), each through a thread-pool hop. Measured at 40 sends a
    second: 0.15 cores with 50 sessions' keys, 0.77 with 500, all on the event loop. The
    synchronous storage answers in microseconds without blocking; its sweep runs every
    SWEEP_INTERVAL_S (see _LoopSweptMemory)."""

    def __init__(self) -> None:
        self.storage = _LoopSweptMemory()
        self._strategy = strategies.MovingWindowRateLimiter(self.storage)

    async def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        self.storage.sweep_if_due()
        return self._strategy.hit(item, *identifiers, cost=cost)

    async def test(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        return self._strategy.test(item, *identifiers, cost=cost)

    async def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        return self._strategy.get_window_stats(item, *identifiers)


class RateLimiter:
    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession] | None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.limits = {
            name: LimitInfo(name, text, SCOPES[name], parse(text))
            for name, text in (
                (SESSION_CREATE, settings.rate_limit_session_create),
                (MESSAGE_SEND, settings.rate_limit_messages),
                (AUTH_FAILURE, settings.rate_limit_auth_failures),
            )
        }
        self.strategy: MovingWindowRateLimiter | InProcessWindows
        if settings.redis_url:
            storage = storage_from_string(
                storage_uri(settings.redis_url),
                # redis-py (already a dependency) rather than limits' default coredis client.
                implementation="redispy",
                socket_timeout=STORAGE_TIMEOUT_S,
                socket_connect_timeout=STORAGE_TIMEOUT_S,
            )
            assert isinstance(storage, Storage)
            self.strategy = MovingWindowRateLimiter(storage)
        else:
            self.strategy = InProcessWindows()
        self.sessionmaker = sessionmaker
        self.on_reject = on_reject
        self.shared = bool(settings.redis_url)
        self._recent: dict[str, OrderedDict[str, str | None]] = {
            name: OrderedDict() for name in self.limits
        }
        self._storage_down_until = 0.0  # time.monotonic(); see STORAGE_RETRY_AFTER_S

    def _storage_down(self) -> bool:
        return time.monotonic() < self._storage_down_until

    def _storage_failed(self, name: str, exc: Exception) -> None:
        self._storage_down_until = time.monotonic() + STORAGE_RETRY_AFTER_S
        log.warning("rate_limit_storage_unavailable", limit=name, error=type(exc).__name__)

    async def hit(
        self,
        name: str,
        key: str,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        record: bool = True,
    ) -> None:
        """Count one request against `name` for `key`; over the limit raises RateLimited (429).

        Inside an open write transaction pass `record=False` and `record_rejection` the error
        after it has rolled back: on SQLite a second writer would wait for the first."""
        info = self.limits[name]
        if self._storage_down():
            return
        try:
            allowed = await self.strategy.hit(info.item, name, key)
        except Exception as exc:
            self._storage_failed(name, exc)
            return
        recent = self._recent[name]
        recent[key] = user_id
        recent.move_to_end(key)
        while len(recent) > RECENT_KEYS:
            recent.popitem(last=False)
        if allowed:
            return
        headers = await self._headers(info, key)
        if self.on_reject is not None:
            self.on_reject(name)
        error = RateLimited(
            f"rate limit {info.limit} per {info.scope} reached; retry in "
            f"{headers['Retry-After']} s",
            headers=headers,
        )
        error.event = RateLimitEvent(
            at=datetime.now(UTC),
            limit_name=name,
            key=key[:128],
            user_id=user_id,
            session_id=session_id,
        )
        if record:
            await self.record_rejection(error)
        raise error

    async def blocked(self, name: str, key: str) -> dict[str, str] | None:
        """The 429 headers if `key` has no room left under `name`, without counting a hit."""
        info = self.limits[name]
        if self._storage_down():
            return None
        try:
            room = await self.strategy.test(info.item, name, key)
        except Exception as exc:
            self._storage_failed(name, exc)
            return None
        return None if room else await self._headers(info, key)

    async def _headers(self, info: LimitInfo, key: str) -> dict[str, str]:
        stats = await self.strategy.get_window_stats(info.item, info.name, key)
        reset = max(1, math.ceil(stats.reset_time - time.time()))
        return {
            "Retry-After": str(reset),
            "RateLimit-Limit": str(info.item.amount),
            "RateLimit-Remaining": str(max(0, stats.remaining)),
            "RateLimit-Reset": str(reset),
            "RateLimit-Policy": f"{info.item.amount};w={info.item.get_expiry()}",
        }

    async def record_rejection(self, error: RateLimited) -> None:
        """Write the rejection for the dashboard (once; a no-op without a database)."""
        event, error.event = error.event, None
        if self.sessionmaker is None or event is None:
            return
        try:
            async with self.sessionmaker.begin() as db:
                db.add(event)
        except Exception as exc:
            # The 429 stands even if the dashboard misses one rejection.
            log.warning("rate_limit_event_not_recorded", error=type(exc).__name__)

    async def current(self) -> list[dict[str, Any]]:
        """Window use of the keys this process saw recently (with Redis: counted by everyone)."""
        out: list[dict[str, Any]] = []
        for name, recent in self._recent.items():
            info = self.limits[name]
            for key, user_id in reversed(recent.items()):
                try:
                    stats = await self.strategy.get_window_stats(info.item, name, key)
                except Exception:
                    return out
                used = info.item.amount - stats.remaining
                if used <= 0:
                    continue
                out.append(
                    {
                        "limit_name": name,
                        "key": key,
                        "user_id": user_id,
                        "used": used,
                        "limit": info.item.amount,
                        "resets_at": datetime.fromtimestamp(stats.reset_time, UTC),
                    }
                )
        return out
