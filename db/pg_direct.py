"""Core statements run on Postgres' own driver connection, inside a SQLAlchemy transaction.

Why: a send and a generation's finish run a handful of statements each on the event loop, and
SQLAlchemy's async layer costs about 0.3 ms of CPU per statement there (a greenlet switch, the
adapted cursor, result processing), several times what psycopg itself spends on it: measured on
this machine, a transaction locking a session and reading its messages took 2.6 ms of CPU
through an AsyncSession and 1.1 ms with the same two statements sent on the driver connection.
psycopg can also pipeline statements that do not wait on each other into one round trip.

The statements stay SQLAlchemy Core, defined once: `DirectStatement` compiles one for psycopg
(with the same bind processors, so a JSON value is sent as SQLAlchemy would send it), and
`direct(db)` hands out the psycopg connection of the session's transaction, which SQLAlchemy
still begins, commits and rolls back. Errors are raised as SQLAlchemy raises them (with the
parameters hidden: they carry message text), so callers and error handlers see one kind.
On SQLite, `direct` returns None and callers run the statement through the session as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol, cast

import psycopg
from psycopg.rows import namedtuple_row
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.schema import ScalarElementColumnDefault

_DIALECT = PGDialect_psycopg()  # type: ignore[no-untyped-call]


class RowCount(Protocol):
    """A statement's outcome: psycopg's cursor, whose count is set once its result arrives."""

    @property
    def rowcount(self) -> int: ...


class DirectStatement:
    """A Core statement compiled once for psycopg, for the columns `keys` (INSERT/UPDATE)."""

    __slots__ = ("_compiled", "_defaults", "_processors", "sql")

    def __init__(self, statement: ClauseElement, keys: Sequence[str] | None = None) -> None:
        compiled = cast(
            SQLCompiler,
            statement.compile(
                dialect=_DIALECT, column_keys=list(keys) if keys is not None else None
            ),
        )
        self._compiled = compiled
        self.sql: str = str(compiled)
        # The bind processors SQLAlchemy itself would apply (JSON values wrapped for psycopg,
        # timestamps checked to be timezone-aware).
        self._processors: dict[str, Callable[[Any], Any]] = {
            name: process
            for name, process in compiled._bind_processors.items()
            if callable(process)  # (the others are for expanding IN lists, unused here)
        }
        # Columns left out that have a Python-side default: SQLAlchemy's execution fills those
        # in, so this does too. Only constants: anything computed at execution is refused here.
        self._defaults: dict[str, Any] = {}
        for column, default in [
            *((c, c.default) for c in compiled.insert_prefetch),
            *((c, c.onupdate) for c in compiled.update_prefetch),
        ]:
            if not isinstance(default, ScalarElementColumnDefault):
                raise TypeError(f"{column} has a default computed at execution")
            self._defaults[column.key] = default.arg

    def params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        params = dict(
            self._compiled.construct_params({**self._defaults, **values}, _check=False) or {}
        )
        for name, process in self._processors.items():
            if name in params:
                params[name] = process(params[name])
        return params


# Keyed by the statement's id: safe, since each entry's compiled form holds its statement, so
# no other statement can be given that id while the entry exists. For module-level statements.
_compiled: dict[tuple[int, tuple[str, ...] | None], DirectStatement] = {}


def statement(stmt: ClauseElement, keys: Sequence[str] | None = None) -> DirectStatement:
    """`stmt` compiled for psycopg, once per statement and set of columns."""
    key = (id(stmt), tuple(keys) if keys is not None else None)
    found = _compiled.get(key)
    if found is None:
        found = _compiled[key] = DirectStatement(stmt, keys)
    return found


class Direct:
    """The psycopg connection of one SQLAlchemy transaction."""

    __slots__ = ("_conn", "driver")

    def __init__(self, conn: AsyncConnection, driver: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn
        self.driver = driver

    async def execute(self, stmt: DirectStatement, values: Mapping[str, Any]) -> int:
        """Run a statement; its row count (inside `pipeline()`, -1: known only at the end)."""
        return (await self.submit(stmt, values)).rowcount

    async def submit(self, stmt: DirectStatement, values: Mapping[str, Any]) -> RowCount:
        """Run a statement; inside `pipeline()` its row count is read once the pipeline ends."""
        params = stmt.params(values)
        async with self._translated(stmt, params):
            return await self.driver.execute(stmt.sql, params)

    async def fetch(
        self, queries: Sequence[tuple[DirectStatement, Mapping[str, Any]]]
    ) -> list[list[Any]]:
        """Run several queries in one round trip; the rows of each, as named tuples."""
        cursors = []
        async with self._translated(queries[0][0], {}):
            async with self.driver.pipeline():
                for stmt, values in queries:
                    cursor = self.driver.cursor(row_factory=namedtuple_row)
                    await cursor.execute(stmt.sql, stmt.params(values))
                    cursors.append(cursor)
            return [await cursor.fetchall() for cursor in cursors]

    @contextlib.asynccontextmanager
    async def pipeline(self) -> AsyncIterator[None]:
        """Statements executed inside go out together, in one round trip at the end."""
        async with self._translated(None, {}), self.driver.pipeline():
            yield

    @contextlib.asynccontextmanager
    async def _translated(
        self, stmt: DirectStatement | None, params: Mapping[str, Any]
    ) -> AsyncIterator[None]:
        try:
            yield
        except psycopg.Error as orig:
            # SQLAlchemy's own test for psycopg (PGDialect_psycopg.is_disconnect). It also
            # acts on it: rolling the transaction back on a dead connection invalidates it and
            # the pool's connections older than it, which are replaced on their next checkout.
            disconnect = self.driver.closed or self.driver.broken
            raise sa_exc.DBAPIError.instance(
                stmt.sql if stmt is not None else "(pipeline)",
                dict(params),
                orig,
                psycopg.Error,
                hide_parameters=True,
                connection_invalidated=disconnect,
                dialect=self._conn.dialect,
            ) from orig


def pipeline(pg: Direct | None) -> contextlib.AbstractAsyncContextManager[None]:
    """`pg.pipeline()`, or nothing to do without a driver connection (SQLite)."""
    return pg.pipeline() if pg is not None else contextlib.nullcontext()


async def direct(db: AsyncSession) -> Direct | None:
    """The driver connection of `db`'s transaction on Postgres (starting it); None elsewhere."""
    conn = await db.connection()
    if conn.dialect.name != "postgresql":
        return None
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert isinstance(driver, psycopg.AsyncConnection)
    return Direct(conn, driver)
