"""Fixtures for the Durable Streams conformance suite run (tests/conformance).

The suite itself is the public npm package `@durable-streams/server-conformance-tests`, installed
under `conformance/` by `make node` (`npm ci`). Each backend fixture yields a `DATABASE_URL` on a
fresh, empty database; the test starts `chatops serve` on it and runs vitest against it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import REPO_ROOT

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
