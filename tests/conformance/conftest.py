"""Fixtures for the Durable Streams conformance suite run (tests/conformance).

The suite itself is the public npm package `@durable-streams/server-conformance-tests`, installed
under `conformance/` by `make node` (`npm ci`). Each backend fixture yields a `DATABASE_URL` on a
fresh, empty database; the test starts `chatops serve` on it and runs vitest against it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE_DIR = REPO_ROOT / "conformance"
VITEST_ENTRY = CONFORMANCE_DIR / "node_modules" / "vitest" / "vitest.mjs"

# Maintenance database used to create and drop the per-run databases.
PG_ADMIN_URL = os.environ.get(
    "CONFORMANCE_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "conformance: runs the public Durable Streams conformance suite (node + vitest) "
        "against a real server process",
    )


def _chatops_bin() -> Path:
    """The `chatops` console script of the project's virtualenv."""
    candidates = [
        REPO_ROOT / ".venv" / "bin" / "chatops",
        Path(sys.executable).parent / "chatops",
    ]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    pytest.fail(
        f"chatops console script not found (looked at {[str(c) for c in candidates]})",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def chatops_executable() -> Path:
    """Path of the project's `chatops` console script."""
    return _chatops_bin()


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


@contextmanager
def _postgres_database() -> Iterator[str]:
    """Creates an empty database on the local server and drops it (forcibly) afterwards."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict

    name = f"chatops_conf_{secrets.token_hex(6)}"
    admin = conninfo_to_dict(PG_ADMIN_URL)
    try:
        conn = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}", pytrace=False)
    with conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            user = admin.get("user", "postgres")
            host = admin.get("host", "127.0.0.1")
            port = admin.get("port", "5432")
            yield f"postgresql://{user}@{host}:{port}/{name}"
        finally:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def _migrate(database_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": database_url}
    result = subprocess.run(
        [str(_chatops_bin()), "db", "upgrade"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(
            f"`chatops db upgrade` failed (exit {result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}",
            pytrace=False,
        )


@pytest.fixture(params=["sqlite", "postgres"])
def conformance_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """DATABASE_URL of a fresh database; Postgres ones are migrated and dropped afterwards.

    SQLite databases are migrated by the server at start.
    """
    if request.param == "sqlite":
        # tmp_path is absolute, so this is sqlite:////abs/path/conformance.db
        yield f"sqlite:///{tmp_path / 'conformance.db'}"
        return
    with _postgres_database() as url:
        _migrate(url)
        yield url
