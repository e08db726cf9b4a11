"""An auth-enabled service (STREAMS_SECRET set) in-process, with one person per role."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from streams_service.access import users
from streams_service.access.tokens import mint_jwt
from streams_service.app import Services, create_app
from streams_service.config import Settings
from tests.sessions.conftest import FAST

SECRET = "test-secret-" + "x" * 40


@dataclass
class People:
    """Bearer credentials by who holds them."""

    owner: str  # a member, signed in through the console (JWT)
    owner_id: str
    other: str  # another member (API token)
    other_id: str
    ops: str
    admin: str
    admin_id: str
    system: str
    expired_jwt: str
    revoked: str
    bad: str = "cho_not-a-real-token"


def bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


AuthApp = Callable[..., AbstractAsyncContextManager[tuple[FastAPI, httpx.AsyncClient, People]]]


def services(app: FastAPI) -> Services:
    result: Services = app.state.services
    return result


async def make_people(maker: async_sessionmaker[AsyncSession]) -> People:
    tag = uuid.uuid4().hex[:8]
    async with maker.begin() as db:
        owner = await users.create_user(db, f"owner-{tag}@example.com")
        other = await users.create_user(db, f"other-{tag}@example.com")
        ops = await users.create_user(db, f"ops-{tag}@example.com", role="ops")
        admin = await users.create_user(db, f"admin-{tag}@example.com", role="admin")
        other_token = (await users.issue_token(db, other)).token
        ops_token = (await users.issue_token(db, ops)).token
        admin_token = (await users.issue_token(db, admin)).token
        revoked = await users.issue_token(db, other)
        revoked.row.revoked_at = datetime.now(UTC)
    return People(
        owner=mint_jwt(SECRET, owner.email),
        owner_id=owner.id,
        other=other_token,
        other_id=other.id,
        ops=ops_token,
        admin=admin_token,
        admin_id=admin.id,
        system=SECRET,
        expired_jwt=mint_jwt(SECRET, owner.email, now=datetime.now(UTC) - timedelta(minutes=30)),
        revoked=revoked.token,
    )


@pytest.fixture
def auth_app(database_url: str) -> AuthApp:
    @asynccontextmanager
    async def factory(
        **overrides: Any,
    ) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, People]]:
        settings = Settings(
            database_url=database_url,
            streams_secret=SECRET,
            **{**FAST, "rate_limit_auth_failures": "100000/minute", **overrides},
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            people = await make_people(services(app).sessions.sessionmaker)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                yield app, client, people

    return factory
