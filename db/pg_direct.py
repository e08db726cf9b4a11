"""Core statements run on Postgres' own driver connection, inside a SQLAlchemy transaction.

Why: a send and a generation's finish run a handful of statements each on the event loop, and
SQLAlchemy's async layer costs about 0.3 ms of CPU per statement there (a greenlet switch, the
adapted cursor, result processing), several times what psycopg itself spends on it: measured on
this machine, a transaction locking a session and reading its messages took 2.6 ms of CPU
through an AsyncSession and 1.1 ms with the same two statements sent on the driver connection.
psycopg can also pipeline statements that do not wait on each other into one round trip, and
`Direct.combined()` goes further for writes that do not read each other's effects: they are
sent as one statement (psycopg's per-statement work, about 0.1 ms of CPU each even pipelined,
happens once), optionally with the COMMIT in the same round trip; measured on this machine, a
generation's four finishing writes took 1.44 ms of CPU pipelined and 1.12 to 1.19 ms combined.

The statements stay SQLAlchemy Core, defined once: `DirectStatement` compiles one for psycopg
(with the same bind processors, so a JSON value is sent as SQLAlchemy would send it), and
`direct(db)` hands out the psycopg connection of the session's transaction, which SQLAlchemy
still begins and rolls back (and commits, unless `combined(commit=True)` did). Errors are
raised as SQLAlchemy raises them (with the parameters hidden: they carry message text), so
callers and error handlers see one kind.
On SQLite, `direct` returns None and callers run the statement through the session as before.

Work that is one statement needs no transaction around it: `autocommit()` hands out a driver
connection on which each statement commits by itself, with no ORM session, BEGIN or COMMIT.
Measured on this machine, a generation's finish (one combined statement) took 2.1 to 2.9 ms of
CPU through `sessionmaker.begin()` with the COMMIT pipelined, and 1.0 to 1.5 ms this way.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol, cast

import psycopg
from psycopg.rows import namedtuple_row, tuple_row
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.schema import ScalarElementColumnDefault

from db import scopes

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


class CheckFailed(Exception):
    """A statement given `expect` changed another number of rows: nothing was written."""


class _Deferred:
    """A statement's row count inside `Direct.combined()`: known once the block has ended."""

    __slots__ = ("expect", "rowcount")

    def __init__(self, expect: int | None) -> None:
        self.rowcount = -1
        self.expect = expect


_PLACEHOLDER = re.compile(r"(?<!%)%\((\w+)\)s")
# Keyed by the ids of the DirectStatements combined: those live as long as `_compiled` does.
_combined_sql: dict[tuple[tuple[int, bool], ...], str] = {}


def _combined(parts: Sequence[DirectStatement], checked: Sequence[bool]) -> str:
    """One statement running `parts` (INSERT/UPDATE/DELETE): each a data-modifying WITH query
    whose parameters are prefixed with its position, and a SELECT of their row counts. Where
    `checked`, the part's count must equal the parameter `c<i>`: else the SELECT divides by
    zero, which aborts the whole statement (all data-modifying WITH queries or none)."""
    key = tuple((id(p), c) for p, c in zip(parts, checked, strict=True))
    found = _combined_sql.get(key)
    if found is None:
        queries = [
            f"s{i} AS ({_prefixed(part.sql, f'p{i}_')} RETURNING 1)" for i, part in enumerate(parts)
        ]
        # Built only from compiled Core statements and positions: no value is ever spliced in.
        counts = [f"(SELECT count(*) FROM s{i})" for i in range(len(parts))]  # noqa: S608
        checks = [f"{counts[i]} = %(c{i})s" for i, c in enumerate(checked) if c]
        if checks:
            counts.append(f"1 / ({' AND '.join(checks)})::int")
        found = _combined_sql[key] = f"WITH {', '.join(queries)} SELECT {', '.join(counts)}"
    return found


def _prefixed(sql: str, prefix: str) -> str:
    return _PLACEHOLDER.sub(lambda m: f"%({prefix}{m.group(1)})s", sql)


