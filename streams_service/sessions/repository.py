"""SQL for sessions, messages and generations. Callers own the transaction.

The statements of a send and of a generation's finish run on every message, so they are Core
statements on the tables (`_SESSIONS`, `_MESSAGES`, `_GENERATIONS`) rather than ORM ones: the
ORM's identity map, unit of work and bulk-update bookkeeping cost about a millisecond of CPU per
statement, several times the statement's own round trip to a local Postgres. On Postgres they
go further: given the transaction's driver connection (`pg`, from db/pg_direct.py), they run on
it directly, and statements that do not wait on each other share a round trip. The rest (admin,
history, fork) keeps the ORM's convenience.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from db import pg_direct
from db.models import ChatMessage, ChatSession, Generation
from db.pg_direct import Direct, RowCount

_SESSIONS = cast(Table, ChatSession.__table__)
_MESSAGES = cast(Table, ChatMessage.__table__)
_GENERATIONS = cast(Table, Generation.__table__)


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


# Built once and executed with parameters: the statement's compiled form is then found in the
# cache by a constant key, instead of each call building the expression and walking it (with
# its literal values) to compute one.
# A send's first statement: the session locked, with the id of an earlier message carrying the
# send's client_message_id (NULL when there is none, or no id was given) in the same round trip.
_SEND_ROW = (
    select(
        _SESSIONS,
        select(_MESSAGES.c.id)
        .where(
            _MESSAGES.c.session_id == _SESSIONS.c.id,
            _MESSAGES.c.client_message_id == bindparam("b_cid"),
        )
        .scalar_subquery()
        .label("earlier_message_id"),
    )
    .where(_SESSIONS.c.id == bindparam("b_sid"))
    .with_for_update(of=_SESSIONS)
)
_HISTORY = (
    select(
        _MESSAGES.c.role,
        _MESSAGES.c.content,
        _MESSAGES.c.parts,
        _MESSAGES.c.status,
        _MESSAGES.c.ordinal,
    )
    .where(_MESSAGES.c.session_id == bindparam("b_sid"))
    .order_by(_MESSAGES.c.ordinal)
)
_INSERT_MESSAGE = insert(_MESSAGES)
# The session's next ordinal computed in the INSERT itself: no round trip reads the maximum.
_INSERT_NEXT_MESSAGE = insert(_MESSAGES).values(
    ordinal=select(func.coalesce(func.max(_MESSAGES.c.ordinal), 0) + 1)
    .where(_MESSAGES.c.session_id == bindparam("b_sid"))
    .scalar_subquery()
)
_INSERT_GENERATION = insert(_GENERATIONS)
_UPDATE_GENERATION = update(_GENERATIONS).where(_GENERATIONS.c.id == bindparam("b_id"))
_SET_MESSAGE_OFFSET = update(_MESSAGES).where(
    _MESSAGES.c.session_id == bindparam("b_sid"), _MESSAGES.c.id == bindparam("b_mid")
)
_SETTLE_SESSION = (
    update(_SESSIONS)
    .where(_SESSIONS.c.id == bindparam("b_sid"))
    .values(
        message_count=_SESSIONS.c.message_count + bindparam("b_messages"),
        cost_usd=_SESSIONS.c.cost_usd + bindparam("b_cost", type_=_SESSIONS.c.cost_usd.type),
        reserved_usd=_SESSIONS.c.reserved_usd
        - bindparam("b_reserved", type_=_SESSIONS.c.reserved_usd.type),
        active_generation_id=None,
    )
)


_SESSION_TIMES = ("created_at", "updated_at", "ended_at", "deleted_at")


async def _run(
    db: AsyncSession | None,
    pg: Direct | None,
    stmt: Any,
    values: dict[str, Any],
    keys: Sequence[str] | None = None,
) -> int:
    """Execute a Core statement, on the driver connection when there is one; its row count
    (-1 when unknown: inside a combined statement). `db` may be None with a driver connection
    outside any session (`pg_direct.autocommit`)."""
    if pg is not None:
        return await pg.execute(pg_direct.statement(stmt, keys), values)
    assert db is not None
    result = await db.execute(stmt, values)
    return int(getattr(result, "rowcount", -1))


async def send_row_and_history(
    db: AsyncSession, session_id: str, client_message_id: str | None, pg: Direct | None = None
) -> tuple[Any | None, Sequence[Any]]:
    """A send's reads, in one round trip on Postgres. First the session's columns as a plain
    row (attributes named like ChatSession's, times in UTC), locked until the transaction ends,
    plus `earlier_message_id`: the message already sent with this client_message_id, if any.
    Then what building the conversation needs of each of its messages, in order."""
    params = {"b_sid": session_id, "b_cid": client_message_id}
    if pg is None:
        row = (await db.execute(_SEND_ROW, params)).first()
        return row, (await db.execute(_HISTORY, params)).all()
    rows, history = await pg.fetch(
        [(pg_direct.statement(_SEND_ROW), params), (pg_direct.statement(_HISTORY), params)]
    )
    if not rows:
        return None, history
    # As UTCDateTime reads them through SQLAlchemy: the driver gives the server's time zone.
    row = rows[0]
    times = {k: getattr(row, k).astimezone(UTC) for k in _SESSION_TIMES if getattr(row, k)}
    return row._replace(**times), history


async def insert_message(db: AsyncSession | None, pg: Direct | None = None, **values: Any) -> None:
    """Insert a chat message; without an `ordinal`, the session's next one."""
    if "ordinal" in values:
        await _run(db, pg, _INSERT_MESSAGE, values, sorted(values))
    else:
        params = {**values, "b_sid": values["session_id"]}
        await _run(db, pg, _INSERT_NEXT_MESSAGE, params, sorted(values))


async def insert_generation(db: AsyncSession, pg: Direct | None = None, **values: Any) -> None:
    await _run(db, pg, _INSERT_GENERATION, values, sorted(values))


async def update_generation(
    db: AsyncSession | None, generation_id: str, pg: Direct | None = None, **values: Any
) -> None:
    await _run(db, pg, _UPDATE_GENERATION, {**values, "b_id": generation_id}, sorted(values))


async def set_message_offset(
    db: AsyncSession | None, session_id: str, message_id: str, offset: str, pg: Direct | None = None
) -> None:
    values = {"b_sid": session_id, "b_mid": message_id, "stream_offset": offset}
    await _run(db, pg, _SET_MESSAGE_OFFSET, values, ["stream_offset"])


async def settle_session(
    db: AsyncSession | None,
    session_id: str,
    *,
    cost: Decimal,
    reserved: Decimal,
    now: datetime,
    messages: int = 1,
    pg: Direct | None = None,
) -> None:
    """A generation ended: count its answer, charge its cost, release its reservation and
    free the session for the next one."""
    values = {
        "b_sid": session_id,
        "b_messages": messages,
        "b_cost": cost,
        "b_reserved": reserved,
        "updated_at": now,
    }
    await _run(db, pg, _SETTLE_SESSION, values, ["updated_at"])


async def message_by_client_id(
    db: AsyncSession, session_id: str, client_message_id: str
) -> ChatMessage | None:
    stmt = select(ChatMessage).where(
        ChatMessage.session_id == session_id, ChatMessage.client_message_id == client_message_id
    )
    return (await db.execute(stmt)).scalar_one_or_none()


def _claim(count_message: bool) -> Any:
    s = _SESSIONS.c
    values: dict[str, Any] = {
        "reserved_usd": s.reserved_usd + bindparam("b_reserve", type_=s.reserved_usd.type),
    }
    if count_message:
        values["message_count"] = s.message_count + 1
    return (
        update(_SESSIONS)
        .where(s.id == bindparam("b_sid"), s.active_generation_id.is_(None))
        .values(**values)
    )


_CLAIM = {False: _claim(False), True: _claim(True)}


async def claim_generation(
    db: AsyncSession,
    session_id: str,
    generation_id: str,
    reserve: Decimal,
    now: datetime,
    *,
    count_message: bool = False,
    pg: Direct | None = None,
) -> bool:
    """Atomically make `generation_id` the session's one active generation, reserving its
    estimated cost (and counting the user message it answers, when it adds one). False when
    another generation is already running."""
    values = _claim_values(session_id, generation_id, reserve, now)
    return await _run(db, pg, _CLAIM[count_message], values, _CLAIM_KEYS) == 1


async def submit_claim(
    pg: Direct,
    session_id: str,
    generation_id: str,
    reserve: Decimal,
    now: datetime,
    *,
    count_message: bool = False,
    must_win: bool = False,
) -> RowCount:
    """`claim_generation` inside `pg_direct.combined()`: claimed when the count reads 1 once
    the block has ended. `must_win`: a lost claim raises pg_direct.CheckFailed
    instead (in `combined()`, with nothing of the block written)."""
    values = _claim_values(session_id, generation_id, reserve, now)
    stmt = pg_direct.statement(_CLAIM[count_message], _CLAIM_KEYS)
    return await pg.submit(stmt, values, expect=1 if must_win else None)


_CLAIM_KEYS = ("active_generation_id", "updated_at")


def _claim_values(
    session_id: str, generation_id: str, reserve: Decimal, now: datetime
) -> dict[str, Any]:
    return {
        "b_sid": session_id,
        "b_reserve": reserve,
        "active_generation_id": generation_id,
        "updated_at": now,
    }


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
