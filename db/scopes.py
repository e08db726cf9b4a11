"""Sessions and connections that end in the caller's task, for the paths every message takes.

SQLAlchemy's async context managers (`async with maker.begin()`, `async with AsyncSession`,
`async with engine.connect()`) run their exit in a task of their own, awaited through
`asyncio.shield`, so that a cancellation cannot cut a close short. Each such task costs the
caller two turns of the event loop (the task starts in one, the caller resumes in a later one),
and `maker.begin()` nests two. A turn of a busy loop takes milliseconds: at 50 chatting sessions
on this 2-core machine, the exit of a send's transaction, whose COMMIT had already landed, took
66 ms p50 and 161 ms p90 — time the user message's append and the 202 waited for.

`begin()` and `connect()` do the same work in the caller's task. Where it cannot be cut short
it is no different: a cancellation reaches a task only where it suspends, and after a COMMIT
that has landed (or on an autocommit connection) nothing of the exit waits on the database —
the driver finds nothing to commit or roll back, so SQLAlchemy hands the connection back to
its pool without a round trip. When the block fails, the exit is SQLAlchemy's own, guarded one.
A commit that does wait on the database (the session still had work to flush, or the driver's
transaction is open) runs in the caller's task, unguarded: a cancellation while it waits leaves
the outcome of that transaction unknown to a caller that is going away, and SQLAlchemy's
guarded exit then cleans up after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker


@contextlib.asynccontextmanager
async def begin(maker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """As `maker.begin()`: a session in a transaction, committed when the block ends, rolled
    back when it raises."""
    db = maker()
    try:
        async with db.begin():
            yield db
    except BaseException as exc:
        await db.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    # Committed: the session holds no connection any more, so its close does not suspend.
    await db.close()


@contextlib.asynccontextmanager
async def connect(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """As `engine.connect()`, for connections that end with nothing left to roll back (reads
    and writes on an autocommit engine, or a transaction the block committed itself)."""
    conn = await engine.connect()
    try:
        yield conn
    except BaseException as exc:
        await conn.__aexit__(type(exc), exc, exc.__traceback__)
        raise
    await conn.close()