class Direct:
    """The psycopg connection of one SQLAlchemy transaction."""

    __slots__ = ("_combining", "_conn", "driver")

    def __init__(self, conn: AsyncConnection, driver: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn
        self.driver = driver
        self._combining: list[tuple[DirectStatement, dict[str, Any], _Deferred]] | None = None

    async def execute(self, stmt: DirectStatement, values: Mapping[str, Any]) -> int:
        """Run a statement; its row count (inside `combined()`, -1: known only at the end)."""
        return (await self.submit(stmt, values)).rowcount

    async def submit(
        self, stmt: DirectStatement, values: Mapping[str, Any], *, expect: int | None = None
    ) -> RowCount:
        """Run a statement; inside `combined()` its row count is read once the block has ended.
        `expect`: the number of rows it must change, else CheckFailed; inside `combined()`
        nothing of the block is then written."""
        params = stmt.params(values)
        if self._combining is not None:
            count = _Deferred(expect)
            self._combining.append((stmt, params, count))
            return count
        async with self._translated(stmt, params):
            cursor = await self.driver.execute(stmt.sql, params)
        if expect is not None and cursor.rowcount != expect:
            raise CheckFailed(f"{cursor.rowcount} rows changed, {expect} expected")
        return cursor

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

    async def rows(
        self, stmt: DirectStatement, values: Mapping[str, Any], *, binary: bool = False
    ) -> list[tuple[Any, ...]]:
        """A query's rows, as tuples. `binary`: in Postgres' binary format, where a `bytea` value
        is its bytes as they are instead of twice as many hex digits for the server to write
        and libpq to decode: 16 MiB of stream messages came back in 14 ms instead of 46 here."""
        params = stmt.params(values)
        async with self._translated(stmt, params):
            cursor = self.driver.cursor(binary=binary, row_factory=tuple_row)
            await cursor.execute(stmt.sql, params)
            return await cursor.fetchall()

    @contextlib.asynccontextmanager
    async def combined(self, *, commit: bool = False) -> AsyncIterator[None]:
        """INSERTs, UPDATEs and DELETEs executed inside are sent as ONE statement when the block
        ends (nothing is sent if it raises): each becomes a data-modifying WITH query of it.
        psycopg's work per statement on the event loop (a cursor, its wait and result, even in
        a pipeline) then happens once instead of per statement. Only for statements that do not
        read each other's effects: all of them see the database as the statement found it.

        `commit`: the transaction ends with it, the COMMIT in the same round trip (the
        session's own commit then finds nothing to do). Only as the transaction's last work:
        anything the session would still flush at its commit is left out of it."""
        if self._combining is not None:
            raise RuntimeError("combined() blocks do not nest")
        self._combining = []
        try:
            yield
            parts = self._combining
        finally:
            self._combining = None
        if not parts:
            return
        checked = [deferred.expect is not None for _, _, deferred in parts]
        sql = _combined([stmt for stmt, _, _ in parts], checked)
        params = {f"p{i}_{k}": v for i, (_, p, _) in enumerate(parts) for k, v in p.items()}
        params |= {f"c{i}": d.expect for i, (_, _, d) in enumerate(parts) if d.expect is not None}
        try:
            async with self._translated(None, params):
                if commit:
                    # The COMMIT queued behind the statement, both settled by the pipeline's
                    # one Sync: psycopg's commit() would sync (and wait) on its own first, a
                    # second round trip and a second wait on the loop.
                    async with self.driver.pipeline():
                        cursor = await self.driver.execute(sql, params)
                        await self.driver.execute("COMMIT", prepare=False)
                else:
                    cursor = await self.driver.execute(sql, params)
                counts = await cursor.fetchone()
        except sa_exc.DBAPIError as exc:
            if any(checked) and isinstance(exc.orig, psycopg.errors.DivisionByZero):
                raise CheckFailed("a statement changed another number of rows") from None
            raise
        assert counts is not None
        for (_, _, deferred), count in zip(parts, counts, strict=False):
            deferred.rowcount = int(count)

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
                stmt.sql if stmt is not None else "(combined statement)",
                dict(params),
                orig,
                psycopg.Error,
                hide_parameters=True,
                connection_invalidated=disconnect,
                dialect=self._conn.dialect,
            ) from orig


def combined(
    pg: Direct | None, *, commit: bool = False
) -> contextlib.AbstractAsyncContextManager[None]:
    """`pg.combined()`, or nothing to do without a driver connection (SQLite)."""
    return pg.combined(commit=commit) if pg is not None else contextlib.nullcontext()


async def direct(db: AsyncSession) -> Direct | None:
    """The driver connection of `db`'s transaction on Postgres (starting it); None elsewhere."""
    return await on(await db.connection())


def autocommit_engine(engine: AsyncEngine) -> AsyncEngine | None:
    """`engine`'s connections in autocommit, for `autocommit()`; None unless on Postgres. Made
    once: it shares the engine's pool, and SQLAlchemy restores the isolation level of each
    connection it hands back."""
    if engine.dialect.name != "postgresql":
        return None
    return engine.execution_options(isolation_level="AUTOCOMMIT")


async def on(conn: AsyncConnection) -> Direct | None:
    """The driver connection under `conn` on Postgres, as it is (this begins no transaction:
    the stream store reads on its autocommit engine's connections); None elsewhere."""
    if conn.dialect.name != "postgresql":
        return None
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert isinstance(driver, psycopg.AsyncConnection)
    return Direct(conn, driver)


@contextlib.asynccontextmanager
async def autocommit(engine: AsyncEngine) -> AsyncIterator[Direct]:
    """A driver connection of `engine` (from `autocommit_engine`): each statement run on it is
    its own transaction, so a `combined()` block lands whole or not at all by itself."""
    async with scopes.connect(engine) as conn:
        pg = await on(conn)
        assert pg is not None and pg.driver.autocommit
        yield pg
