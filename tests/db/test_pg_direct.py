"""Core statements on Postgres' driver connection (db/pg_direct.py) behave as through SQLAlchemy:
the same rows, defaults, JSON and times; errors of SQLAlchemy's kinds with parameters hidden; a
dead connection invalidated so the pool recovers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from db import pg_direct
from db.engine import create_engine
from db.models import ChatMessage, ChatSession, Generation
from streams_service.config import Settings
from streams_service.sessions import repository as repo
from tests.db.conftest import T0, add_session
from tests.support import PG_ADMIN_URL, postgres_database

# A generation row as a send writes it (columns left out take the model's defaults).
RUNNING_G1: dict[str, Any] = dict(
    id="g1",
    session_id="s1",
    user_id="u1",
    message_id="m2",
    model="claude-sonnet-5-5",
    status="running",
    started_at=T0,
)


def _message(**values: Any) -> dict[str, Any]:
    """A message of session s1: a user's "hi" unless `values` say otherwise."""
    return {
        "session_id": "s1",
        "role": "user",
        "content": "hi",
        "parts": [],
        "created_at": T0,
    } | values


@asynccontextmanager
async def _transaction(
    maker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[tuple[AsyncSession, pg_direct.Direct]]:
    """A session transaction and its driver connection (Postgres: always there)."""
    async with maker.begin() as db:
        pg = await pg_direct.direct(db)
        assert pg is not None
        yield db, pg


async def test_a_send_reads_and_writes_what_the_session_path_does(engine: AsyncEngine) -> None:
    await add_session(engine)
    maker = async_sessionmaker(engine, expire_on_commit=False)
    parts = [{"type": "text", "content": "héllo <b>"}]
    async with maker.begin() as db:
        # Another time zone on this connection: the rows still come back in UTC.
        await db.execute(sa.text("SET TIME ZONE 'Asia/Tokyo'"))
        pg = await pg_direct.direct(db)
        assert pg is not None
        row, history = await repo.send_row_and_history(db, "s1", "c1", pg)
        assert row is not None and history == []
        assert row.earlier_message_id is None and row.active_generation_id is None
        assert row.created_at == T0 and row.created_at.utcoffset() is not None
        assert row.created_at.tzinfo == UTC
        assert await repo.claim_generation(
            db, "s1", "g1", Decimal("0.25"), T0, count_message=True, pg=pg
        )
        # Claimed already: a second claim in the same session loses.
        assert not await repo.claim_generation(db, "s1", "g2", Decimal(1), T0, pg=pg)
        async with pg_direct.combined(pg):
            await repo.insert_message(
                db,
                pg,
                session_id="s1",
                id="m1",
                ordinal=1,
                role="user",
                content="héllo <b>",
                parts=parts,
                client_message_id="c1",
                created_at=T0,
            )
            # Columns left out get the model's defaults (tokens, cost, simulated), as they
            # would through the session.
            await repo.insert_generation(db, pg, **RUNNING_G1)
    async with maker() as db:
        message = await db.get(ChatMessage, ("s1", "m1"))
        generation = await db.get(Generation, "g1")
        session = await db.get(ChatSession, "s1")
    assert message is not None and message.parts == parts and message.status == "complete"
    assert message.created_at == T0
    assert generation is not None and generation.input_tokens == 0
    assert generation.cost_usd == Decimal(0) and generation.simulated is False
    assert session is not None and session.active_generation_id == "g1"
    assert session.reserved_usd == Decimal("0.25") and session.message_count == 1

    async with _transaction(maker) as (db, pg):
        row, history = await repo.send_row_and_history(db, "s1", "c1", pg)
        assert row is not None and row.earlier_message_id == "m1"
        assert [(m.role, m.parts, m.ordinal) for m in history] == [("user", parts, 1)]
        missing, nothing = await repo.send_row_and_history(db, "nope", None, pg)
        assert missing is None and nothing == []


async def test_a_claim_in_a_combined_block_reports_whether_it_won_once_the_block_ends(
    engine: AsyncEngine,
) -> None:
    await add_session(engine)
    maker = async_sessionmaker(engine, expire_on_commit=False)
    async with _transaction(maker) as (db, pg):
        async with pg_direct.combined(pg):
            won = await repo.submit_claim(pg, "s1", "g1", Decimal("0.5"), T0, count_message=True)
            assert won.rowcount == -1  # not known until the round trip
        assert won.rowcount == 1
        async with pg_direct.combined(pg):
            lost = await repo.submit_claim(pg, "s1", "g2", Decimal(1), T0)
        assert lost.rowcount == 0
    async with maker() as db:
        session = await db.get(ChatSession, "s1")
    assert session is not None and session.active_generation_id == "g1"
    assert session.reserved_usd == Decimal("0.5") and session.message_count == 1


class _CountingDriver:
    """The driver connection, counting the statements sent through `execute`."""

    def __init__(self, driver: psycopg.AsyncConnection[Any]) -> None:
        self._driver = driver
        self.sent: list[str] = []

    async def execute(self, query: str, params: Any = None) -> Any:
        self.sent.append(query)
        return await self._driver.execute(query, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._driver, name)


async def test_combined_statements_go_out_as_one_and_report_each_row_count(
    engine: AsyncEngine,
) -> None:
    await add_session(engine)
    maker = async_sessionmaker(engine, expire_on_commit=False)
    async with _transaction(maker) as (db, pg):
        counting = _CountingDriver(pg.driver)
        pg.driver = counting  # type: ignore[assignment]
        # What a send writes: the claim, the user message (with `status`) and the generation
        # (with its own `status`): the same parameter names, kept apart.
        async with pg_direct.combined(pg):
            won = await repo.submit_claim(pg, "s1", "g1", Decimal("0.5"), T0, count_message=True)
            await repo.insert_message(db, pg, **_message(id="m1", ordinal=1, status="complete"))
            await repo.insert_generation(db, pg, **RUNNING_G1)
            assert won.rowcount == -1 and counting.sent == []  # nothing sent yet
        assert len(counting.sent) == 1 and won.rowcount == 1
        async with pg_direct.combined(pg):
            lost = await repo.submit_claim(pg, "s1", "g2", Decimal(1), T0)
            # The next ordinal is computed in the statement: the message above is visible.
            await repo.insert_message(
                db, pg, **_message(id="m2", role="assistant", content="yo", status="complete")
            )
        assert lost.rowcount == 0 and len(counting.sent) == 2
        # A block that raises sends nothing.
        with pytest.raises(RuntimeError):
            async with pg_direct.combined(pg):
                await repo.insert_message(db, pg, **_message(id="m3", ordinal=3, content="no"))
                raise RuntimeError("changed its mind")
        assert len(counting.sent) == 2
    async with maker() as db:
        session = await db.get(ChatSession, "s1")
        generation = await db.get(Generation, "g1")
        rows = (await db.execute(sa.select(ChatMessage).order_by(ChatMessage.ordinal))).scalars()
        messages = [(m.id, m.ordinal, m.status) for m in rows]
    assert session is not None and session.active_generation_id == "g1"
    assert session.reserved_usd == Decimal("0.5") and session.message_count == 1
    assert generation is not None and generation.status == "running"
    assert messages == [("m1", 1, "complete"), ("m2", 2, "complete")]


async def test_a_combined_statement_can_end_the_transaction_in_the_same_round_trip(
    engine: AsyncEngine,
) -> None:
    await add_session(engine)
    maker = async_sessionmaker(engine, expire_on_commit=False)
    async with _transaction(maker) as (db, pg):
        async with pg_direct.combined(pg, commit=True):
            await repo.settle_session(
                db, "s1", cost=Decimal("0.5"), reserved=Decimal(0), now=T0, messages=2, pg=pg
            )
        # Committed already: another connection sees it before the session's own commit.
        assert pg.driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        async with maker() as other:
            session = await other.get(ChatSession, "s1")
            assert session is not None and session.message_count == 2
    async with maker() as db:
        session = await db.get(ChatSession, "s1")
    assert session is not None and session.cost_usd == Decimal("0.5")


async def test_a_claim_that_must_win_and_loses_writes_nothing_of_its_block(
    engine: AsyncEngine,
) -> None:
    await add_session(engine)
    maker = async_sessionmaker(engine, expire_on_commit=False)
    async with _transaction(maker) as (db, pg):
        claim = await repo.submit_claim(pg, "s1", "g1", Decimal(0), T0, must_win=True)
        assert claim.rowcount == 1
    with pytest.raises(pg_direct.CheckFailed):
        async with _transaction(maker) as (db, pg), pg_direct.combined(pg, commit=True):
            await repo.submit_claim(
                pg, "s1", "g2", Decimal(1), T0, count_message=True, must_win=True
            )
            await repo.insert_message(db, pg, **_message(id="m1", ordinal=1))
    # Outside a combined block the same check follows the statement.
    with pytest.raises(pg_direct.CheckFailed):
        async with _transaction(maker) as (db, pg):
            await repo.submit_claim(pg, "s1", "g3", Decimal(1), T0, must_win=True)
    async with maker() as db:
        session = await db.get(ChatSession, "s1")
        count = (await db.execute(sa.select(sa.func.count()).select_from(ChatMessage))).scalar()
    assert session is not None and session.active_generation_id == "g1"
    assert session.message_count == 0 and session.reserved_usd == Decimal(0) and count == 0


async def test_a_combined_statement_that_fails_is_an_sqlalchemy_error_without_parameters(
    engine: AsyncEngine,
) -> None:
    await add_session(engine)
    maker = async_sessionmaker(engine)
    secret = "the user's private words"
    values = dict(
        session_id="s1", id="m1", ordinal=1, role="user", content=secret, parts=[], created_at=T0
    )
    with pytest.raises(sa_exc.IntegrityError) as caught:
        async with _transaction(maker) as (db, pg), pg_direct.combined(pg):
            await repo.insert_message(db, pg, **{**values, "id": "m0", "ordinal": 0})
            await repo.insert_message(db, pg, **values)
            await repo.insert_message(db, pg, **values)  # the same primary key
    assert isinstance(caught.value.orig, psycopg.errors.UniqueViolation)
    assert secret not in str(caught.value)
    async with maker() as db:  # neither was written
        count = (await db.execute(sa.select(sa.func.count()).select_from(ChatMessage))).scalar()
    assert count == 0


async def test_an_autocommit_combined_statement_lands_by_itself_or_not_at_all(
    engine: AsyncEngine,
) -> None:
    await add_session(engine)
    maker = async_sessionmaker(engine, expire_on_commit=False)
    auto = pg_direct.autocommit_engine(engine)
    assert auto is not None
    async with pg_direct.autocommit(auto) as pg:
        async with pg.combined():
            await repo.insert_message(None, pg, **_message(id="m1", ordinal=1))
            await repo.settle_session(
                None, "s1", cost=Decimal("0.25"), reserved=Decimal(0), now=T0, pg=pg
            )
        # No transaction is left open: another connection sees both writes at once.
        assert pg.driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        async with maker() as other:
            session = await other.get(ChatSession, "s1")
            assert session is not None and session.message_count == 1
        # A block that fails on its last write leaves nothing of its earlier ones.
        with pytest.raises(sa_exc.IntegrityError):
            async with pg.combined():
                await repo.settle_session(
                    None, "s1", cost=Decimal(1), reserved=Decimal(0), now=T0, pg=pg
                )
                await repo.insert_message(None, pg, **_message(id="m1", ordinal=2))
    async with maker() as db:
        session = await db.get(ChatSession, "s1")
        count = (await db.execute(sa.select(sa.func.count()).select_from(ChatMessage))).scalar()
    assert session is not None and session.cost_usd == Decimal("0.25") and count == 1


async def test_connections_lent_in_autocommit_go_back_to_the_pool_transactional(
    engine: AsyncEngine,
) -> None:
    await add_session(engine)
    auto = pg_direct.autocommit_engine(engine)
    assert auto is not None
    async with pg_direct.autocommit(auto) as pg:
        lent = pg.driver
    maker = async_sessionmaker(engine, expire_on_commit=False)
    # The pool's one idle connection is the one just lent: a session's writes on it are a
    # transaction again, which its rollback undoes.
    async with maker() as db:
        driver = (await (await db.connection()).get_raw_connection()).driver_connection
        assert driver is lent and not lent.autocommit
        await repo.settle_session(db, "s1", cost=Decimal(1), reserved=Decimal(0), now=T0)
        await db.rollback()
    async with maker() as db:
        session = await db.get(ChatSession, "s1")
    assert session is not None and session.cost_usd == Decimal(0)


async def test_no_autocommit_engine_or_driver_connection_off_postgres(tmp_path: Path) -> None:
    sqlite = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'chatops.db'}")
    try:
        assert pg_direct.autocommit_engine(sqlite) is None
        async with sqlite.connect() as conn:
            assert await pg_direct.on(conn) is None
    finally:
        await sqlite.dispose()


