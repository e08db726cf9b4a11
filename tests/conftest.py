"""Suite-wide fixtures: the service in-process on real SQLite and Postgres databases.

Databases are created and migrated once per session; tests isolate themselves by using fresh
stream paths. Tests that need real processes (crash, cross-process) use tests/support.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from db.migrate import upgrade
from streams_service.app import create_app
from streams_service.config import Settings
from tests.support import migrate, postgres_database


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        path: Path = tmp_path_factory.mktemp("sqlite") / "chatops.db"
        url = f"sqlite:///{path}"
        upgrade(Settings(database_url=url).database_url)
        yield url
        return
    with postgres_database() as url:
        upgrade(Settings(database_url=url).database_url)
        yield url


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        streams_long_poll_timeout_ms=2000,
        streams_sweep_interval_s=3600,
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture
def stream_url() -> str:
    return f"/v1/stream/test-{uuid.uuid4().hex}"


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new, empty database for tests that start real server processes. SQLite is a file the
    server migrates at start; Postgres is migrated with `chatops db upgrade` first, as a deploy
    does, and dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    with postgres_database("chatops_fresh") as url:
        migrate(url)
        yield url
