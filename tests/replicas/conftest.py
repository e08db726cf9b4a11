"""The in-process app factory of the session tests (real SQLite and Postgres, the simulator)."""

from tests.sessions.conftest import make_app

__all__ = ["make_app"]