async def test_errors_are_sqlalchemy_errors_without_parameters(engine: AsyncEngine) -> None:
    await add_session(engine)
    maker = async_sessionmaker(engine)
    secret = "the user's private words"
    values = dict(
        session_id="s1", id="m1", ordinal=1, role="user", content=secret, parts=[], created_at=T0
    )
    async with _transaction(maker) as (db, pg):
        await repo.insert_message(db, pg, **values)
    with pytest.raises(sa_exc.IntegrityError) as caught:
        async with _transaction(maker) as (db, pg), pg_direct.combined(pg):
            await repo.insert_message(db, pg, **values)  # the same primary key
    assert isinstance(caught.value.orig, psycopg.errors.UniqueViolation)
    assert secret not in str(caught.value)
    # Rolled back as a whole, and the pool's connection is usable again.
    async with maker() as db:
        count = (await db.execute(sa.select(sa.func.count()).select_from(ChatMessage))).scalar()
    assert count == 1


async def test_a_dead_connection_is_invalidated_and_the_next_transaction_works(
    engine: AsyncEngine,
) -> None:
    await add_session(engine)
    maker = async_sessionmaker(engine)
    async with _transaction(maker) as (db, pg):
        backend = (await (await pg.driver.execute("SELECT pg_backend_pid()")).fetchone() or [0])[0]
    # The server ends that connection while it sits in the pool (a restart, a failover).
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
    with pytest.raises(sa_exc.OperationalError) as caught:
        async with _transaction(maker) as (db, pg):
            await repo.send_row_and_history(db, "s1", None, pg)
    assert caught.value.connection_invalidated
    async with _transaction(maker) as (db, pg):
        row, _ = await repo.send_row_and_history(db, "s1", None, pg)
    assert row is not None and row.id == "s1"


