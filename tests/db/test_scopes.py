"""db/scopes.py: sessions and connections that end without extra turns of the event loop, on
Postgres, and clean up as SQLAlchemy's own context managers do when their block fails."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from db import pg_direct, scopes
from db.engine import create_engine
from db.models import ChatSession
from streams_service.sessions import repository as repo
from tests.db.conftest import T0, add_session


class _Turns:
    """Counts the turns of the running event loop: a callback that schedules itself again."""

    def __init__(self) -> None:
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.count += 1
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


@pytest.fixture(autouse=True)
async def _s1(engine: AsyncEngine) -> None:
    await add_session(engine)


async def _count(engine: AsyncEngine) -> int:
    async with async_sessionmaker(engine)() as db:
        session = await db.get(ChatSession, "s1")
        assert session is not None
        return session.message_count


async def _settle(db: object, pg: pg_direct.Direct | None) -> None:
    await repo.settle_session(
        None, "s1", cost=Decimal(1), reserved=Decimal(0), now=T0, messages=1, pg=pg
    )


async def test_a_transaction_committed_by_its_block_ends_in_the_same_turn(
    engine: AsyncEngine,
) -> None:
    maker = async_sessionmaker(engine, expire_on_commit=False)
    turns = _Turns()
    try:
        async with scopes.begin(maker) as db:
            pg = await pg_direct.direct(db)
            assert pg is not None
            async with pg.combined(commit=True):
                await _settle(db, pg)
            before = turns.count
        assert turns.count == before  # the exit did not wait for the loop
    finally:
        turns.stop()
    assert await _count(engine) == 1
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_transaction_the_session_commits_lands(engine: AsyncEngine) -> None:
    maker = async_sessionmaker(engine, expire_on_commit=False)
    async with scopes.begin(maker) as db:
        await db.execute(
            sa.update(ChatSession).where(ChatSession.id == "s1").values(message_count=5)
        )
    assert await _count(engine) == 5
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_block_that_raises_rolls_back_and_returns_its_connection(
    engine: AsyncEngine,
) -> None:
    maker = async_sessionmaker(engine, expire_on_commit=False)
    with pytest.raises(LookupError):
        async with scopes.begin(maker) as db:
            await db.execute(
                sa.update(ChatSession).where(ChatSession.id == "s1").values(message_count=7)
            )
            raise LookupError("the block failed")
    assert await _count(engine) == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_an_autocommit_connection_ends_in_the_same_turn(engine: AsyncEngine) -> None:
    auto = pg_direct.autocommit_engine(engine)
    assert auto is not None
    turns = _Turns()
    try:
        async with pg_direct.autocommit(auto) as pg:
            async with pg.combined():
                await _settle(None, pg)
            before = turns.count
        assert turns.count == before
    finally:
        turns.stop()
    assert await _count(engine) == 1
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_connection_whose_block_raises_is_returned(engine: AsyncEngine) -> None:
    read = create_engine(str(engine.url.render_as_string(hide_password=False)), read_only=True)
    try:
        with pytest.raises(LookupError):
            async with scopes.connect(read) as conn:
                assert (await conn.execute(sa.text("SELECT 1"))).scalar_one() == 1
                raise LookupError("the block failed")
        assert read.pool.checkedout() == 0  # type: ignore[attr-defined]
        turns = _Turns()
        try:
            async with scopes.connect(read) as conn:
                assert (await conn.execute(sa.text("SELECT 2"))).scalar_one() == 2
                before = turns.count
            assert turns.count == before
        finally:
            turns.stop()
        assert read.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await read.dispose()
