"""SQL for sessions, messages and generations. Callers own the transaction."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import ChatMessage, ChatSession, Generation


async def get_session(
    db: AsyncSession, session_id: str, *, for_update: bool = False
) -> ChatSession | None:
    stmt = select(ChatSession).where(ChatSession.id == session_id)
    if for_update:
        stmt = stmt.with_for_update()
    return (await db.execute(stmt)).scalar_one_or_none()


async def messages_of(db: AsyncSession, session_id: str) -> list[ChatMessage]:
    stmt = (
        select(ChatMessage)
        .where(ChatMessage.session_id == session_id)
        .order_by(ChatMessage.ordinal)
    )
    return list((await db.execute(stmt)).scalars())


async def message_by_client_id(
    db: AsyncSession, session_id: str, client_message_id: str
) -> ChatMessage | None:
    stmt = select(ChatMessage).where(
        ChatMessage.session_id == session_id, ChatMessage.client_message_id == client_message_id
    )
    return (await db.execute(stmt)).scalar_one_or_none()


async def next_ordinal(db: AsyncSession, session_id: str) -> int:
    current = await db.scalar(
        select(func.max(ChatMessage.ordinal)).where(ChatMessage.session_id == session_id)
    )
    return int(current or 0) + 1


async def claim_generation(
    db: AsyncSession,
    session_id: str,
    generation_id: str,
    reserve: Decimal,
    now: datetime,
    *,
    count_message: bool = False,
) -> bool:
    """Atomically make `generation_id` the session's one active generation, reserving its
    estimated cost (and counting the user message it answers, when it adds one). False when
    another generation is already running."""
    values: dict[str, Any] = {
        "active_generation_id": generation_id,
        "reserved_usd": ChatSession.reserved_usd + reserve,
        "updated_at": now,
    }
    if count_message:
        values["message_count"] = ChatSession.message_count + 1
    result = await db.execute(
        update(ChatSession)
        .where(ChatSession.id == session_id, ChatSession.active_generation_id.is_(None))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


async def release_generation(
    db: AsyncSession, session_id: str, generation_id: str, reserve: Decimal
) -> None:
    await db.execute(
        update(ChatSession)
        .where(ChatSession.id == session_id, ChatSession.active_generation_id == generation_id)
        .values(active_generation_id=None, reserved_usd=ChatSession.reserved_usd - reserve)
        .execution_options(synchronize_session=False)
    )


async def get_generation(db: AsyncSession, generation_id: str) -> Generation | None:
    return await db.get(Generation, generation_id)


async def interrupted_leftovers(db: AsyncSession, stale_before: datetime) -> list[Generation]:
    """Generations still marked running whose owner stopped beating: left by a crash."""
    stmt = select(Generation).where(
        Generation.status == "running",
        (Generation.heartbeat_at.is_(None)) | (Generation.heartbeat_at < stale_before),
        Generation.started_at < stale_before,
    )
    return list((await db.execute(stmt)).scalars())


async def idle_sessions(db: AsyncSession, idle_before: datetime, limit: int) -> list[str]:
    """Open sessions with nothing running, untouched since `idle_before`, oldest first."""
    stmt = (
        select(ChatSession.id)
        .where(
            ChatSession.ended_at.is_(None),
            ChatSession.deleted_at.is_(None),
            ChatSession.active_generation_id.is_(None),
            ChatSession.updated_at < idle_before,
        )
        .order_by(ChatSession.updated_at)
        .limit(limit)
    )
    return list((await db.execute(stmt)).scalars())


async def mark_ended(
    db: AsyncSession, session_id: str, now: datetime, idle_before: datetime | None = None
) -> bool:
    """End the session if it is open, nothing runs in it and (when given) it is untouched since
    `idle_before`. One conditional UPDATE: of concurrent callers (a request, the idle sweeps of
    several replicas) exactly one gets True."""
    conditions = [
        ChatSession.id == session_id,
        ChatSession.ended_at.is_(None),
        ChatSession.active_generation_id.is_(None),
    ]
    if idle_before is not None:
        conditions += [ChatSession.updated_at < idle_before, ChatSession.deleted_at.is_(None)]
    result = await db.execute(
        update(ChatSession)
        .where(*conditions)
        .values(ended_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def message_out(m: ChatMessage) -> dict[str, Any]:
    return {
        "id": m.id,
        "role": m.role,
        "parts": m.parts,
        "status": m.status,
        "generation_id": m.generation_id,
        "created_at": m.created_at,
    }


async def search_messages(
    db: AsyncSession, user_id: str | None, query: str, limit: int
) -> list[dict[str, Any]]:
    """Messages of the user's own sessions whose text contains `query` (case-insensitive)."""
    pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    owner = ChatSession.user_id.is_(None) if user_id is None else ChatSession.user_id == user_id
    stmt = (
        select(ChatMessage.session_id, ChatSession.title, ChatMessage.content)
        .join(ChatSession, ChatSession.id == ChatMessage.session_id)
        .where(owner, ChatSession.deleted_at.is_(None))
        .where(ChatMessage.content.ilike(pattern, escape="\\"))
        .order_by(ChatMessage.created_at.desc())
        .limit(max(1, min(limit, 50)))
    )
    out = []
    for session_id, title, content in await db.execute(stmt):
        at = content.lower().find(query.lower())
        start = max(0, at - 80)
        out.append(
            {"session_id": session_id, "title": title, "snippet": content[start : start + 240]}
        )
    return out
