"""Ops tests run the service in-process (simulator included) on real SQLite and Postgres.

The database is shared by every test of a run, so each test that inserts rows directly puts
them in a time slot of its own (`slot`), far in the past, and filters by it."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.sessions.conftest import AppFactory, acting_as, make_app, person, services

__all__ = ["acting_as", "make_app", "person"]

_slots = itertools.count()
SLOT_DAYS = 10


@pytest.fixture
async def api(make_app: AppFactory) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with make_app() as pair:
        yield pair


@pytest.fixture
def slot() -> datetime:
    """Midnight UTC starting SLOT_DAYS days no other test of this run writes into."""
    return datetime(2001, 1, 1, tzinfo=UTC) + timedelta(days=SLOT_DAYS * next(_slots))


def db_of(app: FastAPI) -> async_sessionmaker[AsyncSession]:
    return services(app).sessions.sessionmaker


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def assert_bad_request(response: httpx.Response, *words: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    body: dict[str, Any] = response.json()
    assert body["error"] == "bad_request" and set(body) == {"error", "detail"}
    for word in words:
        assert word in body["detail"], body
    return body


def assert_forbidden(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["error"] == "forbidden" and body["detail"]
