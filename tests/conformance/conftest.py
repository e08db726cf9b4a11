"""Fixtures for the Durable Streams conformance suite run (tests/conformance).

The suite itself is the public npm package `@durable-streams/server-conformance-tests`, installed
under `conformance/` by `make node` (`npm ci`). Each backend fixture yields a `DATABASE_URL` on a
fresh, empty database; the test starts `chatops serve` on it and runs vitest against it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, migrate, postgres_database

CONFORMANCE_DIR = REPO_ROOT / "conformance"
VITEST_ENTRY = CONFORMANCE_DIR / "node_modules" / "vitest" / "vitest.mjs"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "conformance: runs the public Durable Streams conformance suite (node + vitest) "
        "against a real server process",
    )


@pytest.fixture(scope="session")
def conformance_installed() -> Path:
    """The conformance/ directory, with its node_modules installed (`make node`)."""
    if not VITEST_ENTRY.exists():
        pytest.fail(
            f"{VITEST_ENTRY} is missing: install the conformance suite with `make node` "
            "(cd conformance && npm ci)",
            pytrace=False,
        )
    return CONFORMANCE_DIR


@pytest.fixture(params=["sqlite", "postgres"])
def conformance_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """DATABASE_URL of a fresh database; Postgres ones are migrated and dropped afterwards.

    SQLite databases are migrated by the server at start.
    """
    if request.param == "sqlite":
        # tmp_path is absolute, so this is sqlite:////abs/path/conformance.db
        yield f"sqlite:///{tmp_path / 'conformance.db'}"
        return
    with postgres_database("chatops_conf") as url:
        migrate(url)
        yield url
