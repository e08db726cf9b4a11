"""Per-user daily budgets (DESIGN §4), on top of the per-session one.

A send reserves its estimated cost (input plus the full `max_tokens` of output) before the
upstream call. The check and the reservation happen under a per-user lock in the same transaction
that inserts the running generation, so concurrent sends cannot together overspend: a send starts
only when today's spend plus every running reservation plus its own still fits.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import case, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import Generation, User
from streams_service.config import Settings


def day_start(now: datetime) -> datetime:
    """Budgets are per UTC day."""
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


async def daily_limit(db: AsyncSession, settings: Settings, user_id: str) -> Decimal | None:
    """The user's cap (their own, else USER_DAILY_BUDGET_USD); None when there is none."""
    own = await db.scalar(select(User.daily_budget_usd).where(User.id == user_id))
    limit = Decimal(own) if own is not None else Decimal(str(settings.user_daily_budget_usd))
    return limit if limit > 0 else None


async def spent_today(db: AsyncSession, user_id: str, now: datetime) -> Decimal:
    """Settled cost of today's generations plus what running ones have reserved."""
    # Portable greater-of: max(a, b) is scalar on SQLite but an aggregate on Postgres.
    greater = case(
        (Generation.reserved_usd > Generation.cost_usd, Generation.reserved_usd),
        else_=Generation.cost_usd,
    )
    amount = case((Generation.status == "running", greater), else_=Generation.cost_usd)
    total = await db.scalar(
        select(func.coalesce(func.sum(amount), 0)).where(
            Generation.user_id == user_id, Generation.started_at >= day_start(now)
        )
    )
    return Decimal(total or 0)


async def lock_user_budget(db: AsyncSession, user_id: str) -> None:
    """Serialize budget checks of one user until this transaction ends.

    Postgres: a transaction-scoped advisory lock (works whether or not a users row exists).
    SQLite: writers already run one at a time (BEGIN IMMEDIATE), nothing to do."""
    if db.get_bind().dialect.name == "postgresql":
        await db.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
            {"key": f"budget:{user_id}"},
        )


async def left_today(
    db: AsyncSession, settings: Settings, user_id: str | None, now: datetime
) -> tuple[Decimal | None, Decimal]:
    """(what is left of the user's daily budget or None when uncapped, spent so far)."""
    if user_id is None:
        return None, Decimal(0)
    limit = await daily_limit(db, settings, user_id)
    spent = await spent_today(db, user_id, now)
    return (None if limit is None else limit - spent), spent
