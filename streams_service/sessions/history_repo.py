"""SQL of the session history: keyset listing, full-text search, purge, retention queries.

Search uses what migration 20261126_0004 built: on Postgres GIN indexes on
`to_tsvector('english', ...)` expressions (the queries below repeat those expressions exactly,
with the configuration as a literal, or the planner cannot use the indexes); on SQLite the FTS5
tables `chat_messages_fts` and `chat_sessions_fts`. Callers own the transaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    CompoundSelect,
    Select,
    String,
    and_,
    any_,
    bindparam,
    column,
    delete,
    false,
    func,
    literal,
    literal_column,
    or_,
    select,
    table,
    text,
    tuple_,
    union,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from db.models import ChatMessage, ChatSession, DsStream, User

# The text search configuration of the Postgres indexes (a literal: see the module doc).
PG_CONFIG: ColumnElement[Any] = literal_column("'english'::regconfig")
MAX_TERMS = 16
STREAM_PREFIX = "sessions/"

_messages_fts = table("chat_messages_fts", column("session_id"))
_sessions_fts = table("chat_sessions_fts", column("session_id"))


@dataclass(frozen=True)
class Keyset:
    """Position after the last item of the previous page: (created_at, id), newest first."""

    created_at: datetime
    id: str


@dataclass(frozen=True)
class ListFilter:
    user_id: str | None  # None: every user's sessions
    trash: bool = False
    model: str | None = None
    created_from: datetime | None = None  # inclusive
    created_to: datetime | None = None  # exclusive
    terms: tuple[str, ...] = ()  # full-text search: every term must match


def search_terms(query: str) -> tuple[str, ...]:
    """The words of a search box, as both engines tokenize them (punctuation separates words)."""
    return tuple(re.findall(r"\w+", query))[:MAX_TERMS]


def _search_clause(dialect: str, terms: tuple[str, ...]) -> ColumnElement[bool]:
    """Sessions whose title, or any one message, contains every term."""
    if dialect == "postgresql":
        # Both sides through their GIN indexes, as one set of ids: a title test written as a
        # filter would parse the title of every session the scan passes.
        query = func.plainto_tsquery(PG_CONFIG, " ".join(terms))
        titled = aliased(ChatSession)
        title = func.to_tsvector(PG_CONFIG, func.coalesce(titled.title, literal_column("''")))
        body = func.to_tsvector(PG_CONFIG, ChatMessage.content)
        in_title = select(titled.id).where(title.op("@@")(query))
        in_body = select(ChatMessage.session_id).where(body.op("@@")(query))
        return ChatSession.id.in_(union(in_title, in_body))
    # FTS5: quoted terms are literal strings (no operators), joined by the implicit AND.
    match = " ".join(f'"{t}"' for t in terms)
    in_title = select(_sessions_fts.c.session_id).where(
        literal_column("chat_sessions_fts").op("MATCH")(match)
    )
    in_body = select(_messages_fts.c.session_id).where(
        literal_column("chat_messages_fts").op("MATCH")(match)
    )
    return or_(ChatSession.id.in_(in_title), ChatSession.id.in_(in_body))


def _conditions(
    dialect: str, f: ListFilter, after: Keyset | None, *, search: bool
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [
        ChatSession.deleted_at.is_not(None) if f.trash else ChatSession.deleted_at.is_(None)
    ]
    if f.user_id is not None:
        conditions.append(ChatSession.user_id == f.user_id)
    if f.model is not None:
        conditions.append(ChatSession.model == f.model)
    if f.created_from is not None:
        conditions.append(ChatSession.created_at >= f.created_from)
    if f.created_to is not None:
        conditions.append(ChatSession.created_at < f.created_to)
    if after is not None:
        conditions.append(
            tuple_(ChatSession.created_at, ChatSession.id)
            < tuple_(
                literal(after.created_at, ChatSession.created_at.type),
                literal(after.id, ChatSession.id.type),
            )
        )
    if search and f.terms:
        conditions.append(_search_clause(dialect, f.terms))
    return conditions


NEWEST_FIRST = (ChatSession.created_at.desc(), ChatSession.id.desc())


def _list_stmt(
    dialect: str, f: ListFilter, after: Keyset | None, limit: int
) -> Select[ChatSession, str, str | None]:
    return (
        select(ChatSession, User.email, User.name)
        .outerjoin(User, User.id == ChatSession.user_id)
        .where(*_conditions(dialect, f, after, search=True))
        .order_by(*NEWEST_FIRST)
        .limit(limit)
    )


async def list_sessions(
    db: AsyncSession, f: ListFilter, after: Keyset | None, limit: int
) -> list[tuple[ChatSession, str | None, str | None]]:
    """Up to `limit` sessions after `after`, newest first, with their owner's email and name."""
    dialect = db.get_bind().dialect.name
    if not f.terms or dialect != "postgresql":
        stmt = _list_stmt(dialect, f, after, limit)
        return [(row, email, name) for row, email, name in await db.execute(stmt)]
    ids = await _search_postgres(db, f, after, limit)
    if not ids:
        return []
    stmt = (
        select(ChatSession, User.email, User.name)
        .outerjoin(User, User.id == ChatSession.user_id)
        .where(ChatSession.id.in_(ids))
    )
    rows = {row.id: (row, email, name) for row, email, name in await db.execute(stmt)}
    return [rows[i] for i in ids if i in rows]