async def test_binary_rows_are_what_sqlalchemy_reads(engine: AsyncEngine) -> None:
    """`Direct.rows(binary=True)` (the stream store's reads): the same integers and bytes as
    SQLAlchemy reads, every byte value included; a failing query is SQLAlchemy's error with
    its parameters hidden, and the connection serves the next query."""
    query = sa.select(
        sa.cast(sa.bindparam("n", type_=sa.BigInteger), sa.BigInteger),
        sa.cast(sa.bindparam("data", type_=sa.LargeBinary), sa.LargeBinary),
    )
    stmt = pg_direct.DirectStatement(query)
    values = {"n": 2**40, "data": bytes(range(256)) * 300}
    async with engine.connect() as conn:
        pg = await pg_direct.on(conn)
        assert pg is not None
        expected = (await conn.execute(query, values)).one()
        binary = await pg.rows(stmt, values, binary=True)
        text = await pg.rows(stmt, values)
        assert binary == text == [(expected[0], bytes(expected[1]))]
        assert type(binary[0][1]) is bytes

        failing = pg_direct.DirectStatement(sa.select(sa.bindparam("n", type_=sa.Integer) / 0))
        with pytest.raises(sa_exc.DataError) as caught:
            await pg.rows(failing, {"n": 123456789}, binary=True)
        assert "123456789" not in str(caught.value)
    async with engine.connect() as conn:
        pg = await pg_direct.on(conn)
        assert pg is not None
        assert await pg.rows(stmt, {"n": 1, "data": b"\x00"}, binary=True) == [(1, b"\x00")]


