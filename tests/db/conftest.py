"""A migrated Postgres database of its own per test, and a chat session row in it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from db.engine import create_engine
from db.migrate import upgrade
from db.models import ChatSession
from streams_service.config import Settings
from tests.support import postgres_database

T0 = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
async def engine() -> AsyncIterator[AsyncEngine]:
    with postgres_database("chatops_db") as url:
        database_url = Settings(database_url=url).database_url
        upgrade(database_url)
        engine = create_engine(database_url)
        try:
            yield engine
        finally:
            await engine.dispose()


async def add_session(engine: AsyncEngine, sid: str = "s1") -> None:
    """Session `sid` of user u1: no messages, nothing spent or reserved."""
    async with async_sessionmaker(engine).begin() as db:
        db.add(
            ChatSession(
                id=sid,
                user_id="u1",
                title=None,
                model="claude-sonnet-5-5",
                message_count=0,
                cost_usd=Decimal(0),
                reserved_usd=Decimal(0),
                created_at=T0,
                updated_at=T0,
            )
        )