# Postgres search, newest first. A word's matches are found through its GIN posting list, but
# each match costs a visit to its message row (for the session id): a common word matches a
# tenth of all messages. So the newest sessions in scope are searched first, in windows:
# their messages (a btree bitmap on session_id) AND the word's posting list, which visits only
# the rows that match in those sessions. Only when the windows hold too few matches — a rare
# word, whose posting list is short — is the whole index asked. Measured on the benchmark's
# 1M messages: one window of 400 sessions (~4,000 messages) fills a page for a word in a few
# percent of messages; a second, larger window cost rare words more than it saved others.
SEARCH_WINDOWS: tuple[int, ...] = (400,)


async def _search_postgres(
    db: AsyncSession, f: ListFilter, after: Keyset | None, limit: int
) -> list[str]:
    # For this transaction only: enough memory that the bitmaps stay exact (a lossy one
    # re-parses whole pages of text); no JIT (these index-driven plans look costly to the
    # planner but run in milliseconds, which compiling them would multiply); and random reads
    # priced as the cached reads they are, or the planner, which cannot tell a rare word from
    # a common one it has no statistics for, scans every session to join a handful of matches.
    await db.execute(
        text("SET LOCAL work_mem = '64MB'; SET LOCAL jit = off; SET LOCAL random_page_cost = 1.1")
    )
    found: list[str] = []
    for size in SEARCH_WINDOWS:
        candidates = (
            select(ChatSession.id, ChatSession.created_at)
            .where(*_conditions("postgresql", f, after, search=False))
            .order_by(*NEWEST_FIRST)
            .limit(size)
        )
        window = (await db.execute(candidates)).all()
        if not window:
            return found
        ids = [sid for sid, _ in window]
        hits = set((await db.execute(_hits_postgres(ids, f.terms))).scalars())
        found += [sid for sid in ids if sid in hits]
        if len(found) >= limit or len(window) < size:
            return found[:limit]
        after = Keyset(window[-1][1], window[-1][0])
    rest = (
        select(ChatSession.id)
        .where(*_conditions("postgresql", f, after, search=True))
        .order_by(*NEWEST_FIRST)
        .limit(limit - len(found))
    )
    return found + list((await db.execute(rest)).scalars())


def _hits_postgres(ids: list[str], terms: tuple[str, ...]) -> CompoundSelect[str]:
    """Which of these sessions match, by a message or by the title."""
    query = func.plainto_tsquery(PG_CONFIG, " ".join(terms))
    in_ids = bindparam("ids", ids, type_=ARRAY(String()))
    body = func.to_tsvector(PG_CONFIG, ChatMessage.content)
    title = func.to_tsvector(PG_CONFIG, func.coalesce(ChatSession.title, literal_column("''")))
    return union(
        select(ChatMessage.session_id).where(
            ChatMessage.session_id == any_(in_ids), body.op("@@")(query)
        ),
        select(ChatSession.id).where(ChatSession.id == any_(in_ids), title.op("@@")(query)),
    )


async def delete_session_rows(db: AsyncSession, session_id: str) -> int:
    """Remove a session and its messages for good (generations, usage and audit rows stay).
    Returns how many messages went."""
    result = await db.execute(delete(ChatMessage).where(ChatMessage.session_id == session_id))
    await db.execute(delete(ChatSession).where(ChatSession.id == session_id))
    return int(getattr(result, "rowcount", 0) or 0)


async def streams_past_retention(db: AsyncSession, cutoff: datetime, limit: int) -> list[str]:
    """Sessions ended or deleted before `cutoff` whose stream still exists (and is not already
    kept only for its forks)."""
    path = literal(STREAM_PREFIX) + ChatSession.id
    stmt = (
        select(ChatSession.id)
        .join(DsStream, DsStream.path == path)
        .where(
            or_(
                and_(ChatSession.ended_at.is_not(None), ChatSession.ended_at < cutoff),
                and_(ChatSession.deleted_at.is_not(None), ChatSession.deleted_at < cutoff),
            ),
            DsStream.soft_deleted == false(),
        )
        .limit(limit)
    )
    return list((await db.execute(stmt)).scalars())


async def trash_past_retention(db: AsyncSession, cutoff: datetime, limit: int) -> list[str]:
    stmt = (
        select(ChatSession.id)
        .where(ChatSession.deleted_at.is_not(None), ChatSession.deleted_at < cutoff)
        .order_by(ChatSession.deleted_at)
        .limit(limit)
    )
    return list((await db.execute(stmt)).scalars())