def test_a_default_computed_at_execution_is_refused() -> None:
    table = sa.Table(
        "t",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", sa.DateTime, default=lambda: datetime.now(UTC)),
    )
    with pytest.raises(TypeError, match="computed at execution"):
        pg_direct.statement(sa.insert(table), ["id"])


async def test_default_pool_keeps_a_burst_of_connections_open() -> None:
    """Twenty connections busy at once (what 50 chatting sessions held at their peaks, and a
    storm of reconnecting SSE readers more) are kept open by a pool of the default size and
    reused by the next burst: overflow connections are closed as they come back, and a load
    above the pool's size then opens a Postgres backend per transaction. The ceiling per pool
    stays 30, the Postgres connection budget it always had."""
    burst_size = 20
    # The defaults themselves, whatever this environment sets.
    pool_size = Settings.model_fields["db_pool_size"].default
    max_overflow = Settings.model_fields["db_max_overflow"].default
    assert pool_size + max_overflow == 30
    with postgres_database("chatops_pool") as url:
        engine = create_engine(
            Settings(database_url=url).database_url,
            pool_size=pool_size,
            max_overflow=max_overflow,
        )
        opened = 0

        def count(*_: object) -> None:
            nonlocal opened
            opened += 1

        sa.event.listen(engine.sync_engine, "connect", count)
        try:

            async def burst() -> None:
                held = [await engine.connect() for _ in range(burst_size)]
                for conn in held:
                    await conn.execute(sa.text("SELECT 1"))
                for conn in held:
                    await conn.close()

            await burst()
            assert opened == burst_size
            await burst()  # the same connections: none opened (nor closed) again
            assert opened == burst_size
            pool: Any = engine.sync_engine.pool
            assert pool.checkedin() == burst_size
        finally:
            await engine.dispose()
