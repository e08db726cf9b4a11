"""Engines for Postgres (psycopg 3) and SQLite (aiosqlite), one schema for both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db.errors import DatabaseURLError as DatabaseURLError


def normalize_database_url(raw: str) -> str:
    """Accept the URL forms people paste and return the SQLAlchemy async form.

    postgres://, postgresql:// and postgresql+psycopg2:// all become postgresql+psycopg://;
    sqlite:// becomes sqlite+aiosqlite://.
    """
    raw = raw.strip()
    if not raw:
        raise DatabaseURLError("DATABASE_URL is empty")
    try:
        url = make_url(raw)
    except Exception as exc:
        raise DatabaseURLError(f"DATABASE_URL is not a valid URL: {exc}") from None
    backend = url.get_backend_name()
    if backend in ("postgres", "postgresql"):
        url = url.set(drivername="postgresql+psycopg")
    elif backend == "sqlite":
        url = url.set(drivername="sqlite+aiosqlite")
    else:
        raise DatabaseURLError(f"unsupported database {backend!r}; use sqlite:// or postgresql://")
    return url.render_as_string(hide_password=False)


def sync_url(async_url: str) -> URL:
    """The blocking-driver twin of an async URL (Alembic runs synchronously)."""
    url = make_url(async_url)
    if url.get_backend_name() == "sqlite":
        return url.set(drivername="sqlite")
    return url.set(drivername="postgresql+psycopg")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers run beside the single writer; synchronous=FULL makes every commit durable
    # (acknowledged means durable); busy_timeout rides out the writer's short locks.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def ensure_sqlite_directory(url: URL) -> None:
    """Create the folder a SQLite file lives in: SQLite creates the file but not its folder
    (the default `./.data/chatops.db` from a fresh directory)."""
    database = url.database or ""
    if url.get_backend_name() == "sqlite" and database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def _prepare_sqlite(url: URL, sync_engine: Engine, begin_sql: str | None) -> None:
    ensure_sqlite_directory(url)
    event.listen(sync_engine, "connect", _sqlite_pragmas)

    @event.listens_for(sync_engine, "connect")
    def _no_implicit_tx(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit transactions are off).
        dbapi_conn.isolation_level = None

    if begin_sql is None:
        return  # autocommit: each statement is its own transaction

    @event.listens_for(sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql(begin_sql)


def create_engine(
    url: str, *, pool_size: int = 10, max_overflow: int = 20, read_only: bool = False
) -> AsyncEngine:
    """An async engine for request handlers (the stream writer has its own).

    `read_only=True` is for the stream read path: statements run in autocommit, with no
    BEGIN/ROLLBACK round trips around them (a read needs no transaction: everything it reads
    is committed and append-only). Otherwise transactions are real; on SQLite they start with
    BEGIN IMMEDIATE, so a read-then-write never fails on a lock upgrade.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_async_engine(url, pool_size=pool_size, max_overflow=max_overflow)
        _prepare_sqlite(parsed, engine.sync_engine, None if read_only else "BEGIN IMMEDIATE")
        return engine
    # No pre-ping: it costs a round trip per transaction (a send and a generation's finish run
    # one each; ~0.5 ms of event-loop CPU apiece). A connection that died with its server (a
    # restart, a failover) fails its statement instead, which answers 503 with Retry-After;
    # SQLAlchemy then invalidates every connection of the pool opened before it, so the
    # requests after it get fresh ones.
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_recycle=1800,
        **({"isolation_level": "AUTOCOMMIT"} if read_only else {}),
    )


def create_writer_engine(url: str) -> Engine:
    """The blocking engine of the stream writer thread: one connection, write transactions only.

    On SQLite, transactions start with BEGIN IMMEDIATE so a read-then-write transaction never
    fails on a lock upgrade.
    """
    sync = sync_url(url)
    if sync.get_backend_name() == "sqlite":
        engine = create_sync_engine(sync, pool_size=1, max_overflow=0)
        _prepare_sqlite(sync, engine, "BEGIN IMMEDIATE")
        return engine
    # No pre-ping: it would cost a round trip per transaction on the hot path; a dead
    # connection fails its batch (503) and is replaced.
    return create_sync_engine(sync, pool_size=1, max_overflow=1, pool_recycle=1800)
