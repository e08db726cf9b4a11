"""Statements shared by the async read path and the writer thread's sync path."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import Select, Table, and_, bindparam, literal_column, or_, select

from db.models import DsMessage, DsProducer, DsStream
from streams_service.durable.model import StreamState

# Core tables: the batch paths issue executemany statements, not ORM unit-of-work flushes.
streams = cast(Table, DsStream.__table__)
messages = cast(Table, DsMessage.__table__)
producers = cast(Table, DsProducer.__table__)

# (stream id, highest end position or None) pairs whose messages make up a stream's view.
Segments = list[tuple[int, int | None]]


def stream_by_path(path: str, *, for_update: bool = False) -> Select[Any]:
    stmt = select(streams).where(streams.c.path == path)
    return stmt.with_for_update() if for_update else stmt


def stream_by_id(stream_id: int, *, for_update: bool = False) -> Select[Any]:
    stmt = select(streams).where(streams.c.id == stream_id)
    return stmt.with_for_update() if for_update else stmt


def fork_chain(stream_id: int) -> Select[Any]:
    """The stream and its ancestors, nearest first: (id, forked_from_id, fork_pos)."""
    base = (
        select(
            streams.c.id,
            streams.c.forked_from_id,
            streams.c.fork_pos,
            literal_column("0").label("depth"),
        )
        .where(streams.c.id == stream_id)
        .cte("chain", recursive=True)
    )
    step = select(
        streams.c.id,
        streams.c.forked_from_id,
        streams.c.fork_pos,
        (base.c.depth + 1).label("depth"),
    ).where(streams.c.id == base.c.forked_from_id)
    chain = base.union_all(step)
    return select(chain.c.id, chain.c.forked_from_id, chain.c.fork_pos).order_by(chain.c.depth)


def segments_from_chain(rows: Sequence[Any], from_pos: int) -> Segments:
    """A fork shares its source's offset space: it shows the source's messages up to the fork
    position, then its own. Down a chain of forks each ancestor is capped at the lowest fork
    position seen so far; ancestors entirely before `from_pos` are skipped."""
    segments: Segments = []
    cap: int | None = None
    for row in rows:
        if cap is not None and from_pos >= cap:
            break
        segments.append((row.id, cap))
        if row.fork_pos is None:
            break
        cap = row.fork_pos if cap is None else min(cap, row.fork_pos)
    return segments


def needs_chain(state: StreamState, from_pos: int) -> bool:
    return (
        state.forked_from_id is not None
        and state.fork_pos is not None
        and from_pos < state.fork_pos
    )


# One stream's own messages after `from_pos`, by named parameters, so each is compiled once for
# the direct read on Postgres (db/pg_direct.py; the stream store's reads of a stream that is
# not a fork, or of a fork past its fork point): up to `upper`, and the next one alone.
_ONE_STREAM = select(messages.c.end_pos, messages.c.data).where(
    messages.c.stream_id == bindparam("stream_id"), messages.c.end_pos > bindparam("from_pos")
)
messages_up_to = _ONE_STREAM.where(messages.c.end_pos <= bindparam("upper")).order_by(
    messages.c.end_pos
)
next_message = _ONE_STREAM.order_by(messages.c.end_pos).limit(1)


def messages_in(
    segments: Segments, from_pos: int, upper: int | None, limit: int | None
) -> Select[Any]:
    clauses = []
    for stream_id, cap in segments:
        conds = [messages.c.stream_id == stream_id, messages.c.end_pos > from_pos]
        bound = cap if upper is None else (upper if cap is None else min(cap, upper))
        if bound is not None:
            conds.append(messages.c.end_pos <= bound)
        clauses.append(and_(*conds))
    where = clauses[0] if len(clauses) == 1 else or_(*clauses)
    stmt = select(messages.c.end_pos, messages.c.data).where(where).order_by(messages.c.end_pos)
    return stmt.limit(limit) if limit is not None else stmt
